"""The attention-window knob: how many latent frames (sink included) each block attends to.

Not a module swap: LongLive reads the window from `local_attn_size` attributes (the generator's,
which the pipeline turns into the KV cache size, and every attention module's) and from each
self-attention's `max_attention_size` budget in tokens. `set_attention_window` rewrites them all
on a generator, before or after the other patches (a patched WindowSelfAttention carries both
attributes too). LongLive's own pipeline overwrites the generator's value with its config's
`model_kwargs.local_attn_size`: set the same window there; ours (BlockPipeline) takes the model's.
"""
from __future__ import annotations

import torch.nn as nn


def set_attention_window(generator: nn.Module, frames: int) -> str:
    """Set a window of `frames` latent frames on a LongLive generator; returns what changed, for the report.

    Refused (ValueError) when the window cannot hold the sink and one block of new frames: the
    rolling part of the cache would evict the block being generated.
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"the attention window must be a positive number of latent frames, got {frames!r}")
    sink = int(getattr(generator, "sink_size", 0))
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
