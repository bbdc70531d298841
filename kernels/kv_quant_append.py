"""q/k RMSNorm + causal RoPE + FP8 KV-cache append: rope_kv_append into the FP8 cache that
kernels/window_attention.py's FP8 path reads, with q handed over quantized, in one launch.

Same inputs, math and slot rule as kernels/rope_kv_append.py (same plan values: dst_start,
row_lo, ring_lo/ring_size/shift). What it writes (the cache layout: kernels/fp8_kv_cache.py):
- q8 [B, n, H, D] e4m3 and q_scale [B, n, H] fp32: each roped q row (token, head), rounded to bf16
  as the bf16 path would hand it over, with scale = amax|row| / 448 (1 for a row of zeros).
- k8: the roped k rows (rounded to bf16, exactly what the bf16 cache would hold) divided by the
  static per-head k_scale (`k_head_scale`).
- v8 and v_scale: V rows share one scale per group of V_GROUP slots and head. A group that this
  call fills only partly keeps its other slots (written by other calls, the sink, or not yet): its
  scale becomes max(old scale, amax(new) / 448), and when that grows, the old slots are re-rounded
  to it (one more e4m3 rounding of values already in the cache; values move by at most half a
  step of the new scale).

One launch, two kinds of programs: the first cdiv(n, BLOCK_T) handle BLOCK_T tokens x all heads
of q and k (RMSNorm needs whole rows); the others own one (V group, head) each over the whole
cache and return at once when this call writes none of the group's slots, so the grid depends only
on shapes (capturable in a CUDA graph) and each V group is read and written by one program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_bf16, check_kernel_device, check_tensor, interpreting
from .fp8_kv_cache import V_GROUP, check_fp8_cache, quantize_k_ref, quantize_rows_ref
from .fp8_quant import FP8_DTYPE, FP8_MAX, _cast_fp8
from .rope_kv_append import (_ring_slot, _rms_norm_bf16, _rotate, _rows_written, _token_tables,
                             append_block_t, check_append_inputs)


@triton.jit
def _quant_rows(x, FP8_MAX: tl.constexpr, INTERPRET: tl.constexpr):
    # x [T, H, D] fp32 -> (e4m3 [T, H, D], scale [T, H]); IEEE divisions so the scale equals torch's.
    amax = tl.max(tl.abs(x), 2)
    scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, FP8_MAX))
    inv = tl.math.div_rn(1.0, scale)
    q = tl.minimum(tl.maximum(x * inv[:, :, None], -FP8_MAX), FP8_MAX)
    return _cast_fp8(q, INTERPRET), scale


@triton.jit
def _qk_rows(ql_ptr, kl_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, qo_ptr, qs_ptr, kc_ptr, ks_ptr,
             b64, pid, start_frame, dst_start, row_lo, shift,
             stride_qlb, stride_qlt, stride_klb, stride_klt, stride_qob, stride_qot, stride_qsb, stride_qst,
             stride_kcb, stride_kcs, stride_tab, table_rows,
             n, H, hg, wg, ring_lo, ring_size, inv_n, eps,
             HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
             T_SLOTS: tl.constexpr, HW_SLOTS: tl.constexpr, FP8_MAX: tl.constexpr, INTERPRET: tl.constexpr):
    """BLOCK_T tokens x all heads: q to q8 + row scales, k to the cache with the head scales."""
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    t_ok = t < n
    h_ok = offs_h < H
    hd_offs = offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    mask = t_ok[:, None, None] & h_ok[None, :, None]
    cos, sin = _token_tables(cos_ptr, sin_ptr, t, t_ok, start_frame, hg, wg, stride_tab, table_rows,
                             HEAD_DIM // 2, T_SLOTS, HW_SLOTS)
    t64 = t.to(tl.int64)[:, None, None]
    hd = hd_offs[None, :, :]

    wq = tl.load(wq_ptr + hd_offs, mask=h_ok[:, None], other=0.0).to(tl.float32)
    q = tl.load(ql_ptr + b64 * stride_qlb + t64 * stride_qlt + hd, mask=mask, other=0.0).to(tl.float32)
    q = _rotate(_rms_norm_bf16(q, wq, inv_n, eps, INTERPRET), cos, sin, BLOCK_T, BLOCK_H, HEAD_DIM)
    # Quantize the q the bf16 path would hand to attention.
    q8, q_scale = _quant_rows(cast_bf16(q, INTERPRET).to(tl.float32), FP8_MAX, INTERPRET)
    tl.store(qo_ptr + b64 * stride_qob + t64 * stride_qot + hd, q8, mask=mask)
    tl.store(qs_ptr + b64 * stride_qsb + t.to(tl.int64)[:, None] * stride_qst + offs_h[None, :], q_scale,
             mask=t_ok[:, None] & h_ok[None, :])

    # Rows not written are not read either (masked lanes move no memory).
    w_mask = mask & _rows_written(t, n, row_lo, dst_start, ring_lo, ring_size)[:, None, None]
    wk = tl.load(wk_ptr + hd_offs, mask=h_ok[:, None], other=0.0).to(tl.float32)
    k = tl.load(kl_ptr + b64 * stride_klb + t64 * stride_klt + hd, mask=w_mask, other=0.0).to(tl.float32)
    k = _rotate(_rms_norm_bf16(k, wk, inv_n, eps, INTERPRET), cos, sin, BLOCK_T, BLOCK_H, HEAD_DIM)
    inv_ks = tl.math.div_rn(1.0, tl.load(ks_ptr + offs_h, mask=h_ok, other=1.0))
    k = cast_bf16(k, INTERPRET).to(tl.float32) * inv_ks[None, :, None]
    k8 = _cast_fp8(tl.minimum(tl.maximum(k, -FP8_MAX), FP8_MAX), INTERPRET)
    slot = _ring_slot(dst_start + t, ring_lo, ring_size, shift)[:, None, None]
    tl.store(kc_ptr + b64 * stride_kcb + slot * stride_kcs + hd, k8, mask=w_mask)


@triton.jit
def _v_group(v_ptr, vc_ptr, vs_ptr, b64, g, h, dst_start, row_lo, shift,
             stride_vb, stride_vt, stride_vcb, stride_vch, stride_vcd, stride_vsb, stride_vsg,
             n, C, ring_lo, ring_size,
             HEAD_DIM: tl.constexpr, V_GROUP: tl.constexpr, FP8_MAX: tl.constexpr, INTERPRET: tl.constexpr):
    """V group g (physical slots [g*V_GROUP, +V_GROUP)) of head h: the rows this call writes there,
    quantized with the group's (possibly grown) scale; the group's other rows re-rounded if it grew."""
    p = g * V_GROUP + tl.arange(0, V_GROUP)
    offs_d = tl.arange(0, HEAD_DIM)
    # The row t of this call a physical slot receives, if any: below ring_lo slots are logical ones;
    # a ring slot receives logical ring_lo + rel (+ any multiple of ring_size), the inverse of _ring_slot.
    rel = (p - ring_lo - shift) % ring_size
    rel = tl.where(rel < 0, rel + ring_size, rel)
    # Of more rows than the ring holds only the last ring_size are written (rope_kv_append's rule).
    lo = tl.maximum(tl.maximum(row_lo, ring_lo - dst_start), n - ring_size)
    in_ring = (p >= ring_lo) & (p < ring_lo + ring_size)
    t_ring = ring_lo + rel - dst_start - lo
    t_ring = lo + (t_ring % ring_size + ring_size) % ring_size
    t = tl.where(in_ring, t_ring, p - dst_start)
    new = (p < C) & (t >= row_lo) & (t < n) & (in_ring | (p < ring_lo))
    if tl.sum(new.to(tl.int32), 0) > 0:
        old = (p < C) & ~new
        vs_ptr_g = vs_ptr + b64 * stride_vsb + g * stride_vsg + h
        old_scale = tl.load(vs_ptr_g)
        v_new = tl.load(v_ptr + b64 * stride_vb + t.to(tl.int64)[:, None] * stride_vt + h * HEAD_DIM + offs_d[None, :],
                        mask=new[:, None], other=0.0).to(tl.float32)
        # IEEE divisions, as torch's, so the scale equals the reference's bit for bit.
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.max(tl.abs(v_new), 1), 0), FP8_MAX), old_scale)
        inv = tl.where(scale > 0.0, tl.math.div_rn(1.0, scale), 0.0)
        vt_ptrs = vc_ptr + b64 * stride_vcb + h * stride_vch + offs_d[None, :] * stride_vcd + p[:, None]
        # Old rows are read, re-rounded and written back only when the group's scale grew.
        # Vectors, not scalars, on both sides of &: the interpreter cannot mix them.
        zero = tl.zeros([V_GROUP], tl.float32)
        old_rw = old & (zero + scale > zero + old_scale) & (zero + old_scale > 0.0)
        v_old = tl.load(vt_ptrs, mask=old_rw[:, None], other=0.0).to(tl.float32) * old_scale
        vals = tl.where(new[:, None], v_new, v_old) * inv
        v8 = _cast_fp8(tl.minimum(tl.maximum(vals, -FP8_MAX), FP8_MAX), INTERPRET)
        tl.store(vt_ptrs, v8, mask=(new | old_rw)[:, None])
        tl.store(vs_ptr_g, scale)


@triton.jit(do_not_specialize=["n", "H", "hg", "wg", "C", "ring_lo", "ring_size"])
def _kv_quant_append_kernel(
    ql_ptr, kl_ptr, v_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr,
    qo_ptr, qs_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr,
    start_frame_ptr, dst_start_ptr, row_lo_ptr, shift_ptr,
    stride_sf, stride_ds, stride_rl, stride_shift,
    stride_qlb, stride_qlt, stride_klb, stride_klt, stride_vb, stride_vt,
    stride_qob, stride_qot, stride_qsb, stride_qst,
    stride_kcb, stride_kcs, stride_vcb, stride_vch, stride_vcd, stride_vsb, stride_vsg,
    stride_tab, table_rows,
    n, H, hg, wg, C, ring_lo, ring_size, inv_n, eps, qk_programs,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
    T_SLOTS: tl.constexpr, HW_SLOTS: tl.constexpr, V_GROUP: tl.constexpr, FP8_MAX: tl.constexpr,
    HAS_SHIFT: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    b64 = b.to(tl.int64)
    dst_start = tl.load(dst_start_ptr + b * stride_ds).to(tl.int32)
    row_lo = tl.load(row_lo_ptr + b * stride_rl).to(tl.int32)
    shift = 0
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + b * stride_shift).to(tl.int32)
    if pid < qk_programs:
        start_frame = tl.load(start_frame_ptr + b * stride_sf).to(tl.int32)
        _qk_rows(ql_ptr, kl_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, qo_ptr, qs_ptr, kc_ptr, ks_ptr,
                 b64, pid, start_frame, dst_start, row_lo, shift,
                 stride_qlb, stride_qlt, stride_klb, stride_klt, stride_qob, stride_qot, stride_qsb, stride_qst,
                 stride_kcb, stride_kcs, stride_tab, table_rows,
                 n, H, hg, wg, ring_lo, ring_size, inv_n, eps,
                 HEAD_DIM, BLOCK_H, BLOCK_T, T_SLOTS, HW_SLOTS, FP8_MAX, INTERPRET)
    else:
        v_pid = pid - qk_programs
        _v_group(v_ptr, vc_ptr, vs_ptr, b64, v_pid // H, v_pid % H, dst_start, row_lo, shift,
                 stride_vb, stride_vt, stride_vcb, stride_vch, stride_vcd, stride_vsb, stride_vsg,
                 n, C, ring_lo, ring_size, HEAD_DIM, V_GROUP, FP8_MAX, INTERPRET)


def kv_quant_append(q_lin: torch.Tensor, k_lin: torch.Tensor, v: torch.Tensor,
                    norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor,
                    k8: torch.Tensor, k_scale: torch.Tensor, v8: torch.Tensor, v_scale: torch.Tensor,
                    grid_sizes: tuple[int, int, int], start_frame, dst_start, row_lo, *,
                    ring_lo: int = 0, ring_size: int | None = None, shift=None, eps: float = 1e-6,
                    q_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_kv_append into the FP8 cache (module docstring): rows [row_lo, n) of roped k and raw v
    written; returns (q8 [B, n, H, D] e4m3, q_scale [B, n, H] fp32), into q_out if given."""
    check_tensor("q_lin", q_lin, dtype=torch.bfloat16, shape=("B", "n", "H*D"))
    device = q_lin.device
    check_kernel_device("kv_quant_append", device)
    check_fp8_cache(k8, k_scale, v8, v_scale, device)
    start_frame, dst_start, row_lo, shift, ring_size = check_append_inputs(
        q_lin, k_lin, v, norm_q_weight, norm_k_weight, cos, sin, k8.shape, grid_sizes,
        start_frame, dst_start, row_lo, ring_lo, ring_size, shift)
    B, n, _ = q_lin.shape
    _, C, H, D = k8.shape
    if q_out is not None:
        q8, q_scale = q_out
        check_tensor("q8", q8, dtype=FP8_DTYPE, shape=(B, n, H, D), device=device)
        # The kernel steps only the batch and token strides: a token's H x D block must be dense.
        if n and H and (q8.stride(2), q8.stride(3)) != (D, 1):
            raise ValueError(f"q8 must hold each token's {H} x {D} block densely (strides [..., {D}, 1]), "
                             f"got strides {list(q8.stride())}")
        check_tensor("q_scale", q_scale, dtype=torch.float32, shape=(B, n, H), device=device)

    if q_out is None:
        q8 = torch.empty(B, n, H, D, dtype=FP8_DTYPE, device=device)
        q_scale = torch.empty(B, n, H, dtype=torch.float32, device=device)
    if B == 0 or n == 0:
        return q8, q_scale
    c = D // 2
    block_t = append_block_t(n, H, D)
    qk_programs = triton.cdiv(n, block_t)
    v_programs = triton.cdiv(C, V_GROUP) * H
    _, hg, wg = grid_sizes
    _kv_quant_append_kernel[(qk_programs + v_programs, B)](
        q_lin, k_lin, v, norm_q_weight, norm_k_weight, cos, sin,
        q8, q_scale, k8, k_scale, v8, v_scale,
        start_frame, dst_start, row_lo, dst_start if shift is None else shift,
        0 if start_frame.numel() == 1 else 1, 0 if dst_start.numel() == 1 else 1, 0 if row_lo.numel() == 1 else 1,
        0 if shift is None or shift.numel() == 1 else 1,
        q_lin.stride(0), q_lin.stride(1), k_lin.stride(0), k_lin.stride(1), v.stride(0), v.stride(1),
        q8.stride(0), q8.stride(1), q_scale.stride(0), q_scale.stride(1),
        k8.stride(0), k8.stride(1), v8.stride(0), v8.stride(2), v8.stride(3), v_scale.stride(0), v_scale.stride(1),
        cos.stride(0), cos.shape[0],
        n, H, hg, wg, C, ring_lo, ring_size, 1.0 / (H * D), eps, qk_programs,
        HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_T=block_t, T_SLOTS=c - 2 * (c // 3), HW_SLOTS=c // 3,
        V_GROUP=V_GROUP, FP8_MAX=FP8_MAX, HAS_SHIFT=shift is not None, INTERPRET=interpreting(),
        num_warps=8,
    )
    return q8, q_scale


def kv_quant_append_ref(q_lin, k_lin, v, norm_q_weight, norm_k_weight, k8, k_scale, v8, v_scale,
                        grid_sizes, start_frame, dst_start, row_lo, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_kv_append_ref into bf16 scratch caches, then the torch quantizers: k with the head
    scales, each V group touched with max(old scale, amax(new) / 448) and its old rows re-rounded
    when that grew. Writes the FP8 cache in place; returns (q8, q_scale)."""
    from .rope_kv_append import rope_kv_append_ref

    B, C, H, D = k8.shape
    # NaN marks the slots the bf16 reference does not write; they are left as they are.
    k_bf = torch.full((B, C, H, D), float("nan"), dtype=torch.bfloat16, device=k8.device)
    v_bf = k_bf.clone()
    q = rope_kv_append_ref(q_lin, k_lin, v, norm_q_weight, norm_k_weight, k_bf, v_bf, grid_sizes,
                           start_frame, dst_start, row_lo, **kwargs)
    written = ~torch.isnan(k_bf[..., 0, 0])  # a written row has no NaN: RoPE of finite inputs is finite
    k8.view(torch.uint8)[written] = quantize_k_ref(k_bf[written], k_scale).view(torch.uint8)
    for b in range(B):
        for g in range(triton.cdiv(C, V_GROUP)):
            lo, hi = g * V_GROUP, min(C, (g + 1) * V_GROUP)
            new = written[b, lo:hi]
            if not new.any():
                continue
            old_scale = v_scale[b, g].clone()
            vals = v8[b, lo:hi].float() * old_scale[None, :, None]
            vals[new] = v_bf[b, lo:hi][new].float()
            amax = v_bf[b, lo:hi][new].float().abs().amax(dim=(0, 2))
            scale = torch.maximum(amax / torch.full_like(amax, FP8_MAX), old_scale)
            inv = torch.where(scale > 0, torch.ones_like(scale) / scale, torch.zeros_like(scale))
            requant = (~new)[:, None] & (scale > old_scale)[None, :] & (old_scale > 0)[None, :]  # [slots, H]
            rewrite = new[:, None] | requant
            q8 = (vals * inv[None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            block = v8[b, lo:hi]
            block.view(torch.uint8)[rewrite] = q8.view(torch.uint8)[rewrite]
            v_scale[b, g] = scale
    return quantize_rows_ref(q.to(torch.bfloat16))


def kv_quant_append_bytes(batch: int, n: int, heads: int, head_dim: int, rows_written: int | None = None) -> float:
    """Fewest bytes one call must move: read bf16 q_lin, k_lin and v for the rows written; write
    e4m3 q with a scale per (row, head), and e4m3 k and v (v's group scales are negligible)."""
    rows_written = n if rows_written is None else rows_written
    row = heads * head_dim
    return batch * (n * row * 2.0 + n * (row + heads * 4.0) + rows_written * (row * 2.0 * 2 + row * 2.0))
