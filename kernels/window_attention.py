"""Attention of new queries over the sink + window slots of a KV cache, read in place.

Shapes, layout and dtypes:
- q:        [B, Lq, H, D] bf16, already roped (any Lq; any strides with the last one 1).
- k_cache:  [B, C, H, D] bf16, the stock slot-major cache layout, read in place.
- v_cache:  [B, C, H, D] bf16, same shape as k_cache.
- sink_end, win_start, win_end: int32/int64 tensors of shape [1] (shared) or [B] (per sample) on
  q's device, or Python ints. The keys attended are the union of slots [0, sink_end) and
  [win_start, win_end); they form a set (no mask, no order), so a ring-buffer window is fine.
- out:      [B, Lq, H, D] bf16.
- ring_lo, ring_size, shift (optional): the ring-buffer layout of kernels/kv_cache_plan.py. With a
  shift (int tensor [1]/[B] on the device, or an int) the ranges are logical slots: the sink range
  lies below ring_lo and is read as is, the window lies inside [ring_lo, ring_lo + ring_size) and
  logical slot l is read from ring_lo + ((l - ring_lo + shift) mod ring_size), at most two
  physical ranges. Without a shift the ranges are physical slots.
D is 32, 64 or 128. Scale 1/sqrt(D) unless given. Softmax is online (flash style) with fp32
statistics and fp32 accumulation.

The range values are read on the device: the grid depends only on shapes, so no host sync happens
and the launch can be captured in a CUDA graph (autotune in warm-up, before capture). Tensor range
values are clamped to [0, C] inside the kernel; Python ints are checked on the host.

The same kernel serves cross-attention to the text: a 512-slot cache with sink_end=0 and the
window [0, 512).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (SUPPORTED_HEAD_DIMS, cast_bf16, check_kernel_device, index_arg, interpreting, launch_on, tma_supported,
                      use_tma_allocator)

_SUPPORTED_HEAD_DIMS = SUPPORTED_HEAD_DIMS
_LOG2E = 1.4426950408889634
# The launcher runs one fixed small config under the interpreter: autotuning there would time
# every config in numpy, and small tiles exercise the tail paths at test sizes.
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}


@triton.jit
def _attend_tile(acc, l_i, m_i, q, k, v, valid, qk_scale, MASKED: tl.constexpr, INTERPRET: tl.constexpr):
    # The interpreter's bf16 tl.dot is wrong; fp32 operands are exact there.
    if INTERPRET:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    else:
        qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(valid[None, :], qk, float("-inf"))
        # Rows past the range may hold anything (a TMA tile reads real slots there): 0 * NaN is NaN.
        v = tl.where(valid[:, None], v, 0.0)
    # The scale (times log2 e) is applied to the fp32 scores in one FMA rather than folded into q,
    # which would round q*scale to bf16 and cost accuracy for no speed.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p = cast_bf16(p, INTERPRET)
    if INTERPRET:
        acc = tl.dot(p.to(tl.float32), v.to(tl.float32), acc)
    else:
        acc = tl.dot(p, v, acc)
    return acc, l_i, m_new


@triton.jit
def _attend_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, k_desc, v_desc,
                  desc_row, desc_col, start, end, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr,
                  INTERPRET: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # Full tiles run unmasked; only the one ragged tile at the end of the range pays for masks.
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    for n0 in tl.range(start, full_end, BLOCK_N):
        if USE_TMA:
            k = k_desc.load([desc_row + n0, desc_col])
            v = v_desc.load([desc_row + n0, desc_col])
        else:
            rows = n0 + offs_n
            k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :])
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k, v, offs_n, qk_scale, False, INTERPRET)
    if full_end < end:
        rows = full_end + offs_n
        valid = rows < end
        if USE_TMA:
            k = k_desc.load([desc_row + full_end, desc_col])
            v = v_desc.load([desc_row + full_end, desc_col])
        else:
            k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k, v, valid, qk_scale, True, INTERPRET)
    return acc, l_i, m_i


@triton.jit
def _window_ranges(sink_end_ptr, win_start_ptr, win_end_ptr, shift_ptr, b,
                   stride_sink, stride_wstart, stride_wend, stride_shift, C, ring_lo, ring_size,
                   RING: tl.constexpr):
    """Sample b's physical key ranges [0, sink_end) U [win_start, win_end) U [ring_lo, wrap_end)
    (the last empty unless RING) from the device range values (module docstring)."""
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


# Sizes stay runtime values: specialising a size of 1 made ptxas crash (SIGSEGV, triton 3.6, H200).
@triton.jit(do_not_specialize=["B", "H", "Lq", "C", "ring_lo", "ring_size"])
def _window_attn_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr,
    sink_end_ptr, win_start_ptr, win_end_ptr, shift_ptr,
    stride_sink, stride_wstart, stride_wend, stride_shift,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    B, H, Lq, C, qk_scale, ring_lo, ring_size,
    LQ_BUCKET: tl.constexpr,  # autotune key only
    HEAD_DIM: tl.constexpr, RING: tl.constexpr, USE_TMA: tl.constexpr, INTERPRET: tl.constexpr,
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

    k_base = k_ptr + b64 * stride_kb + h * stride_kh
    v_base = v_ptr + b64 * stride_vb + h * stride_vh
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
    acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, k_desc, v_desc,
                                  desc_row, desc_col, 0, sink_end, qk_scale,
                                  BLOCK_N, HEAD_DIM, USE_TMA, INTERPRET)
    acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, k_desc, v_desc,
                                  desc_row, desc_col, win_start, win_end, qk_scale,
                                  BLOCK_N, HEAD_DIM, USE_TMA, INTERPRET)
    if RING:
        acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, k_desc, v_desc,
                                      desc_row, desc_col, ring_lo, wrap_end, qk_scale,
                                      BLOCK_N, HEAD_DIM, USE_TMA, INTERPRET)
    # An empty key set gives zeros instead of 0/0.
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(o_ptr + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             cast_bf16(out, INTERPRET), mask=q_mask)


def _configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (64, 128)
        for w in (4, 8)
        for s in (2, 3, 4)
    ]


def _prune_configs(configs, named_args, **kwargs):
    # Configs that overflow shared memory need no rule here: the autotuner skips them (OutOfResources).
    lq_bucket = {**named_args, **kwargs}["LQ_BUCKET"]
    kept = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        # 64-row tiles only pay when there are too few 128-row tiles to fill the GPU.
        if bm == 64 and lq_bucket > 1024:
            continue
        # One warpgroup cannot hold a 128x128 fp32 score tile plus a 128xD accumulator in registers.
        if bm == 128 and bn == 128 and cfg.num_warps == 4:
            continue
        kept.append(cfg)
    return kept


_window_attn_fwd_tuned = triton.autotune(
    configs=_configs(),
    key=["LQ_BUCKET", "HEAD_DIM", "USE_TMA"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_window_attn_fwd)


def tma_option(use_tma: bool, device: torch.device, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether to load K/V through device-side TMA descriptors; use_tma=True where they are not
    supported (before Hopper; not CUDA and not the interpreter) is refused, as in fp8_gemm."""
    if not use_tma:
        return False
    if not tma_supported(device):
        raise ValueError(f"use_tma=True needs a CUDA GPU of compute capability >= 9 (or the interpreter); "
                         f"q is on {device}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("use_tma needs contiguous k_cache and v_cache")
    use_tma_allocator()
    return True


def _check_config(config: dict) -> dict:
    if not isinstance(config, dict) or not {"BLOCK_M", "BLOCK_N"} <= set(config) or \
            not set(config) <= {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}:
        raise ValueError(f"config must hold BLOCK_M, BLOCK_N and optionally num_warps, num_stages; got {config!r}")
    for key in ("BLOCK_M", "BLOCK_N"):
        if config[key] not in (16, 32, 64, 128, 256):
            raise ValueError(f"config {key}={config[key]} must be a power of two in [16, 256]")
    return config


def _check_bhld(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.bfloat16:
        raise TypeError(f"{name} must be bfloat16, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, L, H, D], got shape {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last (head) dim, got strides {t.stride()}")


def window_launch_args(q, k_cache, sink_end, win_start, win_end, ring_lo, ring_size, shift, out):
    """The checks and device index arguments every window-attention launcher shares (q and the
    caches already checked for layout): (B, Lq, H, D, C, sink_end, win_start, win_end, ring_size,
    shift, out)."""
    device = q.device
    check_kernel_device("window attention", device)
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
    if out is None:
        out = torch.empty((B, Lq, H, D), dtype=torch.bfloat16, device=device)
    else:
        _check_bhld("out", out, device)
        if out.shape != q.shape:
            raise ValueError(f"out has shape {list(out.shape)}, expected {list(q.shape)}")
    return B, Lq, H, D, C, sink_end, win_start, win_end, ring_size, shift, out


def window_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     sink_end, win_start, win_end, *, ring_lo: int = 0, ring_size: int | None = None,
                     shift=None, scale: float | None = None,
                     out: torch.Tensor | None = None, use_tma: bool = False,
                     config: dict | None = None) -> torch.Tensor:
    """Attend q [B, Lq, H, D] to cache slots [0, sink_end) U [win_start, win_end); returns [B, Lq, H, D].

    sink_end, win_start, win_end: int32/int64 tensors of shape [1] or [B] on q's device (read there,
    so no host sync), or Python ints (checked against the cache size, then filled on the device).
    With shift given they are logical slots of the ring layout (module docstring); ring_size
    defaults to C - ring_lo.
    use_tma loads K/V tiles through device-side TMA descriptors: it needs a CUDA GPU of compute
    capability >= 9 (or the interpreter; refused elsewhere) and contiguous caches, and installs a
    torch-backed Triton allocator for the descriptors' scratch memory.
    config ({"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}) skips autotuning on the GPU, for
    experiments and tests; the interpreter always runs its own small tiles.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    device = q.device
    _check_bhld("q", q, device)
    _check_bhld("k_cache", k_cache, device)
    _check_bhld("v_cache", v_cache, device)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ in shape")
    B, Lq, H, D, C, sink_end, win_start, win_end, ring_size, shift, out = window_launch_args(
        q, k_cache, sink_end, win_start, win_end, ring_lo, ring_size, shift, out)
    if B == 0 or Lq == 0 or H == 0:
        return out
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    interpret = interpreting()
    use_tma = tma_option(use_tma, device, k_cache, v_cache)

    args = (
        q, k_cache, v_cache, out,
        sink_end, win_start, win_end, sink_end if shift is None else shift,
        0 if sink_end.numel() == 1 else 1, 0 if win_start.numel() == 1 else 1, 0 if win_end.numel() == 1 else 1,
        0 if shift is None or shift.numel() == 1 else 1,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        B, H, Lq, C, scale * _LOG2E, ring_lo, ring_size,
    )
    meta = dict(LQ_BUCKET=min(triton.next_power_of_2(Lq), 8192), HEAD_DIM=D, RING=shift is not None, USE_TMA=use_tma, INTERPRET=interpret)
    if config is not None:
        config = _check_config(config)
    with launch_on(device):
        if interpret or config is not None:
            cfg = _INTERPRET_CONFIG if interpret else config
            grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
            _window_attn_fwd[grid](*args, **meta, **cfg)
        else:
            def grid(cfg):
                return (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
            _window_attn_fwd_tuned[grid](*args, **meta)
    return out


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


def window_attention_flops(batch: int, lq: int, lkv: int, heads: int, head_dim: int) -> float:
    """Matmul flops of one call: QK^T and PV, 2 flops per multiply-add each."""
    return 4.0 * batch * heads * lq * lkv * head_dim


def window_attention_bytes(batch: int, lq: int, lkv: int, heads: int, head_dim: int) -> float:
    """Fewest bytes one call must move: read q and the lkv K/V slots once, write the output (bf16)."""
    return 2.0 * batch * heads * head_dim * (2 * lq + 2 * lkv)
