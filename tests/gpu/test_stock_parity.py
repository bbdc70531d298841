"""Parity of our reference generator with the stock LongLive v1.0 `CausalWanModel` on the GPU, at real
shapes, and patch_model on the stock class wrapped with peft LoRA.

The stock code is read from a LongLive v1.0 checkout named by $LONGLIVE_SRC (every test here is skipped
without one); `tests/gpu/prepare_stock_src.sh` copies its python files into the git-ignored
`.stock/LongLive`. Both generators get the same weights (ours, loaded strictly into the stock model),
the same noise and prompt embeddings, and the same RNG seed before each run; our `BlockPipeline` drives
both, calling them as LongLive's `WanDiffusionWrapper` does. How the stock code is imported (stand-ins
for diffusers and flash-attn) is described in `longlive_triton.stock.longlive1`; the comparison is
`tests/stock_harness.py`.

    LONGLIVE_SRC=.stock/LongLive PARITY_OUT=parity.json python -m pytest tests/gpu/test_stock_parity.py -s

Both models have the 1.3B layer shapes with 4 of the 30 layers (LAYERS): each layer is the same
computation, so parity per layer is what the 30 would show, at a seventh of the cost.

PARITY_OUT, if set, names a JSON file that receives the figures (one entry per case, merged into the file).
The same checks at tiny shapes on the CPU are in tests/reference/test_stock_parity_cpu.py (this folder's
name marks every test in it as GPU-only).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .records import record

_SRC = os.environ.get("LONGLIVE_SRC", "")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.stock,
    pytest.mark.skipif(
        not _SRC or not Path(_SRC).is_dir(),
        reason=("LONGLIVE_SRC is not set" if not _SRC else f"LONGLIVE_SRC={_SRC} is not a directory")
        + ": point it at a LongLive v1.0 checkout (tests/gpu/prepare_stock_src.sh makes .stock/LongLive)"),
]

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
LAYERS = 4


@pytest.fixture(scope="module")
def stock():
    from longlive_triton.stock.longlive1 import load_stock_longlive
    return load_stock_longlive(_SRC)


def _record(key: str, figures: dict) -> None:
    record("PARITY_OUT", key, {k: v for k, v in figures.items() if k != "report"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stock_parity_1_3b(stock, dtype):
    """LongLive-1.3B layer shapes, B=1, 30 latent frames of 16x60x104 (10 blocks; the window rolls from block 4)."""
    from longlive_triton.stock.longlive1 import free_memory

    from ..stock_harness import compare_with_stock
    free_memory("cuda")
    torch.cuda.reset_peak_memory_stats()  # this test's peak, not the process's
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    figures = compare_with_stock(stock, "longlive-1.3b", dtype, "cuda", frames=30, num_layers=LAYERS)
    figures["tolerance"] = TOLERANCE[dtype]
    figures["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"\n[1.3b {name}] rel L2 {figures['rel_l2']:.3e} (tol {TOLERANCE[dtype]:.0e}), max |diff| "
          f"{figures['max_abs_diff']:.3e}; reference {figures['seconds_reference']:.1f} s, "
          f"stock {figures['seconds_stock']:.1f} s; peak {figures['peak_memory_gib']:.1f} GiB")
    print("  per block: " + " ".join(f"{b:.2e}" for b in figures["rel_l2_per_block"]))
    _record(f"longlive-1.3b-cuda-{name}", figures)
    assert figures["stock_class"] == "wan.modules.causal_model.CausalWanModel"
    assert figures["finite"], "non-finite latents"
    assert figures["stock_latent_norm"] > 0, "the stock generator produced all-zero latents"
    assert figures["rel_l2"] <= TOLERANCE[dtype], (
        f"reference vs stock rel L2 {figures['rel_l2']:.3e} > {TOLERANCE[dtype]:.0e}; "
        f"per block {figures['rel_l2_per_block']}")


def test_patch_model_merges_peft_lora_on_stock_1_3b(stock):
    """patch_model folds peft LoRA (r=8 on every block Linear) into the stock model at 1.3B layer shapes,
    output unchanged."""
    pytest.importorskip("peft")
    from longlive_triton.stock.longlive1 import free_memory

    from ..stock_harness import lora_merge_figures, lora_merge_problems
    free_memory("cuda")
    figures = lora_merge_figures(stock, "longlive-1.3b", "cuda", prompt_len=64, num_layers=LAYERS)
    print(f"\n{figures['report']}")
    print(f"[patch_model 1.3b] merged vs unmerged rel L2 {figures['merged_vs_unmerged_rel_l2']:.3e}; "
          f"LoRA effect {figures['lora_effect_rel_l2']:.3e}; rounding control "
          f"{figures['rounding_control_rel_l2']:.3e}; merged Linear vs LoRA layer {figures['layer_max_rel_err']:.1e}")
    _record("patch-lora-longlive-1.3b-cuda-fp32", {k: v for k, v in figures.items() if k not in ("lora_layers", "merged_paths")})
    assert not lora_merge_problems(figures), lora_merge_problems(figures)
