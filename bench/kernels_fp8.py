"""Benchmark cases for FP8: the W8A8 row-wise GEMM against torch._scaled_mm and the bf16 matmul, and
the per-token activation quantization against plain torch, at LongLive-1.3B block shapes (M = 4680)."""
from __future__ import annotations

import torch

from ..kernels.fp8_gemm import fp8_gemm, fp8_gemm_bytes, fp8_gemm_flops
from ..kernels.fp8_quant import quantize_rowwise, quantize_rowwise_bytes, quantize_rowwise_ref, quantize_weight_per_channel
from .registry import KernelCase, register

TOKENS = 4680
# (K, N): q/k/v/o projections, the fused q|k|v, the FFN up and the FFN down.
GEMM_SHAPES = [(1536, 1536), (1536, 4608), (1536, 8960), (8960, 1536)]
QUANT_DIMS = [1536, 8960]


def _fp8_operands(K: int, N: int):
    x = torch.randn(TOKENS, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    a_fp8, a_scale = quantize_rowwise(x)
    w_fp8, w_scale = quantize_weight_per_channel(w)
    return x, w, a_fp8, a_scale, w_fp8, w_scale


def _ours(K: int, N: int):
    def setup():
        _, _, a, sa, w, sw = _fp8_operands(K, N)
        out = torch.empty(TOKENS, N, device="cuda", dtype=torch.bfloat16)
        return lambda: fp8_gemm(a, w, sa, sw, out=out)
    return setup


def _scaled_mm(K: int, N: int):
    def setup():
        _, _, a, sa, w, sw = _fp8_operands(K, N)
        # Row-wise scaling: a_scale [M, 1], w_scale [1, N]; the second operand must be column-major.
        sa2, sw2, wt = sa.view(-1, 1), sw.view(1, -1), w.t()
        return lambda: torch._scaled_mm(a, wt, scale_a=sa2, scale_b=sw2, out_dtype=torch.bfloat16)
    return setup


def _bf16(K: int, N: int):
    def setup():
        x = torch.randn(TOKENS, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        return lambda: torch.nn.functional.linear(x, w)
    return setup


@register("fp8_gemm")
def gemm_cases() -> list[KernelCase]:
    return [
        KernelCase(name="fp8_gemm", shape=f"M{TOKENS} K{K} N{N}",
                   providers={"ours": _ours(K, N), "torch._scaled_mm": _scaled_mm(K, N), "bf16 matmul": _bf16(K, N)},
                   baseline="torch._scaled_mm", ceiling="tflops",
                   flops=fp8_gemm_flops(TOKENS, N, K), bytes=fp8_gemm_bytes(TOKENS, N, K))
        for K, N in GEMM_SHAPES
    ]


def _quant(fn, K: int):
    def setup():
        x = torch.randn(TOKENS, K, device="cuda", dtype=torch.bfloat16)
        return lambda: fn(x)
    return setup


@register("fp8_quant")
def quant_cases() -> list[KernelCase]:
    return [
        KernelCase(name="fp8_quant", shape=f"{TOKENS}x{K}",
                   providers={"ours": _quant(quantize_rowwise, K), "torch": _quant(quantize_rowwise_ref, K)},
                   baseline="torch", ceiling="bandwidth", bytes=quantize_rowwise_bytes(TOKENS, K))
        for K in QUANT_DIMS
    ]
