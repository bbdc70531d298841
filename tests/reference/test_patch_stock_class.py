"""patch_model on the stock LongLive v1.0 class itself (not our reference): every exact-preset patch
applies, the stock forward and its _apply_cache_updates keep working with the patched modules, and
the latents match the unpatched stock model within the bf16 bound, prompt switches included.

Runs wherever a LongLive v1.0 checkout is available (LONGLIVE_SRC); CPU through Triton's interpreter
here, CUDA on the GPU.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from longlive_triton import patch_model
from longlive_triton.runtime.pipeline import PipelineConfig

_SRC = os.environ.get("LONGLIVE_SRC", "")
pytestmark = pytest.mark.skipif(
    not _SRC or not Path(_SRC).is_dir(),
    reason="LONGLIVE_SRC is not set to a LongLive v1.0 checkout (tests/gpu/prepare_stock_src.sh makes .stock/LongLive)",
)


@pytest.mark.parametrize("global_sink", [True, False], ids=["global_sink", "sink_recache"])
def test_exact_preset_on_the_stock_class(device, global_sink):
    from longlive_triton.models import build_model, get_preset
    from longlive_triton.numerics import rel_l2
    from longlive_triton.stock.longlive1 import build_stock_model, load_stock_longlive

    from ..stock_harness import parity_inputs, run_pipeline

    stock = load_stock_longlive(_SRC)
    weights = build_model("tiny", dtype=torch.float32, seed=6).state_dict()
    noise, prompts = parity_inputs("tiny", 18, torch.bfloat16, device, num_prompts=2)
    config = PipelineConfig(global_sink=global_sink)

    # One head of 64 (the tiny preset has two of 32): LongLive's own head dims are what the GPU suite
    # covers at real shapes, and the weights do not depend on how the width splits into heads.
    kwargs = {**get_preset("tiny").model_kwargs(), "num_heads": 1}
    unpatched = build_stock_model(stock, kwargs, device=device, dtype=torch.bfloat16, state_dict=weights)
    want, _ = run_pipeline(unpatched, noise, prompts, (9,), config=config)
    patched = build_stock_model(stock, kwargs, device=device, dtype=torch.bfloat16, state_dict=weights)
    report = patch_model(patched, "exact")
    assert not report.skipped, str(report)
    assert {name: c["applied"] for name, c in report.counts().items()} == {
        "fused_block": 2, "window_self_attention": 2, "fused_cross_attention": 2, "fused_head": 1}
    got, _ = run_pipeline(patched, noise, prompts, (9,), config=config)
    assert torch.isfinite(got.float()).all()
    assert rel_l2(got, want) <= 1e-2
    if device.type == "cuda":
        # On CUDA the stock class runs through CUDA graphs (on by default): the eager patched path agrees.
        from longlive_triton.runtime.graphs import graph_runner
        assert graph_runner(patched).stats.replays > 0
        eager, _ = run_pipeline(patched, noise, prompts, (9,), config=dataclasses.replace(config, cuda_graphs=False))
        assert rel_l2(got, eager) <= 1e-3


def _stock_tiny(device):
    from longlive_triton.models import build_model, get_preset
    from longlive_triton.stock.longlive1 import build_stock_model, load_stock_longlive

    weights = build_model("tiny", dtype=torch.float32, seed=6).state_dict()
    kwargs = {**get_preset("tiny").model_kwargs(), "num_heads": 1}
    return build_stock_model(load_stock_longlive(_SRC), kwargs, device=device, dtype=torch.bfloat16, state_dict=weights)


def test_the_sink_is_read_where_the_stock_class_keeps_it(device):
    """The stock CausalWanModel has no sink_size of its own (its attention modules do): the report
    and the window check use the modules' 3-frame sink, not 0."""
    from longlive_triton.runtime.pipeline import BlockPipeline

    model = _stock_tiny(device)
    assert not hasattr(model, "sink_size") and model.blocks[0].self_attn.sink_size == 3
    with pytest.raises(ValueError, match="smaller than the 3-frame sink plus one 3-frame block"):
        patch_model(model, {"local_attn_size": 4, "cuda_graphs": False})
    with pytest.raises(ValueError, match="cannot hold the 3-frame sink"):
        BlockPipeline(model, PipelineConfig(local_attn_size=5))
    report = patch_model(model, {"local_attn_size": 9, "window_attention": True, "cuda_graphs": False})
    assert "attention window 9 latent frames (sink 3 + 6), was 12" in str(report)
    assert "the cache is larger than the window needs" in str(report)


def test_wans_list_context_equals_the_padded_tensor_on_the_stock_class(device):
    """What the graph runner does with Wan's list form (zero-pad to text_len, stack) gives the stock
    model's own output for the list."""
    from longlive_triton.runtime.graphs import stack_context
    from longlive_triton.runtime.pipeline import BlockPipeline
    from ..stock_harness import parity_inputs

    model = _stock_tiny(device)
    noise, prompts = parity_inputs("tiny", 3, torch.bfloat16, device)
    short = prompts[0][0, :11]
    outs = []
    for context in ([short], stack_context([short], model.text_len)):
        pipe = BlockPipeline(model)
        pipe.frame_seqlen = 8
        pipe.init_caches(1, 3, torch.bfloat16, device)
        with torch.no_grad():
            outs.append(model(noise.permute(0, 2, 1, 3, 4), t=torch.full((1, 3), 937.5, device=device), context=context,
                              seq_len=32760, kv_cache=pipe.caches.kv, crossattn_cache=pipe.caches.crossattn,
                              current_start=0))
    assert torch.equal(outs[0], outs[1])


def test_fp8_cache_on_the_stock_class(device):
    """The FP8 KV cache (the attention of the fp8 and fastest presets) on the stock class, driven by
    the stock cache protocol: the pipeline's bf16 "k"/"v" dicts are swapped for the FP8 layout, the
    stock forward keeps committing the pointers, and the latents stay within the FP8 bound of the
    unpatched stock model through a prompt switch."""
    from longlive_triton.config import load_preset
    from longlive_triton.numerics import rel_l2
    from ..stock_harness import parity_inputs, run_pipeline

    noise, prompts = parity_inputs("tiny", 12, torch.bfloat16, device, num_prompts=2)
    want, _ = run_pipeline(_stock_tiny(device), noise, prompts, (6,))
    patched = _stock_tiny(device)
    config = dataclasses.replace(load_preset("exact"), attention_backend="triton", kv_cache_dtype="fp8")
    report = patch_model(patched, config)
    assert report.counts()["window_self_attention"] == {"applied": 2, "skipped": 0}, str(report)
    from longlive_triton.runtime.pipeline import BlockPipeline
    pipe = BlockPipeline(patched)
    torch.manual_seed(1234)  # run_pipeline's seed: the same re-noising draws
    got = pipe.generate(noise, prompts, (6,))
    assert torch.isfinite(got.float()).all()
    err = rel_l2(got, want)
    print(f"fp8 cache on the stock class: rel L2 {err:.2e}")
    assert err <= 1e-2  # measured in the interpreter: 5.1e-3
    for cache in pipe.caches.kv:
        assert cache["k"].dtype == cache["v"].dtype == torch.float8_e4m3fn and "v_scale" in cache
