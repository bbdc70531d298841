"""The attention-window knob: how many latent frames (sink included) each block attends to.

Not a module swap: LongLive reads the window from `local_attn_size` attributes (the generator's,
which the pipeline turns into the KV cache size, and every attention module's) and from each
self-attention's `max_attention_size` budget in tokens. `set_attention_window` rewrites them all
on a generator, before or after the other patches (a patched WindowSelfAttention carries both
attributes too). LongLive's own pipeline sizes its KV cache from its config's
`model_kwargs.local_attn_size` and resets every module's budget from it on each inference(): the
patched self-attention keeps the patch's window as a cap (patches/window_self_attention.py), so the
window holds there too, in a cache larger than it needs unless the config says the same window.
The stock modules (a model patched without window_attention) take LongLive's reset.
"""
from __future__ import annotations

import torch.nn as nn


def sink_frames(generator: nn.Module) -> int:
    """The attention sink in latent frames. The stock CausalWanModel keeps `sink_size` on its
    self-attention modules only (our reference also on the model); they must agree."""
    sizes = {int(m.sink_size) for m in generator.modules() if hasattr(m, "sink_size") and m is not generator}
    if len(sizes) > 1:
        raise ValueError(f"the attention modules disagree on the sink size: {sorted(sizes)} latent frames")
    if hasattr(generator, "sink_size"):
        own = int(generator.sink_size)
        if sizes and sizes != {own}:
            raise ValueError(f"the model's sink_size {own} differs from its attention modules' {sizes.pop()}")
        return own
    return sizes.pop() if sizes else 0


def set_attention_window(generator: nn.Module, frames: int) -> str:
    """Set a window of `frames` latent frames on a LongLive generator; returns what changed, for the report.

    Refused (ValueError) when the window cannot hold the sink and one block of new frames: the
    rolling part of the cache would evict the block being generated.
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"the attention window must be a positive number of latent frames, got {frames!r}")
    sink = sink_frames(generator)
    block = int(getattr(generator, "num_frame_per_block", 1))
    if frames < sink + block:
        raise ValueError(f"local_attn_size {frames} is smaller than the {sink}-frame sink plus one {block}-frame "
                         f"block ({sink + block} latent frames)")
    old = generator.local_attn_size
    count = 0
    for module in generator.modules():
        if not hasattr(module, "local_attn_size"):
            continue
        before = module.local_attn_size
        module.local_attn_size = frames
        count += 1
        budget = getattr(module, "max_attention_size", None)
        # The stock modules hold the budget in tokens (window * 1560, fixed at construction); keep
        # its tokens per frame. Our reference holds None and derives it at run time.
        if isinstance(budget, int) and isinstance(before, int) and before > 0 and budget % before == 0:
            module.max_attention_size = budget // before * frames
    return f"attention window {frames} latent frames (sink {sink} + {frames - sink}), was {old}; set on {count} modules"


def longlive_cache_note(old, frames: int, patched: bool) -> str | None:
    """What the window means under LongLive's own pipeline, whose KV cache and module budgets come
    from its config's model_kwargs.local_attn_size (`old`, the model's window before the patch)."""
    if not isinstance(old, int) or not (old == -1 or old > frames):
        return None
    cache = "the whole video" if old == -1 else f"{old} latent frames"
    if not patched:
        return (f"LongLive's pipeline resets the window to its model_kwargs.local_attn_size ({cache} here) on "
                f"each inference() and the stock self-attention follows it: set it to {frames} there too")
    return (f"LongLive sizes its KV cache from model_kwargs.local_attn_size ({cache} here): the patched "
            f"self-attention keeps the {frames}-frame window in it and reads it in place at full speed, but the "
            f"cache is larger than the window needs (set model_kwargs.local_attn_size: {frames} to free the rest)")
