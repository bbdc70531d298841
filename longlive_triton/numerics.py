"""How far a result is from its reference: the figures every test, benchmark and parity check
reports. All in float64, so the figure measures the tensors and not the arithmetic of the check."""
from __future__ import annotations

import torch


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def cosine(got: torch.Tensor, want: torch.Tensor) -> float:
    """Cosine similarity of the two tensors, flattened."""
    got, want = got.double().flatten(), want.double().flatten()
    return (got @ want / (got.norm() * want.norm()).clamp_min(1e-300)).item()


def sqnr_db(got: torch.Tensor, want: torch.Tensor) -> float:
    """Signal to quantization noise, in dB: 10 log10(||want||^2 / ||got - want||^2)."""
    got, want = got.double(), want.double()
    noise = (got - want).pow(2).sum().clamp_min(1e-300)
    return (10 * torch.log10(want.pow(2).sum() / noise)).item()
