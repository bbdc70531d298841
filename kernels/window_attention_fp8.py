"""Window attention over an FP8 KV cache (kernels/kv_quant_append.py's layout), read in place.

Shapes, layout and dtypes:
- q:        [B, Lq, H, D] bf16, roped (any strides with the last one 1).
- k_cache, v_cache: [B, C, H, D] float8_e4m3fn; k_scale, v_scale: [B, C, H] fp32, so that
  key n of head h is k_cache[b, n, h] * k_scale[b, n, h] (the same for v).
- sink_end, win_start, win_end, ring_lo, ring_size, shift: as in kernels/window_attention.py
  (device-side range values, ring wrap; capturable in a CUDA graph).
- out: [B, Lq, H, D] bf16.

The dots, chosen by `fp8_dots`:
- QK^T in fp8 ("qk" or "both"): each q row (token, head) is quantized in the kernel to e4m3 with
  its own scale s_q = amax/448; S = (q8 . k8^T) * (s_q * softmax scale * log2 e)[row] * k_scale[col]:
  both scales are per row / per column of S, so they apply after the fp8 dot.
  Otherwise q stays bf16 and k8 is upcast to bf16 (exact), with k_scale applied to S's columns.
- P.V in fp8 ("pv" or "both"): O = sum_n p[m, n] v_scale[n] v8[n]. The per-key v scale is folded
  into P; the tile's P~ = p * v_scale / c with c = max(v_scale in the tile) / 448 lies in [0, 448]
  and is cast to e4m3, and the fp8 dot's result is multiplied by c. (P itself is <= 1: folding
  without c would push small p * v_scale below e4m3's range.)
  Otherwise p * v_scale is rounded to bf16 and multiplied with v8 upcast to bf16.
- "none": both dots in bf16 on the upcast cache, the accuracy baseline: the same math as bf16
  attention on the dequantized cache, with the scales applied to S's columns and P's columns
  instead of to K and V (which is exact).
Softmax is online with fp32 statistics; the fp8 dots start from zero and are added to the fp32
accumulator outside the dot (Hopper's fp8 MMA accumulates with reduced precision).
K smoothing (SageAttention's mean subtraction) is not done: the cache is written one block per
call, and a mean subtracted per call would need a per-block score correction q . mean.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import cast_bf16, index_arg, interpreting, launch_on
from .fp8_quant import FP8_DTYPE, FP8_MAX, _cast_fp8
from .kv_quant_append import check_fp8_cache, dequantize_kv
from .window_attention import (_LOG2E, window_launch_args, _check_bhld, _check_config, _configs, _INTERPRET_CONFIG, _prune_configs,
                               _window_ranges, tma_option, window_attention_ref)

FP8_DOTS = ("both", "qk", "pv", "none")
_SUPPORTED_HEAD_DIMS = (32, 64, 128)


@triton.jit
def _dot_bf16(a, b, INTERPRET: tl.constexpr):
    # The interpreter's bf16 tl.dot is wrong; fp32 operands are exact there.
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def _fp8_tile(acc, l_i, m_i, q, q_scale, k8, k_s, v8, v_s, valid,
              MASKED: tl.constexpr, QK_FP8: tl.constexpr, PV_FP8: tl.constexpr,
              FP8_MAX: tl.constexpr, INTERPRET: tl.constexpr):
    if QK_FP8:
        s = tl.dot(q, tl.trans(k8))
    else:
        s = _dot_bf16(q, tl.trans(k8), INTERPRET)
    s = s * q_scale[:, None] * k_s[None, :]
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
        # Slots past the range may hold anything (a TMA tile reads real slots there): 0 * NaN is NaN.
        v_s = tl.where(valid, v_s, 0.0)
        v8i = v8.to(tl.int8, bitcast=True)
        v8 = tl.where(valid[:, None], v8i, tl.zeros_like(v8i)).to(v8.dtype, bitcast=True)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_FP8:
        v_max = tl.max(v_s, 0)
        c = tl.where(v_max > 0.0, v_max / FP8_MAX, 1.0)
        p8 = _cast_fp8(p * (v_s / c)[None, :], INTERPRET)
        acc = acc * alpha[:, None] + tl.dot(p8, v8) * c
    else:
        pv = cast_bf16(p * v_s[None, :], INTERPRET)
        acc = acc * alpha[:, None] + _dot_bf16(pv, v8, INTERPRET)
    return acc, l_i, m_new


@triton.jit
def _fp8_range(acc, l_i, m_i, q, q_scale, k_base, v_base, ks_base, vs_base, stride_kn, stride_vn,
               stride_ksn, stride_vsn, k_desc, v_desc, desc_row, desc_col, start, end,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr,
               QK_FP8: tl.constexpr, PV_FP8: tl.constexpr, FP8_MAX: tl.constexpr, INTERPRET: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    for n0 in tl.range(start, full_end, BLOCK_N):
        rows = n0 + offs_n
        if USE_TMA:
            k8 = k_desc.load([desc_row + n0, desc_col])
            v8 = v_desc.load([desc_row + n0, desc_col])
        else:
            k8 = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :])
            v8 = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :])
        k_s = tl.load(ks_base + rows * stride_ksn)
        v_s = tl.load(vs_base + rows * stride_vsn)
        acc, l_i, m_i = _fp8_tile(acc, l_i, m_i, q, q_scale, k8, k_s, v8, v_s, offs_n,
                                  False, QK_FP8, PV_FP8, FP8_MAX, INTERPRET)
    if full_end < end:
        rows = full_end + offs_n
        valid = rows < end
        if USE_TMA:
            k8 = k_desc.load([desc_row + full_end, desc_col])
            v8 = v_desc.load([desc_row + full_end, desc_col])
        else:
            k8 = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
            v8 = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        k_s = tl.load(ks_base + rows * stride_ksn, mask=valid, other=0.0)
        v_s = tl.load(vs_base + rows * stride_vsn, mask=valid, other=0.0)
        acc, l_i, m_i = _fp8_tile(acc, l_i, m_i, q, q_scale, k8, k_s, v8, v_s, valid,
                                  True, QK_FP8, PV_FP8, FP8_MAX, INTERPRET)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["B", "H", "Lq", "C", "ring_lo", "ring_size"])
def _window_attn_fp8_fwd(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, o_ptr,
    sink_end_ptr, win_start_ptr, win_end_ptr, shift_ptr,
    stride_sink, stride_wstart, stride_wend, stride_shift,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ksb, stride_ksn, stride_vsb, stride_vsn,
    stride_ob, stride_om, stride_oh,
    B, H, Lq, C, qk_scale, ring_lo, ring_size,
    LQ_BUCKET: tl.constexpr,  # autotune key only
    HEAD_DIM: tl.constexpr, RING: tl.constexpr, USE_TMA: tl.constexpr,
    QK_FP8: tl.constexpr, PV_FP8: tl.constexpr, FP8_MAX: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    sink_end, win_start, win_end, wrap_end = _window_ranges(
        sink_end_ptr, win_start_ptr, win_end_ptr, shift_ptr, b, stride_sink, stride_wstart, stride_wend,
        stride_shift, C, ring_lo, ring_size, RING)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_mask = offs_m[:, None] < Lq
    q = tl.load(q_ptr + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=q_mask, other=0.0)
    if QK_FP8:
        # One scale per q row (token, head), with the softmax scale and log2 e folded in.
        qf = q.to(tl.float32)
        amax = tl.max(tl.abs(qf), 1)
        s_q = tl.where(amax == 0.0, 1.0, amax / FP8_MAX)
        q = _cast_fp8(tl.minimum(tl.maximum(qf / s_q[:, None], -FP8_MAX), FP8_MAX), INTERPRET)
        q_scale = s_q * qk_scale
    else:
        q_scale = tl.full([BLOCK_M], 1.0, tl.float32) * qk_scale

    k_base = k_ptr + b64 * stride_kb + h * stride_kh
    v_base = v_ptr + b64 * stride_vb + h * stride_vh
    ks_base = ks_ptr + b64 * stride_ksb + h
    vs_base = vs_ptr + b64 * stride_vsb + h
    if USE_TMA:
        # The launcher checked that the caches are contiguous, so [B*C, H*D] is an exact 2-D view.
        k_desc = tl.make_tensor_descriptor(k_ptr, shape=[B * C, H * HEAD_DIM], strides=[H * HEAD_DIM, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_ptr, shape=[B * C, H * HEAD_DIM], strides=[H * HEAD_DIM, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    else:
        k_desc = k_ptr
        v_desc = v_ptr
    desc_row = b * C
    desc_col = h * HEAD_DIM

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fp8_range(acc, l_i, m_i, q, q_scale, k_base, v_base, ks_base, vs_base, stride_kn, stride_vn,
                               stride_ksn, stride_vsn, k_desc, v_desc, desc_row, desc_col, 0, sink_end,
                               BLOCK_N, HEAD_DIM, USE_TMA, QK_FP8, PV_FP8, FP8_MAX, INTERPRET)
    acc, l_i, m_i = _fp8_range(acc, l_i, m_i, q, q_scale, k_base, v_base, ks_base, vs_base, stride_kn, stride_vn,
                               stride_ksn, stride_vsn, k_desc, v_desc, desc_row, desc_col, win_start, win_end,
                               BLOCK_N, HEAD_DIM, USE_TMA, QK_FP8, PV_FP8, FP8_MAX, INTERPRET)
    if RING:
        acc, l_i, m_i = _fp8_range(acc, l_i, m_i, q, q_scale, k_base, v_base, ks_base, vs_base, stride_kn,
                                   stride_vn, stride_ksn, stride_vsn, k_desc, v_desc, desc_row, desc_col,
                                   ring_lo, wrap_end, BLOCK_N, HEAD_DIM, USE_TMA, QK_FP8, PV_FP8, FP8_MAX, INTERPRET)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(o_ptr + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             cast_bf16(out, INTERPRET), mask=q_mask)


_window_attn_fp8_fwd_tuned = triton.autotune(
    configs=_configs(),
    key=["LQ_BUCKET", "HEAD_DIM", "USE_TMA", "QK_FP8", "PV_FP8"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_window_attn_fp8_fwd)


def window_attention_fp8(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         k_scale: torch.Tensor, v_scale: torch.Tensor,
                         sink_end, win_start, win_end, *, ring_lo: int = 0, ring_size: int | None = None,
                         shift=None, scale: float | None = None, fp8_dots: str = "both",
                         out: torch.Tensor | None = None, use_tma: bool = False,
                         config: dict | None = None) -> torch.Tensor:
    """Attend q [B, Lq, H, D] to the FP8 cache's slots [0, sink_end) U [win_start, win_end).

    fp8_dots: "both", "qk", "pv" or "none" (module docstring). use_tma, config and the range
    arguments as in window_attention.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    device = q.device
    _check_bhld("q", q, device)
    check_fp8_cache(k_cache, v_cache, k_scale, v_scale, device)
    if fp8_dots not in FP8_DOTS:
        raise ValueError(f"fp8_dots must be one of {FP8_DOTS}, got {fp8_dots!r}")
    B, Lq, H, D, C, sink_end, win_start, win_end, ring_size, shift, out = window_launch_args(
        q, k_cache, sink_end, win_start, win_end, ring_lo, ring_size, shift, out)
    if B == 0 or Lq == 0 or H == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    interpret = interpreting()
    use_tma = tma_option(use_tma, device, k_cache, v_cache)

    args = (
        q, k_cache, v_cache, k_scale, v_scale, out,
        sink_end, win_start, win_end, sink_end if shift is None else shift,
        0 if sink_end.numel() == 1 else 1, 0 if win_start.numel() == 1 else 1, 0 if win_end.numel() == 1 else 1,
        0 if shift is None or shift.numel() == 1 else 1,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_scale.stride(0), k_scale.stride(1), v_scale.stride(0), v_scale.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        B, H, Lq, C, scale * _LOG2E, ring_lo, ring_size,
    )
    meta = dict(LQ_BUCKET=min(triton.next_power_of_2(Lq), 8192), HEAD_DIM=D, RING=shift is not None,
                USE_TMA=use_tma, QK_FP8=fp8_dots in ("both", "qk"), PV_FP8=fp8_dots in ("both", "pv"),
                FP8_MAX=FP8_MAX, INTERPRET=interpret)
    if config is not None:
        config = _check_config(config)
    with launch_on(device):
        if interpret or config is not None:
            cfg = _INTERPRET_CONFIG if interpret else config
            _window_attn_fp8_fwd[(triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)](*args, **meta, **cfg)
        else:
            def grid(cfg):
                return (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
            _window_attn_fp8_fwd_tuned[grid](*args, **meta)
    return out


def window_attention_fp8_ref(q, k_cache, v_cache, k_scale, v_scale, sink_end, win_start, win_end,
                             scale: float | None = None, **ring) -> torch.Tensor:
    """fp32 attention on the dequantized cache (window_attention_ref's gather and SDPA math); fp32 out."""
    k = dequantize_kv(k_cache, k_scale)
    v = dequantize_kv(v_cache, v_scale)
    return window_attention_ref(q.float(), k, v, sink_end, win_start, win_end, scale, **ring)


def fp8_cache_like(k_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An empty FP8 cache of a bf16 cache's shape [B, C, H, D]: (k, v, k_scale, v_scale), zeros and ones."""
    B, C, H, D = k_cache.shape
    k8 = torch.zeros(B, C, H, D, dtype=FP8_DTYPE, device=k_cache.device)
    scales = torch.ones(B, C, H, dtype=torch.float32, device=k_cache.device)
    return k8, torch.zeros_like(k8), scales, scales.clone()


def window_attention_fp8_bytes(batch: int, lq: int, lkv: int, heads: int, head_dim: int) -> float:
    """Fewest bytes one call must move: read bf16 q, e4m3 K/V slots and their fp32 scales, write bf16 out."""
    return batch * heads * (2.0 * head_dim * 2 * lq + lkv * (2.0 * head_dim + 8.0))
