"""Benchmark cases for window attention: our in-place Triton kernel against SDPA (cuDNN, flash).

Self-attention at the LongLive-1.3B block shape (q = 4680 tokens, 12 heads x 128) at each cache fill
level the stock trace goes through (kv = 4680 for block 0 up to 18720 in steady state), and
cross-attention to the 512 text tokens. SDPA gets the window already gathered into contiguous
tensors, transposed to [B, H, L, D] as views (what the stock code hands it); ours reads the cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kernels.window_attention import window_attention, window_attention_bytes, window_attention_flops
from .registry import KernelCase, register

HEADS, HEAD_DIM, LQ = 12, 128, 4680
SINK, CACHE = 4680, 18720
TEXT = 512


def _ours(lq: int, cap: int, sink_end: int, win_start: int, win_end: int, **options):
    """Our bf16 kernel over a random cache; options: window_attention's (use_tma, split, ...)."""
    def setup():
        q = torch.randn(1, lq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k_cache = torch.randn(1, cap, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        ranges = [torch.tensor([x], dtype=torch.int64, device="cuda") for x in (sink_end, win_start, win_end)]
        out = torch.empty_like(q)
        return lambda: window_attention(q, k_cache, v_cache, *ranges, out=out, **options)
    return setup


def _sdpa(backend, lq: int, lkv: int):
    def setup():
        q = torch.randn(1, lq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, lkv, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)

        def call():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return call
    return setup


def _case(shape: str, lq: int, cap: int, sink_end: int, win_start: int, win_end: int) -> KernelCase:
    lkv = sink_end + max(0, win_end - max(win_start, sink_end))
    return KernelCase(
        name="window_attention",
        shape=shape,
        providers={
            "ours": _ours(lq, cap, sink_end, win_start, win_end),
            "ours_tma": _ours(lq, cap, sink_end, win_start, win_end, use_tma=True),
            "cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION, lq, lkv),
            "flash": _sdpa(SDPBackend.FLASH_ATTENTION, lq, lkv),
        },
        baseline="cudnn",
        flops=window_attention_flops(1, lq, lkv, HEADS, HEAD_DIM),
        bytes=window_attention_bytes(1, lq, lkv, HEADS, HEAD_DIM),
        ceiling="tflops",
        extra={"cache_slots": cap, "sink_end": sink_end, "window": [win_start, win_end]},
    )


@register("window_attention")
def cases() -> list[KernelCase]:
    # Block 0 attends to the sink only; blocks 1..3 fill the window behind it; then steady state.
    fills = [_case(f"q{LQ} kv{SINK}", LQ, CACHE, SINK, SINK, SINK)]
    fills += [_case(f"q{LQ} kv{end}", LQ, CACHE, SINK, SINK, end) for end in (9360, 14040, CACHE)]
    cross = _case(f"q{LQ} kv{TEXT} (cross)", LQ, TEXT, 0, 0, TEXT)
    return fills + [cross]
