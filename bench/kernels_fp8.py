"""Benchmark cases for FP8 at LongLive-1.3B block shapes (M = 4680): the W8A8 GEMM (persistent TMA
kernel, pointer kernel) against torch._scaled_mm row-wise and the bf16 matmul; the per-token
activation quantization against plain torch; the FFN pair (adaln + up + GELU + down) in bf16
against the fused FP8 chain; adaln with FP8 output against the bf16 adaln."""
from __future__ import annotations

import torch

import torch.nn.functional as F

from ..kernels.adaln import adaln, adaln_bytes
from ..kernels.fp8_gemm import fp8_gemm, fp8_gemm_bytes, fp8_gemm_flops, fp8_linear
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


# Our kernel's variants, each its own provider so one that fails to compile shows as a failed row.
OURS = {"ours (TMA persistent)": dict(use_tma=True), "ours (TMA, no flatten)": dict(use_tma=True, flatten=False),
        "ours (TMA, warp-specialized)": dict(use_tma=True, warp_specialize=True), "ours (pointer)": dict(use_tma=False)}


def _ours(K: int, N: int, **options):
    def setup():
        _, _, a, sa, w, sw = _fp8_operands(K, N)
        out = torch.empty(TOKENS, N, device="cuda", dtype=torch.bfloat16)
        return lambda: fp8_gemm(a, w, sa, sw, out=out, **options)
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
                   providers={**{name: _ours(K, N, **o) for name, o in OURS.items()},
                              "torch._scaled_mm": _scaled_mm(K, N), "bf16 matmul": _bf16(K, N)},
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


DIM, FFN_DIM, FRAMES = 1536, 8960, 3


def _ffn_inputs():
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale

    x, y, mod = rnd(1, TOKENS, DIM), rnd(1, TOKENS, DIM), rnd(1, FRAMES, 6, 1, DIM, scale=0.5)
    w1, b1 = rnd(FFN_DIM, DIM, scale=DIM ** -0.5), rnd(FFN_DIM, scale=0.1)
    w2, b2 = rnd(DIM, FFN_DIM, scale=FFN_DIM ** -0.5), rnd(DIM, scale=0.1)
    return x, y, mod, (w1, b1, w2, b2)


def _ffn_bf16():
    """The exact preset's FFN stretch: adaln (residual + LN2 + modulation), up GEMM, GELU, down GEMM."""
    def setup():
        x, y, mod, (w1, b1, w2, b2) = _ffn_inputs()

        def run():
            _, h = adaln(x, y=y, shift=mod[:, :, 3], scale=mod[:, :, 4])
            return F.linear(F.gelu(F.linear(h, w1, b1), approximate="tanh"), w2, b2)
        return run
    return setup


def _ffn_fp8(fused: bool, **options):
    """The fp8 preset's: adaln writing FP8, up GEMM + GELU (writing FP8 with group scales when
    fused, else bf16 then a quantization pass), down GEMM."""
    def setup():
        x, y, mod, (w1, b1, w2, b2) = _ffn_inputs()
        (q1, s1), (q2, s2) = quantize_weight_per_channel(w1), quantize_weight_per_channel(w2)

        def run():
            _, h = adaln(x, y=y, shift=mod[:, :, 3], scale=mod[:, :, 4], fp8=True)
            hidden = fp8_linear(h, q1, s1, b1, gelu=True, out_fp8=fused, **options)
            return fp8_linear(hidden, q2, s2, b2, **options)
        return run
    return setup


@register("fp8_ffn")
def ffn_cases() -> list[KernelCase]:
    flops = fp8_gemm_flops(TOKENS, FFN_DIM, DIM) + fp8_gemm_flops(TOKENS, DIM, FFN_DIM)
    return [KernelCase(
        name="fp8_ffn", shape=f"adaln + FFN {TOKENS}x{DIM}->{FFN_DIM}->{DIM}",
        providers={"fused fp8 (TMA)": _ffn_fp8(True, use_tma=True), "fused fp8 (pointer)": _ffn_fp8(True, use_tma=False),
                   "fp8, hidden quantized apart (TMA)": _ffn_fp8(False, use_tma=True), "bf16": _ffn_bf16()},
        baseline="bf16", ceiling="tflops", flops=flops)]


def _adaln_provider(fp8: bool):
    def setup():
        x, y, mod, _ = _ffn_inputs()
        return lambda: adaln(x, y=y, shift=mod[:, :, 3], scale=mod[:, :, 4], fp8=fp8)
    return setup


@register("fp8_adaln")
def adaln_fp8_cases() -> list[KernelCase]:
    return [KernelCase(
        name="fp8_adaln", shape=f"residual + LN2 + modulation [{TOKENS}x{DIM}]",
        providers={"ours fp8 out": _adaln_provider(True), "ours bf16 out": _adaln_provider(False)},
        baseline="ours bf16 out", ceiling="bandwidth",
        bytes=adaln_bytes(1, TOKENS, DIM, residual=True, norm=True, fp8=True))]
