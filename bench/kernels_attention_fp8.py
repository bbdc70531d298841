"""Benchmark cases for the FP8 KV cache: attention over it, and the fused quantize/append.

window_attention_fp8, steady state of LongLive-1.3B (q = 4680 tokens, kv = sink + window = 18720
slots, 12 heads x 128): our kernel with each choice of fp8 dots ("both", "qk", "pv", and "none",
the bf16 dots on the upcast cache), against cuDNN SDPA and our bf16 window kernel on a bf16 cache.
The case's extra field records the KV cache bytes of all 30 layers, bf16 against e4m3 + scales,
summed over the tensors the patched layer really allocates.

kv_quant_append against rope_kv_append: one steady-state block's append (n = 4680 rows at slots
[14040, 18720)), bandwidth against the fewest bytes each must move.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.kv_quant_append import kv_quant_append, kv_quant_append_bytes, quantize_kv_rows
from ..kernels.rope_kv_append import rope_kv_append, rope_kv_append_bytes, rope_tables
from ..kernels.window_attention import window_attention, window_attention_flops
from ..kernels.window_attention_fp8 import FP8_DOTS, window_attention_fp8, window_attention_fp8_bytes
from .registry import KernelCase, register

HEADS, HEAD_DIM, LQ = 12, 128, 4680
SINK, CACHE = 4680, 18720
LAYERS = 30
GRID = (3, 30, 52)
DST, START_FRAME = 14040, 12


def _fp8_cache():
    k = torch.randn(1, CACHE, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return (*quantize_kv_rows(k), *quantize_kv_rows(v))


def _ours_fp8(fp8_dots: str, use_tma: bool = False):
    def setup():
        q = torch.randn(1, LQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k8, ks, v8, vs = _fp8_cache()
        ranges = [torch.tensor([x], dtype=torch.int64, device="cuda") for x in (SINK, SINK, CACHE)]
        out = torch.empty_like(q)
        return lambda: window_attention_fp8(q, k8, v8, ks, vs, *ranges, fp8_dots=fp8_dots, out=out, use_tma=use_tma)
    return setup


def _ours_bf16():
    q = torch.randn(1, LQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, CACHE, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ranges = [torch.tensor([x], dtype=torch.int64, device="cuda") for x in (SINK, SINK, CACHE)]
    out = torch.empty_like(q)
    return lambda: window_attention(q, k, v, *ranges, out=out)


def _cudnn():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, LQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, CACHE, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def call():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return call


def kv_cache_bytes() -> dict:
    """All layers' self-attention KV cache at 1.3B shapes, from real allocations: the pipeline's bf16
    "k"/"v" of one layer, then what WindowSelfAttention swaps in for them, times the layers."""
    from ..patches.window_self_attention import WindowSelfAttention

    cache = {name: torch.zeros(1, CACHE, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda") for name in ("k", "v")}
    bf16 = sum(t.numel() * t.element_size() for t in cache.values())
    WindowSelfAttention._use_fp8_cache(cache)
    fp8 = sum(cache[n].numel() * cache[n].element_size() for n in ("k", "v", "k_scale", "v_scale"))
    return {"layers": LAYERS, "bf16_bytes": LAYERS * bf16, "fp8_bytes": LAYERS * fp8, "ratio": fp8 / bf16}


@register("window_attention_fp8")
def attention_cases() -> list[KernelCase]:
    providers = {f"ours_fp8_{mode}": _ours_fp8(mode) for mode in FP8_DOTS}
    providers["ours_fp8_both_tma"] = _ours_fp8("both", use_tma=True)
    providers["ours_bf16"] = _ours_bf16
    providers["cudnn"] = _cudnn
    return [KernelCase(
        name="window_attention_fp8",
        shape=f"q{LQ} kv{CACHE}",
        providers=providers,
        baseline="cudnn",
        flops=window_attention_flops(1, LQ, CACHE, HEADS, HEAD_DIM),
        bytes=window_attention_fp8_bytes(1, LQ, CACHE, HEADS, HEAD_DIM),
        ceiling="tflops",
        extra={"kv_cache": kv_cache_bytes()},
    )]


def _append_inputs():
    hd = HEADS * HEAD_DIM
    q_lin, k_lin, v = (torch.randn(1, LQ, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    wq, wk = (torch.randn(hd, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cos, sin = rope_tables(HEAD_DIM, device="cuda")
    index = [torch.tensor([x], dtype=torch.int64, device="cuda") for x in (START_FRAME, DST, 0)]
    out = torch.empty(1, LQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return q_lin, k_lin, v, wq, wk, cos, sin, index, out


def _quant_append():
    q_lin, k_lin, v, wq, wk, cos, sin, index, out = _append_inputs()
    k8, ks, v8, vs = _fp8_cache()
    return lambda: kv_quant_append(q_lin, k_lin, v, wq, wk, cos, sin, k8, v8, ks, vs, GRID, *index, out=out)


def _bf16_append():
    q_lin, k_lin, v, wq, wk, cos, sin, index, out = _append_inputs()
    k, v_cache = (torch.randn(1, CACHE, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return lambda: rope_kv_append(q_lin, k_lin, v, wq, wk, cos, sin, k, v_cache, GRID, *index, out=out)


@register("kv_quant_append")
def append_cases() -> list[KernelCase]:
    # bytes: the fp8 append's own minimum; rope_kv_append's minimum is in "extra" (GB/s of the
    # rope_kv_append row is thus against the fp8 byte count: compare its ms, not its GB/s).
    return [KernelCase(
        name="kv_quant_append",
        shape=f"n{LQ} cache{CACHE} H{HEADS} D{HEAD_DIM}",
        providers={"ours": _quant_append, "rope_kv_append": _bf16_append},
        baseline="rope_kv_append",
        bytes=kv_quant_append_bytes(1, LQ, HEADS, HEAD_DIM),
        ceiling="bandwidth",
        extra={"rope_kv_append_bytes": rope_kv_append_bytes(1, LQ, HEADS, HEAD_DIM), "dst_start": DST},
    )]
