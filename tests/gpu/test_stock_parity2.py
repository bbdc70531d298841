"""Parity of our LongLive 2.0 reference with the stock LongLive 2.0 generator on the GPU at 5B shapes
(`longlive2-5b`: 1280x704, 8-frame blocks, 32-frame window, 8-frame sink, multi-shot), bf16, random weights,
both driven by LongLive 2.0's own inference pipeline with a scene cut.

The stock code is read from a 2.0 checkout named by $LONGLIVE_SRC2 (or $LONGLIVE_SRC when it is one); every
test here is skipped without one (`tests/gpu/prepare_stock_src.sh <mirror> main` makes .stock/LongLive2).

    LONGLIVE_SRC2=.stock/LongLive2 PARITY_OUT=parity2.json python -m pytest tests/gpu/test_stock_parity2.py -s

5 blocks (40 latent frames): the cut at block 2 pins it 16 frames in; block 4 is the first that evicts and
moves the pinned chunk left. Layers are compared at the cut block's first call and at block 4's first call.
The CPU version at tiny2 shapes (every call, every layer) is tests/reference/test_stock_parity2_cpu.py.
"""
from __future__ import annotations

import pytest
import torch

from ..stock_harness2 import stock2_src
from .records import record

_SRC = stock2_src()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(_SRC is None, reason="no LongLive 2.0 checkout: set LONGLIVE_SRC2 (or LONGLIVE_SRC) to one"),
]
BLOCKS, CUTS, LAYER_CALLS = 5, (2,), (10, 20)


def _record(key: str, figures: dict) -> None:
    record("PARITY_OUT", key, {k: v for k, v in figures.items() if k != "stock_notes"})


def _run(triton_kernels: bool) -> dict:
    from longlive_triton.stock.longlive2 import load_stock_longlive2

    from ..stock_harness2 import compare_with_stock2
    stock = load_stock_longlive2(_SRC, triton_kernels=triton_kernels)
    figures = compare_with_stock2(stock, "longlive2-5b", torch.bfloat16, "cuda", BLOCKS, CUTS, layer_calls=LAYER_CALLS)
    figures["stock_triton_kernels"] = triton_kernels
    print(f"\nstock Triton kernels {'on' if triton_kernels else 'off'}: rel L2 per block "
          + " ".join(f"{b:.2e}" for b in figures["rel_l2_per_block"]) + "; worst layer "
          + f"{max(figures['rel_l2_per_layer']):.2e}; pinned {figures['pinned']}")
    _record(f"longlive2-5b_bf16_triton_{'on' if triton_kernels else 'off'}", figures)
    assert figures["finite"] and figures["stock_latent_norm"] > 0
    assert figures["pinned"]["ours"] == figures["pinned"]["stock"]
    return figures


def test_stock2_parity_5b_same_math():
    """Stock Triton RoPE and adaLN off: the same operations on both sides, expected bit-equal."""
    figures = _run(triton_kernels=False)
    assert max(figures["rel_l2_per_block"]) <= 1e-6 and max(figures["rel_l2_per_layer"]) <= 1e-6


def test_stock2_parity_5b_stock_default_kernels():
    """Stock as it runs on a GPU (its Triton RoPE rotates in fp32, ours in fp64: one bf16 ulp on q and k)."""
    figures = _run(triton_kernels=True)
    assert max(figures["rel_l2_per_block"]) <= 1e-2
