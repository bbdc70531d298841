"""warmup(): one eager pass over the shapes of a LongLive run (window filling, steady blocks, both
re-cache lengths), leaving the model, its CUDA-graph runner and the global RNG as they were."""
import torch

from longlive_triton import warmup
from longlive_triton.models import build_model, get_preset
from longlive_triton.runtime.pipeline import BlockPipeline

TINY = get_preset("tiny")


def _video(model):
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 9, 16, TINY.latent_height, TINY.latent_width, generator=gen)
    prompts = [torch.randn(1, TINY.text_len, TINY.text_dim, generator=gen) for _ in range(2)]
    torch.manual_seed(1)
    return BlockPipeline(model).generate(noise, prompts, [6])


def test_warmup_meets_every_shape_and_leaves_no_trace():
    model = build_model("tiny", seed=2)
    want = _video(model)
    budgets = [m.max_attention_size for m in model.modules() if hasattr(m, "max_attention_size")]
    torch.manual_seed(7)
    report = warmup(model, latent_hw=(TINY.latent_height, TINY.latent_width), local_attn_size=12)
    after_warmup = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after_warmup, torch.rand(3)), "warmup advanced the global RNG"
    # A 12-frame window of 3-frame blocks: 4 blocks fill it, then 2 more; switches re-cache 6 and 12 frames.
    assert report.blocks == 6 and report.switch_frames == [6, 15] and report.recache_frames == [6, 12]
    assert report.autotune_cache is None and "6 blocks" in str(report)
    assert [m.max_attention_size for m in model.modules() if hasattr(m, "max_attention_size")] == budgets
    assert model.local_attn_size == TINY.local_attn_size
    assert torch.equal(_video(model), want)


def test_a_whole_video_cache_warms_four_blocks_and_two():
    model = build_model("tiny", seed=2)
    report = warmup(model, latent_hw=(TINY.latent_height, TINY.latent_width), local_attn_size=-1)
    assert report.blocks == 6 and report.recache_frames == [6, 15]
