"""The fused-glue block patch: same latents as the unpatched reference, alone and with the
window self-attention patch, and it leaves blocks it cannot serve untouched."""
import copy

import pytest
import torch

from longlive_triton import PatchConfig, patch_model
from longlive_triton.numerics import rel_l2
from longlive_triton.patches.cross_attention import FusedCrossAttention
from longlive_triton.patches.fused_block import FusedAttentionBlock, cache_only_last_layer
from longlive_triton.patches.fused_head import FusedHead
from longlive_triton.patches.window_self_attention import WindowSelfAttention
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.models import CausalWanModel, build_model, get_preset

from .._numerics import assert_as_close_as_same_precision


def _generate(model, device, switches=(12,), frames=18, **pipeline):
    p = get_preset("tiny")
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(1, frames, 16, p.latent_height, p.latent_width, generator=gen).to(device, torch.bfloat16)
    prompts = [torch.randn(1, p.text_len, p.text_dim, generator=gen).to(device, torch.bfloat16) for _ in range(2)]
    torch.manual_seed(0)
    return BlockPipeline(model, PipelineConfig(**pipeline)).generate(noise, prompts, list(switches))


@pytest.mark.parametrize("with_attention", [False, True])
def test_fused_blocks_match_reference(device, with_attention):
    want = _generate(build_model("tiny", dtype=torch.bfloat16, device=device, seed=4), device)
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=4)
    report = patch_model(model, PatchConfig(fused_glue=True, window_attention=with_attention))
    assert report.counts()["fused_block"] == {"applied": 2, "skipped": 0}
    assert report.counts()["fused_cross_attention"] == {"applied": 2, "skipped": 0}
    assert all(isinstance(b.cross_attn, FusedCrossAttention) for b in model.blocks)
    assert all(isinstance(b, FusedAttentionBlock) for b in model.blocks)
    assert all(isinstance(b.self_attn, WindowSelfAttention) == with_attention for b in model.blocks)
    got = _generate(model, device)
    rel = rel_l2(got, want)
    assert rel <= 1e-2, rel


@pytest.mark.parametrize("preset", ["exact", "fp8"])
def test_cache_pass_stops_last_layer_after_append(device, preset):
    """The cache passes (and the re-cache after the switch) run the last layer up to its K/V append
    only: the same latents bit for bit, and its cross-attention never runs in them."""
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=4)
    patch_model(model, preset)
    calls = {0: 0, -1: 0}
    for i in calls:
        model.blocks[i].cross_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    whole = _generate(model, device, switches=(6,), frames=9, cache_pass_append_only=False)
    assert calls[0] == calls[-1]
    calls.update({0: 0, -1: 0})
    append_only = _generate(model, device, switches=(6,), frames=9)
    assert torch.equal(append_only, whole)
    # 3 blocks: 3 cache passes and 1 re-cache skip the last layer's cross-attention.
    assert calls[0] - calls[-1] == 4 and not model.blocks[-1].cache_only


def test_cache_only_needs_fused_last_block(device):
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=4)
    with cache_only_last_layer(model) as applies:
        assert not applies
    patch_model(model, PatchConfig(fused_glue=True, window_attention=False))
    with cache_only_last_layer(model) as applies:
        assert not applies and not model.blocks[-1].cache_only


def test_block_without_affine_cross_norm_is_skipped():
    kwargs = {**get_preset("tiny").model_kwargs(), "cross_attn_norm": False}
    model = CausalWanModel(**kwargs).to(torch.bfloat16)
    blocks = list(model.blocks)
    report = patch_model(model, PatchConfig(fused_glue=True))
    assert {e.reason for e in report.skipped if e.patch == "fused_block"} == {
        "norm3 is not an affine LayerNorm (cross_attn_norm off?)"}
    assert list(model.blocks) == blocks


def test_state_dict_unchanged(device):
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch_model(model, PatchConfig(fused_glue=True, window_attention=True))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("frames", [1, 3])
def test_fused_head_matches_stock_head(device, frames):
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=4)
    stock = model.head
    torch.nn.init.normal_(stock.head.weight, std=0.05)  # the stock init leaves the head at zero
    patch_model(model, PatchConfig(fused_glue=True))
    assert isinstance(model.head, FusedHead) and model.head.head is stock.head
    gen = torch.Generator().manual_seed(9)
    L = frames * get_preset("tiny").frame_seqlen
    x = (torch.randn(2, L, stock.dim, generator=gen) * 3).to(device, torch.bfloat16)
    e = torch.randn(2, frames, 1, stock.dim, generator=gen).to(device, torch.bfloat16)
    want, got = stock(x, e), model.head(x, e)
    exact = copy.deepcopy(stock).double()(x.double(), e.double())
    # The stock bf16 head rounds where the fused one does (its LayerNorm and modulation in bf16).
    assert_as_close_as_same_precision(got, exact, want, terms=stock.dim)


def test_fp32_head_is_skipped():
    model = build_model("tiny", dtype=torch.float32, seed=4)
    head = model.head
    report = patch_model(model, PatchConfig(fused_glue=True))
    assert model.head is head
    assert {e.reason for e in report.skipped if e.patch == "fused_head"} == {
        "the adaln kernel runs the bf16 path; this head is torch.float32"}


@pytest.mark.gpu
@pytest.mark.slow
def test_cache_pass_append_only_at_real_size():
    """LongLive-1.3B shapes, fp8 preset, CUDA graphs, 4 blocks with a switch: the cache passes that
    stop the last layer after its K/V append give the latents of whole cache passes, bit for bit (the
    same kernels on the same inputs up to that append; nothing after it reaches the cache)."""
    device = torch.device("cuda")
    p = get_preset("longlive-1.3b")
    gen = torch.Generator(device=device).manual_seed(0)
    noise = torch.randn(1, 12, 16, p.latent_height, p.latent_width, generator=gen, device=device).bfloat16()
    prompts = [torch.randn(1, p.text_len, p.text_dim, generator=gen, device=device).bfloat16() for _ in range(2)]
    model = build_model("longlive-1.3b", dtype=torch.bfloat16, device=device, seed=4)
    patch_model(model, "fp8")
    outs = []
    for append_only in (False, True):
        torch.manual_seed(0)
        pipe = BlockPipeline(model, PipelineConfig(cache_pass_append_only=append_only))
        outs.append(pipe.generate(noise, prompts, [6]))
    assert torch.equal(*outs)
