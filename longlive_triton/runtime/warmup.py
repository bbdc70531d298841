"""Warm-up: meet every kernel shape of a LongLive run once, before the first real block.

    from longlive_triton import patch_model, warmup
    patch_model(model, "fp8")
    print(warmup(model))        # before LongLive's loop (or BlockPipeline) starts the video

A patched model's first call of each shape is slow: Triton compiles its kernels (integer arguments
are specialized by divisibility, so the 4680-token block and the 18720-token re-cache are two
compilations), the autotuned kernels search their configs, cuDNN and cuBLAS plan. Left to the run,
that lands on the first block (seconds) and on the first prompt switch, whose re-cache is the first
call at the window's length. `warmup` pays it up front on scratch caches: one eager `BlockPipeline`
(no CUDA graphs, so nothing is captured on the scratch buffers) over as many blocks as the KV
window holds plus two, with a prompt switch after two blocks (the re-cache of a partly filled
window) and one at the last block (the re-cache of a full window). So it meets the blocks that fill
the window, the steady block, both re-cache lengths and the text-cache refill.

With the autotuning kept on disk (`longlive_triton.kernels._common.AutotuneCache`) and Triton's own
compile cache, the warm-up of a second process only loads: it runs the blocks at full speed.
The model's state is left as it was: the global RNG (the pipeline's re-noising draws) is forked, and
the attention budget and window the pipeline writes on the model are put back.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig, _inner_model

__all__ = ["WarmupReport", "warmup"]

LONGLIVE_LATENT_HW = (60, 104)  # 480x832 pixels, LongLive's video size


@dataclass
class WarmupReport:
    seconds: float
    blocks: int
    switch_frames: list[int]
    recache_frames: list[int]
    latent_hw: tuple[int, int]
    autotune_cache: str | None  # the file the tuned configs live in (None: not on CUDA)

    def __str__(self) -> str:
        cache = f"; tuned configs in {self.autotune_cache}" if self.autotune_cache else ""
        return (f"warm-up: {self.blocks} blocks at latent {self.latent_hw[0]}x{self.latent_hw[1]} with prompt "
                f"switches at frames {self.switch_frames} (re-caching {self.recache_frames} frames) in "
                f"{self.seconds:.1f} s{cache}")


def warmup(model: nn.Module, *, latent_hw: tuple[int, int] = LONGLIVE_LATENT_HW, batch_size: int = 1,
           num_frame_per_block: int = 3, local_attn_size: int | None = None) -> WarmupReport:
    """Run the shapes of a LongLive video once on scratch caches (module docstring).

    latent_hw, batch_size, num_frame_per_block, local_attn_size: those of the run to come (the last is
    the KV cache length in latent frames that LongLive's config gives; None: the model's own).
    """
    inner = _inner_model(model)
    weight = inner.patch_embedding.weight
    device, dtype = weight.device, weight.dtype
    budgets = {m: m.max_attention_size for m in inner.modules() if hasattr(m, "max_attention_size")}
    window_before = inner.local_attn_size
    config = PipelineConfig(num_frame_per_block=num_frame_per_block, local_attn_size=local_attn_size,
                            cuda_graphs=False)
    start = time.perf_counter()
    try:
        pipe = BlockPipeline(model, config)
        window = pipe.config.local_attn_size
        fpb = num_frame_per_block
        blocks = (math.ceil(window / fpb) if window != -1 else 4) + 2
        switches = [2 * fpb, (blocks - 1) * fpb]
        gen = torch.Generator(device).manual_seed(0)
        noise = torch.randn([batch_size, blocks * fpb, inner.in_dim, *latent_hw], generator=gen, device=device)
        prompts = [torch.randn([batch_size, inner.text_len, inner.text_dim], generator=gen, device=device).to(dtype)
                   for _ in range(3)]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            pipe.generate(noise.to(dtype), prompts, switches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        inner.local_attn_size = window_before
        for module, budget in budgets.items():
            module.max_attention_size = budget
    cache = None
    if device.type == "cuda":
        from longlive_triton.kernels._common import current_autotune_cache
        with torch.cuda.device(device):
            cache = str(current_autotune_cache().path)
    recache = [s if window == -1 else min(window, s) for s in switches]
    return WarmupReport(time.perf_counter() - start, blocks, switches, recache, tuple(latent_hw), cache)
