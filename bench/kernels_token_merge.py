"""Benchmark cases for token merging: ours vs the torch reference, one 3-frame block of 1.3B
(3 frames of 30x52 tokens, width 1536), stride 2x2, ratio 0.5: matching, merge, unmerge."""
from __future__ import annotations

import torch

from ..kernels.token_merge import (
    token_match, token_match_ref, token_merge, token_merge_bytes, token_merge_ref, token_unmerge,
    token_unmerge_ref,
)
from .registry import KernelCase, register

FRAMES, GRID, STRIDE, RATIO, DIM = 3, (30, 52), (2, 2), 0.5, 1536
KW = dict(frames=FRAMES, grid=GRID, stride=STRIDE)
LABEL = f"1x{FRAMES * GRID[0] * GRID[1]}x{DIM} ({FRAMES} frames {GRID[0]}x{GRID[1]}) stride 2x2 ratio {RATIO}"


def _x() -> torch.Tensor:
    return torch.randn(1, FRAMES * GRID[0] * GRID[1], DIM, device="cuda", dtype=torch.bfloat16)


def _match(fn):
    def setup():
        x = _x()
        return lambda: fn(x, **KW)
    return setup


def _merge(fn):
    """Merge given the matching (the selection and bookkeeping are timed, the similarity is not)."""
    def setup():
        x = _x()
        match = token_match(x, **KW)
        return lambda: fn(x, **KW, ratio=RATIO, match=match)
    return setup


def _unmerge(fn):
    def setup():
        x = _x()
        m = token_merge(x, **KW, ratio=RATIO)
        return lambda: fn(m.merged, m.mapping)
    return setup


@register("token_merge")
def cases() -> list[KernelCase]:
    def nbytes(op):
        return token_merge_bytes(1, FRAMES, GRID, STRIDE, RATIO, DIM, op=op)

    return [
        KernelCase(name="token_merge", shape=f"match {LABEL}",
                   providers={"ours": _match(token_match), "torch": _match(token_match_ref)},
                   baseline="torch", ceiling="bandwidth", bytes=nbytes("match")),
        KernelCase(name="token_merge", shape=f"merge {LABEL}",
                   providers={"ours": _merge(token_merge), "torch": _merge(token_merge_ref)},
                   baseline="torch", ceiling="bandwidth", bytes=nbytes("merge")),
        KernelCase(name="token_merge", shape=f"unmerge {LABEL}",
                   providers={"ours": _unmerge(token_unmerge), "torch": _unmerge(token_unmerge_ref)},
                   baseline="torch", ceiling="bandwidth", bytes=nbytes("unmerge")),
    ]
