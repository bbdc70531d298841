"""Benchmark cases for the fused adaln glue: ours vs the stock torch ops, one 3-frame block of 1.3B."""
from __future__ import annotations

import torch

from ..kernels.adaln import adaln, adaln_bytes, adaln_ref
from .registry import KernelCase, register

FRAMES, TOKENS, DIM = 3, 1560, 1536

# The three fused stretches of a layer (the fourth, the FFN's gated residual, is the second without LN).
VARIANTS = {
    "LN1 + modulation": dict(y=False, gate=False, affine=False, modulate=True, norm=True),
    "gated residual + LN3 affine": dict(y=True, gate=True, affine=True, modulate=False, norm=True),
    "residual + LN2 + modulation": dict(y=True, gate=False, affine=False, modulate=True, norm=True),
    "gated residual (FFN out)": dict(y=True, gate=True, affine=False, modulate=False, norm=False),
}


def _inputs(v: dict) -> tuple[torch.Tensor, dict]:
    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    x = rnd(1, FRAMES * TOKENS, DIM)
    mod = rnd(1, FRAMES, 6, 1, DIM)
    kw = {"norm": v["norm"]}
    if v["y"]:
        kw["y"] = rnd(1, FRAMES * TOKENS, DIM)
    if v["gate"]:
        kw["gate"] = mod[:, :, 2]
    if v["affine"]:
        kw["weight"], kw["bias"] = rnd(DIM), rnd(DIM)
    if v["modulate"]:
        kw["shift"], kw["scale"] = mod[:, :, 0], mod[:, :, 1]
    return x, kw


def _provider(fn, v: dict):
    def setup():
        x, kw = _inputs(v)
        return lambda: fn(x, **kw)
    return setup


@register("adaln")
def cases() -> list[KernelCase]:
    return [
        KernelCase(name="adaln", shape=f"{label} [{FRAMES * TOKENS}x{DIM}]",
                   providers={"ours": _provider(adaln, v), "stock": _provider(adaln_ref, v)},
                   baseline="stock", ceiling="bandwidth",
                   bytes=adaln_bytes(1, FRAMES * TOKENS, DIM, residual=v["y"], norm=v["norm"]))
        for label, v in VARIANTS.items()
    ]
