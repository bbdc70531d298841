"""Attention of new queries over the sink + window slots of a KV cache, read in place: one kernel
for the bf16 cache and for the FP8 cache.

Shapes, layout and dtypes (bf16 cache, `window_attention`):
- q:        [B, Lq, H, D] bf16, already roped (any Lq; any strides with the last one 1).
- k_cache:  [B, C, H, D] bf16, the stock slot-major cache layout, read in place.
- v_cache:  [B, C, H, D] bf16, same shape as k_cache.
- out:      [B, Lq, H, D] bf16.
FP8 cache (`window_attention_fp8`, written by kernels/kv_quant_append.py):
- q8:       [B, Lq, H, D] float8_e4m3fn with q_scale [B, Lq, H] fp32: one scale per row (token, head).
- k8, k_scale, v8, v_scale: the FP8 cache of kernels/fp8_kv_cache.py (k8 [B, C, H, D] with one
            static scale per head; v8 a tokens-contiguous [B, C, H, D] view with one scale per
            group of V_GROUP = 128 physical slots and head).
Ranges (both): sink_end, win_start, win_end: int32/int64 tensors of shape [1] or [B] on q's device,
or Python ints. The keys attended are the union of slots [0, sink_end) and [win_start, win_end);
they form a set (no mask, no order), so a ring-buffer window is fine. ring_lo, ring_size, shift
(optional): with a shift (int tensor [1]/[B] on the device, or an int) the ranges are logical slots:
the sink range lies below ring_lo and is read as is, the window lies inside [ring_lo, ring_lo +
ring_size) and logical slot l is read from ring_lo + ((l - ring_lo + shift) mod ring_size), at
most two physical ranges. D is 32, 64 or 128. Scale 1/sqrt(D) unless given.

Online softmax with fp32 statistics and accumulator; SPLIT > 1 cuts each (query tile, head)'s key
tiles into SPLIT shares merged in split order (the result does not depend on arrival order). The
range values are read on the device: the grid depends only on shapes, so the launch can be captured
in a CUDA graph (autotune in warm-up, before capture). Tensor range values are clamped to [0, C]
inside the kernel; Python ints are checked on the host. The kernel's design: docs/window-attention.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (SUPPORTED_HEAD_DIMS, autotune, cast_bf16, check_kernel_device, check_tensor, dot, index_arg,
                      interpreting, launch_on, tma_supported, use_tma_allocator)
from .fp8_kv_cache import V_GROUP, check_fp8_cache, dequantize_fp8_cache
from .fp8_quant import FP8_DTYPE, _cast_fp8
from .window_split import merge_store, pick3, split_share, split_workspace, tile_edges, window_ranges

_SUPPORTED_HEAD_DIMS = SUPPORTED_HEAD_DIMS
_LOG2E = 1.4426950408889634
# The launcher runs one fixed small config under the interpreter: autotuning there would time
# every config in numpy, and small tiles exercise the tail paths at test sizes.
_INTERPRET_BLOCK_M = 16
_INTERPRET_BLOCK_N = 16


@triton.jit
def _tile(acc, l_i, m_i, q, a_row, k, v, vs, valid, MASKED: tl.constexpr, FP8: tl.constexpr,
          INTERPRET: tl.constexpr):
    """One key tile into the running (acc, l, m). vs: the tile's v scale (FP8), else unused."""
    s = dot(q, tl.trans(k), None, INTERPRET)
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    if FP8:
        log_vs = tl.math.log2(vs)
        # log2(448) keeps P~ in e4m3's range: the largest score of a row maps to 448 * vs / vs_max.
        shift = log_vs + 8.807354922057604
    else:
        log_vs = 0.0
        shift = 0.0
    m_new = tl.maximum(m_i, tl.max(s, 1) * a_row + log_vs)
    p = tl.math.exp2(s * a_row[:, None] - (m_new - shift)[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    if FP8:
        l_i = l_i * alpha + tl.sum(p, 1) * (1.0 / vs)
        # Each tile's P.V into a fresh accumulator, added in fp32: Hopper's FP8 MMA accumulates with
        # far fewer mantissa bits than fp32, and a running sum over ~150 tiles of a flat softmax
        # then loses most of each tile (relative L2 0.3 against 3e-3 at 1.3B shapes, measured).
        acc = acc * alpha[:, None] + dot(_cast_fp8(p, INTERPRET), v, None, INTERPRET)
    else:
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = dot(cast_bf16(p, INTERPRET), v, acc * alpha[:, None], INTERPRET)
    return acc, l_i, m_new


@triton.jit
def _load_tile(k_base, v_base, vs_base, k_desc, v_desc, desc_k_row, desc_v_row, desc_col, n0, valid,
               stride_kn, stride_vn, stride_vsg,
               MASKED: tl.constexpr, FP8: tl.constexpr, USE_TMA: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """k [BLOCK_N, D], v [BLOCK_N, D] (from V^T for FP8) and the tile's v scale, at slot n0."""
    rows = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if USE_TMA:
        k = k_desc.load([desc_k_row + n0, desc_col])
        if FP8:
            v = tl.trans(v_desc.load([desc_v_row, n0]))
        else:
            v = v_desc.load([desc_k_row + n0, desc_col])
        if MASKED:
            # Slots outside the range may hold anything (a TMA tile reads real slots): 0 * NaN is NaN.
            if FP8:
                vi = v.to(tl.int8, bitcast=True)
                v = tl.where(valid[:, None], vi, tl.zeros_like(vi)).to(v.dtype, bitcast=True)
            else:
                v = tl.where(valid[:, None], v, 0.0)
    elif MASKED:
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
        if FP8:
            v = tl.trans(tl.load(v_base + offs_d[:, None] * stride_vn + rows[None, :], mask=valid[None, :], other=0.0))
        else:
            v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :])
        if FP8:
            v = tl.trans(tl.load(v_base + offs_d[:, None] * stride_vn + rows[None, :]))
        else:
            v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :])
    vs = 1.0
    if FP8:
        vs = tl.load(vs_base + (n0 // BLOCK_N) * stride_vsg)
        # 0 marks a group that holds nothing: its v8 are zero, so any scale is right.
        vs = tl.where(vs > 0.0, vs, 1.0)
    return k, v, vs


# Sizes stay runtime values: specialising a size of 1 made ptxas crash (SIGSEGV, triton 3.6, H200).
@triton.jit(do_not_specialize=["B", "H", "Lq", "C", "ring_lo", "ring_size"])
def _window_attn_fwd(
    q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, o_ptr, ws_ptr, ml_ptr, cnt_ptr,
    sink_end_ptr, win_start_ptr, win_end_ptr, shift_ptr,
    stride_sink, stride_wstart, stride_wend, stride_shift,
    stride_qb, stride_qm, stride_qh, stride_qsb, stride_qsm,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_vsb, stride_vsg,
    stride_ob, stride_om, stride_oh,
    B, H, Lq, C, qk_scale, ring_lo, ring_size,
    LQ_BUCKET: tl.constexpr,  # autotune key only
    HEAD_DIM: tl.constexpr, RING: tl.constexpr, N_RANGES: tl.constexpr, USE_TMA: tl.constexpr,
    FP8: tl.constexpr, SPLIT: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Long on purpose: the tile body, range walk and merge are jit helpers already; what is left is
    # the 30-odd pointer and stride arguments and the two range loops, which must stay separate loops
    # in this one function so the compiler keeps exactly two copies of the tile body.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    sink_end, win_start, win_end, wrap_end = window_ranges(
        sink_end_ptr, win_start_ptr, win_end_ptr, shift_ptr, b, stride_sink, stride_wstart, stride_wend,
        stride_shift, C, ring_lo, ring_size, RING)

    offs_m_local = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_m_local
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Lq
    q = tl.load(q_ptr + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    # a_row turns a raw Q.K^T dot into log2-domain scores: softmax scale * log2 e, times the q row
    # scale and the k head scale of the FP8 cache.
    a_row = tl.full([BLOCK_M], 1.0, tl.float32) * qk_scale
    if FP8:
        qs = tl.load(qs_ptr + b64 * stride_qsb + offs_m * stride_qsm + h, mask=m_ok, other=0.0)
        a_row = a_row * qs * tl.load(ks_ptr + h)

    k_base = k_ptr + b64 * stride_kb + h * stride_kh
    v_base = v_ptr + b64 * stride_vb + h * stride_vh
    vs_base = vs_ptr + b64 * stride_vsb + h
    if USE_TMA:
        # The launcher checked the layouts, so these 2-D views are exact.
        k_desc = tl.make_tensor_descriptor(k_ptr, shape=[B * C, H * HEAD_DIM], strides=[H * HEAD_DIM, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        if FP8:
            v_desc = tl.make_tensor_descriptor(v_ptr, shape=[B * H * HEAD_DIM, C], strides=[stride_vn, 1],
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
    n_tiles = (tl.where(sink_end > 0, tl.cdiv(sink_end, BLOCK_N), 0)
               + tl.where(win_end > win_start, tl.cdiv(win_end, BLOCK_N) - win_start // BLOCK_N, 0)
               + tl.where(wrap_end > ring_lo, tl.cdiv(wrap_end, BLOCK_N) - ring_lo // BLOCK_N, 0))
    lo_t = split * n_tiles // SPLIT
    hi_t = (split + 1) * n_tiles // SPLIT

    s0, e0, off = split_share(lo_t, hi_t, 0, 0, sink_end, BLOCK_N)
    s1, e1, off = split_share(lo_t, hi_t, off, win_start, win_end, BLOCK_N)
    s2, e2, off = split_share(lo_t, hi_t, off, ring_lo, wrap_end, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    # Loops over the ranges (runtime loops, not unrolled) keep the code to two tile bodies, one
    # masked and one not: first the partial tiles at the ranges' edges, then the full tiles.
    for r in range(0, N_RANGES):
        start = pick3(r, s0, s1, s2)
        end = pick3(r, e0, e1, e2)
        first, lo_full, hi_full = tile_edges(start, end, BLOCK_N)
        for edge in range(0, 2):
            n0 = tl.where(edge == 0, first, hi_full)
            if tl.where(edge == 0, (first < start) & (start < end), hi_full < end):
                valid = (n0 + offs_n >= start) & (n0 + offs_n < end)
                k, v, vs = _load_tile(k_base, v_base, vs_base, k_desc, v_desc, desc_k_row, desc_v_row, desc_col, n0,
                                      valid, stride_kn, stride_vn, stride_vsg, True, FP8, USE_TMA, BLOCK_N, HEAD_DIM)
                acc, l_i, m_i = _tile(acc, l_i, m_i, q, a_row, k, v, vs, valid, True, FP8, INTERPRET)
    for r in range(0, N_RANGES):
        first, lo_full, hi_full = tile_edges(pick3(r, s0, s1, s2), pick3(r, e0, e1, e2), BLOCK_N)
        for n0 in tl.range(lo_full, hi_full, BLOCK_N):
            k, v, vs = _load_tile(k_base, v_base, vs_base, k_desc, v_desc, desc_k_row, desc_v_row, desc_col, n0,
                                  offs_n, stride_kn, stride_vn, stride_vsg, False, FP8, USE_TMA, BLOCK_N, HEAD_DIM)
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, a_row, k, v, vs, offs_n, False, FP8, INTERPRET)
    o_ptrs = o_ptr + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    merge_store(acc, l_i, m_i, o_ptrs, m_ok, ws_ptr, ml_ptr, cnt_ptr, pid_bh * tl.num_programs(0) + pid_m,
                 B * H * tl.num_programs(0), offs_m_local, split, SPLIT, HEAD_DIM, BLOCK_M, INTERPRET)


def _configs() -> list[triton.Config]:
    # The neighbourhood of what measured fastest on the H200 at LongLive's shapes (bench/RESULTS.md,
    # run S3-1): bf16 128 x 128 tiles with 8 warps and 3 stages; FP8 64 x 128 with 4 warps and 3
    # stages (two programs per SM); 2-stage pipelines and the other shapes lost by 10-40%.
    shapes = [(128, 128, 8), (128, 64, 8), (64, 128, 4), (64, 64, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w in shapes for s in (3, 4)]


def _prune_configs(configs, named_args, **kwargs):
    # Configs that overflow shared memory need no rule here: the autotuner skips them (OutOfResources).
    args = {**named_args, **kwargs}
    kept = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        # The FP8 cache has one v scale per V_GROUP slots: its tiles are exactly that wide.
        if args["FP8"] and bn != V_GROUP:
            continue
        # 64-row bf16 tiles only pay when there are too few 128-row tiles to fill the GPU.
        if not args["FP8"] and bm == 64 and args["LQ_BUCKET"] > 1024:
            continue
        kept.append(cfg)
    return kept


_window_attn_fwd_tuned = autotune(
    configs=_configs(),
    key=["LQ_BUCKET", "HEAD_DIM", "USE_TMA", "FP8", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_window_attn_fwd)


def _check_config(config: dict) -> dict:
    if not isinstance(config, dict) or not {"BLOCK_M", "BLOCK_N"} <= set(config) or \
            not set(config) <= {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}:
        raise ValueError(f"config must hold BLOCK_M, BLOCK_N and optionally num_warps, num_stages; got {config!r}")
    for key in ("BLOCK_M", "BLOCK_N"):
        if config[key] not in (16, 32, 64, 128, 256):
            raise ValueError(f"config {key}={config[key]} must be a power of two in [16, 256]")
    if config["BLOCK_M"] > 128:
        raise ValueError(f"config BLOCK_M={config['BLOCK_M']} must be at most 128")
    return config


def window_launch_args(q, k_cache, sink_end, win_start, win_end, ring_lo, ring_size, shift, out):
    """The checks and device index arguments every window-attention launcher shares (q and the
    caches already checked for layout): (B, Lq, H, D, C, sink_end, win_start, win_end, ring_size,
    shift, out)."""
    device = q.device
    B, Lq, H, D = q.shape
    if D not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported; expected one of {_SUPPORTED_HEAD_DIMS}")
    Bk, C, Hk, Dk = k_cache.shape
    if (Bk, Hk, Dk) != (B, H, D):
        raise ValueError(f"cache shape {list(k_cache.shape)} does not match q {list(q.shape)} in B, H or D")
    if C == 0:
        raise ValueError("the cache has no slots")
    sink_end = index_arg("sink_end", sink_end, batch=B, lo=0, hi=C, device=device, where="the cache ")
    win_start = index_arg("win_start", win_start, batch=B, lo=0, hi=C, device=device, where="the cache ")
    win_end = index_arg("win_end", win_end, batch=B, lo=0, hi=C, device=device, where="the cache ")
    ring_size = C - ring_lo if ring_size is None else ring_size
    if not (isinstance(ring_lo, int) and isinstance(ring_size, int) and 0 <= ring_lo and ring_size >= 1
            and ring_lo + ring_size <= C):
        raise ValueError(f"ring [{ring_lo}, {ring_lo}+{ring_size}) must be a non-empty range inside the {C}-slot cache")
    if shift is not None:
        shift = index_arg("shift", shift, batch=B, lo=0, hi=ring_size - 1, device=device, where="the ring ")
    if out is not None:
        check_tensor("out", out, dtype=torch.bfloat16, shape=(B, Lq, H, D), device=device)

    if out is None:
        out = torch.empty((B, Lq, H, D), dtype=torch.bfloat16, device=device)
    return B, Lq, H, D, C, sink_end, win_start, win_end, ring_size, shift, out


def _launch(q, q_scale, k, k_scale, v, v_scale, sink_end, win_start, win_end, ring_lo, ring_size, shift,
            scale, out, use_tma, split, config, fp8: bool):
    """Shared by both launchers: index arguments, workspace, the grid and the launch."""
    B, Lq, H, D, C, sink_end, win_start, win_end, ring_size, shift, out = window_launch_args(
        q, k, sink_end, win_start, win_end, ring_lo, ring_size, shift, out)
    if not isinstance(split, int) or isinstance(split, bool) or not 1 <= split <= 8:
        raise ValueError(f"split must be an int in [1, 8] (key shares per query tile), got {split!r}")
    if B == 0 or Lq == 0 or H == 0:
        return out
    device = q.device
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    interpret = interpreting()
    if use_tma:
        # Refused where unsupported, as in fp8_gemm: never dropped silently.
        if not tma_supported(device):
            raise ValueError(f"use_tma=True needs a CUDA GPU of compute capability >= 9 (or the interpreter); "
                             f"q is on {device}")
        if not k.is_contiguous() or (not fp8 and not v.is_contiguous()):
            raise ValueError("use_tma needs contiguous caches")
        if fp8 and v.stride(3) % 16:
            raise ValueError(f"use_tma needs the FP8 cache's V^T rows 16-byte aligned (fp8_kv_cache pads them); "
                             f"their stride is {v.stride(3)}")
        use_tma_allocator()
    if config is not None:
        config = _check_config(config)
        if fp8 and config["BLOCK_N"] != V_GROUP:
            raise ValueError(f"the FP8 cache is read in tiles of its v-scale group: config BLOCK_N must be {V_GROUP}")
    if interpret:
        config = {"BLOCK_M": _INTERPRET_BLOCK_M, "BLOCK_N": V_GROUP if fp8 else _INTERPRET_BLOCK_N}
    max_units = B * H * triton.cdiv(Lq, 64 if config is None else config["BLOCK_M"])
    ws, ml, cnt = (split_workspace(device, split, max_units, D) if split > 1 else (out, out, out))
    qs = q_scale if fp8 else out
    args = (
        q, qs, k, k_scale if fp8 else out, v, v_scale if fp8 else out, out, ws, ml, cnt,
        sink_end, win_start, win_end, sink_end if shift is None else shift,
        0 if sink_end.numel() == 1 else 1, 0 if win_start.numel() == 1 else 1, 0 if win_end.numel() == 1 else 1,
        0 if shift is None or shift.numel() == 1 else 1,
        q.stride(0), q.stride(1), q.stride(2), qs.stride(0) if fp8 else 0, qs.stride(1) if fp8 else 0,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(3) if fp8 else v.stride(1), v.stride(2),
        v_scale.stride(0) if fp8 else 0, v_scale.stride(1) if fp8 else 0,
        out.stride(0), out.stride(1), out.stride(2),
        B, H, Lq, C, scale * _LOG2E, ring_lo, ring_size,
    )
    meta = dict(LQ_BUCKET=min(triton.next_power_of_2(Lq), 8192), HEAD_DIM=D, RING=shift is not None,
                N_RANGES=3 if shift is not None else 2, USE_TMA=bool(use_tma), FP8=fp8,
                SPLIT=split, INTERPRET=interpret)
    with launch_on(device):
        if config is not None:
            _window_attn_fwd[(triton.cdiv(Lq, config["BLOCK_M"]), B * H, split)](*args, **meta, **config)
        else:
            def grid(cfg):
                return (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H, split)
            _window_attn_fwd_tuned[grid](*args, **meta)
    return out


def window_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     sink_end, win_start, win_end, *, ring_lo: int = 0, ring_size: int | None = None,
                     shift=None, scale: float | None = None, out: torch.Tensor | None = None,
                     use_tma: bool = False, split: int = 1, config: dict | None = None) -> torch.Tensor:
    """Attend q [B, Lq, H, D] to bf16 cache slots [0, sink_end) U [win_start, win_end); returns [B, Lq, H, D].

    sink_end, win_start, win_end: int32/int64 tensors of shape [1] or [B] on q's device (read there,
    so no host sync), or Python ints (checked against the cache size, then filled on the device).
    With shift given they are logical slots of the ring layout (module docstring); ring_size
    defaults to C - ring_lo.
    use_tma loads K/V tiles through device-side TMA descriptors (a CUDA GPU of compute capability
    >= 9, or the interpreter, and contiguous caches; refused elsewhere, never dropped silently). split cuts each query tile's keys into that many
    shares (module docstring). config ({"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}) skips
    autotuning on the GPU, for experiments and tests; the interpreter always runs its own small tiles.
    """
    check_tensor("q", q, dtype=torch.bfloat16, shape=("B", "Lq", "H", "D"))
    device = q.device
    check_kernel_device("window attention", device)
    check_tensor("k_cache", k_cache, dtype=torch.bfloat16, shape=("B", "C", "H", "D"), device=device)
    check_tensor("v_cache", v_cache, dtype=torch.bfloat16, shape=("B", "C", "H", "D"), device=device)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ in shape")
    return _launch(q, None, k_cache, None, v_cache, None, sink_end, win_start, win_end, ring_lo, ring_size, shift,
                   scale, out, use_tma, split, config, fp8=False)


def window_attention_fp8(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                         v8: torch.Tensor, v_scale: torch.Tensor, sink_end, win_start, win_end, *,
                         ring_lo: int = 0, ring_size: int | None = None, shift=None, scale: float | None = None,
                         out: torch.Tensor | None = None, use_tma: bool = False, split: int = 1,
                         config: dict | None = None) -> torch.Tensor:
    """window_attention over the FP8 cache (module docstring): q8 [B, Lq, H, D] e4m3 with q_scale
    [B, Lq, H]; k8 with k_scale [H]; v8 (a view of V^T) with v_scale [B, ceil(C / 128), H].
    Other arguments as in window_attention; config's BLOCK_N
    must be 128."""
    check_tensor("q8", q8, dtype=FP8_DTYPE, shape=("B", "Lq", "H", "D"))
    device = q8.device
    check_kernel_device("FP8 window attention", device)
    check_tensor("q_scale", q_scale, dtype=torch.float32, shape=tuple(q8.shape[:3]), device=device)
    check_fp8_cache(k8, k_scale, v8, v_scale, device)
    return _launch(q8, q_scale, k8, k_scale, v8, v_scale, sink_end, win_start, win_end, ring_lo, ring_size, shift,
                   scale, out, use_tma, split, config, fp8=True)


def _slots(sink_end: int, win_start: int, win_end: int, device) -> torch.Tensor:
    sink = torch.arange(0, sink_end, device=device)
    lo = max(win_start, sink_end)
    window = torch.arange(lo, max(lo, win_end), device=device)
    return torch.cat([sink, window])


def window_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         sink_end, win_start, win_end, scale: float | None = None, *,
                         ring_lo: int = 0, ring_size: int | None = None, shift=None) -> torch.Tensor:
    """Plain-torch reference: gather the slots of [0, sink_end) U [win_start, win_end) per sample
    (logical slots mapped through the ring when shift is given) and run SDPA's math backend in
    float32. Returns float32 [B, Lq, H, D]; an empty key set gives zeros.
    Ranges may be ints or tensors of shape [1]/[B] (read on the host: this is a test oracle)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, Lq, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    def per_sample(v, b):
        if isinstance(v, torch.Tensor):
            v = v.reshape(-1)
            return int(v[b if v.numel() > 1 else 0])
        return int(v)

    out = torch.zeros((B, Lq, H, D), dtype=torch.float32, device=q.device)
    for b in range(B):
        idx = _slots(per_sample(sink_end, b), per_sample(win_start, b), per_sample(win_end, b), q.device)
        if shift is not None:
            size = k_cache.shape[1] - ring_lo if ring_size is None else ring_size
            idx = torch.where(idx < ring_lo, idx, ring_lo + (idx - ring_lo + per_sample(shift, b)) % size)
        if idx.numel() == 0:
            continue
        qb = q[b].float().transpose(0, 1)
        kb = k_cache[b, idx].float().transpose(0, 1)
        vb = v_cache[b, idx].float().transpose(0, 1)
        with sdpa_kernel(SDPBackend.MATH):
            out[b] = F.scaled_dot_product_attention(qb, kb, vb, scale=scale).transpose(0, 1)
    return out


def window_attention_fp8_ref(q8, q_scale, k8, k_scale, v8, v_scale, sink_end, win_start, win_end,
                             scale: float | None = None, **ring) -> torch.Tensor:
    """fp32 attention of the dequantized q over the dequantized FP8 cache; fp32 out."""
    k, v = dequantize_fp8_cache(k8, k_scale, v8, v_scale)
    return window_attention_ref(q8.float() * q_scale[..., None], k, v, sink_end, win_start, win_end, scale, **ring)


def window_attention_flops(batch: int, lq: int, lkv: int, heads: int, head_dim: int) -> float:
    """Matmul flops of one call: QK^T and PV, 2 flops per multiply-add each."""
    return 4.0 * batch * heads * lq * lkv * head_dim


def window_attention_bytes(batch: int, lq: int, lkv: int, heads: int, head_dim: int, fp8: bool = False) -> float:
    """Fewest bytes one call must move: read q and the lkv K/V slots once, write the bf16 output
    (FP8: e4m3 q, k, v plus their scales)."""
    if fp8:
        return batch * heads * (lq * (head_dim + 4.0 + 2.0 * head_dim) + lkv * 2.0 * head_dim + lkv / V_GROUP * 4.0)
    return 2.0 * batch * heads * head_dim * (2 * lq + 2 * lkv)
