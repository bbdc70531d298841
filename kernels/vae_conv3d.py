"""The Wan VAE's 3x3x3 causal convolution as an implicit GEMM over its time-padded channels-last input.

x [B, C_in, 2 + T, H, W] is a causal convolution's input buffer as the fast decoder keeps it
(patches/vae_decoder.py): channels-last 3-D (`torch.channels_last_3d`), the two frames in front
being the causal cache, so no padding in time is needed; H and W are zero-padded by one here (by
masks). The output out [B, C_out, T, H, W] (channels-last) is

    out[b, o, t, h, w] = bias[o] + sum_{kt, kh, kw, c} x[b, c, t + kt, h + kh - 1, w + kw - 1] * weight[o, c, kt, kh, kw]

Channels-last makes each position's C_in channels one contiguous row, and the positions of all
frames one [(2 + T) * H * W, C_in] matrix. Output position m = (t * H + h) * W + w reads input row
m + kt * H * W + (kh - 1) * W + (kw - 1) for tap (kt, kh, kw): the same shift for every row of a
tile. So the convolution is 27 GEMMs of shifted row ranges ([M, C_in] x [C_in, C_out], M = T * H * W)
summed into one accumulator, rows whose shifted (h, w) leaves the frame masked to zero. The weight
is reordered once to [27 * C_in, C_out] (tap-major, `vae_conv3d_weight`).

bf16 or fp32 (fp32 multiplies in full fp32, not TF32), accumulation in fp32, one rounding at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune, cast_bf16, check_kernel_device, check_tensor, dot, interpreting

_DTYPES = (torch.bfloat16, torch.float32)
CACHE_T = 2


@triton.jit(do_not_specialize=["M"])
def _vae_conv3d_kernel(x_ptr, w_ptr, b_ptr, o_ptr, sxb, sob, M, H, W,
                       C_IN: tl.constexpr, C_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, FP32: tl.constexpr,
                       INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    num_n: tl.constexpr = (C_OUT + BLOCK_N - 1) // BLOCK_N
    k_steps: tl.constexpr = C_IN // BLOCK_K
    pid = tl.program_id(0)
    pid_m = pid // num_n  # the column tiles of one row tile run side by side: its input stays in L2
    pid_n = pid % num_n
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_OUT
    hw = offs_m % (H * W)
    h = hw // W
    w = hw % W
    x_base = x_ptr + b * sxb
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(0, 27 * k_steps):
        tap = step // k_steps
        kc = (step % k_steps) * BLOCK_K
        kt = tap // 9
        kh = (tap // 3) % 3 - 1
        kw = tap % 3 - 1
        ok = m_ok & (h + kh >= 0) & (h + kh < H) & (w + kw >= 0) & (w + kw < W)
        rows = offs_m + kt * H * W + kh * W + kw  # the tap's input row of each output position
        a = tl.load(x_base + rows.to(tl.int64)[:, None] * C_IN + (kc + offs_k)[None, :], mask=ok[:, None], other=0.0)
        wk = tl.load(w_ptr + (tap * C_IN + kc + offs_k).to(tl.int64)[:, None] * C_OUT + offs_n[None, :],
                     mask=n_ok[None, :], other=0.0)
        if FP32:
            acc = tl.dot(a, wk, acc, input_precision="ieee")
        else:
            acc = dot(a, wk, acc, INTERPRET)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = o_ptr + b * sob + offs_m.to(tl.int64)[:, None] * C_OUT + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if FP32:
        tl.store(out, acc, mask=mask)
    else:
        tl.store(out, cast_bf16(acc, INTERPRET), mask=mask)


def _configs() -> list[triton.Config]:
    # Few on purpose: every config compiles once per channel pair, in the decoder's first call.
    # 128-row tiles (the M of a call is 6K-4.8M positions); two warpgroups for the accumulator.
    return [triton.Config({"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=8, num_stages=s)
            for bn in (64, 128) for bk in (32, 64) for s in (3, 4)]


def _prune_configs(configs, named_args, **kwargs):
    # Shared-memory overflow needs no rule: the autotuner skips configs that raise OutOfResources.
    args = {**named_args, **kwargs}
    c_in, c_out = args["C_IN"], args["C_OUT"]
    kept = [c for c in configs
            if c_in % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_N"] <= triton.next_power_of_2(c_out)]
    return kept or configs[:1]


# Keyed on the channels only: the position count changes with the frames per call, the best tile less so.
_vae_conv3d_tuned = autotune(configs=_configs(), key=["C_IN", "C_OUT", "HAS_BIAS", "FP32"],
                             prune_configs_by={"early_config_prune": _prune_configs})(_vae_conv3d_kernel)


def vae_conv3d_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, 3, 3, 3] -> [27 * C_in, C_out], row (kt * 9 + kh * 3 + kw) * C_in + c."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 5 or tuple(weight.shape[2:]) != (3, 3, 3):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"vae_conv3d needs a 3x3x3 Conv3d weight [C_out, C_in, 3, 3, 3], got {got}")
    c_out, c_in = weight.shape[:2]
    return weight.permute(2, 3, 4, 1, 0).reshape(27 * c_in, c_out).contiguous()


def supported(c_in: int, c_out: int) -> bool:
    """Channel counts the kernel takes: C_in a multiple of 32 (the K step), C_out a multiple of 16."""
    return c_in % 32 == 0 and c_out % 16 == 0


def vae_conv3d(x: torch.Tensor, weight_kn: torch.Tensor, bias: torch.Tensor | None = None, *,
               out: torch.Tensor | None = None, tile: dict | None = None) -> torch.Tensor:
    """The causal 3x3x3 convolution of the time-padded buffer x [B, C_in, 2 + T, H, W] (module docstring)
    with `vae_conv3d_weight`'s weights; returns out [B, C_out, T, H, W] (allocated channels-last if None).
    No host sync: capturable in a CUDA graph once autotuned.

    tile: BLOCK_M, BLOCK_N, BLOCK_K (dividing C_in), num_warps, num_stages to use instead of the
    autotuned ones (tests check several tilings without compiling every config for every shape)."""
    check_tensor("x", x, dtype=_DTYPES, shape=("B", "C_in", "2 + T", "H", "W"), layout="channels_last_3d")
    check_kernel_device("vae_conv3d", x.device)
    B, c_in, tp, H, W = x.shape
    if tp <= CACHE_T:
        raise ValueError(f"x has {tp} frames: the time-padded input holds {CACHE_T} cached frames and at least one more")
    check_tensor("weight_kn", weight_kn, dtype=x.dtype, shape=("27 * C_in", "C_out"), device=x.device,
                 layout="contiguous")
    if weight_kn.shape[0] != 27 * c_in:
        raise ValueError(f"weight_kn must be [27 * C_in = {27 * c_in}, C_out] (vae_conv3d_weight), "
                         f"got {list(weight_kn.shape)}")
    c_out = weight_kn.shape[1]
    if not supported(c_in, c_out):
        raise ValueError(f"vae_conv3d takes C_in a multiple of 32 and C_out a multiple of 16, got {c_in} -> {c_out}")
    if bias is not None:
        check_tensor("bias", bias, dtype=x.dtype, shape=(c_out,), device=x.device)
    T = tp - CACHE_T
    if out is not None:
        check_tensor("out", out, dtype=x.dtype, shape=(B, c_out, T, H, W), device=x.device, layout="channels_last_3d")
    if tp * H * W * max(c_in, c_out) >= 2 ** 31:
        raise ValueError(f"x {tuple(x.shape)} is too large for 32-bit row indices")
    if tile is not None and c_in % tile["BLOCK_K"]:
        raise ValueError(f"tile BLOCK_K {tile['BLOCK_K']} does not divide C_in {c_in}")

    if out is None:
        out = torch.empty((B, c_out, T, H, W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    M = T * H * W
    common = dict(C_IN=c_in, C_OUT=c_out, HAS_BIAS=bias is not None, FP32=x.dtype == torch.float32,
                  INTERPRET=interpreting())
    args = (x, weight_kn, weight_kn if bias is None else bias, out, x.stride(0), out.stride(0), M, H, W)
    if tile is None and interpreting():  # few, large tiles: the interpreter runs programs and steps in Python
        tile = {"BLOCK_M": 64, "BLOCK_N": min(triton.next_power_of_2(c_out), 64),
                "BLOCK_K": 64 if c_in % 64 == 0 else 32}
    if tile is not None:
        tile = dict(tile)
        blocks = {k: tile.pop(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        grid = (triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(c_out, blocks["BLOCK_N"]), B)
        _vae_conv3d_kernel[grid](*args, **common, **blocks, **tile)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]), B)
        _vae_conv3d_tuned[grid](*args, **common)
    return out


def vae_conv3d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The stock convolution of the time-padded input: no padding in time (the cache is in front), one
    zero pixel around each frame; weight [C_out, C_in, 3, 3, 3]."""
    return torch.nn.functional.conv3d(x, weight, bias, padding=(0, 1, 1))


def vae_conv3d_flops(b: int, c_in: int, c_out: int, t: int, h: int, w: int) -> float:
    return 2.0 * b * t * h * w * c_out * 27 * c_in
