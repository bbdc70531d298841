"""LongLive 2.0's cache rules outside the layers: what its patched model does once per forward.

`before_forward` runs as a forward pre-hook of the patched generator (patch.py installs it), before
the CUDA-graph runner and the layers. It
1. checks the model's RoPE settings (`t_scale`, `use_relative_rope`, `rope_method`,
   `original_seq_len`, `rope_temporal_offset`: set by 2.0's pipeline on each inference(), so they
   show only at call time) and refuses what is not served, with the reason;
2. reads every patched layer's cache pointers and pinned shot sink in one device-to-host copy (2.0's
   own wrapper reads them with .item() before every call too): its pipeline writes them in place
   between calls (a reset, a pin at a scene cut, `shot_clean_recache`), so the host-side copy that
   the layers and the graph runner key on is set from them, never guessed;
3. computes each layer's effective sink (the tokens eviction keeps: the global sink, + the pinned
   shot sink once it has reached it; the stock rule in `effective_sink`) and, where it changed since
   the last call, unrolls that layer's ring (kernels/kv_cache_plan.py `unroll_ring`: physical slot ==
   logical slot again, so the ring can start at the new effective sink; a copy of the cache once
   per change, two per scene cut). With the FP8 cache the ring and the shift must be whole 128-slot
   groups of the value scales (they are at 2.0's shapes: blocks of 8 x 880 tokens).

`graph_key` is the part of a CUDA-graph key these rules add: the shot's RoPE offset and every
layer's effective sink (both are launch arguments a replay keeps), and the pinned tensors' addresses.
`crossattn_cache_used` is False: 2.0's cross-attention never reads its cache (patches/cross_attention2.py),
so a reset cache flag does not keep a call off the graphs.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels.kv_cache_plan import unroll_ring
from ..kernels.fp8_kv_cache import V_GROUP
from .window_self_attention import _HOST_STATE, _RING_SHIFT
from .window_self_attention2 import RING_LO, WindowSelfAttention2, frame_offset


def effective_sink(global_sink: int, sink: int, pinned_start: int, pinned_len: int) -> int:
    """Tokens eviction keeps at the front of the cache (CausalWanSelfAttention.forward of LongLive 2.0)."""
    if pinned_start >= 0 and pinned_len > 0:
        return global_sink + pinned_len if pinned_start == global_sink else global_sink
    return max(global_sink, sink)


def rope_settings(generator: nn.Module) -> int:
    """The model's RoPE settings as its forward hands them to every block: the frame offset, or a ValueError."""
    return frame_offset(getattr(generator, "t_scale", 1.0), getattr(generator, "use_relative_rope", False),
                        getattr(generator, "rope_method", "linear"), getattr(generator, "original_seq_len", None),
                        getattr(generator, "rope_temporal_offset", 0.0))


def check_patchable(generator: nn.Module, config) -> None:
    """Refuse at patch time what LongLive 2.0's patched model cannot serve (the model is left untouched)."""
    if getattr(generator, "kv_quant_config", None) is not None:
        raise ValueError("LongLive 2.0 with its NVFP4 KV cache (kv_quant) is not served: patch a model without "
                         "kv_quant")
    if config.local_attn_size is not None:
        raise ValueError("a patch window (local_attn_size) is not served for LongLive 2.0 yet: its drift is "
                         "unmeasured; set local_attn_size in LongLive 2.0's own config instead")
    if config.token_merge_ratio:
        raise ValueError("token merging (token_merge_ratio) is not served for LongLive 2.0 yet (untested on its blocks)")
    rope_settings(generator)


def _tokens_per_frame(generator: nn.Module, args: tuple, kwargs: dict) -> int:
    x = args[0] if args else kwargs.get("x")
    u = x[0] if isinstance(x, (list, tuple)) else x
    _, ph, pw = generator.patch_size
    return (u.shape[-2] // ph) * (u.shape[-1] // pw)


def _patched(generator: nn.Module, kv_cache) -> list[tuple[WindowSelfAttention2, dict]]:
    return [(block.self_attn, cache) for block, cache in zip(generator.blocks, kv_cache)
            if isinstance(block.self_attn, WindowSelfAttention2)]


def unroll_cache(cache: dict, ring_lo: int, shift: int) -> None:
    """Unroll one layer's cache (bf16, or the FP8 layout with its value scales) to the stock layout."""
    capacity = cache["k"].shape[1]
    ring = capacity - ring_lo   # 2.0's budget is the cache (the layer refuses a smaller one)
    if "v_scale" in cache:
        if shift % ring and (ring_lo % V_GROUP or ring % V_GROUP or shift % V_GROUP):
            raise ValueError(f"the FP8 cache's value scales cover {V_GROUP} slots each: moving the shot sink needs "
                             f"the ring ({ring_lo}, {ring} slots, shift {shift}) in whole groups; use "
                             "kv_cache_dtype bf16 for these shapes")
        unroll_ring(cache["v_scale"], ring_lo // V_GROUP, ring // V_GROUP, shift // V_GROUP)
    unroll_ring(cache["k"], ring_lo, ring, shift)
    unroll_ring(cache["v"], ring_lo, ring, shift)


def before_forward(generator: nn.Module, args: tuple, kwargs: dict) -> None:
    """The forward pre-hook (module docstring)."""
    kv_cache = kwargs.get("kv_cache")
    if kv_cache is None:
        return
    rope_settings(generator)
    layers = _patched(generator, kv_cache)
    if not layers:
        return
    for _, cache in layers:
        if "pinned_start" not in cache or "pinned_len" not in cache:
            raise KeyError("LongLive 2.0's KV cache dicts carry pinned_start and pinned_len (its pipeline's "
                           "_initialize_kv_cache); this one has neither")
        if cache.get("quantized", False):
            raise ValueError("LongLive 2.0's NVFP4 KV cache (kv_quant) is not served: run without kv_quant")
    state = torch.cat([c[name] for _, c in layers for name in ("global_end_index", "local_end_index", "pinned_start",
                                                                "pinned_len")]).view(-1, 4).tolist()
    fs = _tokens_per_frame(generator, args, kwargs)
    for (layer, cache), (g, loc, ps, pl) in zip(layers, state):
        sink = effective_sink(layer.global_sink_size * fs, layer.sink_size * fs, ps, pl)
        shift = cache.get(_HOST_STATE, (0, 0, 0))[2]
        before = cache.get(RING_LO)
        if before is not None and before != sink and _RING_SHIFT in cache:
            unroll_cache(cache, before, shift)
            cache[_RING_SHIFT].zero_()
            shift = 0
        cache[RING_LO] = sink
        cache[_HOST_STATE] = (g, loc, shift)


def graph_key(generator: nn.Module, kv_cache) -> tuple:
    layers = _patched(generator, kv_cache)
    return (rope_settings(generator), tuple(c.get(RING_LO) for _, c in layers),
            tuple((c["pinned_start"].data_ptr(), c["pinned_len"].data_ptr()) for _, c in layers))


crossattn_cache_used = False
