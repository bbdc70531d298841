"""Benchmark case for the fused RMSNorm: ours vs WanRMSNorm's torch ops on one block's queries."""
from __future__ import annotations

import torch

from ..kernels.rms_norm import rms_norm, rms_norm_bytes, rms_norm_ref
from .registry import KernelCase, register

TOKENS, DIM = 4680, 1536


def _provider(fn):
    def setup():
        x = torch.randn(1, TOKENS, DIM, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(DIM, device="cuda", dtype=torch.bfloat16)
        return lambda: fn(x, w)
    return setup


@register("rms_norm")
def cases() -> list[KernelCase]:
    return [KernelCase(name="rms_norm", shape=f"[{TOKENS}x{DIM}]",
                       providers={"ours": _provider(rms_norm), "stock": _provider(rms_norm_ref)},
                       baseline="stock", ceiling="bandwidth", bytes=rms_norm_bytes(1, TOKENS, DIM))]
