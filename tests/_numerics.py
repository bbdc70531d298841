"""Numerics the kernel tests share (the figures themselves, rel L2, cosine and SQNR, are
longlive_triton.numerics, which the benchmarks report too)."""
import torch


def fp8_step(v: torch.Tensor) -> torch.Tensor:
    """The spacing of float8_e4m3fn at |v| (3 mantissa bits; subnormal spacing 2^-9 below 2^-6)."""
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -6))) - 3)
