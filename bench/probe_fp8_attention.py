"""Probe: which Hopper overlaps Triton 3.6 lets the FP8 window attention reach (issue 22, item 2).

A minimal FP8 attention forward with our FP8 cache layout (q8 [B, Lq, H, D] with one scale per row,
k8 [B, C, H, D] with one scale per head, v8 tokens-contiguous [B, H, D, C] with one scale per
128-slot group; all of [0, C) attended, C a multiple of 128; B = 1) in five schedules, timed beside
our kernel (`window_attention_fp8`, TMA, split 2) and cuDNN's bf16 SDPA at LongLive's shape:
- `base`: the tile body of kernels/window_attention.py (S = Q.K^T; softmax; P.V into a fresh
  accumulator added in fp32), TMA loads;
- `prefetch`: S of tile j+1 is issued before the softmax of tile j (FlashAttention-3's intra-
  warpgroup pipelining written by hand): the wgmma can run while the MUFU and FMA units work
  (Triton 3.6 waits for it at once: `WARPGROUP.DEPBAR.LE gsb0, 0x0` right after the QGMMA);
- `ws`: the key loop as `tl.range(..., warp_specialize=True)` (Triton's automatic warp
  specialisation: a producer warp for the TMA loads, consumers for the math);
- `gluon`: the same math in Gluon (Triton's explicit-layout dialect, `triton.experimental.gluon`),
  where the pipelining is written out: S_{j+1} = Q.K_{j+1}^T is an async wgmma issued before the
  softmax of tile j and waited after it, P~.V goes into a fresh accumulator (waited at once), K and
  V stream through a TMA ring of STAGES slots with one mbarrier per slot. 64 query rows per
  warpgroup of 4 warps, 128-key tiles;
- `gluon+pv`: as `gluon` with 64-key tiles, which leave the registers for P~.V of tile j-1 to run
  under the softmax of tile j as well (two wgmmas under every softmax, FlashAttention-3's full
  intra-warpgroup overlap).
Each prints ms, TFLOP/s, the rate ratio to cuDNN (the probes attend the whole 128-slot tiles
of the window only) and the cosine against the fp32 reference, or a one-line reason it did not
compile or run. The Gluon rows run last (a hand-built mbarrier pipeline that hangs or faults must
not cost the other rows). One call of about a minute on an H100:

    python -m longlive_triton.bench.probe_fp8_attention [--lkv 18720 14040]

Gluon has no CPU interpreter: the GPU run's cosine is its check. Without a GPU, `--sass` compiles
the Gluon kernel for sm_90 (Triton's bundled ptxas) and prints, per config, the instruction counts
and, for each S = Q.K^T wgmma, how many MUFU.EX2 the SASS issues under it before the next
WARPGROUP.DEPBAR; exit status 1 if a config does not compile or shows no overlap:

    python -m longlive_triton.bench.probe_fp8_attention --sass
"""
from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl

try:  # Gluon is experimental: without it the probe still runs the Triton modes.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # Names that moved: Triton 3.6 has tma.async_copy_global_to_shared and gl.thread_barrier, 3.9 async_load and
    # gl.barrier.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _GLUON_ERROR = None
except (ImportError, AttributeError) as e:
    _GLUON_ERROR = f"{type(e).__name__}: {e}"

from ..kernels.fp8_kv_cache import quantize_k_ref, quantize_rows_ref, quantize_v_groups_ref
from ..kernels.window_attention import window_attention_flops, window_attention_fp8, window_attention_fp8_ref
from longlive_triton.numerics import cosine

HEADS, HEAD_DIM, LQ = 12, 128, 4680
MODES = {"base": 0, "prefetch": 1, "ws": 2}


@triton.jit
def _softmax_pv(acc, l_i, m_i, s, a_row, v, vs):
    log_vs = tl.math.log2(vs)
    m_new = tl.maximum(m_i, tl.max(s, 1) * a_row + log_vs)
    p = tl.math.exp2(s * a_row[:, None] - (m_new - (log_vs + 8.807354922057604))[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1) * (1.0 / vs)
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)
    return acc, l_i, m_new


@triton.jit
def _probe_attn(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, o_ptr, Lq, C, H, qk_scale, stride_vd,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Lq
    q = tl.load(q_ptr + offs_m[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :], mask=m_ok[:, None],
                other=0.0)
    a_row = qk_scale * tl.load(qs_ptr + offs_m * H + h, mask=m_ok, other=0.0) * tl.load(ks_ptr + h)
    k_desc = tl.make_tensor_descriptor(k_ptr, shape=[C, H * HEAD_DIM], strides=[H * HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(v_ptr, shape=[H * HEAD_DIM, C], strides=[stride_vd, 1],
                                       block_shape=[HEAD_DIM, BLOCK_N])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if MODE == 1:
        s = tl.dot(q, tl.trans(k_desc.load([0, h * HEAD_DIM])))
        for n0 in range(0, C - BLOCK_N, BLOCK_N):
            s_next = tl.dot(q, tl.trans(k_desc.load([n0 + BLOCK_N, h * HEAD_DIM])))
            v = tl.trans(v_desc.load([h * HEAD_DIM, n0]))
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, a_row, v, tl.load(vs_ptr + (n0 // BLOCK_N) * H + h))
            s = s_next
        n0 = C - BLOCK_N
        v = tl.trans(v_desc.load([h * HEAD_DIM, n0]))
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, a_row, v, tl.load(vs_ptr + (n0 // BLOCK_N) * H + h))
    else:
        for n0 in tl.range(0, C, BLOCK_N, warp_specialize=MODE == 2):
            s = tl.dot(q, tl.trans(k_desc.load([n0, h * HEAD_DIM])))
            v = tl.trans(v_desc.load([h * HEAD_DIM, n0]))
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, a_row, v, tl.load(vs_ptr + (n0 // BLOCK_N) * H + h))
    out = acc / l_i[:, None]
    tl.store(o_ptr + offs_m[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :], out.to(tl.bfloat16),
             mask=m_ok[:, None])


def probe_attn(q8, q_scale, k8, k_scale, v8, v_scale, out, mode: str, block_m: int, num_warps: int, num_stages: int):
    """B = 1 only; v8 the cache's [1, C, H, D] view of a tokens-contiguous [1, H, D, C'] buffer."""
    Lq, C = q8.shape[1], k8.shape[1] // 128 * 128  # whole tiles only: the probe has no masked tile
    grid = (triton.cdiv(Lq, block_m), HEADS)
    _probe_attn[grid](q8, q_scale, k8, k_scale, v8, v_scale, out, Lq, C, HEADS, HEAD_DIM ** -0.5 * 1.4426950408889634,
                      v8.stride(3),
                      HEAD_DIM=HEAD_DIM, BLOCK_M=block_m, BLOCK_N=128, MODE=MODES[mode], num_warps=num_warps,
                      num_stages=num_stages)
    return out


def _gluon_jit(fn):
    """gluon.jit where this Triton has Gluon; else the plain function (the `gluon` mode reports why)."""
    return gluon.jit(fn) if _GLUON_ERROR is None else fn


@_gluon_jit
def _gl_softmax(s, a_row, m_i, l_i, vs, log_vs):
    """`_softmax_pv`'s math up to P~: (P~ fp32, alpha, l, m) for the tile's scores s."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * a_row + log_vs)
    p = gl.exp2(s * gl.expand_dims(a_row, 1) - gl.expand_dims(m_new - (log_vs + 8.807354922057604), 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1) * (1.0 / vs)
    return p, alpha, l_i, m_new


@_gluon_jit
def _gl_load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, t, n_tiles, h,
                HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of key tile t (K [BLOCK_N, D] and V^T [D, BLOCK_N]) into ring slot t % STAGES; none past the end."""
    slot = t % STAGES
    ok = t < n_tiles
    mbarrier.expect(k_bars.index(slot), k_desc.block_type.nbytes, pred=ok)
    _tma_load(k_desc, [t * BLOCK_N, h * HEAD_DIM], k_bars.index(slot), k_smem.index(slot), pred=ok)
    mbarrier.expect(v_bars.index(slot), v_desc.block_type.nbytes, pred=ok)
    _tma_load(v_desc, [h * HEAD_DIM, t * BLOCK_N], v_bars.index(slot), v_smem.index(slot), pred=ok)


@_gluon_jit
def _gl_p8(p, p_layout: gl.constexpr):
    """P~ as the e4m3 register operand A of the P~.V wgmma."""
    return gl.convert_layout(p.to(gl.float8e4nv), p_layout)


@_gluon_jit
def _gl_pv(p8, v_smem, v_bars, t, STAGES: gl.constexpr, zero):
    """Issue tile t's P~.V (async) into a fresh accumulator; returns its wgmma token. P~ goes in registers
    (ptxas keeps them until the wgmma retires; Triton 3.6's wait takes no 8-bit deps)."""
    slot = t % STAGES
    mbarrier.wait(v_bars.index(slot), (t // STAGES) & 1)
    # V^T's tile is [D, BLOCK_N] with the slots contiguous: its transpose is the K-major B that FP8 wgmma needs.
    return warpgroup_mma(p8, v_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)


@_gluon_jit
def _gl_vs(vs_ptr, t, h, H, BLOCK_N: gl.constexpr):
    """The v scale of key tile t (one per 128-slot group and head)."""
    return gl.load(vs_ptr + (t * BLOCK_N // 128) * H + h)


@_gluon_jit
def _gl_tiles(s, acc, l_i, m_i, a_row, q_smem, k_smem, v_smem, k_bars, v_bars, k_desc, v_desc, vs_ptr, h, H, n_tiles,
              zero_s, zero_o, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              p_layout: gl.constexpr, o_rows: gl.constexpr):
    """All key tiles, S_0 given; S_{j+1} is in flight under the softmax of tile j, P~.V of tile j is waited at
    once (keeping it in flight across the next softmax would need S_j, S_{j+1}, the pending P~.V and the fp32
    accumulator live at once: at BLOCK_N 128, 4 x 64 registers per thread, more than a thread has)."""
    for j in range(0, n_tiles - 1):
        nxt = (j + 1) % STAGES
        mbarrier.wait(k_bars.index(nxt), ((j + 1) // STAGES) & 1)
        # S_{j+1} in flight from here to the wait below: under the softmax of tile j.
        s_next = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        vs = _gl_vs(vs_ptr, j, h, H, BLOCK_N)
        p, alpha, l_i, m_i = _gl_softmax(s, a_row, m_i, l_i, vs, gl.log2(vs))
        o = _gl_pv(_gl_p8(p, p_layout), v_smem, v_bars, j, STAGES, zero_o)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
        s = warpgroup_mma_wait(1, deps=[s_next])  # wgmma groups retire in order: S_{j+1} done, P~.V may run on
        o = warpgroup_mma_wait(0, deps=[o])
        acc = acc + o
        # Every warp is done with slot j % STAGES (K_j and V_j): refill it with tile j + STAGES.
        _cta_barrier()
        _gl_load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, j + STAGES, n_tiles, h, HEAD_DIM, BLOCK_N,
                    STAGES)
    last = n_tiles - 1
    vs = _gl_vs(vs_ptr, last, h, H, BLOCK_N)
    p, alpha, l_i, m_i = _gl_softmax(s, a_row, m_i, l_i, vs, gl.log2(vs))
    o = _gl_pv(_gl_p8(p, p_layout), v_smem, v_bars, last, STAGES, zero_o)
    o = warpgroup_mma_wait(0, deps=[o])
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1) + o
    return acc, l_i, m_i


@_gluon_jit
def _gl_tiles_deferred(s, acc, l_i, m_i, a_row, q_smem, k_smem, v_smem, k_bars, v_bars, k_desc, v_desc, vs_ptr, h, H,
                       n_tiles, zero_s, zero_o, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                       p_layout: gl.constexpr, o_rows: gl.constexpr):
    """`_gl_tiles` with two wgmmas under every softmax (FA3's full intra-warpgroup overlap): iteration j issues
    P~.V of tile j-1 and S_{j+1}, then runs the softmax of tile j, then waits for both. Both are issued and
    waited in the same iteration: a wgmma left in flight across the loop's back edge makes ptxas serialize all
    of them (C7514: it then cannot tell which group a `wait_group 1` retired). Registers allow it at BLOCK_N 64:
    S_j and S_{j+1} take 32 per thread each, the pending P~.V and the accumulator 64 each. The slot of tile j-1
    is refilled in iteration j, so K_{j+1} was loaded an iteration ahead only if STAGES >= 3. n_tiles >= 2."""
    gl.static_assert(STAGES >= 3, "the deferred schedule refills a slot one tile later: STAGES >= 3")
    # Tile 0's softmax under S_1; its P~.V goes out with the next iteration.
    mbarrier.wait(k_bars.index(1), 0)
    s_next = warpgroup_mma(q_smem, k_smem.index(1).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    vs = _gl_vs(vs_ptr, 0, h, H, BLOCK_N)
    p, alpha_prev, l_i, m_i = _gl_softmax(s, a_row, m_i, l_i, vs, gl.log2(vs))
    p8 = _gl_p8(p, p_layout)
    s = warpgroup_mma_wait(0, deps=[s_next])
    for j in range(1, n_tiles - 1):
        # log2 of the v scale before the wgmmas: libdevice's log2f branches (inf/NaN), and a branch while a
        # wgmma is in flight makes ptxas wait for it there.
        vs = _gl_vs(vs_ptr, j, h, H, BLOCK_N)
        log_vs = gl.log2(vs)
        o = _gl_pv(p8, v_smem, v_bars, j - 1, STAGES, zero_o)
        nxt = (j + 1) % STAGES
        mbarrier.wait(k_bars.index(nxt), ((j + 1) // STAGES) & 1)
        s_next = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        # In flight now: P~.V of tile j-1, then S_{j+1}; both under this softmax.
        p, alpha, l_i, m_i = _gl_softmax(s, a_row, m_i, l_i, vs, log_vs)
        # The older group, P~.V of tile j-1. P~ passes through the wait so that the compiler keeps the softmax
        # before it (nothing else needs P~ before the wait, and it would sink the exp2 below).
        o, p = warpgroup_mma_wait(1, deps=[o, p])
        acc = acc * gl.expand_dims(gl.convert_layout(alpha_prev, o_rows), 1) + o
        s = warpgroup_mma_wait(0, deps=[s_next])
        p8 = _gl_p8(p, p_layout)
        alpha_prev = alpha
        # Every warp is done with slot (j-1) % STAGES: refill it with tile j-1 + STAGES.
        _cta_barrier()
        _gl_load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, j - 1 + STAGES, n_tiles, h, HEAD_DIM, BLOCK_N,
                    STAGES)
    last = n_tiles - 1
    vs = _gl_vs(vs_ptr, last, h, H, BLOCK_N)
    log_vs = gl.log2(vs)
    o = _gl_pv(p8, v_smem, v_bars, last - 1, STAGES, zero_o)
    p, alpha, l_i, m_i = _gl_softmax(s, a_row, m_i, l_i, vs, log_vs)
    o = warpgroup_mma_wait(0, deps=[o])
    acc = acc * gl.expand_dims(gl.convert_layout(alpha_prev, o_rows), 1) + o
    o = _gl_pv(_gl_p8(p, p_layout), v_smem, v_bars, last, STAGES, zero_o)
    o = warpgroup_mma_wait(0, deps=[o])
    return acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1) + o, l_i, m_i


@_gluon_jit
def _gluon_attn(q_desc, qs_ptr, k_desc, ks_ptr, v_desc, vs_ptr, o_ptr, Lq, H, n_tiles, qk_scale,
                HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, DEFER_PV: gl.constexpr, num_warps: gl.constexpr):
    """FlashAttention-3's intra-warpgroup pipelining: S_{j+1} = Q.K_{j+1}^T is issued (async wgmma) before the
    softmax of tile j, so the tensor cores work while MUFU and FMA do (DEFER_PV: P~.V of tile j as well, see
    `_gl_tiles_deferred`). K and V stream through a ring of STAGES slots by TMA, tracked by one mbarrier per slot
    and operand. Each warpgroup (4 warps) owns 64 query rows. P~.V of every tile goes into a fresh accumulator
    added in fp32, as `_softmax_pv` does. BLOCK_M and BLOCK_N are the descriptors' block rows."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    s_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BLOCK_N, 32])
    o_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, HEAD_DIM, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_mma, k_width=4)
    rows: gl.constexpr = gl.SliceLayout(1, s_mma)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_mma)
    pid_m = gl.program_id(0)
    h = gl.program_id(1)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [pid_m * BLOCK_M, h * HEAD_DIM], q_bar, q_smem)  # rows past Lq read 0
    for t in gl.static_range(STAGES):
        _gl_load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, t, n_tiles, h, HEAD_DIM, BLOCK_N, STAGES)

    # a_row turns a raw Q.K^T dot into log2-domain scores (softmax scale * log2 e * q row scale * k head scale).
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=rows)
    a_row = qk_scale * gl.load(qs_ptr + offs_m * H + h, mask=offs_m < Lq, other=0.0) * gl.load(ks_ptr + h)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows)
    l_i = gl.zeros([BLOCK_M], gl.float32, rows)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_mma)
    # The ignored inputs of the use_acc=False wgmmas.
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_mma)
    zero_o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_mma)

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bars.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=[s])
    if DEFER_PV:
        acc, l_i, m_i = _gl_tiles_deferred(s, acc, l_i, m_i, a_row, q_smem, k_smem, v_smem, k_bars, v_bars, k_desc,
                                           v_desc, vs_ptr, h, H, n_tiles, zero_s, zero_o, HEAD_DIM, BLOCK_N, STAGES,
                                           p_layout, o_rows)
    else:
        acc, l_i, m_i = _gl_tiles(s, acc, l_i, m_i, a_row, q_smem, k_smem, v_smem, k_bars, v_bars, k_desc, v_desc,
                                  vs_ptr, h, H, n_tiles, zero_s, zero_o, HEAD_DIM, BLOCK_N, STAGES, p_layout, o_rows)

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    out = acc / gl.expand_dims(gl.convert_layout(l_i, o_rows), 1)
    offs_mo = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=o_rows)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_mma))
    o_ptrs = o_ptr + gl.expand_dims(offs_mo * (H * HEAD_DIM) + h * HEAD_DIM, 1) + gl.expand_dims(offs_d, 0)
    gl.store(o_ptrs, out.to(gl.bfloat16), mask=gl.expand_dims(offs_mo < Lq, 1))


def _gluon_descriptors(q8, k8, v8, block_m: int, block_n: int):
    """Host-side TMA descriptors over the probe's 2-D views (q8 [Lq, H*D], k8 [C, H*D], V^T [H*D, C'])."""
    Lq, C = q8.shape[1], k8.shape[1]

    def desc(base, shape, strides, block):
        layout = gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv)
        return TensorDescriptor(base, shape, strides, block, layout)

    return (desc(q8, [Lq, HEADS * HEAD_DIM], [HEADS * HEAD_DIM, 1], [block_m, HEAD_DIM]),
            desc(k8, [C, HEADS * HEAD_DIM], [HEADS * HEAD_DIM, 1], [block_n, HEAD_DIM]),
            desc(v8, [HEADS * HEAD_DIM, C], [v8.stride(3), 1], [HEAD_DIM, block_n]))


def gluon_attn(q8, q_scale, k8, k_scale, v8, v_scale, out, block_m: int, block_n: int, num_warps: int, stages: int,
               defer_pv: bool):
    """The Gluon kernel on the probe's operands (B = 1, whole 128-slot tiles); block_m = 64 per warpgroup."""
    if _GLUON_ERROR is not None:
        raise RuntimeError(f"no Gluon in this Triton ({_GLUON_ERROR})")
    if block_m != 64 * (num_warps // 4):
        raise ValueError(f"block_m {block_m} must be 64 rows per warpgroup of 4 warps (num_warps {num_warps})")
    for name, x in (("q8", q8), ("k8", k8)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous for its TMA descriptor")
    Lq, n_tiles = q8.shape[1], k8.shape[1] // 128 * 128 // block_n  # whole 128-slot tiles only, as the Triton probes
    if n_tiles < 2:
        raise ValueError(f"the Gluon schedules need 2 key tiles or more, got {n_tiles}")
    q_desc, k_desc, v_desc = _gluon_descriptors(q8, k8, v8, block_m, block_n)
    _gluon_attn[(triton.cdiv(Lq, block_m), HEADS)](
        q_desc, q_scale, k_desc, k_scale, v_desc, v_scale, out, Lq, HEADS, n_tiles,
        HEAD_DIM ** -0.5 * 1.4426950408889634, HEAD_DIM=HEAD_DIM, STAGES=stages, DEFER_PV=defer_pv,
        num_warps=num_warps)
    return out


def _operands(lkv: int):
    q = torch.randn(1, LQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, lkv, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k_scale = (k.float().abs().amax(dim=(0, 1, 3)) / 448.0).contiguous()
    q8, q_scale = quantize_rows_ref(q)
    v8, v_scale = quantize_v_groups_ref(v)
    return (q, k, v), (q8, q_scale, quantize_k_ref(k, k_scale), k_scale, v8, v_scale)


def gluon_sass(block_m: int, block_n: int, num_warps: int, stages: int, defer_pv: bool) -> tuple[str, str]:
    """The Gluon kernel compiled for sm_90 without a GPU (Triton's bundled ptxas): (SASS, cuobjdump's resource line)."""
    if _GLUON_ERROR is not None:
        raise RuntimeError(f"no Gluon in this Triton ({_GLUON_ERROR})")
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(block):
        return f"tensordesc<fp8e4nv[{block[0]}, {block[1]}],{gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv)!r}>"

    sig = {"q_desc": desc([block_m, HEAD_DIM]), "qs_ptr": "*fp32", "k_desc": desc([block_n, HEAD_DIM]),
           "ks_ptr": "*fp32", "v_desc": desc([HEAD_DIM, block_n]), "vs_ptr": "*fp32", "o_ptr": "*bf16", "Lq": "i32",
           "H": "i32", "n_tiles": "i32", "qk_scale": "fp32", "HEAD_DIM": "constexpr", "STAGES": "constexpr",
           "DEFER_PV": "constexpr", "num_warps": "constexpr"}
    const = dict(HEAD_DIM=HEAD_DIM, STAGES=stages, DEFER_PV=defer_pv, num_warps=num_warps)
    kernel = triton.compile(GluonASTSource(_gluon_attn, sig, const), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps))
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tools / "nvdisasm"), "-c", f.name], check=True, capture_output=True, text=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                               text=True).stdout.strip().splitlines()[-1].strip()
    return text, usage


def sass_overlap(text: str) -> list[tuple[int, int, str]]:
    """For each S = Q.K^T wgmma (its first QGMMA: A from shared memory, no accumulator in), the MUFU.EX2 and
    QGMMA that the SASS issues after it and before the next WARPGROUP.DEPBAR, and that DEPBAR:
    [(ex2, qgmma, depbar)]. A schedule without overlap shows 0 EX2 and `DEPBAR.LE gsb0, 0x0` (the prologue's
    S_0 always does); the pipelined loop shows the softmax's EX2 (a 64 x 128 tile is 64 per thread of its
    warpgroup), the rest of S and the P~.V QGMMA, then `0x1` (S retired, P~.V still in flight)."""
    lines = [re.sub(r"/\*[0-9a-f]*\*/|;", "", line).strip() for line in text.splitlines()]
    found = []
    for i, line in enumerate(lines):
        if re.search(r"QGMMA\.\S+ R\d+, gdesc\[UR\d+\], RZ, !UPT", line):
            ex2 = qgmma = 0
            for later in lines[i + 1:]:
                if "WARPGROUP.DEPBAR" in later:
                    found.append((ex2, qgmma, later))
                    break
                ex2 += "MUFU.EX2" in later
                qgmma += "QGMMA" in later
    return found


def _sass_report(configs) -> int:
    """Prints the overlap evidence of each config; 1 if one does not compile or has no EX2 under any S wgmma."""
    failed = 0
    for config in configs:
        block_m, block_n, num_warps = config[:3]
        label = _gluon_label(*config)
        try:
            text, usage = gluon_sass(*config)
        except Exception as e:
            failed = 1
            print(f"{label}: does not compile for sm_90: {_one_line(e)}")
            continue
        count = lambda pattern: len(re.findall(pattern, text))  # noqa: E731
        print(f"{label}: {count(r'QGMMA')} QGMMA, {count(r'MUFU[.]EX2')} MUFU.EX2, "
              f"{count(r'WARPGROUP[.]DEPBAR')} WARPGROUP.DEPBAR, {count(r'BAR[.]SYNC')} BAR.SYNC, "
              f"{count(r'[^.]STL|[^.]LDL')} local load/store (spills); {usage}")
        overlap = sass_overlap(text)
        for n, (ex2, qgmma, depbar) in enumerate(overlap):
            print(f"  S=Q.K^T wgmma {n}: then {ex2} MUFU.EX2 and {qgmma} QGMMA before `{depbar}`")
        most = max((ex2 for ex2, _, depbar in overlap if not depbar.endswith("0x0")), default=0)
        print(f"  under one S wgmma at most {most} of the tile's {block_m * block_n // (32 * num_warps)} EX2 per thread")
        if most == 0:
            failed = 1
            print(f"  {label}: NO OVERLAP: no S wgmma runs under the softmax's MUFU.EX2")
    return failed


def _one_line(e: Exception) -> str:
    """A compile or launch error in one line: the underlying error's type and its line that names an error,
    else its last line (a CompilationError's own message starts with the source excerpt)."""
    cause = e.__cause__ or e
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    said = [line for line in lines if "error" in line.lower()] or lines[-1:]
    return f"{type(cause).__name__}: {said[0][:300] if said else ''}"


def _timed_row(lkv, label, call, out, ref_al, flops_al, flops, ms_cudnn):
    """One probe row: (kv, label, ms, TFLOP/s, x cuDNN, cosine), or NaNs and a printed one-line reason."""
    try:
        out.fill_(float("nan"))
        call()
        torch.cuda.synchronize()
        cos = cosine(out.float(), ref_al)
        ms = triton.testing.do_bench(call, warmup=100, rep=400, return_mode="median")
        # x cuDNN as a rate ratio: the probe does lkv_al / lkv of the work.
        row = (lkv, label, ms, flops_al / ms / 1e9, flops_al / ms / (flops / ms_cudnn), cos)
    except Exception as e:  # a schedule that does not compile or run is a finding, not a crash
        print(f"{label} at kv {lkv}: {_one_line(e)}")
        row = (lkv, label, float("nan"), float("nan"), float("nan"), float("nan"))
    _print_row(row)
    return row


def _print_row(row):
    lkv, label, ms, tf, ratio, cos = row
    print(f"{lkv:>6} {label:<24} {ms:8.3f} {tf:8.0f} {ratio:8.3f} {cos:9.6f}", flush=True)


TRITON_CONFIGS = ((64, 4, 3), (128, 8, 3), (128, 8, 2))
# (BLOCK_M, BLOCK_N, num_warps, STAGES, DEFER_PV): 64 query rows per warpgroup. Unrolling the key loop twice
# (S_j, S_{j+1} in fixed registers, no copy between tiles) was tried and spills (255 registers).
# All take ~230-255 registers a thread, so an SM holds two warpgroups either way (two CTAs of 4 warps or one of 8).
GLUON_CONFIGS = ((64, 128, 4, 3, False), (128, 128, 8, 2, False), (64, 64, 4, 4, True), (64, 64, 4, 6, True))


def _gluon_label(block_m, block_n, num_warps, stages, defer_pv):
    return f"gluon{'+pv' if defer_pv else ''} {block_m}x{block_n} w{num_warps} s{stages}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lkv", type=int, nargs="+", default=[18720, 14040])
    ap.add_argument("--sass", action="store_true",
                    help="no GPU: compile the Gluon kernel for sm_90 and show whether its wgmma overlaps the softmax")
    args = ap.parse_args(argv)
    if args.sass:
        return _sass_report(GLUON_CONFIGS)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    print("GPU", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    header = f"{'kv':>6} {'variant':<24} {'ms':>8} {'TFLOP/s':>8} {'x cuDNN':>8} {'cosine':>9}"
    print(header)
    rows, cases = [], []
    for lkv in args.lkv:
        torch.manual_seed(0)
        (q, k, v), ops = _operands(lkv)
        flops = window_attention_flops(1, LQ, lkv, HEADS, HEAD_DIM)
        ref = window_attention_fp8_ref(*ops, 0, 0, lkv)
        # The probe kernels attend the whole 128-slot tiles only: their own reference and flops.
        lkv_al = lkv // 128 * 128
        ref_al = window_attention_fp8_ref(*ops, 0, 0, lkv_al)
        flops_al = window_attention_flops(1, LQ, lkv_al, HEADS, HEAD_DIM)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        ms_cudnn = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt),
                                           warmup=100, rep=400, return_mode="median")
        rows.append((lkv, "cudnn bf16", ms_cudnn, flops / ms_cudnn / 1e9, 1.0, float("nan")))
        _print_row(rows[-1])
        out = torch.empty(1, LQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        rng = [torch.tensor([x], dtype=torch.int64, device="cuda") for x in (lkv, lkv, lkv)]
        ours = lambda: window_attention_fp8(*ops, *rng, out=out, use_tma=True, split=2)  # noqa: E731
        ours()
        ms = triton.testing.do_bench(ours, warmup=100, rep=400, return_mode="median")
        rows.append((lkv, "ours tma split2", ms, flops / ms / 1e9, ms_cudnn / ms, cosine(out.float(), ref)))
        _print_row(rows[-1])
        for mode in MODES:
            for bm, warps, stages in TRITON_CONFIGS:
                call = lambda: probe_attn(*ops, out, mode, bm, warps, stages)  # noqa: E731
                rows.append(_timed_row(lkv, f"{mode} {bm}x128 w{warps} s{stages}", call, out, ref_al, flops_al, flops,
                                        ms_cudnn))
        cases.append((lkv, ops, out, ref_al, flops_al, flops, ms_cudnn))
    # Gluon last, after every Triton row is printed: a hand-written mbarrier pipeline that went wrong would
    # hang or fault the context, and must not take the other rows with it.
    for lkv, ops, out, ref_al, flops_al, flops, ms_cudnn in cases:
        for config in GLUON_CONFIGS:
            call = lambda: gluon_attn(*ops, out, *config)  # noqa: E731
            rows.append(_timed_row(lkv, _gluon_label(*config), call, out, ref_al, flops_al, flops,
                                    ms_cudnn))
    print(header)
    for row in rows:
        _print_row(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
