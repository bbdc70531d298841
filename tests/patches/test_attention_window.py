"""The attention-window knob: patch_model sets it on the model, the pipeline takes the model's window,
and windows that cannot hold the sink and one block are refused."""
import pytest
import torch

from longlive_triton import PatchConfig, load_preset, patch_model
from longlive_triton.patches.window_self_attention import WindowSelfAttention
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.models import build_model, get_preset

TINY = get_preset("tiny")                       # window 12, sink 3, 3-frame blocks, 8 tokens per frame
FS = (TINY.latent_height // 2) * (TINY.latent_width // 2)


def _generate(model, config=None, frames=15):
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(1, frames, 16, TINY.latent_height, TINY.latent_width, generator=gen)
    prompt = torch.randn(1, 10, TINY.text_dim, generator=gen)
    torch.manual_seed(0)
    pipe = BlockPipeline(model, config)
    return pipe.generate(noise, prompt), pipe


def test_patched_window_is_the_pipelines_window():
    """A window of 9 set by patch_model gives what the stock route (the pipeline's config) gives, and
    differs from the default 12 once the cache rolls (block 4 of 5)."""
    model = build_model("tiny", seed=1)
    report = patch_model(model, PatchConfig(local_attn_size=9))
    assert model.local_attn_size == 9
    assert all(b.local_attn_size == 9 and b.self_attn.local_attn_size == 9 for b in model.blocks)
    assert "attention window 9 latent frames (sink 3 + 6), was 12" in str(report)
    got, pipe = _generate(model)
    assert pipe.config.local_attn_size == 9 and pipe.caches.kv[0]["k"].shape[1] == 9 * FS
    want, _ = _generate(build_model("tiny", seed=1), PipelineConfig(local_attn_size=9))
    assert torch.equal(got, want)
    default, default_pipe = _generate(build_model("tiny", seed=1))
    assert default_pipe.config.local_attn_size == 12 and not torch.equal(got, default)
    assert torch.equal(got[:, :9], default[:, :9])          # identical until the 9-frame window rolls


def test_an_explicit_pipeline_window_still_wins():
    model = build_model("tiny", seed=1)
    patch_model(model, PatchConfig(local_attn_size=9))
    pipe = BlockPipeline(model, PipelineConfig(local_attn_size=6))
    assert pipe.config.local_attn_size == 6 and model.local_attn_size == 6


def test_window_reaches_patched_attention_and_the_stock_token_budget(device):
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=1)
    for b in model.blocks:   # the stock modules carry window * 1560 tokens from construction
        b.self_attn.max_attention_size = 12 * 1560
    patch_model(model, PatchConfig(window_attention=True, local_attn_size=9))
    attn = [b.self_attn for b in model.blocks]
    assert all(isinstance(a, WindowSelfAttention) for a in attn)
    assert all(a.local_attn_size == 9 and a.max_attention_size == 9 * 1560 for a in attn)


def test_window9_preset():
    cfg = load_preset("window9")
    assert cfg.local_attn_size == 9 and cfg.token_merge_ratio == 0.0
    assert cfg.window_attention and cfg.fused_glue and cfg.attention_backend == load_preset("exact").attention_backend


@pytest.mark.parametrize("window", [5, 3, 1])
def test_a_window_without_room_for_sink_and_block_is_refused(window):
    model = build_model("tiny", seed=1)
    with pytest.raises(ValueError, match=f"local_attn_size {window} is smaller than the 3-frame sink plus one 3-frame"):
        patch_model(model, PatchConfig(local_attn_size=window))
    assert model.local_attn_size == 12 and all(b.self_attn.local_attn_size == 12 for b in model.blocks)
    with pytest.raises(ValueError, match="cannot hold the 3-frame sink and one 3-frame block"):
        BlockPipeline(build_model("tiny", seed=1), PipelineConfig(local_attn_size=max(window, 3)))


@pytest.mark.parametrize("window", [0, -1, True, 9.0, "9"])
def test_invalid_window_values_are_refused_by_the_config(window):
    with pytest.raises((ValueError, TypeError), match="local_attn_size"):
        PatchConfig(local_attn_size=window)
