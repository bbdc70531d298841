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
from longlive_triton.pipeline import PipelineConfig

_SRC = os.environ.get("LONGLIVE_SRC", "")
pytestmark = pytest.mark.skipif(
    not _SRC or not Path(_SRC).is_dir(),
    reason="LONGLIVE_SRC is not set to a LongLive v1.0 checkout (tests/gpu/prepare_stock_src.sh makes .stock/LongLive)",
)


@pytest.mark.parametrize("global_sink", [True, False], ids=["global_sink", "sink_recache"])
def test_exact_preset_on_the_stock_class(device, global_sink):
    from longlive_triton.reference import build_model, get_preset
    from longlive_triton.stock import build_stock_model, load_stock_longlive, parity_inputs, rel_l2, run_pipeline

    stock = load_stock_longlive(_SRC)
    weights = build_model("tiny", dtype=torch.float32, seed=6).state_dict()
    noise, prompts = parity_inputs("tiny", 18, torch.bfloat16, device, num_prompts=2)
    config = PipelineConfig(global_sink=global_sink)

    # One head of 64: the tiny preset's head dim 32 runs only in the interpreter (the GPU kernels take
    # 64 or 128), and the weights do not depend on how the width splits into heads.
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
        from longlive_triton.graphs import graph_runner
        assert graph_runner(patched).stats.replays > 0
        eager, _ = run_pipeline(patched, noise, prompts, (9,), config=dataclasses.replace(config, cuda_graphs=False))
        assert rel_l2(got, eager) <= 1e-3


def test_fp8_cache_on_the_stock_class(device):
    """The FP8 KV cache (the attention of the fp8 and fastest presets) on the stock class, driven by
    the stock cache protocol: the pipeline's bf16 "k"/"v" dicts are swapped for the FP8 layout, the
    stock forward keeps committing the pointers, and the latents stay within the FP8 bound of the
    unpatched stock model through a prompt switch."""
    from longlive_triton.config import load_preset
    from longlive_triton.reference import build_model, get_preset
    from longlive_triton.stock import build_stock_model, load_stock_longlive, parity_inputs, rel_l2, run_pipeline

    stock = load_stock_longlive(_SRC)
    weights = build_model("tiny", dtype=torch.float32, seed=6).state_dict()
    noise, prompts = parity_inputs("tiny", 12, torch.bfloat16, device, num_prompts=2)
    kwargs = {**get_preset("tiny").model_kwargs(), "num_heads": 1}
    unpatched = build_stock_model(stock, kwargs, device=device, dtype=torch.bfloat16, state_dict=weights)
    want, _ = run_pipeline(unpatched, noise, prompts, (6,))
    patched = build_stock_model(stock, kwargs, device=device, dtype=torch.bfloat16, state_dict=weights)
    config = dataclasses.replace(load_preset("exact"), attention_backend="triton", kv_cache_dtype="fp8")
    report = patch_model(patched, config)
    assert report.counts()["window_self_attention"] == {"applied": 2, "skipped": 0}, str(report)
    from longlive_triton.pipeline import BlockPipeline
    pipe = BlockPipeline(patched)
    torch.manual_seed(1234)  # run_pipeline's seed: the same re-noising draws
    got = pipe.generate(noise, prompts, (6,))
    assert torch.isfinite(got.float()).all()
    err = rel_l2(got, want)
    print(f"fp8 cache on the stock class: rel L2 {err:.2e}")
    assert err <= 1e-2  # measured in the interpreter: 5.1e-3
    for cache in pipe.caches.kv:
        assert cache["k"].dtype == cache["v"].dtype == torch.float8_e4m3fn and "v_scale" in cache
