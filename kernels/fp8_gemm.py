"""W8A8 FP8 GEMM with row-wise scales: the Linear layers of a LongLive block in float8_e4m3fn.

    out[M, N] = act((a_fp8[M, K] @ w_fp8[N, K]^T) * a_scale * w_scale[None, N] + bias[N])

Shapes, layout and dtypes:
- a_fp8:   [M, K] float8_e4m3fn, K contiguous (row stride any multiple of 16): the activation.
- a_scale: float32, either one scale per token, [M] (or [M, 1]), as kernels/fp8_quant.quantize_rowwise
           and the adaln kernel's FP8 output make it; or one scale per token and group of 128
           features, [M, K / 128] (last dim contiguous; K % 128 == 0), as this GEMM's own FP8
           output makes it.
- w_fp8:   [N, K] float8_e4m3fn, K contiguous: the nn.Linear weight layout, quantized once per
           output channel by kernels/fp8_quant.quantize_weight_per_channel.
- w_scale: [N] (or [1, N] / [N, 1]) float32, contiguous.
- bias:    [N] bf16 or fp32, optional.
- gelu:    apply GELU with the tanh approximation (the Wan FFN's activation) in the epilogue.
- out:     [M, N] bf16, N contiguous (any row stride), optional preallocated.
- out_fp8: instead of bf16, emit the result quantized for the next GEMM: (q [M, N] fp8,
           scale [M, N / 128] fp32), one scale per token and 128 output columns, computed from the
           fp32 epilogue value (amax / 448, the row-wise rule per group); needs N % 128 == 0. This is
           how the FFN up GEMM hands its GELU output to the FFN down GEMM without a quantization pass.
- residual, gate: instead of y, write residual + y * gate (bf16, the block's gated residual add
           after its FFN, in the stock's rounding order): residual [M, N] bf16, gate [B, F, N] bf16
           per sequence and frame (the M rows are B sequences of F equal frames). out may be residual.
K must be a multiple of 16 (the fp8 MMA's K step) and the operands 16-byte aligned.

The products of fp8 operands are exact and the accumulator is an fp32 register tile, but on Hopper
(compute capability 9.0) Triton's fp8 `tl.dot` leaves the whole K reduction inside the wgmma's own
accumulation (its default max_num_imprecise_acc), which keeps fewer mantissa bits than fp32 (about
13-14: the "FP22" accumulator of SageAttention2, DeepSeek-V3's "around 14 bits"). Emulated at
K = 1536, it moves a 128-group's amax by up to 5.5e-4 (13 bits, rounding) or 3.6e-3 (truncating),
within one bf16 rounding (2^-8), and any value by a few 1e-3 of its group's amax: below the fp8
quantization error (2^-4 per element) this GEMM's inputs already carry. Group-scaled A adds each 128-wide K-tile's product to the accumulator in fp32, and so does
`precise_acc` (Triton's max_num_imprecise_acc = BLOCK_K; about 10x less error, emulated; off by
default: bench/probe_fp8_block.py measures its cost). The scales, bias and GELU are applied to the
fp32 accumulator and the result is rounded once (to bf16, or to fp8 with out_fp8; three times with a
residual, as the stock rounds).

Two kernels, one epilogue: `_fp8_gemm_tma_kernel` (Hopper and the interpreter: persistent, TMA
operand loads, launcher flags `flatten` / `warp_specialize`) and `_fp8_gemm_kernel` (Ada and the
fallback). Why these and what the flags do: docs/fp8-gemm.md.

`fp8_linear(x, w_fp8, w_scale, bias, gelu)` takes a bf16 activation (quantized per token here) or
an `Fp8Activation` from a fused producer, and runs the GEMM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (autotune, cast_bf16, check_kernel_device, check_tensor, interpreting, launch_on, round_bf16,
                      tma_supported, use_tma_allocator)
from .fp8_quant import ACT_GROUP, FP8_DTYPE, FP8_MAX, Fp8Activation, _cast_fp8, quantize_rowwise

# The interpreter runs fixed small configs: autotuning there would time every config in numpy, and
# small tiles exercise the ragged M/N tails and the K tail at test sizes. Group-scaled A needs
# BLOCK_K = ACT_GROUP, FP8 output BLOCK_N = ACT_GROUP.
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
# Few programs in the interpreter, so each persistent program walks several tiles.
_INTERPRET_SMS = 3


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability >= 8.9 (Ada, Hopper and later); the interpreter emulates."""
    if interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@triton.jit
def _gelu_tanh(x):
    # tanh(u) = 1 - 2 / (exp(2u) + 1).
    # |u| >= 15 already gives tanh = +-1 in fp32; the clamp keeps exp2 finite.
    u = tl.minimum(tl.maximum(0.7978845608028654 * (x + 0.044715 * x * x * x), -15.0), 15.0)
    t = 1.0 - 2.0 / (tl.math.exp2(u * (2.0 * 1.4426950408889634)) + 1.0)
    return 0.5 * x * (1.0 + t)


@triton.jit
def _tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped ("swizzled") order: GROUP_M row tiles share each column tile while it is in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, pid_m, pid_n, M, N, as_ptr, ws_ptr, bias_ptr, o_ptr, os_ptr, stride_om, stride_osm,
              r_ptr, g_ptr, stride_rm, stride_gb, stride_gf, L, TPF,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, A_GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
              GELU: tl.constexpr, OUT_FP8: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr,
              FP8_MAX: tl.constexpr, INTERPRET: tl.constexpr):
    """Scales, bias, GELU and the one rounding of a [BLOCK_M, BLOCK_N] fp32 tile (or the gated
    residual's three); masked stores."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Columns past N get w_scale 0 and bias 0, so they hold GELU(0) = 0 and never raise a group amax.
    w_s = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    if A_GROUPED:
        acc = acc * w_s[None, :]  # the token scales were applied per K-tile
    else:
        a_s = tl.load(as_ptr + offs_m, mask=m_ok, other=0.0)
        acc = acc * a_s[:, None] * w_s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu_tanh(acc)
    rows = offs_m.to(tl.int64)[:, None]
    mask = m_ok[:, None] & n_ok[None, :]
    if OUT_FP8:
        # BLOCK_N is one group: the tile holds the whole group of each row. div_rn as torch divides.
        amax = tl.max(tl.abs(acc), 1)
        scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, FP8_MAX))
        inv = tl.math.div_rn(1.0, scale)
        q = tl.minimum(tl.maximum(acc * inv[:, None], -FP8_MAX), FP8_MAX)
        tl.store(o_ptr + rows * stride_om + offs_n[None, :], _cast_fp8(q, INTERPRET), mask=mask)
        tl.store(os_ptr + offs_m.to(tl.int64) * stride_osm + pid_n, scale, mask=m_ok)
    elif RESIDUAL:
        # The stock rounding points of `x + y * gate` in bf16: y as the GEMM would have written it,
        # y * gate, then the sum. Integer rounding (round_bf16), so no FMA fuses the last two.
        y = round_bf16(acc)
        if GATED:
            rows_g = offs_m.to(tl.int64)
            g_off = (rows_g // L) * stride_gb + ((rows_g % L) // TPF) * stride_gf
            g = tl.load(g_ptr + g_off[:, None] + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            y = round_bf16(y * g)
        x = tl.load(r_ptr + rows * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + rows * stride_om + offs_n[None, :], round_bf16(x + y).to(tl.bfloat16), mask=mask)
    else:
        tl.store(o_ptr + rows * stride_om + offs_n[None, :], cast_bf16(acc, INTERPRET), mask=mask)


@triton.jit(do_not_specialize=["M", "L", "TPF"])
def _fp8_gemm_kernel(
    a_ptr, w_ptr, as_ptr, ws_ptr, bias_ptr, o_ptr, os_ptr, r_ptr, g_ptr,
    M, N, K,
    stride_am, stride_wn, stride_asm, stride_om, stride_osm, stride_rm, stride_gb, stride_gf, L, TPF,
    M_BUCKET: tl.constexpr,  # autotune key only
    A_GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, OUT_FP8: tl.constexpr,
    RESIDUAL: tl.constexpr, GATED: tl.constexpr, PRECISE_ACC: tl.constexpr,
    EVEN_K: tl.constexpr, FP8_MAX: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read row 0 / column 0 instead of masking every load: their results
    # are never stored.
    rows_a = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    rows_w = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + rows_w[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K-major

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if A_GROUPED:
            s = tl.load(as_ptr + rows_a * stride_asm + k0)
            acc += tl.dot(a, w) * s[:, None]
        elif PRECISE_ACC:
            acc = tl.dot(a, w, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _epilogue(acc, pid_m, pid_n, M, N, as_ptr, ws_ptr, bias_ptr, o_ptr, os_ptr, stride_om, stride_osm,
              r_ptr, g_ptr, stride_rm, stride_gb, stride_gf, L, TPF,
              BLOCK_M, BLOCK_N, A_GROUPED, HAS_BIAS, GELU, OUT_FP8, RESIDUAL, GATED, FP8_MAX, INTERPRET)


@triton.jit(do_not_specialize=["M", "L", "TPF"])
def _fp8_gemm_tma_kernel(
    a_ptr, w_ptr, as_ptr, ws_ptr, bias_ptr, o_ptr, os_ptr, r_ptr, g_ptr,
    M, N, K,
    stride_am, stride_wn, stride_asm, stride_om, stride_osm, stride_rm, stride_gb, stride_gf, L, TPF,
    M_BUCKET: tl.constexpr,  # autotune key only
    A_GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, OUT_FP8: tl.constexpr,
    RESIDUAL: tl.constexpr, GATED: tl.constexpr, PRECISE_ACC: tl.constexpr,
    FP8_MAX: tl.constexpr, INTERPRET: tl.constexpr,
    NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    # TMA zero-fills reads past M, N and K, so no load needs a mask.
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    start = tl.program_id(0)
    # The epilogue recomputes its tile from its own counter (as Triton's persistent matmul does), so
    # a flattened loop can run it while the next tile's loads are in flight.
    tile_id_c = start - NUM_SMS
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if A_GROUPED:
            rows_a = tl.minimum(off_m + tl.arange(0, BLOCK_M), M - 1).to(tl.int64)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            w = w_desc.load([off_n, ki * BLOCK_K])
            if A_GROUPED:
                s = tl.load(as_ptr + rows_a * stride_asm + ki)
                acc += tl.dot(a, w.T) * s[:, None]
            elif PRECISE_ACC:
                acc = tl.dot(a, w.T, acc, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(a, w.T, acc)
        tile_id_c += NUM_SMS
        pid_m_c, pid_n_c = _tile_ids(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
        _epilogue(acc, pid_m_c, pid_n_c, M, N, as_ptr, ws_ptr, bias_ptr, o_ptr, os_ptr, stride_om, stride_osm,
                  r_ptr, g_ptr, stride_rm, stride_gb, stride_gf, L, TPF,
                  BLOCK_M, BLOCK_N, A_GROUPED, HAS_BIAS, GELU, OUT_FP8, RESIDUAL, GATED, FP8_MAX, INTERPRET)


def _configs(tma: bool) -> list[triton.Config]:
    if tma:
        # LongLive's shapes (M = 4680; N, K in 1536..8960) fill 132 SMs with 128-row tiles; a
        # 128 x 256 fp32 accumulator needs two warpgroups; fp8 tiles of 128 x 128 (A) + 256 x 128 (W)
        # are 48 KiB a stage, so 4 stages fit the H200's 227 KiB of shared memory.
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=s)
                for bn in (128, 256) for s in (3, 4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (128, 256)
        for w in (4, 8)
        for s in (3, 4)
    ]


def _prune_configs(configs, named_args, **kwargs):
    # Shared-memory overflow needs no rule: the autotuner skips configs that raise OutOfResources.
    args = {**named_args, **kwargs}
    m_bucket, n = args["M_BUCKET"], args["N"]
    kept = []
    for cfg in configs:
        bm, bn, w = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps
        # FP8 output: one tile column is one scale group.
        if args["OUT_FP8"] and bn != ACT_GROUP:
            continue
        # 64-row tiles only pay when 128-row tiles are too few to fill 132 SMs.
        if bm == 64 and m_bucket >= 2048:
            continue
        # A 128-row tile wants two warpgroups; a 128x256 fp32 accumulator does not fit in one.
        if bm == 128 and w == 4:
            continue
        if bn == 256 and n <= 128:
            continue
        kept.append(cfg)
    return kept or configs[:1]


_KEY = ["M_BUCKET", "N", "K", "A_GROUPED", "HAS_BIAS", "GELU", "OUT_FP8", "RESIDUAL", "GATED", "PRECISE_ACC"]
_fp8_gemm_tuned = autotune(configs=_configs(False), key=_KEY,
                                  prune_configs_by={"early_config_prune": _prune_configs})(_fp8_gemm_kernel)
_fp8_gemm_tma_tuned = autotune(configs=_configs(True), key=_KEY + ["FLATTEN", "WARP_SPECIALIZE"],
                                      prune_configs_by={"early_config_prune": _prune_configs})(_fp8_gemm_tma_kernel)


def _num_sms(device: torch.device) -> int:
    if interpreting():
        return _INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_config(config: dict) -> dict:
    keys = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}
    if not isinstance(config, dict) or not keys <= set(config) or not set(config) <= keys | {"num_warps", "num_stages"}:
        raise ValueError(f"config must hold {sorted(keys)} and optionally num_warps, num_stages; got {config!r}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if config[key] not in (16, 32, 64, 128, 256):
            raise ValueError(f"config {key}={config[key]} must be a power of two in [16, 256]")
    return config


def _check_aligned(name, t, elem_bytes):
    if t.data_ptr() % 16 or (t.shape[0] > 1 and (t.stride(0) * elem_bytes) % 16):
        raise ValueError(f"{name} must be 16-byte aligned (pointer and row stride), "
                         f"got pointer offset {t.data_ptr() % 16} and row stride {t.stride(0)}")


def _vector(name, t, n, device):
    """Accept [n], [n, 1] or [1, n] float32 contiguous; return the 1-D view."""
    if isinstance(t, torch.Tensor) and t.dim() == 2 and 1 in t.shape and t.numel() == n:
        t = t.reshape(n)
    check_tensor(name, t, dtype=torch.float32, shape=(n,), device=device)
    return t


def _activation_scale(a_scale, M: int, K: int, device) -> tuple[torch.Tensor, bool]:
    """(scale, grouped): [M] per token, or [M, K / 128] per token and group (K = 128 is both)."""
    groups = K // ACT_GROUP
    if isinstance(a_scale, torch.Tensor) and a_scale.dim() == 2 and groups > 1 and a_scale.shape[1] != 1:
        if K % ACT_GROUP:
            raise ValueError(f"group-wise a_scale needs K={K} to be a multiple of {ACT_GROUP}")
        check_tensor("a_scale", a_scale, dtype=torch.float32, shape=(M, groups), device=device)
        return a_scale, True
    return _vector("a_scale", a_scale, M, device), False


def _check_operands(a_fp8, w_fp8) -> tuple[int, int, int, torch.device]:
    """(M, N, K, device) of a checked pair of FP8 operands."""
    check_tensor("a_fp8", a_fp8, dtype=FP8_DTYPE, shape=("M", "K"))
    device = a_fp8.device
    check_kernel_device("fp8_gemm", device)
    check_tensor("w_fp8", w_fp8, dtype=FP8_DTYPE, shape=("N", "K"), device=device)
    M, K = a_fp8.shape
    N = w_fp8.shape[0]
    if w_fp8.shape[1] != K:
        raise ValueError(f"a_fp8 [M, K={K}] and w_fp8 [N, K={w_fp8.shape[1]}] disagree on K")
    if K == 0 or K % 16:
        raise ValueError(f"K={K} must be a positive multiple of 16")
    if N == 0:
        raise ValueError("w_fp8 has N = 0 output channels")
    _check_aligned("a_fp8", a_fp8, 1)
    _check_aligned("w_fp8", w_fp8, 1)
    return M, N, K, device


def _check_outputs(out, out_scale, out_fp8: bool, M: int, N: int, device) -> None:
    """The preallocated outputs that are given: bf16 out, or FP8 out with its group scales."""
    if not out_fp8:
        if out_scale is not None:
            raise ValueError("out_scale is the FP8 output's scale: pass out_fp8=True")
        if out is not None:
            check_tensor("out", out, dtype=torch.bfloat16, shape=(M, N), device=device)
        return
    if N % ACT_GROUP:
        raise ValueError(f"out_fp8 needs N={N} to be a multiple of {ACT_GROUP} (one scale per {ACT_GROUP} columns)")
    if out is not None:
        check_tensor("out", out, dtype=FP8_DTYPE, shape=(M, N), device=device)
    if out_scale is not None:
        check_tensor("out_scale", out_scale, dtype=torch.float32, shape=(M, N // ACT_GROUP), device=device)


def _residual_operands(residual, gate, out, out_fp8: bool, M: int, N: int, device) -> tuple:
    """(gate [B, F, N] view or None, tokens per batch row L, tokens per frame) of a checked gated residual."""
    if residual is None:
        if gate is not None:
            raise ValueError("gate needs residual: the gate multiplies the GEMM output added to the residual")
        return None, 1, 1
    if out_fp8:
        raise ValueError("residual writes x + gate * y in bf16; out_fp8 cannot take it")
    check_tensor("residual", residual, dtype=torch.bfloat16, shape=(M, N), device=device)
    if out is not None and out.untyped_storage().data_ptr() == residual.untyped_storage().data_ptr() \
            and (out.data_ptr() != residual.data_ptr() or out.stride() != residual.stride()):
        raise ValueError("out overlaps residual without being it: pass out=residual (in place) or a separate buffer")
    if gate is None:
        return None, M, M
    if isinstance(gate, torch.Tensor) and gate.dim() == 4 and gate.shape[2] == 1:
        gate = gate.squeeze(2)  # the stock [B, F, 1, C] modulation chunk
    if not isinstance(gate, torch.Tensor) or gate.dim() != 3:
        raise ValueError(f"gate must be [B, F, N] (or [B, F, 1, N]), got {getattr(gate, 'shape', type(gate).__name__)}")
    B, F_, _ = gate.shape
    check_tensor("gate", gate, dtype=torch.bfloat16, shape=(B, F_, N), device=device)
    if B == 0 or F_ == 0 or M % B or (M // B) % F_:
        raise ValueError(f"the M={M} rows do not split into gate's B={B} sequences of F={F_} frames of equal length")
    return gate, M // B, M // B // F_


def fp8_gemm(a_fp8: torch.Tensor, w_fp8: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, *, gelu: bool = False, out: torch.Tensor | None = None,
             out_fp8: bool = False, out_scale: torch.Tensor | None = None, residual: torch.Tensor | None = None,
             gate: torch.Tensor | None = None, use_tma: bool | None = None, flatten: bool = True,
             warp_specialize: bool = False, precise_acc: bool = False, config: dict | None = None):
    """act((a_fp8 @ w_fp8.T) * scales + bias): bf16 [M, N], or with out_fp8 an Fp8Activation
    (q [M, N] fp8, scale [M, N / 128]).

    residual [M, N] bf16 (and gate [B, F, N] bf16): write `residual + y * gate` instead of y, in the
    stock's bf16 rounding order (y rounded, y * gate rounded, the sum rounded), as the block's gated
    residual add after its FFN: the rows are B sequences of F frames, row m in frame
    (m % L) // (L / F) of sequence m // L, L = M / B. out may be residual itself (in place).
    See the module docstring for layouts. use_tma: None picks the persistent TMA kernel where it runs
    (compute capability >= 9, and the interpreter), True insists (ValueError where it cannot run),
    False takes the pointer kernel. flatten / warp_specialize: Triton loop options of the TMA kernel.
    precise_acc: on Hopper, add each K-tile's product to the accumulator in fp32 (the wgmma's reduced-
    precision accumulation then spans BLOCK_K, not K; see the module docstring); group-scaled A always does.
    config ({"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}) skips
    autotuning on the GPU; the interpreter always runs small tiles.
    No host sync: capturable in a CUDA graph once autotuned.
    """
    M, N, K, device = _check_operands(a_fp8, w_fp8)
    a_scale, grouped = _activation_scale(a_scale, M, K, device)
    w_scale = _vector("w_scale", w_scale, N, device)
    if bias is not None:
        check_tensor("bias", bias, dtype=(torch.bfloat16, torch.float32), shape=(N,), device=device)
    _check_outputs(out, out_scale, out_fp8, M, N, device)
    gate, tokens, per_frame = _residual_operands(residual, gate, out, out_fp8, M, N, device)
    if use_tma is None:
        use_tma = tma_supported(device)
    elif use_tma and not tma_supported(device):
        raise ValueError(f"use_tma=True needs a CUDA GPU of compute capability >= 9 (or the interpreter); "
                         f"a_fp8 is on {device}")
    if config is not None:
        config = _check_config(config)
        if grouped and config["BLOCK_K"] != ACT_GROUP:
            raise ValueError(f"group-wise a_scale needs config BLOCK_K = {ACT_GROUP}")
        if out_fp8 and config["BLOCK_N"] != ACT_GROUP:
            raise ValueError(f"out_fp8 needs config BLOCK_N = {ACT_GROUP}")

    if out is None:
        out = torch.empty((M, N), dtype=FP8_DTYPE if out_fp8 else torch.bfloat16, device=device)
    if out_fp8 and out_scale is None:
        out_scale = torch.empty((M, N // ACT_GROUP), dtype=torch.float32, device=device)
    result = Fp8Activation(out, out_scale) if out_fp8 else out
    if M == 0:
        return result

    interpret = interpreting()
    r = residual if residual is not None else out
    g = gate if gate is not None else out
    args = (a_fp8, w_fp8, a_scale, w_scale, bias if bias is not None else w_scale, out,
            out_scale if out_fp8 else w_scale, r, g, M, N, K, a_fp8.stride(0), w_fp8.stride(0),
            a_scale.stride(0) if grouped else 0, out.stride(0), out_scale.stride(0) if out_fp8 else 0,
            r.stride(0), g.stride(0), g.stride(1) if gate is not None else 0, tokens, per_frame)
    meta = dict(M_BUCKET=min(triton.next_power_of_2(M), 8192), A_GROUPED=grouped, HAS_BIAS=bias is not None,
                GELU=bool(gelu), OUT_FP8=bool(out_fp8), RESIDUAL=residual is not None, GATED=gate is not None,
                PRECISE_ACC=bool(precise_acc) and not grouped, FP8_MAX=FP8_MAX, INTERPRET=interpret)
    fixed = None
    if interpret:
        fixed = dict(_INTERPRET_CONFIG)
        if grouped:
            fixed["BLOCK_K"] = ACT_GROUP
        if out_fp8:
            fixed["BLOCK_N"] = ACT_GROUP
    elif config is not None:
        fixed = dict(config)

    def tiles(cfg):
        return triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])

    with launch_on(device):
        if use_tma:
            use_tma_allocator()
            sms = _num_sms(device)
            meta.update(NUM_SMS=sms, FLATTEN=bool(flatten), WARP_SPECIALIZE=bool(warp_specialize))
            if fixed is not None:
                _fp8_gemm_tma_kernel[(min(sms, tiles(fixed)),)](*args, **meta, **fixed)
            else:
                _fp8_gemm_tma_tuned[lambda cfg: (min(sms, tiles(cfg)),)](*args, **meta)
        elif fixed is not None:
            _fp8_gemm_kernel[(tiles(fixed),)](*args, **meta, EVEN_K=K % fixed["BLOCK_K"] == 0, **fixed)
        else:
            # All autotune configs use BLOCK_K = 128.
            _fp8_gemm_tuned[lambda cfg: (tiles(cfg),)](*args, **meta, EVEN_K=K % 128 == 0)
    return result


def fp8_linear(x, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
               *, gelu: bool = False, out_fp8: bool = False, residual: torch.Tensor | None = None,
               gate: torch.Tensor | None = None, out: torch.Tensor | None = None, **gemm_options):
    """x [..., K] -> [..., N]: bf16, or with out_fp8 an Fp8Activation with 128-column group scales.

    x is a bf16 tensor (2-D or 3-D; quantized per token here, one extra pass) or an Fp8Activation
    from a fused producer (its scales per token or per 128-feature group). residual [..., N] bf16
    (and gate [B, F, N] per frame): `residual + y * gate` in bf16 instead of y (see fp8_gemm), into
    out [..., N] if given (out=residual: in place). gemm_options go to fp8_gemm (use_tma, flatten,
    warp_specialize, config).
    """
    if isinstance(x, Fp8Activation):
        q, s = x
    else:
        q, s = quantize_rowwise(x)
    K = q.shape[-1]
    lead = q.shape[:-1]
    grouped = s.dim() == q.dim()
    s2 = s.reshape(-1, s.shape[-1]) if grouped else s.reshape(-1)
    N = w_fp8.shape[0]
    flat = {}
    for name, t in (("residual", residual), ("out", out)):
        if t is not None:
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (*lead, N):
                raise ValueError(f"{name} must have shape {[*lead, N]}, got {getattr(t, 'shape', type(t).__name__)}")
            try:
                flat[name] = t.view(-1, N)  # a view, never a copy: out is written in place
            except RuntimeError:
                raise ValueError(f"{name} must flatten to [rows, {N}] without a copy, "
                                 f"got strides {t.stride()}") from None
    out = fp8_gemm(q.reshape(-1, K), w_fp8, s2, w_scale, bias, gelu=gelu, out_fp8=out_fp8, gate=gate, **flat,
                   **gemm_options)
    if out_fp8:
        return Fp8Activation(out.q.view(*lead, N), out.scale.view(*lead, N // ACT_GROUP))
    return out.view(*lead, N)


def fp8_gemm_ref(a_fp8, w_fp8, a_scale, w_scale, bias=None, *, gelu: bool = False) -> torch.Tensor:
    """The EMULATED path: dequantize both operands to fp32, matmul in fp32; returns fp32 [M, N].
    a_scale is per token ([M] / [M, 1]) or per token and 128-feature group ([M, K / 128])."""
    K = a_fp8.shape[-1]
    if a_scale.dim() == 2 and a_scale.shape[1] == K // ACT_GROUP and a_scale.shape[1] > 1:
        a = (a_fp8.float().unflatten(-1, (-1, ACT_GROUP)) * a_scale.float()[..., None]).flatten(-2)
    else:
        a = a_fp8.float() * a_scale.reshape(-1, 1).float()
    w = w_fp8.float() * w_scale.reshape(-1, 1).float()
    out = a @ w.t()
    if bias is not None:
        out = out + bias.float()
    if gelu:
        out = F.gelu(out, approximate="tanh")
    return out


def fp8_gemm_flops(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


def fp8_gemm_bytes(m: int, n: int, k: int, *, out_fp8: bool = False) -> float:
    """Fewest bytes one call moves: read both fp8 operands and the scales once, write the output
    (bf16, or fp8 plus one fp32 scale per 128 columns)."""
    out = m * n + 4.0 * m * (n // ACT_GROUP) if out_fp8 else 2.0 * m * n
    return m * k + n * k + 4.0 * (m + n) + out
