"""The fused-glue block patch: same latents as the unpatched reference, alone and with the
window self-attention patch, and it leaves blocks it cannot serve untouched."""
import copy

import pytest
import torch

from longlive_triton import PatchConfig, patch_model
from longlive_triton.numerics import rel_l2
from longlive_triton.patches.cross_attention import FusedCrossAttention
from longlive_triton.patches.fused_block import FusedAttentionBlock
from longlive_triton.patches.fused_head import FusedHead
from longlive_triton.patches.window_self_attention import WindowSelfAttention
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.models import CausalWanModel, build_model, get_preset

from .._numerics import assert_as_close_as_same_precision


def _generate(model, device, switches=(12,)):
    p = get_preset("tiny")
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 18, 16, p.latent_height, p.latent_width, generator=gen).to(device, torch.bfloat16)
    prompts = [torch.randn(1, p.text_len, p.text_dim, generator=gen).to(device, torch.bfloat16) for _ in range(2)]
    torch.manual_seed(0)
    return BlockPipeline(model, PipelineConfig()).generate(noise, prompts, list(switches))


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
