"""A window smaller than the KV cache (window9/fastest in a cache LongLive sizes from its config, 12
frames): the ring is as long as the window, so every window is read in place (cuDNN and CUDA graphs
never fall back to a gathered copy), the patch's window survives LongLive's budget reset, and the
latents match the unpatched model with the same cache and window."""
import pytest
import torch

from longlive_triton import PatchConfig, patch_model
from longlive_triton.runtime.graphs import attention_windows
from longlive_triton.numerics import rel_l2
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.models import build_model, get_preset

TINY = get_preset("tiny")                 # 8 tokens per frame, 3-frame blocks and sink, 12-frame window
FS = TINY.frame_seqlen
HEADS, HEAD_DIM = TINY.num_heads, TINY.dim // TINY.num_heads
CACHE = 12                                # LongLive's config: the cache it allocates, in latent frames


def _longlive_calls(blocks: int, switch_block: int, global_sink: bool):
    """(current_start, new tokens, sink_recache) of every generator call LongLive's loop makes: the
    re-cache of its config's 12 frames at the switch, then 4 denoising steps and the cache pass."""
    for block in range(blocks):
        start = block * 3
        if block == switch_block:
            count = min(CACHE, start)
            yield (start - count) * FS, count * FS, not global_sink
        for _ in range(5):
            yield start * FS, 3 * FS, False


@pytest.mark.parametrize("window", [6, 9, 12])
@pytest.mark.parametrize("global_sink", [True, False])
def test_every_window_reads_in_place_in_a_larger_cache(window, global_sink):
    """The graph runner's key for each call of 16 blocks with a switch: never the gathered-copy
    fallback, and once full the window is the preset's (LongLive's budget reset to 12 frames
    notwithstanding)."""
    model = build_model("tiny", dtype=torch.bfloat16, seed=3)
    patch_model(model, PatchConfig(window_attention=True, local_attn_size=window))
    layers = [b.self_attn for b in model.blocks]
    for layer in layers:  # what LongLive's _set_all_modules_max_attention_size does on each inference()
        layer.max_attention_size = CACHE * FS
    # The runner reads the caches' shapes and its own host-side bookkeeping: no tensor is touched.
    caches = [{"k": torch.empty(1, CACHE * FS, HEADS, HEAD_DIM, dtype=torch.bfloat16)} for _ in layers]
    lengths = []
    for start, n, sink_recache in _longlive_calls(16, 9, global_sink):
        key = attention_windows(layers, caches, start, n, FS, sink_recache, commit=False)
        assert key is not None, f"call at {start} (n {n}) would run eagerly with gathered keys"
        lengths.append(key[0])
        attention_windows(layers, caches, start, n, FS, sink_recache, commit=True)
    assert lengths[-1] == (window - TINY.sink_size) * FS


class _Window9InCache12(BlockPipeline):
    """The unpatched model as LongLive would run it with a 9-frame window in a 12-frame cache: the
    pipeline's config (12) sizes the cache and the re-cache, the modules' budget is 9 frames."""

    def _set_attention_budget(self):
        for module in self.model.modules():
            if hasattr(module, "max_attention_size"):
                module.max_attention_size = 9 * self.frame_seqlen


def _inputs(frames: int):
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(1, frames, 16, TINY.latent_height, TINY.latent_width, generator=gen).to(torch.bfloat16)
    prompts = [torch.randn(1, TINY.text_len, TINY.text_dim, generator=gen).to(torch.bfloat16) for _ in range(2)]
    return noise, prompts


@pytest.mark.parametrize("backend, global_sink", [("sdpa", False), ("triton", True)])
def test_window9_in_a_12_frame_cache_matches_the_unpatched_model(backend, global_sink):
    """18 latent frames, a prompt switch at frame 15 that re-caches 12 frames into the 6-frame ring
    (with and without a new sink): the patched window9 model under LongLive's settings (cache,
    re-cache and budget from a config of 12) against the unpatched model with the same cache."""
    noise, prompts = _inputs(18)
    config = PipelineConfig(local_attn_size=CACHE, global_sink=global_sink)
    unpatched = _Window9InCache12(build_model("tiny", dtype=torch.bfloat16, seed=3), config)
    torch.manual_seed(0)  # after building: module construction draws from the global generator
    want = unpatched.generate(noise, prompts, [15])
    model = build_model("tiny", dtype=torch.bfloat16, seed=3)
    report = patch_model(model, PatchConfig(window_attention=True, attention_backend=backend, local_attn_size=9))
    assert "the cache is larger than the window needs" in str(report), str(report)
    torch.manual_seed(0)
    pipe = BlockPipeline(model, config)
    with pytest.warns(UserWarning, match="holds 12 latent frames, 3 more than the 9-frame attention window"):
        got = pipe.generate(noise, prompts, [15])
    assert pipe.caches.kv[0]["k"].shape[1] == CACHE * FS
    rel = rel_l2(got, want)
    assert rel <= 1e-2, rel
    # The 12-frame window differs from frame 12 on (block 4 rolls), so the window really is 9 frames.
    wide = BlockPipeline(build_model("tiny", dtype=torch.bfloat16, seed=3), config)
    torch.manual_seed(0)
    wide = wide.generate(noise, prompts, [15])
    rel_wide = rel_l2(got[:, 12:], wide[:, 12:])
    print(f"patched vs unpatched {rel:.2e}; vs the 12-frame window {rel_wide:.2e}")
    assert rel_wide > 3 * rel


def test_a_recompute_before_the_last_commit_is_refused_in_a_larger_cache():
    """The ring keeps only the window: a call that recomputes older tokens (LongLive never makes one)
    is refused instead of reading keys that were overwritten."""
    model = build_model("tiny", dtype=torch.bfloat16, seed=3)
    patch_model(model, PatchConfig(window_attention=True, local_attn_size=9))
    layers = [b.self_attn for b in model.blocks]
    caches = [{"k": torch.empty(1, CACHE * FS, HEADS, HEAD_DIM, dtype=torch.bfloat16)} for _ in layers]
    for block in range(6):
        attention_windows(layers, caches, block * 3 * FS, 3 * FS, FS, False, commit=True)
    with pytest.raises(ValueError, match="before the last committed token"):
        attention_windows(layers, caches, 3 * FS, 3 * FS, FS, False, commit=False)
