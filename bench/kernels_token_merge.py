"""Benchmark cases for token merging at one 3-frame block of 1.3B (3 frames of 30x52 tokens, width
1536), stride 2x2, ratio 0.5 (half of each frame's tokens merged away):
- `token_merge`: matching, merge, unmerge, ours against the torch reference;
- `token_merge_ffn`: one layer's FFN plain against merge + FFN + unmerge, with the parts timed alone."""
from __future__ import annotations

import torch

from ..kernels.token_merge import (token_match, token_match_ref, token_merge, token_merge_bytes, token_merge_ref,
                                   token_unmerge, token_unmerge_ref)
from ..kernels.token_merge_plan import merge_count, merge_plan, merge_plan_ref
from ..patches.token_merge_ffn import TokenMergedFFN
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
    """Merge given the matching (the plan is timed too, the similarity is not); the torch provider
    runs the torch plan and merge."""
    def setup():
        x = _x()
        match = token_match(x, **KW)
        return lambda: fn(x, **KW, ratio=RATIO, match=match)
    return setup


def _plan(fn):
    """Selection and bookkeeping alone, given the matching."""
    def setup():
        best, score = token_match(_x(), **KW)
        r = merge_count(GRID, STRIDE, RATIO)
        return lambda: fn(best, score, r, GRID, STRIDE)
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
        KernelCase(name="token_merge", shape=f"plan {LABEL}",
                   providers={"ours": _plan(merge_plan), "torch": _plan(merge_plan_ref)}, baseline="torch"),
        KernelCase(name="token_merge", shape=f"plan+merge {LABEL}",
                   providers={"ours": _merge(token_merge), "torch": _merge(token_merge_ref)},
                   baseline="torch", ceiling="bandwidth", bytes=nbytes("merge")),
        KernelCase(name="token_merge", shape=f"unmerge {LABEL}",
                   providers={"ours": _unmerge(token_unmerge), "torch": _unmerge(token_unmerge_ref)},
                   baseline="torch", ceiling="bandwidth", bytes=nbytes("unmerge")),
    ]


# ----------------------------------------------------------------------------------------------
# One layer's FFN at the same shape, plain against merged (what the `tome` preset runs per layer and
# call). Saved = plain - "FFN on merged tokens"; the merge overhead is the "match+merge+unmerge" row,
# to be under a tenth of that saving; "merge+FFN+unmerge" against plain is the speed-up.

FFN_DIM = 8960


def _ffn() -> torch.nn.Sequential:
    ffn = torch.nn.Sequential(torch.nn.Linear(DIM, FFN_DIM), torch.nn.GELU(approximate="tanh"),
                              torch.nn.Linear(FFN_DIM, DIM))
    return ffn.to("cuda", torch.bfloat16).eval().requires_grad_(False)


def _plain_ffn():
    ffn, x = _ffn(), _x()
    return lambda: ffn(x)


def _merged_ffn():
    ffn = TokenMergedFFN(_ffn(), RATIO, STRIDE)
    ffn.grid = (FRAMES, *GRID)          # what the patched block's pre-hook hands it
    x = _x()
    return lambda: ffn(x)


def _ffn_on_merged_tokens():
    ffn = _ffn()
    m = token_merge(_x(), **KW, ratio=RATIO)
    return lambda: ffn(m.merged)


def _merge_overhead():
    x = _x()

    def call():
        m = token_merge(x, **KW, ratio=RATIO)
        return token_unmerge(m.merged, m.mapping)
    return call


@register("token_merge_ffn")
def ffn_cases() -> list[KernelCase]:
    tokens = FRAMES * GRID[0] * GRID[1]
    return [KernelCase(
        name="token_merge_ffn", shape=f"FFN {DIM}->{FFN_DIM}->{DIM} GELU-tanh, {LABEL}",
        providers={"plain FFN": _plain_ffn, "merge+FFN+unmerge": _merged_ffn,
                   "FFN on merged tokens": _ffn_on_merged_tokens, "match+merge+unmerge": _merge_overhead},
        baseline="plain FFN",
        extra={"tokens": tokens, "merged_tokens": tokens - FRAMES * merge_count(GRID, STRIDE, RATIO)},
    )]
