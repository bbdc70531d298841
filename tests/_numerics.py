"""Numerics the kernel tests share (the figures themselves, rel L2, cosine and SQNR, are
longlive_triton.numerics, which the benchmarks report too).

How a kernel test judges a float result (FlashAttention's rule, `assert_as_close_as_same_precision`):
the kernel's error against an exact reference (fp64 or fp32 math on the same inputs) may be at most
twice the error of a plain-torch implementation that rounds where the kernel rounds (the
same-precision reference), plus a floor for what differs between two correct implementations: a
final rounding flipped by another summation order. So the bound follows the dtypes and the shape of
each case, not a number tuned on one seed."""
import torch

from longlive_triton.numerics import rel_l2

# Mantissa bits of the float dtypes a kernel writes.
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52, torch.float8_e4m3fn: 3}


def fp8_step(v: torch.Tensor) -> torch.Tensor:
    """The spacing of float8_e4m3fn at |v| (3 mantissa bits; subnormal spacing 2^-9 below 2^-6)."""
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -6))) - 3)


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """The spacing of `dtype` at `magnitude` (normal numbers; 0 for a magnitude of 0)."""
    if magnitude == 0:
        return 0.0
    return 2.0 ** (torch.tensor(float(magnitude)).log2().floor().item() - _MANTISSA[dtype])


def assert_as_close_as_same_precision(got: torch.Tensor, exact: torch.Tensor, same: torch.Tensor, *,
                                      terms: int = 1, floor: float | None = None, factor: float = 2.0,
                                      what: str = "output"):
    """max |got - exact| <= factor * max |same - exact| + floor.

    got: the kernel's result; exact: the reference in fp32/fp64 on the same inputs; same: a plain-torch
    implementation that rounds where the kernel rounds (in got's dtype). floor: absolute; by default
    one ulp of got's dtype at max |exact| (a different summation order may flip the final rounding of
    any element) plus sqrt(terms) fp32 ulps there, terms being the number of values the kernel sums
    in fp32 per output: two fp32 sums of n terms in different orders differ by a random walk of n
    roundings, which on a small tensor the same-precision reference's max error need not show.
    Returns (kernel error, same-precision error)."""
    assert got.shape == exact.shape == same.shape, (got.shape, exact.shape, same.shape)
    g, e, s = got.double(), exact.double(), same.double()
    assert torch.isfinite(g).all(), f"{what}: {int((~torch.isfinite(g)).sum())} non-finite elements"
    if e.numel() == 0:
        return 0.0, 0.0
    if floor is None:
        top = e.abs().max().item()
        floor = ulp(got.dtype, top) + terms ** 0.5 * ulp(torch.float32, top)
    err = (g - e).abs().max().item()
    err_same = (s - e).abs().max().item()
    assert err <= factor * err_same + floor, (
        f"{what}: max error {err:.3e} against the exact reference > {factor} x {err_same:.3e} (the "
        f"same-precision reference's) + floor {floor:.3e}; rel L2 {rel_l2(g, e):.3e} vs {rel_l2(s, e):.3e}")
    return err, err_same
