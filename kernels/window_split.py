"""How one window attention is cut into programs: the physical key ranges each batch sample reads
(sink, window, and the ring's wrapped part, resolved on the device), their tiles aligned to
BLOCK_N, the share of tiles each split-KV program takes, and the last-arriver merge of the
split-KV partials with the workspace it uses. jit helpers and host plumbing of
kernels/window_attention.py, whose docstring states the rules.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_bf16


@triton.jit
def tile_edges(start, end, BLOCK_N: tl.constexpr):
    """Keys [start, end) in tiles aligned to BLOCK_N: (first tile, start of the full tiles, end of
    the full tiles). The tile at `first` is partial when first < start, the one at `hi_full` when
    hi_full < end; those two are read masked, the full tiles between them not."""
    first = start // BLOCK_N * BLOCK_N
    lo_full = tl.where(first < start, first + BLOCK_N, first)
    hi_full = tl.maximum(end // BLOCK_N * BLOCK_N, lo_full)
    return first, lo_full, hi_full


@triton.jit
def pick3(r, a, b, c):
    return tl.where(r == 0, a, tl.where(r == 1, b, c))


@triton.jit
def window_ranges(sink_end_ptr, win_start_ptr, win_end_ptr, shift_ptr, b,
                   stride_sink, stride_wstart, stride_wend, stride_shift, C, ring_lo, ring_size,
                   RING: tl.constexpr):
    """Sample b's physical key ranges [0, sink_end) U [win_start, win_end) U [ring_lo, wrap_end)
    (the last empty unless RING) from the device range values (kernels/window_attention.py's docstring)."""
    # Clamp on the device: the host never sees these values.
    sink_end = tl.load(sink_end_ptr + b * stride_sink).to(tl.int32)
    win_start = tl.load(win_start_ptr + b * stride_wstart).to(tl.int32)
    win_end = tl.load(win_end_ptr + b * stride_wend).to(tl.int32)
    sink_end = tl.minimum(tl.maximum(sink_end, 0), C)
    win_end = tl.minimum(tl.maximum(win_end, 0), C)
    # The union of the two ranges: the window starts no earlier than the sink ends.
    win_start = tl.minimum(tl.maximum(win_start, sink_end), C)
    # A rotated ring maps the logical window to physical [win_start, win_end) plus [ring_lo, wrap_end).
    if RING:
        sink_end = tl.minimum(sink_end, ring_lo)
        win_start = tl.maximum(win_start, ring_lo)
        length = tl.minimum(tl.maximum(win_end - win_start, 0), ring_size)
        rel = (win_start - ring_lo + tl.load(shift_ptr + b * stride_shift).to(tl.int32)) % ring_size
        # Triton's % truncates toward zero; fold a negative remainder back into [0, ring_size).
        rel = tl.where(rel < 0, rel + ring_size, rel)
        head = tl.minimum(length, ring_size - rel)
        win_start = ring_lo + rel
        win_end = win_start + head
        wrap_end = ring_lo + length - head
    else:
        wrap_end = ring_lo
    # Steady state has the window right behind the sink: one range, one ragged tile instead of two.
    if win_start == sink_end:
        sink_end = tl.maximum(win_end, sink_end)
        win_start = sink_end
        win_end = sink_end
    return sink_end, win_start, win_end, wrap_end


@triton.jit
def split_share(lo_t, hi_t, off_t, start, end, BLOCK_N: tl.constexpr):
    """The keys of range [start, end) whose aligned tiles, numbered from off_t, fall in [lo_t, hi_t);
    and the next range's first tile number."""
    first_t = start // BLOCK_N
    n_t = tl.where(end > start, tl.cdiv(end, BLOCK_N) - first_t, 0)
    a = tl.minimum(tl.maximum(lo_t - off_t, 0), n_t)
    b = tl.minimum(tl.maximum(hi_t - off_t, 0), n_t)
    return (tl.maximum(start, (first_t + a) * BLOCK_N), tl.minimum(end, (first_t + b) * BLOCK_N), off_t + n_t)


@triton.jit
def merge_store(acc, l_i, m_i, o_ptrs, m_ok, ws_ptr, ml_ptr, cnt_ptr, unit, n_units, offs_m_local, split,
                 SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
    """Normalise and store; with SPLIT > 1 leave the partial, and let the last share merge them all."""
    offs_d = tl.arange(0, HEAD_DIM)
    if SPLIT > 1:
        # Workspace: acc [SPLIT, n_units, BLOCK_M, D] and (m, l) [SPLIT, n_units, 2, BLOCK_M], fp32.
        row = (split * n_units + unit).to(tl.int64) * BLOCK_M + offs_m_local
        tl.store(ws_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc)
        ml = (split * n_units + unit).to(tl.int64) * 2 * BLOCK_M + offs_m_local
        tl.store(ml_ptr + ml, m_i)
        tl.store(ml_ptr + ml + BLOCK_M, l_i)
        # Every thread's partial is written before the counter says so (release), and read after it
        # (acquire); .cg loads bypass L1, which is not coherent across SMs.
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + unit, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            for i in tl.static_range(SPLIT):
                r = (i * n_units + unit).to(tl.int64) * 2 * BLOCK_M + offs_m_local
                m_all = tl.maximum(m_all, tl.load(ml_ptr + r, cache_modifier=".cg"))
            m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            for i in tl.static_range(SPLIT):
                r = (i * n_units + unit).to(tl.int64) * 2 * BLOCK_M + offs_m_local
                w = tl.math.exp2(tl.load(ml_ptr + r, cache_modifier=".cg") - m_ref)
                l_i += tl.load(ml_ptr + r + BLOCK_M, cache_modifier=".cg") * w
                a = (i * n_units + unit).to(tl.int64) * BLOCK_M + offs_m_local
                acc += tl.load(ws_ptr + a[:, None] * HEAD_DIM + offs_d[None, :], cache_modifier=".cg") * w[:, None]
            tl.atomic_xchg(cnt_ptr + unit, 0)
            # An empty key set gives zeros instead of 0/0.
            l_i = tl.where(l_i == 0.0, 1.0, l_i)
            tl.store(o_ptrs, cast_bf16(acc / l_i[:, None], INTERPRET), mask=m_ok[:, None])
    else:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(o_ptrs, cast_bf16(acc / l_i[:, None], INTERPRET), mask=m_ok[:, None])


_WORKSPACES: dict = {}


def split_workspace(device: torch.device, split: int, units: int, head_dim: int):
    """The split-KV partials and counters, one set per (device, size), kept for reuse: a captured
    graph bakes their addresses in, and the counters must start at zero (each launch leaves them so)."""
    key = (device, split, units, head_dim)
    ws = _WORKSPACES.get(key)
    if ws is None:
        rows = split * units * 128  # sized for BLOCK_M <= 128
        ws = (torch.empty(rows * head_dim, dtype=torch.float32, device=device),
              torch.empty(rows * 2, dtype=torch.float32, device=device),
              torch.zeros(units, dtype=torch.int32, device=device))
        _WORKSPACES[key] = ws
    return ws
