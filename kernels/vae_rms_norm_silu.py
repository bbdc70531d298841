"""The Wan VAE's RMS_norm (+ SiLU), fused with the adds before it, in channels-last layout.

Inputs are video activations [B, C, T, H, W] stored channels-last (`torch.channels_last_3d`: C is the
innermost, contiguous dim and the T*H*W positions follow each other with a stride of C), bf16 or fp32;
`gamma` [C] (the stock (C, 1, 1, 1) parameter flattened), `bias` [C] or None:

    s = x + x_bias + residual             (x_bias [C]: the bias of the convolution that made x, which
                                           the decoder leaves out of the convolution; both optional)
    y = s / max(||s||_2 over C, 1e-12) * scale * gamma + bias      (the stock F.normalize(s, dim=1) ...)
    y = silu(y)                           (optional: the decoder's norms are followed by SiLU except
                                           the attention block's)

`y` goes to `out` and, when given, `s` to `sum_out`. Both may be views into larger channels-last
buffers (e.g. the frames after the two cached frames of a causal convolution's time-padded input), so
the decoder writes the next convolution's input in place, with no concatenation or padding copy.
The stock code spends about ten passes over the activation on this (the conv's bias add; the residual
add; normalize's norm and division; the scale and gamma products; SiLU), with bf16 rounding after
each; here it is one read of each input and one write of each output, with the math in fp32 and one
rounding at the end. `vae_add` is the same kernel without the norm: out = x + x_bias + residual.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_bf16, check_kernel_device, check_tensor, interpreting

_DTYPES = (torch.bfloat16, torch.float32)
_EPS = 1e-12  # F.normalize's default eps


# C stays specialised (a multiple of 16 lets the compiler vectorise each position's channel row);
# R, the number of positions, changes with every frame count and is not.
@triton.jit(do_not_specialize=["R"])
def _vae_rms_norm_silu_kernel(x_ptr, xb_ptr, r_ptr, g_ptr, b_ptr, o_ptr, s_ptr,
                              sxb, srb, sob, ssb, R, C, scale, eps,
                              HAS_XBIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                              HAS_SUM: tl.constexpr, NORM: tl.constexpr, SILU: tl.constexpr,
                              OUT_BF16: tl.constexpr, INTERPRET: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r64 = rows.to(tl.int64)[:, None] * C  # positions are C apart in channels-last
    cols = tl.arange(0, BLOCK_C)[None, :]
    cmask = cols < C
    mask = (rows < R)[:, None] & cmask
    s = tl.load(x_ptr + b * sxb + r64 + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_XBIAS:
        s += tl.load(xb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(r_ptr + b * srb + r64 + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SUM:
        if OUT_BF16:
            tl.store(s_ptr + b * ssb + r64 + cols, cast_bf16(s, INTERPRET), mask=mask)
        else:
            tl.store(s_ptr + b * ssb + r64 + cols, s, mask=mask)
    if NORM:
        inv = scale / tl.maximum(tl.sqrt(tl.sum(s * s, 1)), eps)
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = s * inv[:, None] * g
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if SILU:
            y = y * tl.sigmoid(y)
        if OUT_BF16:
            tl.store(o_ptr + b * sob + r64 + cols, cast_bf16(y, INTERPRET), mask=mask)
        else:
            tl.store(o_ptr + b * sob + r64 + cols, y, mask=mask)


def _check_inputs(x, x_bias, residual, out, sum_out) -> torch.Tensor | None:
    """x, and the other videos (channels-last, x's shape, dtype and device) and x_bias that are given;
    returns x_bias as a [C] vector."""
    check_tensor("x", x, dtype=_DTYPES, shape=("B", "C", "T", "H", "W"), layout="channels_last_3d")
    check_kernel_device("the VAE norm/add kernel", x.device)
    for name, t in (("residual", residual), ("out", out), ("sum_out", sum_out)):
        if t is not None:
            check_tensor(name, t, dtype=x.dtype, shape=tuple(x.shape), device=x.device, layout="channels_last_3d")
    return None if x_bias is None else _check_param("x_bias", x_bias, x)


def _check_param(name: str, t, x: torch.Tensor) -> torch.Tensor:
    """A per-channel parameter, [C] or the stock [C, 1, 1, 1]; returns the [C] view."""
    if isinstance(t, torch.Tensor) and t.dim() > 1 and all(d == 1 for d in t.shape[1:]):
        t = t.reshape(t.shape[0])
    check_tensor(name, t, dtype=_DTYPES, shape=(x.shape[1],), device=x.device)
    return t


def vae_rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None = None, *,
                      x_bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, silu: bool = True,
                      scale: float | None = None, out: torch.Tensor | None = None,
                      sum_out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(RMS_norm(x + x_bias + residual)) for channels-last [B, C, T, H, W]; see the module docstring.

    scale defaults to sqrt(C) (the stock RMS_norm's). Returns `out` (allocated channels-last if None).
    """
    xb = _check_inputs(x, x_bias, residual, out, sum_out)
    g = _check_param("gamma", gamma, x)
    bvec = None if bias is None else _check_param("bias", bias, x)

    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last_3d)
    _launch(x, xb, residual, out, sum_out, g, bvec, norm=True, silu=silu,
            scale=float(x.shape[1]) ** 0.5 if scale is None else float(scale))
    return out


def vae_add(x: torch.Tensor, x_bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, *,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """out = x + x_bias + residual (rounded once) for channels-last [B, C, T, H, W]; out may be a view
    into a larger channels-last buffer. Returns `out` (allocated channels-last if None)."""
    xb = _check_inputs(x, x_bias, residual, out, None)

    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last_3d)
    _launch(x, xb, residual, None, out, None, None, norm=False, silu=False, scale=1.0)
    return out


def _launch(x, xb, residual, out, sum_out, g, bvec, *, norm: bool, silu: bool, scale: float) -> None:
    """Launch the kernel on checked tensors (out is None in vae_add: the sum is the output)."""
    B, C, T, H, W = x.shape
    R = T * H * W
    if B == 0 or R == 0 or C == 0:
        return
    block_c = triton.next_power_of_2(C)
    # About 4K elements per program: rows of a few hundred channels are too short to fill one alone.
    # The CPU interpreter runs programs one after another in Python, so there it takes big tiles.
    block_r = max(1, min(64, 4096 // block_c)) if not interpreting() else max(1, 8192 // block_c)
    grid = (triton.cdiv(R, block_r), B)
    o = sum_out if out is None else out  # a pointer the kernel never writes in add mode
    s_out = o if sum_out is None else sum_out
    r = x if residual is None else residual
    _vae_rms_norm_silu_kernel[grid](
        x, x if xb is None else xb, r, x if g is None else g, x if bvec is None else bvec, o, s_out,
        x.stride(0), r.stride(0), o.stride(0), s_out.stride(0), R, C, scale, _EPS,
        HAS_XBIAS=xb is not None, HAS_RES=residual is not None, HAS_BIAS=bvec is not None,
        HAS_SUM=sum_out is not None, NORM=norm, SILU=silu, OUT_BF16=x.dtype == torch.bfloat16,
        INTERPRET=interpreting(), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)


def vae_rms_norm_silu_ref(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None = None, *,
                          x_bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                          silu: bool = True, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock ops, literally: (conv bias add, residual add), RMS_norm.forward, nn.SiLU. Returns (y, s)."""
    c = x.shape[1]
    s = vae_add_ref(x, x_bias, residual)
    shape = (c, 1, 1, 1)
    y = torch.nn.functional.normalize(s, dim=1) * (float(c) ** 0.5 if scale is None else scale) * gamma.reshape(shape)
    y = y + (0.0 if bias is None else bias.reshape(shape))
    return (torch.nn.functional.silu(y) if silu else y), s


def vae_add_ref(x: torch.Tensor, x_bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """The stock order: the convolution's bias add (its own pass in torch), then the residual add."""
    s = x if x_bias is None else x + x_bias.reshape(x.shape[1], 1, 1, 1)
    return s if residual is None else s + residual


def vae_rms_norm_silu_bytes(numel: int, element_size: int, *, residual: bool, sum_out: bool) -> float:
    """Fewest bytes moved: each input read once, each output written once."""
    return float(numel * element_size * (2 + int(residual) + int(sum_out)))
