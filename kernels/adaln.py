"""Fused residual + LayerNorm + adaLN modulation: the glue between the big ops of a LongLive block.

One pass per token row computes, in this order and each step optional,

    x_new = x + y * gate        (the gated residual; `gate` None: x + y; `y` None: x_new = x)
    h     = LN(x_new)           (no affine, or affine with weight/bias; eps)
    h     = h * (1 + scale) + shift

and writes x_new (when a residual was added) and h. The stock block runs these as 3-6 separate
torch ops per step, each a full read and write of the [B, L, C] activation; here it is one read of
x (and y) and one write of each output.

Shapes and dtypes: x, y [B, L, C] bf16 (last dim contiguous); gate, shift, scale [B, F, C] bf16
(any strides, e.g. chunks of the stock [B, F, 6, C] modulation) where the L tokens are F frames of
L/F tokens, token t belonging to frame t // (L/F); weight, bias [C] bf16. eps float.

With fp8=True the LayerNorm branch's output h is handed to the next GEMM already quantized: instead
of h in bf16 the kernel writes q = h / scale in float8_e4m3fn and one fp32 scale per token
(amax |h| / 448 over the row, which one program holds whole), the per-token rule of
kernels/fp8_quant.quantize_rowwise applied to the bf16-rounded h, so no quantization pass reads h
again. The result is an Fp8Activation(q [B, L, C], scale [B, L]) that kernels/fp8_gemm consumes.

Rounding follows the stock bf16 path exactly: y * gate, the residual sum, the LayerNorm output
(fp32 statistics, one rounding after the affine), 1 + scale, the product and the final sum are each
rounded to bf16, as torch's bf16 ops round them. Only the LayerNorm's fp32 reduction order differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_kernel_device, check_tensor, interpreting, round_bf16, row_warps, rows_per_program
from .fp8_quant import FP8_DTYPE, FP8_MAX, Fp8Activation, _cast_fp8, quantize_rowwise_ref


@triton.jit(do_not_specialize=["L", "C", "tokens_per_frame"])
def _adaln_kernel(
    x_ptr, y_ptr, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, xo_ptr, h_ptr, hs_ptr,
    stride_xb, stride_xl, stride_yb, stride_yl,
    stride_gb, stride_gf, stride_sb, stride_sf, stride_cb, stride_cf,
    stride_xob, stride_xol, stride_hb, stride_hl, stride_hsb,
    L, C, tokens_per_frame, eps,
    HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, HAS_LN: tl.constexpr, AFFINE: tl.constexpr,
    MODULATE: tl.constexpr, FP8_OUT: tl.constexpr, FP8_MAX: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.program_id(1).to(tl.int64)
    frame = (rows // tokens_per_frame)[:, None]
    r = rows.to(tl.int64)[:, None]
    offs = tl.arange(0, BLOCK_C)[None, :]
    cmask = offs < C
    mask = (rows < L)[:, None] & cmask
    x = tl.load(x_ptr + b * stride_xb + r * stride_xl + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + b * stride_yb + r * stride_yl + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            g = tl.load(gate_ptr + b * stride_gb + frame * stride_gf + offs, mask=mask, other=0.0).to(tl.float32)
            y = round_bf16(y * g)
        x = round_bf16(x + y)
        tl.store(xo_ptr + b * stride_xob + r * stride_xol + offs, x.to(tl.bfloat16), mask=mask)
    if HAS_LN:
        mean = tl.sum(x, 1) / C
        diff = tl.where(cmask, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(diff * diff, 1) / C + eps)
        h = diff * rstd[:, None]
        if AFFINE:
            w = tl.load(w_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
            bias = tl.load(b_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
            h = h * w + bias
        h = round_bf16(h)
        if MODULATE:
            sc = tl.load(scale_ptr + b * stride_cb + frame * stride_cf + offs, mask=mask, other=0.0).to(tl.float32)
            sh = tl.load(shift_ptr + b * stride_sb + frame * stride_sf + offs, mask=mask, other=0.0).to(tl.float32)
            h = round_bf16(round_bf16(h * round_bf16(1.0 + sc)) + sh)
        if FP8_OUT:
            # Masked columns hold 0 here. div_rn: IEEE rounding, as torch divides.
            amax = tl.max(tl.abs(h), 1)
            hscale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, FP8_MAX))
            q = tl.minimum(tl.maximum(h * tl.math.div_rn(1.0, hscale)[:, None], -FP8_MAX), FP8_MAX)
            tl.store(h_ptr + b * stride_hb + r * stride_hl + offs, _cast_fp8(q, INTERPRET), mask=mask)
            tl.store(hs_ptr + b * stride_hsb + rows, hscale, mask=rows < L)
        else:
            tl.store(h_ptr + b * stride_hb + r * stride_hl + offs, h.to(tl.bfloat16), mask=mask)


def _per_frame(name: str, t: torch.Tensor, B: int, C: int, device) -> tuple[torch.Tensor, int]:
    """Accept [B, F, C] or the stock [B, F, 1, C] chunk; returns the 3-D view and F."""
    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2] == 1:
        t = t.squeeze(2)
    check_tensor(name, t, dtype=torch.bfloat16, shape=(B, "F", C), device=device)
    return t, t.shape[1]


def _check_operands(x, y, gate, norm, weight, bias, shift, scale) -> tuple[dict, int]:
    """The per-frame [B, F, C] views of gate/shift/scale that are given, and F."""
    B, L, C = x.shape
    device = x.device
    if y is not None:
        check_tensor("y", y, dtype=torch.bfloat16, shape=(B, L, C), device=device)
    if gate is not None and y is None:
        raise ValueError("gate needs y: the gate multiplies the residual branch")
    if (weight is None) != (bias is None):
        raise ValueError("pass both LayerNorm weight and bias, or neither")
    if (shift is None) != (scale is None):
        raise ValueError("pass both shift and scale, or neither")
    if not norm and (weight is not None or shift is not None):
        raise ValueError("weight/bias and shift/scale apply to the LayerNorm output; norm=False has none")
    if y is None and not norm:
        raise ValueError("nothing to compute: give y (a residual) or norm=True")
    frames = set()
    per_frame = {}
    for name, t in (("gate", gate), ("shift", shift), ("scale", scale)):
        if t is not None:
            per_frame[name], f = _per_frame(name, t, B, C, device)
            frames.add(f)
    if len(frames) > 1:
        raise ValueError(f"gate/shift/scale disagree on the number of frames: {sorted(frames)}")
    num_frames = frames.pop() if frames else 1
    if L % num_frames:
        raise ValueError(f"{L} tokens do not split into {num_frames} frames")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, dtype=torch.bfloat16, shape=(C,), device=device)
    return per_frame, num_frames


def adaln(x: torch.Tensor, *, y: torch.Tensor | None = None, gate: torch.Tensor | None = None,
          norm: bool = True, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
          shift: torch.Tensor | None = None, scale: torch.Tensor | None = None, eps: float = 1e-6,
          out_x: torch.Tensor | None = None, out_h: torch.Tensor | Fp8Activation | None = None,
          fp8: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | Fp8Activation | None]:
    """(x_new, h) per the module docstring: x_new is None without y, h is None without norm.

    fp8: h comes back as an Fp8Activation (q [B, L, C] float8_e4m3fn, scale [B, L] fp32).
    out_x / out_h: optional preallocated outputs (out_x may be x itself: each row is read before
    it is written, by the same program); with fp8, out_h is an Fp8Activation of contiguous tensors.
    """
    check_tensor("x", x, dtype=torch.bfloat16, shape=("B", "L", "C"))
    B, L, C = x.shape
    device = x.device
    check_kernel_device("adaln", device)
    per_frame, num_frames = _check_operands(x, y, gate, norm, weight, bias, shift, scale)
    _check_outputs(out_x, out_h, y, norm, fp8, B, L, C, device)
    x_new = (torch.empty_like(x) if out_x is None else out_x) if y is not None else None
    h = h_scale = None
    if fp8 and out_h is None:
        out_h = Fp8Activation(torch.empty((B, L, C), dtype=FP8_DTYPE, device=device),
                              torch.empty((B, L), dtype=torch.float32, device=device))
    if fp8:
        h, h_scale = out_h
    elif norm:
        h = torch.empty_like(x) if out_h is None else out_h
    result_h = Fp8Activation(h, h_scale) if fp8 else h
    if B == 0 or L == 0:
        return x_new, result_h
    dummy = x
    g = per_frame.get("gate", dummy if gate is None else gate)
    sh = per_frame.get("shift", dummy)
    sc = per_frame.get("scale", dummy)
    yy, xo, hh = (y if y is not None else dummy), (x_new if x_new is not None else dummy), (h if h is not None else dummy)
    hs = h_scale if fp8 else dummy
    block_c = triton.next_power_of_2(C)
    block_r = rows_per_program(block_c)
    _adaln_kernel[(triton.cdiv(L, block_r), B)](
        x, yy, g, weight if weight is not None else dummy, bias if bias is not None else dummy, sh, sc, xo, hh, hs,
        x.stride(0), x.stride(1), yy.stride(0), yy.stride(1),
        g.stride(0), g.stride(1), sh.stride(0), sh.stride(1), sc.stride(0), sc.stride(1),
        xo.stride(0), xo.stride(1), hh.stride(0), hh.stride(1), hs.stride(0),
        L, C, L // num_frames, eps,
        HAS_Y=y is not None, HAS_GATE=gate is not None, HAS_LN=norm, AFFINE=weight is not None,
        MODULATE=shift is not None, FP8_OUT=bool(fp8), FP8_MAX=FP8_MAX, INTERPRET=interpreting(),
        BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=row_warps(block_c),
    )
    return x_new, result_h


def _check_outputs(out_x, out_h, y, norm: bool, fp8: bool, B: int, L: int, C: int, device) -> None:
    """The preallocated outputs that are given: out_x [B, L, C] bf16; out_h [B, L, C] bf16, or with fp8
    an Fp8Activation of contiguous (q [B, L, C] fp8, scale [B, L] fp32)."""
    if out_x is not None:
        check_tensor("out_x", out_x, dtype=torch.bfloat16, shape=(B, L, C), device=device)
    if out_x is not None and y is None:
        raise ValueError("out_x needs y: without a residual there is no x_new")
    if out_h is not None and not norm:
        raise ValueError("out_h needs norm=True")
    if fp8 and not norm:
        raise ValueError("fp8 quantizes the LayerNorm output h; norm=False has none")
    if out_h is None:
        return
    if not fp8:
        check_tensor("out_h", out_h, dtype=torch.bfloat16, shape=(B, L, C), device=device)
        return
    if not isinstance(out_h, Fp8Activation):
        raise TypeError(f"with fp8=True, out_h must be an Fp8Activation, got {type(out_h).__name__}")
    check_tensor("out_h.q", out_h.q, dtype=FP8_DTYPE, shape=(B, L, C), device=device, layout="contiguous")
    check_tensor("out_h.scale", out_h.scale, dtype=torch.float32, shape=(B, L), device=device, layout="contiguous")


def adaln_ref(x, *, y=None, gate=None, norm=True, weight=None, bias=None, shift=None, scale=None, eps=1e-6,
              fp8=False):
    """The stock bf16 torch ops, in the stock order (CausalWanAttentionBlock.forward); with fp8, h
    quantized per token by the torch quantizer (an Fp8Activation)."""
    B, L, C = x.shape

    def frames(t):
        return t.reshape(B, t.shape[1], 1, C) if t.dim() == 3 else t

    def per_frame(t, f):
        return t.unflatten(1, (f.shape[1], L // f.shape[1]))

    x_new = None
    if y is not None:
        if gate is not None:
            g = frames(gate)
            y = (per_frame(y, g) * g).flatten(1, 2)
        x = x_new = x + y
    h = None
    if norm:
        h = F.layer_norm(x, (C,), weight, bias, eps)
        if shift is not None:
            sc, sh = frames(scale), frames(shift)
            h = (per_frame(h, sc) * (1 + sc) + sh).flatten(1, 2)
    if fp8:
        h = Fp8Activation(*quantize_rowwise_ref(h))
    return x_new, h


def adaln_bytes(batch: int, tokens: int, dim: int, *, residual: bool, norm: bool, fp8: bool = False) -> float:
    """Fewest bytes one call moves: x (and y) read, x_new written, bf16; h written in bf16, or in
    fp8 with one fp32 scale per token."""
    rows = batch * tokens
    h = (rows * dim + 4.0 * rows if fp8 else 2.0 * rows * dim) if norm else 0.0
    return 2.0 * rows * dim * (1 + (2 if residual else 0)) + h
