"""WindowSelfAttention2: LongLive 2.0's causal self-attention on our kernels, same call, same cache dicts.

Replaces 2.0's `CausalWanSelfAttention` (wan_5b/modules/causal_model.py). The work per call is
v1.0's (patches/window_self_attention.py: one q|k|v GEMM, the cache plan, fused RoPE + append into
the ring, attention read in place); 2.0's cache rules enter through the plan's two options
(kernels/kv_cache_plan.py) and through the effective sink, which its model forward tells the layer:

- The stock layer clones its whole cache every call (~21 GB per forward at 5B shapes) and returns an
  update record the model applies after the forward (or its wrapper, with LLV2_DEFER_KV_UPDATES=1).
  This layer writes in place and returns the new pointers as device scalars with no record, so
  either way of applying leaves the pointers right, and nothing is copied.
- Sinks: a global sink (its pipeline's `global_sink_size`) and, after a scene cut, a shot sink
  pinned where the cut's block was cached (`pinned_start`, `pinned_len` in the cache dict). While the
  pin floats, evictions move it with its data: the plan lowers `pinned_start` in place, as the stock
  update does. The tokens eviction keeps (the effective sink: global sink, + the pin once it reaches
  it) are the ring's start; when they change, patches/cache_rules2.py (run before each model
  forward, where it reads the pin once for all layers) unrolls the ring and records the new start.
- RoPE: `temporal_offset` (shot index x multi_shot_rope_offset) is added to every new row's temporal
  position (the plan's frame_offset); it must be a whole number of frames, as with 2.0's config.
  What 2.0 computes otherwise is refused with an error naming it: `use_relative_rope`, a `method`
  other than "linear", `t_scale` != 1, `original_seq_len`, an NVFP4 cache (`quantized`), an
  attention budget below the cache size (2.0's pipeline makes them equal), and a call that ends
  before the last committed token (2.0 then moves its pointers back; its pipeline never does).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels.kv_cache_plan import window_ring_size
from ..kernels.rope_kv_append import rope_tables
from .base import Patch
from .window_self_attention import PATCH as _V1_PATCH
from .window_self_attention import _HOST_STATE, WindowSelfAttention, _is_self_attention

# Set in each cache dict by patches/cache_rules2.py before each model forward: the effective sink in
# tokens, where the ring starts.
RING_LO = "_longlive_triton_ring_lo"
# RoPE rows: LongLive 2.0 computes the offset positions from angles (no table), so frames plus the
# shot offset may pass the stock 1024-row table; ours is longer and a call past it is refused.
ROPE_ROWS = 4096


def frame_offset(t_scale=1.0, use_relative_rope=False, method="linear", original_seq_len=None,
                 temporal_offset=0.0) -> int:
    """The RoPE frame offset of one LongLive 2.0 call, or a ValueError naming what is not served."""
    if use_relative_rope:
        raise ValueError("use_relative_rope (window-relative RoPE positions, re-roped keys at attention time) is not "
                         "served by the patched LongLive 2.0 self-attention; turn it off or patch without "
                         "window_attention")
    if method != "linear":
        raise ValueError(f"RoPE method {method!r} is not served (LongLive 2.0 releases 'linear' only)")
    if original_seq_len is not None:
        raise ValueError(f"original_seq_len {original_seq_len!r} is not served (LongLive 2.0's linear RoPE refuses it)")
    if float(t_scale) != 1.0:
        raise ValueError(f"t_scale {t_scale} is not served: the fused RoPE reads integer frame positions (t_scale 1)")
    offset = temporal_offset
    if isinstance(offset, torch.Tensor):
        if offset.numel() != 1:
            raise ValueError(f"a per-sample or per-frame temporal_offset (shape {tuple(offset.shape)}) is not served: "
                             "one offset for the whole call")
        offset = offset.item()
    if offset is None:
        offset = 0.0
    if float(offset) != int(offset) or offset < 0:
        raise ValueError(f"temporal_offset {offset} is not served: the fused RoPE takes a whole, non-negative number "
                         "of frames (multi_shot_rope_offset times the shot index)")
    return int(offset)


class WindowSelfAttention2(WindowSelfAttention):
    @classmethod
    def from_stock(cls, stock: nn.Module, config) -> "WindowSelfAttention2":
        new = super().from_stock(stock, config)
        new.global_sink_size = getattr(stock, "global_sink_size", 0)
        new._cos, new._sin = rope_tables(new.head_dim, ROPE_ROWS, device=new._cos.device)
        return new

    def forward(self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0, cache_start=None,
                t_scale=1.0, use_relative_rope=False, method="linear", original_seq_len=None, temporal_offset=0.0):
        if kv_cache is None:
            raise NotImplementedError("WindowSelfAttention2 serves LongLive 2.0's KV-cached inference path; pass "
                                      "kv_cache")
        if kv_cache.get("quantized", False):
            raise ValueError("LongLive 2.0's NVFP4 KV cache (kv_quant) is not served: run without kv_quant")
        offset = frame_offset(t_scale, use_relative_rope, method, original_seq_len, temporal_offset)
        frames = int(grid_sizes[0][0])
        fs = x.shape[1] // frames
        last = int(current_start) // fs + offset + frames
        if last > ROPE_ROWS:
            raise ValueError(f"frame {last - 1} (with the shot offset {offset}) is past the {ROPE_ROWS}-frame RoPE table")
        qkv = self._project_qkv(x)
        d = self.dim
        out, info = self._attend(qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:], grid_sizes, kv_cache,
                                 current_start, True, normed=False, frame_offset=offset)
        return self.o(out.flatten(2)), info

    def plan_args(self, kv_cache: dict, current_start: int, num_new: int, frame_seqlen: int,
                  sink_recache: bool = False) -> dict:
        """v1.0's plan arguments with 2.0's rules: the effective sink (set by cache_rules2 before the model
        forward) starts the ring, and no sink is protected on a direct insert (`sink_recache`)."""
        if RING_LO not in kv_cache:
            raise RuntimeError("the patched LongLive 2.0 self-attention runs inside its model's forward, which "
                               "reads the shot-sink state before the layers run (patches/cache_rules2.py): call "
                               "the model, not the layer")
        sink = kv_cache[RING_LO]
        capacity = kv_cache["k"].shape[1]
        budget = self._budget(frame_seqlen, capacity)
        if budget < capacity:
            raise ValueError(f"an attention budget of {budget} tokens below the {capacity}-token cache is not served "
                             "for LongLive 2.0 (its pipeline sets both from local_attn_size)")
        start, end = int(current_start), int(current_start) + num_new
        committed = kv_cache.get(_HOST_STATE, (0, 0, 0))[0]
        if 0 < start and end < committed:
            raise ValueError(f"this call recomputes tokens [{start}, {end}) before the last committed token "
                             f"{committed}: LongLive 2.0 would move its cache pointers back, which is not served")
        return dict(current_start=start, num_new=num_new, capacity=capacity, sink_tokens=sink, budget=budget,
                    frame_tokens=frame_seqlen, local=self.local_attn_size != -1, sink_recache=True,
                    ring_size=window_ring_size(capacity, sink, budget))

    def pinned(self, kv_cache: dict):
        return kv_cache["pinned_start"], kv_cache["pinned_len"]


def _is_self_attention2(m: nn.Module) -> bool:
    return _is_self_attention(m) and not isinstance(m, WindowSelfAttention2)


PATCH = Patch(name="window_self_attention", matches=_is_self_attention2,
              enabled=lambda cfg: cfg.window_attention, replace=WindowSelfAttention2.from_stock,
              describe=_V1_PATCH.describe)
