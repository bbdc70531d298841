"""Benchmark cases for the FP8 KV cache: attention over it, and the fused quantize/append.

window_attention_fp8 (kernels/window_attention.py's FP8 path: e4m3 q, k, v, both dots on the FP8
tensor cores) at LongLive-1.3B's shapes (q = 4680 tokens, 12 heads x 128): the steady-state
window (kv = sink + window = 18720 slots), the 9-frame window (14040) and the fill levels, with
its launch options (split-KV, TMA), against cuDNN SDPA and our bf16 kernel on a
bf16 cache. The steady-state case's extra field records the KV cache bytes of all 30 layers, bf16
against the FP8 layout, summed over the tensors the patched layer really allocates.

kv_quant_append against rope_kv_append: one steady-state block's append (n = 4680 rows at slots
[14040, 18720)), bandwidth against the fewest bytes each must move.
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

from ..kernels.fp8_kv_cache import fp8_kv_cache, k_head_scale, quantize_k_ref, quantize_rows_ref, quantize_v_groups_ref
from ..kernels.kv_quant_append import kv_quant_append, kv_quant_append_bytes
from ..kernels.rope_kv_append import rope_kv_append, rope_kv_append_bytes, rope_tables
from ..kernels.window_attention import window_attention_bytes, window_attention_flops, window_attention_fp8
from .kernels_attention import _ours, _sdpa
from .registry import KernelCase, register

HEADS, HEAD_DIM, LQ = 12, 128, 4680
SINK, CACHE = 4680, 18720
LAYERS = 30
GRID = (3, 30, 52)
DST, START_FRAME = 14040, 12


def _fp8_operands(lkv: int):
    q = torch.randn(1, LQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, lkv, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k_scale = (k.float().abs().amax(dim=(0, 1, 3)) / 448.0).contiguous()
    return (*quantize_rows_ref(q), quantize_k_ref(k, k_scale), k_scale, *quantize_v_groups_ref(v))


def _ours_fp8(lkv: int, sink_end: int, **options):
    def setup():
        ops = _fp8_operands(lkv)
        ranges = [torch.tensor([x], dtype=torch.int64, device="cuda") for x in (sink_end, sink_end, lkv)]
        out = torch.empty(1, LQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        return lambda: window_attention_fp8(*ops, *ranges, out=out, **options)
    return setup


def kv_cache_bytes() -> dict:
    """All layers' self-attention KV cache at 1.3B shapes, from real allocations: the pipeline's bf16
    "k"/"v" of one layer against the FP8 layout's tensors, times the layers."""
    bf16 = 2 * CACHE * HEADS * HEAD_DIM * 2
    k8, v8, v_scale = fp8_kv_cache(1, CACHE, HEADS, HEAD_DIM, "cuda")
    fp8 = sum(t.untyped_storage().nbytes() for t in (k8, v8, v_scale))
    return {"layers": LAYERS, "bf16_bytes": LAYERS * bf16, "fp8_bytes": LAYERS * fp8, "ratio": fp8 / bf16}


# Launch options compared: split-KV shares, TMA loads.
FP8_OPTIONS = {"ours_fp8": {}, "ours_fp8_split2": dict(split=2), "ours_fp8_tma": dict(use_tma=True),
               "ours_fp8_tma_split2": dict(use_tma=True, split=2)}


def _attention_case(lkv: int, extra: dict | None = None) -> KernelCase:
    providers = {name: _ours_fp8(lkv, SINK, **opts) for name, opts in FP8_OPTIONS.items()}
    providers["ours_bf16"] = _ours(LQ, lkv, SINK, SINK, lkv)
    providers["ours_bf16_tma_split2"] = _ours(LQ, lkv, SINK, SINK, lkv, use_tma=True, split=2)
    providers["cudnn"] = _sdpa(SDPBackend.CUDNN_ATTENTION, LQ, lkv)
    return KernelCase(
        name="window_attention_fp8",
        shape=f"q{LQ} kv{lkv}",
        providers=providers,
        baseline="cudnn",
        flops=window_attention_flops(1, LQ, lkv, HEADS, HEAD_DIM),
        bytes=window_attention_bytes(1, LQ, lkv, HEADS, HEAD_DIM, fp8=True),
        ceiling="tflops",
        extra=extra or {},
    )


@register("window_attention_fp8")
def attention_cases() -> list[KernelCase]:
    cases = [_attention_case(CACHE, {"kv_cache": kv_cache_bytes()}), _attention_case(14040)]
    return cases + [_attention_case(lkv) for lkv in (4680, 9360)]


def _append_inputs():
    hd = HEADS * HEAD_DIM
    q_lin, k_lin, v = (torch.randn(1, LQ, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    wq, wk = (torch.randn(hd, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cos, sin = rope_tables(HEAD_DIM, device="cuda")
    index = [torch.tensor([x], dtype=torch.int64, device="cuda") for x in (START_FRAME, DST, 0)]
    out = torch.empty(1, LQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return q_lin, k_lin, v, wq, wk, cos, sin, index, out


def _quant_append():
    q_lin, k_lin, v, wq, wk, cos, sin, index, _ = _append_inputs()
    k8, v8, v_scale = fp8_kv_cache(1, CACHE, HEADS, HEAD_DIM, "cuda")
    k_scale = k_head_scale(wk, HEADS)
    return lambda: kv_quant_append(q_lin, k_lin, v, wq, wk, cos, sin, k8, k_scale, v8, v_scale, GRID, *index)


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
