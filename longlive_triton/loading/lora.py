"""The LoRA merge arithmetic: W + sum of scale * (B @ A), in fp32, rounded once to W's dtype.

Two callers, each validating its own inputs first: `patch.py` folds peft LoRA layers at patch time,
`checkpoints.merge_lora` folds a LongLive `lora.pt` into a model's Linear layers. This module
imports nothing of the package, so both can import it without a cycle.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["merge_lora_weight"]


@torch.no_grad()
def merge_lora_weight(weight: torch.Tensor, adapters: Iterable[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """weight += sum over `adapters` of scale * (B @ A), in place.

    weight [out, in] (any floating dtype and device); each adapter (A [r, in], B [out, r], scale),
    any floating dtype and device. A and B are cast to fp32 on the weight's device, the sum is
    accumulated in fp32 and rounded to the weight's dtype once, at the end. Each term is one `addmm`
    (the scale applied inside the GEMM, no weight-sized temporary but the fp32 sum): bit-equal to
    W + scale * (B @ A) for a power-of-two scale (LongLive's is 1.0); for other scales one fp32
    rounding falls elsewhere (CPU BLAS scales A first), with the same accuracy.
    """
    out_features, in_features = weight.shape
    merged = weight.float()
    for a, b, scale in adapters:
        if not (a.dim() == b.dim() == 2 and a.shape[0] == b.shape[1]
                and a.shape[1] == in_features and b.shape[0] == out_features):
            raise ValueError(f"LoRA A {list(a.shape)} / B {list(b.shape)} do not fit a weight of shape "
                             f"{list(weight.shape)}: expected A [r, {in_features}] and B [{out_features}, r]")
        a = a.to(device=weight.device, dtype=torch.float32)
        b = b.to(device=weight.device, dtype=torch.float32)
        merged = torch.addmm(merged, b, a, alpha=scale)
    weight.copy_(merged)
