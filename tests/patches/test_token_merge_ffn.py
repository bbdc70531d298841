"""The FFN token-merging patch: equals the same model with the torch reference of the merge, leaves
self-attention and the KV cache at full resolution, is off in `exact`, and refuses bad knobs."""
import copy
import dataclasses

import pytest
import torch

from longlive_triton.numerics import rel_l2
import longlive_triton.patches.token_merge_ffn as tm_patch
from longlive_triton import PatchConfig, load_preset, patch_model
from longlive_triton.kernels.token_merge import token_merge_ref, token_unmerge_ref
from longlive_triton.patches.token_merge_ffn import TokenMergedFFN
from longlive_triton.runtime.pipeline import BlockPipeline
from longlive_triton.models import build_model, get_preset

from .._numerics import assert_as_close_as_same_precision

TINY = get_preset("tiny")                       # latent 4x8: a 2x4 token grid, 8 tokens per frame
FS = (TINY.latent_height // 2) * (TINY.latent_width // 2)


def _inputs(frames, dtype=torch.float32, seed=3):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, frames, 16, TINY.latent_height, TINY.latent_width, generator=gen)
    prompt = torch.randn(1, 10, TINY.text_dim, generator=gen)
    return noise.to(dtype), prompt.to(dtype)


def _first_forward(model, dtype=torch.float32):
    """One generator call on block 0 (t = 1000): returns x0 and the pipeline (its caches)."""
    noise, prompt = _inputs(3, dtype)
    pipe = BlockPipeline(model)
    pipe.frame_seqlen = FS
    pipe.init_caches(1, 3, dtype, noise.device)
    pipe._set_attention_budget()
    with torch.no_grad():
        return pipe.predict_x0(noise, 1000.0, prompt, 0), pipe


def _generate(model, frames=3):
    noise, prompt = _inputs(frames)
    torch.manual_seed(0)
    return BlockPipeline(model).generate(noise, prompt)


def test_patched_model_equals_the_torch_reference_merge(monkeypatch):
    """A block of the tiny model (every layer's FFN merged, in 5 calls) against the same
    patch running the plain torch reference of matching, merge and unmerge."""
    model = build_model("tiny", seed=2)
    report = patch_model(model, PatchConfig(token_merge_ratio=0.5))
    assert report.counts()["token_merge_ffn"] == {"applied": TINY.num_layers, "skipped": 0}
    assert all(isinstance(b.ffn, TokenMergedFFN) for b in model.blocks)
    got = _generate(model)
    monkeypatch.setattr(tm_patch, "token_merge", token_merge_ref)
    monkeypatch.setattr(tm_patch, "token_unmerge", token_unmerge_ref)
    want = _generate(model)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    plain = _generate(build_model("tiny", seed=2))
    assert rel_l2(got, plain) > 1e-3     # the merge did change the output


def test_ffn_sees_fewer_tokens_and_the_cache_stays_full(monkeypatch):
    model = build_model("tiny", seed=2)
    patch_model(model, PatchConfig(token_merge_ratio=0.5))
    seen = []
    ffn_in = model.blocks[0].ffn[0]
    ffn_in.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    _, pipe = _first_forward(model)
    assert seen == [3 * (FS - FS // 2)]             # half of each frame's 8 tokens merged away
    _, plain_pipe = _first_forward(build_model("tiny", seed=2))
    for layer, (cache, plain) in enumerate(zip(pipe.caches.kv, plain_pipe.caches.kv)):
        assert cache["k"].shape == plain["k"].shape and int(cache["local_end_index"]) == 3 * FS
        written = cache["k"][:, :3 * FS]
        assert (written != 0).any(-1).any(-1).all()   # every token's key is in the cache
    # Layer 0's self-attention runs before any FFN: its keys and values are the unpatched ones.
    assert torch.equal(pipe.caches.kv[0]["k"], plain_pipe.caches.kv[0]["k"])
    assert torch.equal(pipe.caches.kv[0]["v"], plain_pipe.caches.kv[0]["v"])


def test_a_ratio_that_merges_nothing_changes_nothing():
    """ratio 0.1 of 8 tokens is r = 0: merge and unmerge are copies, the FFN sees every token."""
    want, _ = _first_forward(build_model("tiny", seed=2))
    model = build_model("tiny", seed=2)
    patch_model(model, PatchConfig(token_merge_ratio=0.1))
    got, _ = _first_forward(model)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_merging_with_the_fused_block(device):
    """exact + merging (the opt-in knob), bf16: the merge runs inside FusedAttentionBlock."""
    cfg = dataclasses.replace(load_preset("exact"), token_merge_ratio=0.5)
    assert cfg.token_merge_stride == (2, 2) and cfg.fused_glue
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=2)
    report = patch_model(model, cfg)
    assert report.counts()["token_merge_ffn"] == {"applied": TINY.num_layers, "skipped": 0}
    assert all(type(b).__name__ == "FusedAttentionBlock" and isinstance(b.ffn, TokenMergedFFN) for b in model.blocks)
    x0, _ = _first_forward(model, torch.bfloat16)
    assert torch.isfinite(x0.float()).all()


def test_exact_has_no_merging_and_state_dict_is_unchanged():
    exact = load_preset("exact")
    assert exact.token_merge_ratio == 0.0 and exact.local_attn_size is None
    model = build_model("tiny", seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = patch_model(model, PatchConfig(token_merge_ratio=0.5))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert "token_merge_ffn" not in patch_model(build_model("tiny"), exact).counts()
    assert "0.5 of each latent frame" in str(report)


@pytest.mark.parametrize("cfg, match", [
    (dict(token_merge_ratio=0.5, token_merge_stride=(4, 4)), "must divide the frame grid"),
    (dict(token_merge_ratio=0.5, token_merge_stride=(1, 3)), "must divide the frame grid"),
    (dict(token_merge_ratio=0.9), "only 6 sources"),
])
def test_knobs_that_do_not_fit_the_grid_are_refused_at_the_first_call(cfg, match):
    model = build_model("tiny", seed=2)
    patch_model(model, PatchConfig(**cfg))
    with pytest.raises(ValueError, match=f"token_merge_stride .* do not fit the latent token grid 2x4: .*{match}"):
        _first_forward(model)


@pytest.mark.parametrize("cfg, match", [
    (dict(token_merge_ratio=1.0), "token_merge_ratio must be in"), (dict(token_merge_ratio=-0.1), "token_merge_ratio"),
    (dict(token_merge_ratio=float("nan")), "token_merge_ratio"), (dict(token_merge_stride=[2]), "token_merge_stride"),
    (dict(token_merge_stride=[0, 2]), "token_merge_stride"), (dict(token_merge_stride=[2.0, 2]), "token_merge_stride"),
])
def test_invalid_knobs_are_refused_by_the_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        PatchConfig(**cfg)
    with pytest.raises(ValueError, match=match):
        PatchConfig.from_dict(cfg)


def test_an_ffn_the_kernels_cannot_take_is_skipped():
    model = build_model("tiny", seed=2).half()
    ffns = [b.ffn for b in model.blocks]
    report = patch_model(model, PatchConfig(token_merge_ratio=0.5))
    assert {e.reason for e in report.skipped if e.patch == "token_merge_ffn"} == {
        "the merge kernels take bf16 or fp32 tokens; this FFN is torch.float16"}
    assert [b.ffn for b in model.blocks] == ffns and not model.blocks[0]._forward_pre_hooks


def test_the_ffn_alone_is_refused_with_a_reason():
    model = build_model("tiny", seed=2)
    patch_model(model, PatchConfig(token_merge_ratio=0.5))
    with pytest.raises(RuntimeError, match="call the block"):
        model.blocks[0].ffn(torch.randn(1, 3 * FS, TINY.dim))


@pytest.mark.gpu
def test_real_shape_layer_ffn():
    """One 1.3B layer's FFN on a 3-frame block (3 x 30x52 tokens, 1536 -> 8960 -> 1536, bf16), ratio 0.5:
    equals the FFN run on the torch reference's merge of the same matching, copied back by the reference."""
    from longlive_triton.kernels.token_merge import token_match

    torch.manual_seed(0)
    ffn = torch.nn.Sequential(torch.nn.Linear(1536, 8960), torch.nn.GELU(approximate="tanh"),
                              torch.nn.Linear(8960, 1536)).to("cuda", torch.bfloat16)
    merged_ffn = TokenMergedFFN(ffn, 0.5, (2, 2))
    merged_ffn.grid = (3, 30, 52)
    x = torch.randn(1, 4680, 1536, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = merged_ffn(x)
        kw = dict(frames=3, grid=(30, 52), stride=(2, 2))
        ref = token_merge_ref(x, **kw, ratio=0.5, match=token_match(x, **kw))
        assert ref.merged.shape[1] == 2340
        want = token_unmerge_ref(ffn(ref.merged), ref.mapping)
        rows = ref.mapping[0]  # each merged row: the fp64 mean of the tokens mapped to it
        exact_merged = torch.zeros(2340, 1536, dtype=torch.float64, device="cuda").index_add_(0, rows, x[0].double())
        exact_merged = (exact_merged / torch.bincount(rows, minlength=2340).double()[:, None])[None]
        exact = token_unmerge_ref(copy.deepcopy(ffn).double()(exact_merged), ref.mapping)
    # A merged row may differ by one bf16 ulp (the reference's index_add_ sums in any order on the
    # GPU), which the FFN carries through; every other row is the same GEMM on the same input. So
    # the torch route is the same-precision reference (tests/_numerics.py).
    assert_as_close_as_same_precision(got, exact, want, terms=8960)
