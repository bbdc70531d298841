"""Window attention, one kernel for the bf16 and the FP8 cache (exploration version: variant flags).

Shapes, layout and dtypes:
- q:   [B, Lq, H, D] bf16, or e4m3 with q_scale [B, Lq, H] fp32 (one scale per row: token, head).
- k:   [B, C, H, D] bf16 or e4m3 (the stock slot-major layout: rows of D are K-major for Q.K^T).
- v:   bf16 [B, C, H, D]; e4m3 either [B, C, H, D] or, V_T, a [B, C, H, D] view of a [B, H, D, C]
       buffer (tokens contiguous: Hopper's FP8 MMA wants P.V's reduction axis, the tokens, K-major).
- k_scale / v_scale (FP8 only): "head" [H] fp32, or "token" [B, C, H] fp32.
- ranges as in kernels/window_attention.py (sink_end, win_start, win_end, ring layout, shift).
- out: [B, Lq, H, D] bf16.

Split-KV (SPLIT > 1): the key tiles of every (query tile, head) are cut into SPLIT contiguous
shares, each a program: the grid has SPLIT times the programs, so the last wave of 444 tiles on
132 SMs (3.36 waves at LongLive's shape) stops idling most of the GPU. Each share writes its fp32
partial (acc, m, l) to a workspace and bumps a counter; the last to arrive merges all shares in
split order (deterministic) and writes the output, then resets the counter.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import cast_bf16, interpreting
from .fp8_quant import FP8_MAX, _cast_fp8
from .window_attention import _LOG2E, _window_ranges

LOG2_FP8_MAX = math.log2(FP8_MAX)
SCALE_MODES = {"none": 0, "head": 1, "token": 2, "tile": 3}


@triton.jit
def _exp2_f16(x, EXP16: tl.constexpr, INTERPRET: tl.constexpr):
    """exp2 of fp32 x: fp32 out, or with EXP16 fp16 out from the packed ex2.approx.f16x2 (two
    results per MUFU op; the result feeds an e4m3 cast, far coarser than fp16)."""
    if EXP16:
        if INTERPRET:
            return tl.math.exp2(x).to(tl.float16)
        else:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t; cvt.rn.f16x2.f32 t, $2, $1; ex2.approx.f16x2 $0, t; }",
                "=r,f,f", [x], dtype=tl.float16, is_pure=True, pack=2)
    else:
        return tl.math.exp2(x)


@triton.jit
def _dot(a, b, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    # The interpreter's bf16 tl.dot is wrong; fp32 operands are exact there (fp8 dots are right).
    if INTERPRET and not FP8:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _tile(acc, l_i, m_i, q, a_row, k, v, ks, vs, valid,
          MASKED: tl.constexpr, FP8: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr,
          EXP16: tl.constexpr, TWO_LEVEL: tl.constexpr, P_SHIFT: tl.constexpr, INTERPRET: tl.constexpr):
    s = _dot(q, tl.trans(k), FP8, INTERPRET)
    if K_SCALE == 2:
        s = s * ks[None, :]
    if K_SCALE == 3:
        # One k scale per (tile, head): it scales the whole tile's scores, a per-row factor.
        a_row = a_row * ks
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    if V_SCALE == 3:
        # One v scale per (tile, head) rides in the exponent: P~ = 448 vs exp2(x - m), so that
        # P~ . v8 = 448 exp2(x - m) V; m tracks max(x + log2 vs) so P~ <= 448; l takes P~ / vs.
        log_vs = tl.math.log2(vs)
        m_new = tl.maximum(m_i, tl.max(s, 1) * a_row + log_vs)
        p = _exp2_f16(s * a_row[:, None] - (m_new - P_SHIFT - log_vs)[:, None], EXP16, INTERPRET)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1) * (1.0 / vs)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * a_row)
        # P_SHIFT (log2 448 for fp8) puts P in [0, 448], e4m3's whole range, at no cost: it rides in
        # the FMA's addend; l sums the same shifted P, so it cancels in acc / l.
        p = _exp2_f16(s * a_row[:, None] - (m_new - P_SHIFT)[:, None], EXP16, INTERPRET)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    if V_SCALE == 2:
        v_max = tl.max(vs, 0)
        v_max = tl.where(v_max > 0.0, v_max, 1.0)
        p = p * (vs / v_max).to(p.dtype)[None, :]
    if FP8:
        if INTERPRET:
            pv = _cast_fp8(p.to(tl.float32), INTERPRET)
        else:
            pv = p.to(tl.float8e4nv)
    else:
        pv = cast_bf16(p, INTERPRET)
    if V_SCALE == 2:
        acc = acc * alpha[:, None] + _dot(pv, v, FP8, INTERPRET) * v_max
    elif TWO_LEVEL:
        acc = acc * alpha[:, None] + _dot(pv, v, FP8, INTERPRET)
    else:
        if INTERPRET and not FP8:
            acc = tl.dot(pv.to(tl.float32), v.to(tl.float32), acc * alpha[:, None])
        else:
            acc = tl.dot(pv, v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _load_kv(k_base, v_base, ks_base, vs_base, k_desc, v_desc, desc_k_row, desc_v_row, desc_col,
             n0, offs_n, offs_d, valid, stride_kn, stride_vn, stride_vd, stride_ksn, stride_vsn,
             MASKED: tl.constexpr, FP8: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr,
             V_T: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = n0 + offs_n
    if USE_TMA:
        k = k_desc.load([desc_k_row + n0, desc_col])
        if V_T:
            v = tl.trans(v_desc.load([desc_v_row, n0]))
        else:
            v = v_desc.load([desc_k_row + n0, desc_col])
        if MASKED:
            # Slots past the range may hold anything (a TMA tile reads real slots): 0 * NaN is NaN.
            if FP8:
                vi = v.to(tl.int8, bitcast=True)
                v = tl.where(valid[:, None], vi, tl.zeros_like(vi)).to(v.dtype, bitcast=True)
            else:
                v = tl.where(valid[:, None], v, 0.0)
    elif MASKED:
        # Masked-off rows read as 0 (and their scores are -inf), so a partial tile adds nothing.
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
        if V_T:
            v = tl.trans(tl.load(v_base + offs_d[:, None] * stride_vd + rows[None, :], mask=valid[None, :],
                                 other=0.0))
        else:
            v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :])
        if V_T:
            v = tl.trans(tl.load(v_base + offs_d[:, None] * stride_vd + rows[None, :]))
        else:
            v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :])
    ks = 0.0
    vs = 0.0
    if K_SCALE == 2:
        if MASKED:
            ks = tl.load(ks_base + rows * stride_ksn, mask=valid, other=0.0)
        else:
            ks = tl.load(ks_base + rows * stride_ksn)
    if V_SCALE == 2:
        if MASKED:
            vs = tl.load(vs_base + rows * stride_vsn, mask=valid, other=0.0)
        else:
            vs = tl.load(vs_base + rows * stride_vsn)
    # Tile scales: [B, C / BLOCK_N, H], tile n0 // BLOCK_N (tiles start on multiples of BLOCK_N).
    if K_SCALE == 3:
        ks = tl.load(ks_base + (n0 // BLOCK_N) * stride_ksn)
    if V_SCALE == 3:
        vs = tl.load(vs_base + (n0 // BLOCK_N) * stride_vsn)
    return k, v, ks, vs


@triton.jit
def _range(acc, l_i, m_i, q, a_row, k_base, v_base, ks_base, vs_base, k_desc, v_desc,
           desc_k_row, desc_v_row, desc_col, start, end,
           stride_kn, stride_vn, stride_vd, stride_ksn, stride_vsn,
           BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, FP8: tl.constexpr, K_SCALE: tl.constexpr,
           V_SCALE: tl.constexpr, V_T: tl.constexpr, USE_TMA: tl.constexpr, EXP16: tl.constexpr,
           TWO_LEVEL: tl.constexpr, P_SHIFT: tl.constexpr, INTERPRET: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    for n0 in tl.range(start, full_end, BLOCK_N):
        k, v, ks, vs = _load_kv(k_base, v_base, ks_base, vs_base, k_desc, v_desc, desc_k_row, desc_v_row,
                                desc_col, n0, offs_n, offs_d, offs_n, stride_kn, stride_vn, stride_vd, stride_ksn, stride_vsn,
                                False, FP8, K_SCALE, V_SCALE, V_T, USE_TMA, BLOCK_N)
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, a_row, k, v, ks, vs, offs_n, False, FP8, K_SCALE, V_SCALE,
                              EXP16, TWO_LEVEL, P_SHIFT, INTERPRET)
    if full_end < end:
        valid = full_end + offs_n < end
        k, v, ks, vs = _load_kv(k_base, v_base, ks_base, vs_base, k_desc, v_desc, desc_k_row, desc_v_row,
                                desc_col, full_end, offs_n, offs_d, valid, stride_kn, stride_vn, stride_vd,
                                stride_ksn, stride_vsn, True, FP8, K_SCALE, V_SCALE, V_T, USE_TMA, BLOCK_N)
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, a_row, k, v, ks, vs, valid, True, FP8, K_SCALE, V_SCALE,
                              EXP16, TWO_LEVEL, P_SHIFT, INTERPRET)
    return acc, l_i, m_i


@triton.jit
def _share(lo_t, hi_t, off_t, start, end, BLOCK_N: tl.constexpr):
    """The keys of range [start, end) whose tiles (numbered from off_t) fall in [lo_t, hi_t)."""
    n_t = tl.cdiv(tl.maximum(end - start, 0), BLOCK_N)
    a = tl.minimum(tl.maximum(lo_t - off_t, 0), n_t)
    b = tl.minimum(tl.maximum(hi_t - off_t, 0), n_t)
    return start + a * BLOCK_N, tl.minimum(start + b * BLOCK_N, end), off_t + n_t


@triton.jit(do_not_specialize=["B", "H", "Lq", "C", "ring_lo", "ring_size", "lq_pad"])
def _attn_kernel(
    q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, o_ptr, ws_ptr, ml_ptr, cnt_ptr,
    sink_end_ptr, win_start_ptr, win_end_ptr, shift_ptr,
    stride_sink, stride_wstart, stride_wend, stride_shift,
    stride_qb, stride_qm, stride_qh, stride_qsb, stride_qsm,
    stride_kb, stride_kn, stride_kh, stride_ksb, stride_ksn, stride_vsb, stride_vsn,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh,
    B, H, Lq, C, qk_scale, ring_lo, ring_size, lq_pad,
    LQ_BUCKET: tl.constexpr,  # autotune key only
    HEAD_DIM: tl.constexpr, RING: tl.constexpr, USE_TMA: tl.constexpr, FP8: tl.constexpr,
    K_SCALE: tl.constexpr, V_SCALE: tl.constexpr, V_T: tl.constexpr, EXP16: tl.constexpr,
    TWO_LEVEL: tl.constexpr, SPLIT: tl.constexpr, P_SHIFT: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    sink_end, win_start, win_end, wrap_end = _window_ranges(
        sink_end_ptr, win_start_ptr, win_end_ptr, shift_ptr, b, stride_sink, stride_wstart, stride_wend,
        stride_shift, C, ring_lo, ring_size, RING)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Lq
    q = tl.load(q_ptr + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    # a_row turns a raw Q.K^T dot into log2-domain scores: softmax scale * log2 e, times the
    # q row scale and the per-head k scale where those exist.
    a_row = tl.full([BLOCK_M], 1.0, tl.float32) * qk_scale
    if FP8:
        a_row = a_row * tl.load(qs_ptr + b64 * stride_qsb + offs_m * stride_qsm + h, mask=m_ok, other=0.0)
    if K_SCALE == 1:
        a_row = a_row * tl.load(ks_ptr + h)

    k_base = k_ptr + b64 * stride_kb + h * stride_kh
    v_base = v_ptr + b64 * stride_vb + h * stride_vh
    ks_base = ks_ptr + b64 * stride_ksb + h
    vs_base = vs_ptr + b64 * stride_vsb + h
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_ptr, shape=[B * C, H * HEAD_DIM], strides=[H * HEAD_DIM, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        if V_T:
            v_desc = tl.make_tensor_descriptor(v_ptr, shape=[B * H * HEAD_DIM, C], strides=[C, 1],
                                               block_shape=[HEAD_DIM, BLOCK_N])
        else:
            v_desc = tl.make_tensor_descriptor(v_ptr, shape=[B * C, H * HEAD_DIM], strides=[H * HEAD_DIM, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
    else:
        k_desc = k_ptr
        v_desc = v_ptr
    desc_k_row = b * C
    desc_v_row = (b * H + h) * HEAD_DIM
    desc_col = h * HEAD_DIM

    # This program's share of the key tiles, numbered across the (up to) three ranges in order.
    n_tiles = (tl.cdiv(sink_end, BLOCK_N) + tl.cdiv(tl.maximum(win_end - win_start, 0), BLOCK_N)
               + tl.cdiv(tl.maximum(wrap_end - ring_lo, 0), BLOCK_N))
    lo_t = split * n_tiles // SPLIT
    hi_t = (split + 1) * n_tiles // SPLIT

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    s0, e0, off = _share(lo_t, hi_t, 0, 0, sink_end, BLOCK_N)
    acc, l_i, m_i = _range(acc, l_i, m_i, q, a_row, k_base, v_base, ks_base, vs_base, k_desc, v_desc,
                           desc_k_row, desc_v_row, desc_col, s0, e0, stride_kn, stride_vn, stride_vd, stride_ksn,
                           stride_vsn,
                           BLOCK_N, HEAD_DIM, FP8, K_SCALE, V_SCALE, V_T, USE_TMA, EXP16, TWO_LEVEL, P_SHIFT,
                           INTERPRET)
    s1, e1, off = _share(lo_t, hi_t, off, win_start, win_end, BLOCK_N)
    acc, l_i, m_i = _range(acc, l_i, m_i, q, a_row, k_base, v_base, ks_base, vs_base, k_desc, v_desc,
                           desc_k_row, desc_v_row, desc_col, s1, e1, stride_kn, stride_vn, stride_vd, stride_ksn,
                           stride_vsn,
                           BLOCK_N, HEAD_DIM, FP8, K_SCALE, V_SCALE, V_T, USE_TMA, EXP16, TWO_LEVEL, P_SHIFT,
                           INTERPRET)
    if RING:
        s2, e2, off = _share(lo_t, hi_t, off, ring_lo, wrap_end, BLOCK_N)
        acc, l_i, m_i = _range(acc, l_i, m_i, q, a_row, k_base, v_base, ks_base, vs_base, k_desc, v_desc,
                               desc_k_row, desc_v_row, desc_col, s2, e2, stride_kn, stride_vn, stride_vd,
                               stride_ksn, stride_vsn, BLOCK_N, HEAD_DIM, FP8, K_SCALE, V_SCALE, V_T, USE_TMA, EXP16,
                               TWO_LEVEL, P_SHIFT, INTERPRET)

    o_ptrs = o_ptr + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    if SPLIT > 1:
        # Workspace rows: [SPLIT, B*H, lq_pad, D] accumulators and [SPLIT, B*H, 2, lq_pad] (m, l).
        row = (split * B * H + pid_bh).to(tl.int64) * lq_pad + offs_m
        tl.store(ws_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc)
        ml_row = (split * B * H + pid_bh).to(tl.int64) * 2 * lq_pad + offs_m
        tl.store(ml_ptr + ml_row, m_i)
        tl.store(ml_ptr + ml_row + lq_pad, l_i)
        tl.debug_barrier()
        counter = cnt_ptr + pid_bh * tl.cdiv(lq_pad, 16) + pid_m
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            # The last share merges all of them in split order, so the result does not depend on
            # which share arrived last.
            m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            for i in tl.static_range(SPLIT):
                r = (i * B * H + pid_bh).to(tl.int64) * 2 * lq_pad + offs_m
                m_all = tl.maximum(m_all, tl.load(ml_ptr + r, cache_modifier=".cg"))
            m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            for i in tl.static_range(SPLIT):
                r = (i * B * H + pid_bh).to(tl.int64) * 2 * lq_pad + offs_m
                w = tl.math.exp2(tl.load(ml_ptr + r, cache_modifier=".cg") - m_ref)
                l_i += tl.load(ml_ptr + r + lq_pad, cache_modifier=".cg") * w
                ar = (i * B * H + pid_bh).to(tl.int64) * lq_pad + offs_m
                acc += tl.load(ws_ptr + ar[:, None] * HEAD_DIM + offs_d[None, :], cache_modifier=".cg") * w[:, None]
            tl.atomic_xchg(counter, 0)
            l_i = tl.where(l_i == 0.0, 1.0, l_i)
            out = acc / l_i[:, None]
            if V_SCALE == 1:
                out = out * tl.load(vs_ptr + h)
            tl.store(o_ptrs, cast_bf16(out, INTERPRET), mask=m_ok[:, None])
    else:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        if V_SCALE == 1:
            out = out * tl.load(vs_ptr + h)
        tl.store(o_ptrs, cast_bf16(out, INTERPRET), mask=m_ok[:, None])


_WORKSPACES: dict = {}


def _workspace(device, split: int, bh: int, lq: int, d: int):
    lq_pad = triton.cdiv(lq, 128) * 128
    key = (device, split, bh, lq_pad, d)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = (torch.empty(split * bh * lq_pad * d, dtype=torch.float32, device=device),
              torch.empty(split * bh * 2 * lq_pad, dtype=torch.float32, device=device),
              torch.zeros(bh * triton.cdiv(lq_pad, 16), dtype=torch.int32, device=device), lq_pad)
        _WORKSPACES[key] = ws
    return ws


def _tma_allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def attention_v2(q, k, v, sink_end, win_start, win_end, *, q_scale=None, k_scale=None, v_scale=None,
                 k_scale_mode="none", v_scale_mode="none", v_t=False, ring_lo=0, ring_size=None, shift=None,
                 scale=None, out=None, use_tma=False, exp16=False, two_level=False, split=1,
                 config=None):
    """Exploration launcher (argument checks come with the production version)."""
    B, Lq, H, D = q.shape
    C = k.shape[1]
    fp8 = q.dtype == torch.float8_e4m3fn
    device = q.device
    ring_size = C - ring_lo if ring_size is None else ring_size
    if out is None:
        out = torch.empty((B, Lq, H, D), dtype=torch.bfloat16, device=device)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    interpret = interpreting()
    if use_tma and not interpret:
        triton.set_allocator(_tma_allocator)
    dummy = out
    qs = q_scale if q_scale is not None else dummy
    ks = k_scale if k_scale is not None else dummy
    vs = v_scale if v_scale is not None else dummy
    if split > 1:
        ws, ml, cnt, lq_pad = _workspace(device, split, B * H, Lq, D)
    else:
        ws, ml, cnt, lq_pad = dummy, dummy, dummy, 0
    ks_b, ks_n = (ks.stride(0), ks.stride(1)) if k_scale_mode in ("token", "tile") else (0, 0)
    vs_b, vs_n = (vs.stride(0), vs.stride(1)) if v_scale_mode in ("token", "tile") else (0, 0)
    if v_t:
        stride_vb, stride_vn, stride_vh, stride_vd = v.stride(0), v.stride(1), v.stride(2), v.stride(3)
        assert stride_vn == 1 and stride_vd == C, "v_t wants a [B, C, H, D] view of a [B, H, D, C] buffer"
    else:
        stride_vb, stride_vn, stride_vh, stride_vd = v.stride(0), v.stride(1), v.stride(2), 1
    args = (q, qs, k, ks, v, vs, out, ws, ml, cnt,
            sink_end, win_start, win_end, sink_end if shift is None else shift,
            0 if sink_end.numel() == 1 else 1, 0 if win_start.numel() == 1 else 1, 0 if win_end.numel() == 1 else 1,
            0 if shift is None or shift.numel() == 1 else 1,
            q.stride(0), q.stride(1), q.stride(2),
            qs.stride(0) if q_scale is not None else 0, qs.stride(1) if q_scale is not None else 0,
            k.stride(0), k.stride(1), k.stride(2), ks_b, ks_n, vs_b, vs_n,
            stride_vb, stride_vn, stride_vh, stride_vd,
            out.stride(0), out.stride(1), out.stride(2),
            B, H, Lq, C, scale * _LOG2E, ring_lo, ring_size, lq_pad)
    meta = dict(LQ_BUCKET=min(triton.next_power_of_2(Lq), 8192), HEAD_DIM=D, RING=shift is not None,
                USE_TMA=bool(use_tma) and not interpret, FP8=fp8, K_SCALE=SCALE_MODES[k_scale_mode],
                V_SCALE=SCALE_MODES[v_scale_mode], V_T=v_t, EXP16=exp16, TWO_LEVEL=two_level, SPLIT=split,
                P_SHIFT=LOG2_FP8_MAX if fp8 else 0.0, INTERPRET=interpret)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16} if interpret else dict(config)
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H, split)
    _attn_kernel[grid](*args, **meta, **cfg)
    return out
