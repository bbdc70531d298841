"""LongLive's KV-cache bookkeeping as index arithmetic on the GPU: one tiny kernel per layer call.

The stock cache rules (pointers, eviction, the sink) run in one single-program kernel that reads
the pointers on the device and writes a plan that the append and attention kernels read: no host
sync, capturable in a CUDA graph. Slots are logical (the stock layout's indices); the non-sink part
of the buffer is a ring of R slots (`window_ring_size`), logical slot l read and written at
l if l < ring_lo (the sink, ring_lo = sink tokens), else ring_lo + (l - ring_lo + shift) % R.
Why a ring, how long, and why it is enough: docs/kv-cache-ring.md.

Inputs (int64 device tensors of one element): global_end (G), local_end (L), shift (updated in
place), and current_start s (a device tensor or a host int: a captured CUDA graph replays with
whatever the tensor holds, so one graph serves every block). Host ints: new tokens n, capacity C,
sink tokens S, attention budget M, tokens per latent frame, `local` (local_attn_size != -1),
`sink_recache` (LongLive's sink_recache_after_switch) and the ring size R.

Plan (int64 [PLAN_SIZE]):
    LOCAL_START   logical slot of new row 0 (ls)
    ROW_LO        first new row written, in [0, n] (rows before it fall on the protected sink)
    SINK_END      keys attended: logical [0, SINK_END) ...
    WIN_START     ... plus logical [WIN_START, WIN_END)
    WIN_END
    NEW_GLOBAL    pointer values after the call (unchanged on a recompute)
    NEW_LOCAL
    SHIFT         the ring shift after this call's eviction
    START_FRAME   s // tokens per frame + frame_offset: the RoPE frame index of new row 0
    NEW_PINNED    the pinned region's start after the call (-1 without `pinned`)

LongLive 2.0 variant (two options, both off for v1.0, whose plans they leave bit-identical):
- `frame_offset` (host int): its multi-shot RoPE offset (shot index x multi_shot_rope_offset)
  added to the temporal position of every new row.
- `pinned` (its cache dict's pinned_start, pinned_len int64 device scalars): a shot sink pinned at
  a scene cut. While it floats (pinned_start >= S, the sink tokens the host passed, which are
  LongLive 2.0's effective sink), an eviction moves it with the data it pins: pinned_start -= the
  evicted tokens, written in place (the stock `pinned_shift` of `_apply_cache_updates`). Once it
  reaches the global sink it is part of the effective sink (the host passes S = global + pinned
  tokens) and stays. LongLive 2.0's other rules are v1.0's with `sink_recache` (no sink protection
  on a direct insert); its pointer commit differs only on a call that ends before the last
  committed token, which its pipeline never makes (patches/window_self_attention2.py refuses it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_kernel_device, check_tensor

LOCAL_START, ROW_LO, SINK_END, WIN_START, WIN_END, NEW_GLOBAL, NEW_LOCAL, SHIFT, START_FRAME, NEW_PINNED = range(10)
PLAN_SIZE = 10


@triton.jit
def _kv_cache_plan_kernel(global_ptr, local_ptr, shift_ptr, start_ptr, start, plan_ptr, n, C, S, M, R, frame_tokens,
                          frame_offset, pinned_start_ptr, pinned_len_ptr,
                          START_ON_DEVICE: tl.constexpr, LOCAL: tl.constexpr, SINK_RECACHE: tl.constexpr,
                          PINNED: tl.constexpr):
    # An eager call passes the host int (no fill kernel per layer); a graph-captured one reads the
    # device scalar, so a replay follows what the runner wrote there.
    if START_ON_DEVICE:
        s = tl.load(start_ptr).to(tl.int64)
    else:
        s = start.to(tl.int64)
    g = tl.load(global_ptr)
    loc = tl.load(local_ptr)
    shift = tl.load(shift_ptr)
    e = s + n
    is_recompute = (e <= g) & (s > 0)
    evicted = n + loc - C
    roll = (e > g) & (evicted > 0)
    if not LOCAL:
        roll = e < 0  # never: global attention does not evict
    new_local = tl.where(roll, loc + (e - g) - evicted, loc + (e - g))
    local_start = new_local - n
    # The sink is protected on a recompute; sink_recache_after_switch lifts that in the
    # direct-insert branch only, as in the stock code.
    protect = is_recompute
    if SINK_RECACHE:
        protect = is_recompute & roll
    write_start = tl.where(protect, tl.maximum(local_start, S), local_start)
    new_shift = tl.where(roll, (shift + evicted) % R, shift)
    # With no sink (S = 0) this is the stock max(0, L' - M).
    win_start = tl.where(M - S > 0, tl.maximum(S, new_local - (M - S)), new_local)
    tl.store(plan_ptr + 0, local_start)
    tl.store(plan_ptr + 1, tl.minimum(tl.maximum(write_start - local_start, 0), n))
    tl.store(plan_ptr + 2, g * 0 + S)
    tl.store(plan_ptr + 3, win_start)
    tl.store(plan_ptr + 4, new_local)
    tl.store(plan_ptr + 5, tl.where(is_recompute, g, e))
    tl.store(plan_ptr + 6, tl.where(is_recompute, loc, new_local))
    tl.store(plan_ptr + 7, new_shift)
    tl.store(plan_ptr + 8, s // frame_tokens + frame_offset)
    if PINNED:
        ps = tl.load(pinned_start_ptr)
        floating = (ps >= 0) & (tl.load(pinned_len_ptr) > 0) & (ps >= S)
        new_ps = tl.where(roll & floating, ps - evicted, ps)
        tl.store(plan_ptr + 9, new_ps)
        tl.store(pinned_start_ptr, new_ps)
    else:
        tl.store(plan_ptr + 9, g * 0 - 1)
    tl.store(shift_ptr, new_shift)


def _check_pointer(name: str, t: torch.Tensor, device: torch.device | None = None) -> None:
    """A cache pointer the kernel reads (and may write): an int64 tensor of one element."""
    check_tensor(name, t, dtype=torch.int64, device=device, layout="any")
    if t.numel() != 1:
        raise ValueError(f"{name} must hold one element, got shape {list(t.shape)}")


def window_ring_size(capacity: int, sink_tokens: int, budget: int) -> int:
    """The ring a window of `budget` tokens (sink included) needs in a cache of `capacity` slots:
    budget - sink when that is shorter than the cache's ring, else capacity - sink (module docstring)."""
    return min(capacity, budget) - sink_tokens if budget > sink_tokens else capacity - sink_tokens


def _check_ring(ring_size, capacity: int, sink_tokens: int) -> int:
    if ring_size is None:
        return capacity - sink_tokens
    if isinstance(ring_size, bool) or not isinstance(ring_size, int) or not 1 <= ring_size <= capacity - sink_tokens:
        raise ValueError(f"ring_size must be an int in [1, capacity {capacity} - sink {sink_tokens}], got {ring_size!r}")
    return ring_size


def kv_cache_plan(global_end: torch.Tensor, local_end: torch.Tensor, shift: torch.Tensor, *,
                  current_start: int | torch.Tensor, num_new: int, capacity: int, sink_tokens: int, budget: int,
                  frame_tokens: int = 1, local: bool = True, sink_recache: bool = False,
                  ring_size: int | None = None, frame_offset: int = 0,
                  pinned: tuple[torch.Tensor, torch.Tensor] | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Plan one self-attention call's cache update and window; updates `shift` in place.

    current_start: a host int, or an int64 device tensor of one element (read by the kernel, so a
    captured launch follows its value). ring_size: slots of the ring after the sink (default
    capacity - sink_tokens; `window_ring_size` gives the one a window needs). frame_offset and
    pinned (pinned_start, pinned_len; pinned_start updated in place): LongLive 2.0's (module docstring)."""
    _check_pointer("global_end", global_end)
    device = global_end.device
    check_kernel_device("kv_cache_plan", device)
    _check_pointer("local_end", local_end, device)
    _check_pointer("shift", shift, device)
    if num_new < 1:
        raise ValueError(f"num_new must be >= 1, got {num_new}")
    on_device = isinstance(current_start, torch.Tensor)
    if on_device:
        _check_pointer("current_start", current_start, device)
    elif isinstance(current_start, bool) or not isinstance(current_start, int):
        raise TypeError(f"current_start must be an int or an int64 device tensor, got {type(current_start).__name__}")
    elif current_start < 0:
        raise ValueError(f"current_start must be >= 0, got {current_start}")
    if frame_tokens < 1:
        raise ValueError(f"frame_tokens must be >= 1, got {frame_tokens}")
    if not 0 <= sink_tokens < capacity:
        raise ValueError(f"sink tokens {sink_tokens} must lie in [0, capacity {capacity})")
    if num_new > capacity:
        raise ValueError(f"{num_new} new tokens do not fit a KV cache of {capacity} slots")
    if budget < 1:
        raise ValueError(f"attention budget must be >= 1, got {budget}")
    ring_size = _check_ring(ring_size, capacity, sink_tokens)
    if out is not None:
        check_tensor("out", out, dtype=torch.int64, shape=(PLAN_SIZE,), device=device)
    if isinstance(frame_offset, bool) or not isinstance(frame_offset, int) or frame_offset < 0:
        raise ValueError(f"frame_offset must be an int >= 0, got {frame_offset!r}")
    if pinned is not None:
        for name, t in zip(("pinned_start", "pinned_len"), pinned):
            _check_pointer(name, t, device)

    if out is None:
        out = torch.empty(PLAN_SIZE, dtype=torch.int64, device=device)
    _kv_cache_plan_kernel[(1,)](global_end, local_end, shift, current_start if on_device else global_end,
                                0 if on_device else current_start, out, num_new, capacity, sink_tokens, budget,
                                ring_size, frame_tokens, frame_offset,
                                *(pinned if pinned is not None else (global_end, global_end)),
                                START_ON_DEVICE=on_device, LOCAL=bool(local), SINK_RECACHE=bool(sink_recache),
                                PINNED=pinned is not None)
    return out


def kv_cache_plan_ref(global_end: int, local_end: int, shift: int, *, current_start: int, num_new: int,
                      capacity: int, sink_tokens: int, budget: int, frame_tokens: int = 1, local: bool = True,
                      sink_recache: bool = False, ring_size: int | None = None, frame_offset: int = 0,
                      pinned: tuple[int, int] | None = None) -> list[int]:
    """The stock rules (CausalWanSelfAttention.forward + _apply_cache_updates) in plain Python; the
    shift counts evictions modulo ring_size (default capacity - sink_tokens). pinned: host ints
    (pinned_start, pinned_len), LongLive 2.0's shot sink (module docstring)."""
    g, loc, s, n, C, S, M = global_end, local_end, current_start, num_new, capacity, sink_tokens, budget
    ring_size = _check_ring(ring_size, C, S)
    e = s + n
    is_recompute = e <= g and s > 0
    roll = local and e > g and n + loc > C
    new_pinned = -1
    if pinned is not None:
        ps, pl = pinned
        floating = ps >= 0 and pl > 0 and ps >= S
        new_pinned = ps - (n + loc - C) if roll and floating else ps
    if roll:
        evicted = n + loc - C
        new_local = loc + e - g - evicted
        local_start = new_local - n
        write_start = max(local_start, S) if is_recompute else local_start
        shift = (shift + evicted) % ring_size
    else:
        new_local = loc + e - g
        local_start = new_local - n
        write_start = max(local_start, S) if is_recompute else local_start
        if sink_recache:
            write_start = local_start
    if S > 0:
        win_start = max(S, new_local - (M - S)) if M - S > 0 else new_local
    else:
        win_start = max(0, new_local - M)
    return [local_start, min(max(write_start - local_start, 0), n), S, win_start, new_local,
            g if is_recompute else e, loc if is_recompute else new_local, shift, s // frame_tokens + frame_offset,
            new_pinned]


def physical_slot(logical: torch.Tensor, ring_lo: int, ring_size: int, shift) -> torch.Tensor:
    """Where a logical slot lies in the ring-buffered cache (see the module docstring)."""
    return torch.where(logical < ring_lo, logical, ring_lo + (logical - ring_lo + shift) % ring_size)


def unroll_ring(cache: torch.Tensor, ring_lo: int, ring_size: int, shift: int) -> None:
    """Move a ring-buffered cache [B, C, ...] back to the stock layout in place (physical slot ==
    logical slot, shift 0) over slots [ring_lo, ring_lo + ring_size). LongLive 2.0 needs it when its
    effective sink grows or shrinks (a shot sink reaching the global sink, or a new one pinned): the
    ring then starts elsewhere (patches/cache_rules2.py), once per such change."""
    if shift % ring_size:
        ring = cache[:, ring_lo:ring_lo + ring_size]
        ring.copy_(torch.roll(ring, -(shift % ring_size), dims=1))
