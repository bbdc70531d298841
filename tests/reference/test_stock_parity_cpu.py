"""Our reference against the stock LongLive v1.0 generator at tiny shapes on the CPU (fast).

Covers the stock importer (`longlive_triton.stock.longlive1`) and the parity harness (`tests/stock_harness.py`)
wherever a LongLive v1.0 checkout is available: set LONGLIVE_SRC (e.g. .stock/LongLive, made by
tests/gpu/prepare_stock_src.sh); skipped otherwise. The real-shape GPU version is tests/gpu/test_stock_parity.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from longlive_triton.runtime.pipeline import PipelineConfig

_SRC = os.environ.get("LONGLIVE_SRC", "")
pytestmark = pytest.mark.skipif(
    not _SRC or not Path(_SRC).is_dir(),
    reason=("LONGLIVE_SRC is not set" if not _SRC else f"LONGLIVE_SRC={_SRC} is not a directory")
    + ": point it at a LongLive v1.0 checkout (tests/gpu/prepare_stock_src.sh makes .stock/LongLive)",
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def stock():
    from longlive_triton.stock.longlive1 import load_stock_longlive
    return load_stock_longlive(_SRC)


def _check(figures: dict, dtype) -> None:
    print(f"\nrel L2 {figures['rel_l2']:.3e}; per block " + " ".join(f"{b:.1e}" for b in figures["rel_l2_per_block"]))
    assert figures["stock_class"] == "wan.modules.causal_model.CausalWanModel"
    assert figures["finite"]
    assert figures["stock_latent_norm"] > 0
    assert figures["rel_l2"] <= TOLERANCE[dtype], f"per block {figures['rel_l2_per_block']}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stock_parity_tiny(stock, dtype):
    """6 blocks: the window fills at block 3 and rolls from block 4."""
    from ..stock_harness import compare_with_stock
    _check(compare_with_stock(stock, "tiny", dtype, "cpu", frames=18), dtype)


@pytest.mark.parametrize("global_sink", [True, False], ids=["global_sink", "sink_recache"])
def test_stock_parity_tiny_prompt_switch(stock, global_sink):
    """Interactive mode: prompt switches at frames 8 and 19 (taking effect at blocks starting 9 and 21)."""
    from ..stock_harness import compare_with_stock
    figures = compare_with_stock(stock, "tiny", torch.float32, "cpu", frames=30, num_prompts=3, switches=(8, 19),
                                 config=PipelineConfig(global_sink=global_sink), prompt_len=10)
    _check(figures, torch.float32)


def test_stock_parity_detects_a_weight_change(stock):
    """The comparison is not vacuous: one perturbed stock weight shows up in the latents."""
    from longlive_triton.models.longlive1.presets import build_model
    from longlive_triton.numerics import rel_l2
    from longlive_triton.stock.longlive1 import build_stock_model

    from ..stock_harness import parity_inputs, run_pipeline
    ref = build_model("tiny", seed=0)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["blocks.1.cross_attn.k.weight"] += 1e-3
    other = build_stock_model(stock, "tiny", state_dict=state)
    noise, prompts = parity_inputs("tiny", 6, torch.float32, "cpu")
    ours, _ = run_pipeline(ref, noise, prompts[0])
    theirs, _ = run_pipeline(other, noise, prompts[0])
    assert rel_l2(ours, theirs) > 1e-6


def test_build_stock_model_refuses_foreign_weights(stock):
    from longlive_triton.models.longlive1.presets import build_model
    from longlive_triton.stock.longlive1 import build_stock_model
    state = build_model("tiny", seed=0).state_dict()
    state.pop("head.modulation")
    with pytest.raises(RuntimeError, match="head.modulation"):
        build_stock_model(stock, "tiny", state_dict=state)


def test_patch_model_merges_peft_lora_on_stock(stock):
    """patch_model folds peft LoRA on every block Linear of the stock class; the output is unchanged."""
    pytest.importorskip("peft")
    from ..stock_harness import lora_merge_figures, lora_merge_problems
    figures = lora_merge_figures(stock, "tiny", "cpu")
    print(f"\n{figures['report']}\nmerged vs unmerged rel L2 {figures['merged_vs_unmerged_rel_l2']:.3e}; "
          f"LoRA effect {figures['lora_effect_rel_l2']:.3e}; rounding control "
          f"{figures['rounding_control_rel_l2']:.3e}; merged Linear vs LoRA layer {figures['layer_max_rel_err']:.1e}")
    assert not lora_merge_problems(figures), lora_merge_problems(figures)
