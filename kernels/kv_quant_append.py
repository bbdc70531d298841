"""q/k RMSNorm + causal RoPE + FP8 KV-cache append: rope_kv_append with an e4m3 cache, in one pass.

Same inputs, math and slot rule as kernels/rope_kv_append.py (same plan values: dst_start,
row_lo, ring_lo/ring_size/shift), except the caches:
- k_cache, v_cache: [B, C, H, D] float8_e4m3fn, written in place;
- k_scale, v_scale: [B, C, H] float32, one scale per (slot, head), written with the row.
- returns q: [B, n, H, D] bf16, roped (not quantized: attention quantizes it per tile if it wants).

Each written (token, head) row x of D values (k: the roped k rounded to bf16, exactly what the
bf16 cache would hold; v: the raw bf16 v) becomes

    scale = amax|x| / 448          (1 for a row of zeros)
    x8    = e4m3(clamp(x / scale, -448, 448))      so x ~= x8 * scale.

Why per (token, head) and not per block of tokens: a row's scale depends on that row alone, so a
call writes its rows without reading any other slot (rows of one cache block are written by
different calls: the ring wraps, a recompute rewrites a block), and the error is never larger than
with a shared block scale (a block's amax is >= each of its rows'); tests/kernels/
test_kv_quant_append.py measures both on the reference model's k and v. The scales cost 4 bytes per
D values: 3% of the fp8 cache at D = 128.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_bf16, interpreting
from .fp8_quant import FP8_DTYPE, FP8_MAX, _cast_fp8
from .rope_kv_append import (_check, _ring_slot, _rms_norm_bf16, _rotate, _rows_written, _token_tables, append_block_t,
                             check_append_inputs, check_q_out)


@triton.jit
def _quant_rows(x, FP8_MAX: tl.constexpr, INTERPRET: tl.constexpr):
    # x [T, H, D] fp32 -> (e4m3 [T, H, D], scale [T, H]); IEEE divisions so the scale equals torch's.
    amax = tl.max(tl.abs(x), 2)
    scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, FP8_MAX))
    inv = tl.math.div_rn(1.0, scale)
    q = tl.minimum(tl.maximum(x * inv[:, :, None], -FP8_MAX), FP8_MAX)
    return _cast_fp8(q, INTERPRET), scale


@triton.jit(do_not_specialize=["n", "H", "hg", "wg", "ring_lo", "ring_size"])
def _kv_quant_append_kernel(
    ql_ptr, kl_ptr, v_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr,
    qo_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr,
    start_frame_ptr, dst_start_ptr, row_lo_ptr, shift_ptr,
    stride_sf, stride_ds, stride_rl, stride_shift,
    stride_qlb, stride_qlt, stride_klb, stride_klt, stride_vb, stride_vt,
    stride_qob, stride_qot, stride_qoh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_ksb, stride_kss, stride_vsb, stride_vss,
    stride_tab, table_rows,
    n, H, hg, wg, ring_lo, ring_size, inv_n, eps,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
    T_SLOTS: tl.constexpr, HW_SLOTS: tl.constexpr, FP8_MAX: tl.constexpr,
    HAS_SHIFT: tl.constexpr, INTERPRET: tl.constexpr,
):
    b = tl.program_id(1)
    b64 = b.to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    t_ok = t < n
    h_ok = offs_h < H
    hd_offs = offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    mask = t_ok[:, None, None] & h_ok[None, :, None]

    start_frame = tl.load(start_frame_ptr + b * stride_sf).to(tl.int32)
    dst_start = tl.load(dst_start_ptr + b * stride_ds).to(tl.int32)
    row_lo = tl.load(row_lo_ptr + b * stride_rl).to(tl.int32)
    cos, sin = _token_tables(cos_ptr, sin_ptr, t, t_ok, start_frame, hg, wg, stride_tab, table_rows,
                             HEAD_DIM // 2, T_SLOTS, HW_SLOTS)

    t64 = t.to(tl.int64)[:, None, None]
    hd = hd_offs[None, :, :]
    wq = tl.load(wq_ptr + hd_offs, mask=h_ok[:, None], other=0.0).to(tl.float32)
    q = tl.load(ql_ptr + b64 * stride_qlb + t64 * stride_qlt + hd, mask=mask, other=0.0).to(tl.float32)
    q = _rotate(_rms_norm_bf16(q, wq, inv_n, eps, INTERPRET), cos, sin, BLOCK_T, BLOCK_H, HEAD_DIM)
    qo_offs = offs_h[None, :, None] * stride_qoh + offs_d[None, None, :]
    tl.store(qo_ptr + b64 * stride_qob + t64 * stride_qot + qo_offs, cast_bf16(q, INTERPRET), mask=mask)

    written = _rows_written(t, n, row_lo, dst_start, ring_lo, ring_size)
    w_mask = mask & written[:, None, None]
    wk = tl.load(wk_ptr + hd_offs, mask=h_ok[:, None], other=0.0).to(tl.float32)
    k = tl.load(kl_ptr + b64 * stride_klb + t64 * stride_klt + hd, mask=w_mask, other=0.0).to(tl.float32)
    k = _rotate(_rms_norm_bf16(k, wk, inv_n, eps, INTERPRET), cos, sin, BLOCK_T, BLOCK_H, HEAD_DIM)
    # Quantize what the bf16 cache would hold, so the fp8 cache is one rounding away from it.
    k8, k_scale = _quant_rows(cast_bf16(k, INTERPRET).to(tl.float32), FP8_MAX, INTERPRET)
    v = tl.load(v_ptr + b64 * stride_vb + t64 * stride_vt + hd, mask=w_mask, other=0.0).to(tl.float32)
    v8, v_scale = _quant_rows(v, FP8_MAX, INTERPRET)

    shift = 0
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + b * stride_shift).to(tl.int32)
    slot = _ring_slot(dst_start + t, ring_lo, ring_size, shift)[:, None]
    kc_offs = offs_h[None, :, None] * stride_kch + offs_d[None, None, :]
    vc_offs = offs_h[None, :, None] * stride_vch + offs_d[None, None, :]
    tl.store(kc_ptr + b64 * stride_kcb + slot[:, :, None] * stride_kcs + kc_offs, k8, mask=w_mask)
    tl.store(vc_ptr + b64 * stride_vcb + slot[:, :, None] * stride_vcs + vc_offs, v8, mask=w_mask)
    s_mask = (t_ok & written)[:, None] & h_ok[None, :]
    tl.store(ks_ptr + b64 * stride_ksb + slot * stride_kss + offs_h[None, :], k_scale, mask=s_mask)
    tl.store(vs_ptr + b64 * stride_vsb + slot * stride_vss + offs_h[None, :], v_scale, mask=s_mask)


def check_fp8_cache(k_cache, v_cache, k_scale, v_scale, device) -> None:
    """An FP8 KV cache: e4m3 [B, C, H, D] k and v (last dim contiguous), fp32 [B, C, H] scales
    (last dim contiguous)."""
    _check("k_cache", k_cache, FP8_DTYPE, 4, device)
    _check("v_cache", v_cache, FP8_DTYPE, 4, device)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ in shape")
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        _check(name, s, torch.float32, 3, device)
        if s.shape != k_cache.shape[:3]:
            raise ValueError(f"{name} must have shape {list(k_cache.shape[:3])} (B, C, H), got {list(s.shape)}")


def kv_quant_append(q_lin: torch.Tensor, k_lin: torch.Tensor, v: torch.Tensor,
                    norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
                    grid_sizes: tuple[int, int, int], start_frame, dst_start, row_lo, *,
                    ring_lo: int = 0, ring_size: int | None = None, shift=None, eps: float = 1e-6,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """rope_kv_append into an FP8 cache: rows [row_lo, n) of roped k and raw v are quantized per
    (token, head) and written with their scales; returns roped q [B, n, H, D] bf16."""
    if not isinstance(q_lin, torch.Tensor):
        raise TypeError(f"q_lin must be a torch.Tensor, got {type(q_lin).__name__}")
    device = q_lin.device
    check_fp8_cache(k_cache, v_cache, k_scale, v_scale, device)
    start_frame, dst_start, row_lo, shift, ring_size = check_append_inputs(
        q_lin, k_lin, v, norm_q_weight, norm_k_weight, cos, sin, k_cache.shape, grid_sizes,
        start_frame, dst_start, row_lo, ring_lo, ring_size, shift)
    B, n, _ = q_lin.shape
    _, C, H, D = k_cache.shape
    out = check_q_out(out, B, n, H, D, device)
    if B == 0 or n == 0:
        return out
    c = D // 2
    block_t = append_block_t(n, H, D)
    _, hg, wg = grid_sizes
    _kv_quant_append_kernel[(triton.cdiv(n, block_t), B)](
        q_lin, k_lin, v, norm_q_weight, norm_k_weight, cos, sin,
        out, k_cache, v_cache, k_scale, v_scale,
        start_frame, dst_start, row_lo, dst_start if shift is None else shift,
        0 if start_frame.numel() == 1 else 1, 0 if dst_start.numel() == 1 else 1, 0 if row_lo.numel() == 1 else 1,
        0 if shift is None or shift.numel() == 1 else 1,
        q_lin.stride(0), q_lin.stride(1), k_lin.stride(0), k_lin.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_scale.stride(0), k_scale.stride(1), v_scale.stride(0), v_scale.stride(1),
        cos.stride(0), cos.shape[0],
        n, H, hg, wg, ring_lo, ring_size, 1.0 / (H * D), eps,
        HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_T=block_t, T_SLOTS=c - 2 * (c // 3), HW_SLOTS=c // 3,
        FP8_MAX=FP8_MAX, HAS_SHIFT=shift is not None, INTERPRET=interpreting(),
        num_warps=8,
    )
    return out


def quantize_kv_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch quantizer: x [..., D] -> (e4m3 [..., D], fp32 scale [...]), one scale per last-dim row."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    # Tensor / tensor: on CUDA, torch divides by a Python scalar as a multiply by its reciprocal,
    # which is not the IEEE division the kernel does (tl.math.div_rn).
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / torch.full_like(amax, FP8_MAX))
    q = (xf * (torch.ones_like(scale) / scale)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_kv(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x8 [..., D] e4m3 times its row scale [...], in fp32."""
    return x8.float() * scale[..., None]


def kv_quant_append_ref(q_lin, k_lin, v, norm_q_weight, norm_k_weight, k_cache, v_cache, k_scale, v_scale,
                        grid_sizes, start_frame, dst_start, row_lo, **kwargs) -> torch.Tensor:
    """rope_kv_append_ref into bf16 scratch caches, then the torch quantizer on the rows written.
    Writes the fp8 caches and scales in place; returns roped q. kwargs: those of rope_kv_append_ref."""
    from .rope_kv_append import rope_kv_append_ref

    B, C, H, D = k_cache.shape
    # NaN marks the slots the bf16 reference does not write; they are left as they are.
    k_bf = torch.full((B, C, H, D), float("nan"), dtype=torch.bfloat16, device=k_cache.device)
    v_bf = k_bf.clone()
    q = rope_kv_append_ref(q_lin, k_lin, v, norm_q_weight, norm_k_weight, k_bf, v_bf, grid_sizes,
                           start_frame, dst_start, row_lo, **kwargs)
    written = ~torch.isnan(k_bf[..., 0, 0])  # a written row has no NaN: RoPE of finite inputs is finite
    for src, cache, scale in ((k_bf, k_cache, k_scale), (v_bf, v_cache, v_scale)):
        x8, s = quantize_kv_rows(src[written])
        cache.view(torch.uint8)[written] = x8.view(torch.uint8)  # torch has no fp8 index_put
        scale[written] = s
    return q


def kv_quant_append_bytes(batch: int, n: int, heads: int, head_dim: int, rows_written: int | None = None) -> float:
    """Fewest bytes one call must move: read bf16 q_lin, k_lin and v for the rows written; write
    bf16 q, and e4m3 k, v with one fp32 scale each per (row, head)."""
    rows_written = n if rows_written is None else rows_written
    row = heads * head_dim
    return batch * (n * row * 4.0 + rows_written * (row * 2.0 * 2 + row * 2.0 + heads * 8.0))

