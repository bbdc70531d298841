"""Our LongLive 2.0 reference against the stock LongLive 2.0 generator at tiny2 shapes on the CPU, both driven
by LongLive 2.0's own inference pipeline, scene cuts included.

Runs wherever a LongLive 2.0 checkout is available: LONGLIVE_SRC2, or LONGLIVE_SRC when it points at a 2.0
tree (e.g. .stock/LongLive2, branch main of NVlabs/LongLive); skipped otherwise (CI has no checkout).
The harness is tests/stock_harness2.py; the importer longlive_triton/stock/longlive2.py.

The two generators perform the same operations in the same order in fp32 (and in bf16), so every block and
every layer output is expected bit-equal: the bound 1e-6 is far below what a semantic change moves (a missing
shot offset or an untracked pinned chunk: several 1e-3 at the first layer after the cut).
"""
from __future__ import annotations

import pytest
import torch

from ..stock_harness2 import stock2_src


_SRC = stock2_src()
pytestmark = pytest.mark.skipif(
    _SRC is None, reason="no LongLive 2.0 checkout: set LONGLIVE_SRC2 (or LONGLIVE_SRC) to one, e.g. .stock/LongLive2")
BOUND = 1e-6


@pytest.fixture(scope="module")
def stock():
    from longlive_triton.stock.longlive2 import load_stock_longlive2
    return load_stock_longlive2(_SRC)


def _compare(stock, blocks, cuts, dtype=torch.float32, **kwargs) -> dict:
    from ..stock_harness2 import compare_with_stock2
    figures = compare_with_stock2(stock, "tiny2", dtype, "cpu", blocks, cuts, **kwargs)
    print(f"\ncuts {cuts}: rel L2 per block " + " ".join(f"{b:.1e}" for b in figures["rel_l2_per_block"])
          + "; per layer " + " ".join(f"{b:.1e}" for b in figures["rel_l2_per_layer"])
          + f"; pinned {figures['pinned']}")
    assert figures["stock_class"] == "wan_5b.modules.causal_model.CausalWanModel"
    assert figures["finite"] and figures["stock_latent_norm"] > 0
    assert figures["calls_per_block"] == 5  # 4 denoising steps and the cache pass
    return figures


# tiny2: 8-frame blocks, a 32-frame cache (4 blocks) with an 8-frame global sink; eviction starts at block 4.
@pytest.mark.parametrize("blocks, cuts", [
    (7, (2, 5)),   # pinned floating at 16 frames, shifted left to the sink by eviction; a second cut re-pins
    (6, (1, 3)),   # pinned right behind the global sink at once (kept from the first eviction), then re-pinned
    (7, (4,)),     # the cut block is the first that evicts
    (5, ()),       # one shot: global sink and window only
], ids=["cuts_2_5", "cuts_1_3", "cut_4", "no_cut"])
def test_parity_per_block_and_layer(stock, blocks, cuts):
    figures = _compare(stock, blocks, cuts)
    assert max(figures["rel_l2_per_block"]) <= BOUND, figures["rel_l2_per_block"]
    assert max(figures["rel_l2_per_layer"]) <= BOUND, figures["first_differing_call_layer"]
    assert figures["pinned"]["ours"] == figures["pinned"]["stock"]
    if cuts:
        assert figures["pinned"]["stock"][0] >= 0


def test_parity_bf16(stock):
    figures = _compare(stock, 6, (2,), dtype=torch.bfloat16)
    assert max(figures["rel_l2_per_block"]) <= BOUND and max(figures["rel_l2_per_layer"]) <= BOUND


def test_parity_i2v(stock):
    """LongLive 2.0's I2V: a clean first latent frame whose timestep is zeroed in the first block (per-frame t)."""
    figures = _compare(stock, 5, (3,), i2v=True)
    assert figures["first_frame_kept"]
    assert max(figures["rel_l2_per_block"]) <= BOUND and max(figures["rel_l2_per_layer"]) <= BOUND


def test_parity_with_deferred_cache_updates(stock, monkeypatch):
    """LLV2_DEFER_KV_UPDATES=1: the wrapper applies the update records after the forward, for both models."""
    monkeypatch.setenv("LLV2_DEFER_KV_UPDATES", "1")
    figures = _compare(stock, 6, (3,))
    assert max(figures["rel_l2_per_block"]) <= BOUND and max(figures["rel_l2_per_layer"]) <= BOUND


@pytest.mark.parametrize("change", [dict(multi_shot_rope_offset=0.0), dict(multi_shot_sink=False)],
                         ids=["no_shot_offset", "no_pinned_sink"])
def test_the_layer_check_catches_v1_semantics_after_a_cut(stock, change):
    """Our reference without the shot offset or without the pinned sink: equal until the cut, then each layer
    is off by far more than the bound, while the latents move by only a few 1e-3."""
    figures = _compare(stock, 7, (2,), ours=change)
    cut_call = 2 * figures["calls_per_block"]
    assert max(figures["rel_l2_per_call"][:cut_call]) == 0.0
    if "multi_shot_rope_offset" in change:  # the offset applies from the cut block's first call
        assert figures["first_differing_call_layer"] == (cut_call, 0)
    assert max(figures["rel_l2_per_layer"]) > 1e3 * BOUND
    assert figures["rel_l2"] < 2e-2


def test_build_stock_model2_refuses_foreign_weights(stock):
    from longlive_triton.models.longlive2.presets import build_model
    from longlive_triton.stock.longlive2 import build_stock_model2
    state = build_model("tiny2", seed=0).state_dict()
    state.pop("head.modulation")
    with pytest.raises(RuntimeError, match="head.modulation"):
        build_stock_model2(stock, "tiny2", state_dict=state)


# (sink frames, attention window frames): the stock pipeline attends to the whole 32-frame cache; a smaller
# window (what a window preset of patch_model would set) reaches the branches that prepend the kept sink and
# a floating pinned chunk to the window.
@pytest.mark.parametrize("sink, window", [(8, 32), (8, 20), (2, 12)], ids=["pipeline", "window20", "sink2_window12"])
def test_stock_forward_by_hand(stock, sink, window):
    """prepare_inference + stock_forward (what a patcher drives): the reference gives the stock output and cache
    state, block by block, through a cut at block 3 (pinned 24 frames in, moved left by each eviction)."""
    from longlive_triton.models.longlive2.presets import build_model, get_preset
    from longlive_triton.stock.longlive2 import build_stock_model2, prepare_inference, stock_forward, stock_pipeline
    cfg = get_preset("tiny2")
    ref = build_model("tiny2", seed=3)
    other = build_stock_model2(stock, "tiny2", state_dict=ref.state_dict())
    emb = torch.randn([1, cfg.text_len, cfg.text_dim], generator=torch.Generator().manual_seed(0))
    results = []
    with torch.inference_mode():  # as LongLive 2.0's inference.py runs its pipeline
        for model in (ref, other):
            pipe = stock_pipeline(stock, model, "tiny2", prompts={"p": emb[0]}, sink_size=sink)
            prepare_inference(pipe)
            for m in model.modules():
                if hasattr(m, "max_attention_size"):
                    m.max_attention_size = window * cfg.frame_seqlen
            outs, pins = [], []
            for block in range(7):
                x = torch.randn([1, 8, cfg.in_dim, cfg.latent_height, cfg.latent_width],
                                generator=torch.Generator().manual_seed(block))
                if block == 3:  # a scene cut: the shot offset from here on, the block pinned after its cache pass
                    pipe._dit_model.rope_temporal_offset = cfg.multi_shot_rope_offset
                outs.append(stock_forward(pipe, x, emb, 700.0, block * 8)[0])
                stock_forward(pipe, x, emb, 0.0, block * 8)
                if block == 3:
                    pipe._pin_current_chunk(pipe.kv_cache_pos, 8)
                pins.append(int(pipe.kv_cache_pos[0]["pinned_start"]) // cfg.frame_seqlen)
            results.append((torch.cat(outs, 1), pipe.kv_cache_pos, pins))
    (a, cache_a, pins_a), (b, cache_b, pins_b) = results
    assert torch.equal(a, b)
    for la, lb in zip(cache_a, cache_b):
        for key in ("k", "v", "global_end_index", "local_end_index", "pinned_start", "pinned_len"):
            assert torch.equal(la[key], lb[key]), key
    # The pinned chunk floats left by one block per eviction until it sits right behind the 8-frame global
    # sink; behind a 2-frame one it never lands there exactly and goes on floating (stock behaviour).
    expected = [-1, -1, -1, 24, 16, 8, 8] if sink == 8 else [-1, -1, -1, 24, 16, 8, 0]
    assert pins_a == pins_b == expected
