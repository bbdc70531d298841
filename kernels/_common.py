"""Helpers shared by the kernels: bf16 rounding that the compiler and the interpreter both honour,
and the launchers' index arguments."""
from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def round_bf16(x):
    """Round fp32 to the nearest bf16 (ties to even), kept in fp32.

    Integer arithmetic on purpose: on the GPU a cast pair (to bf16 and back) may be folded away,
    after which a multiply and an add fuse into one FMA that rounds once where torch rounds twice
    (seen on the H200 with triton 3.6); and the CPU interpreter truncates such casts. Kernels that
    reproduce the stock bf16 rounding points use this; hot loops that only need a cast use
    `cast_bf16`."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def cast_bf16(x, INTERPRET: tl.constexpr):
    """fp32 -> bf16, rounding to nearest even: the plain cast on the GPU, by hand in the interpreter."""
    if INTERPRET:
        return round_bf16(x).to(tl.bfloat16)
    else:
        return x.to(tl.bfloat16)


def index_arg(name: str, value, *, batch: int, lo: int, hi: int, device: torch.device, where: str = "") -> torch.Tensor:
    """A launcher's index argument as a device tensor the kernel reads (so the host never waits).

    A Python int is range-checked here and becomes a one-element int32 tensor by a device fill (no
    copy, no sync, capturable); a tensor must be int32/int64 of shape [1] or [batch] on `device`.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int tensor or an int, got bool")
    if isinstance(value, int):
        if not lo <= value <= hi:
            raise ValueError(f"{name}={value} is outside {where}[{lo}, {hi}]")
        return torch.full((1,), value, dtype=torch.int32, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int tensor or an int, got {type(value).__name__}")
    if value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {value.dtype}")
    if value.dim() != 1 or value.numel() not in (1, batch):
        raise ValueError(f"{name} must have shape [1] or [B={batch}], got {list(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, the kernel's inputs on {device}")
    return value


def autotune(**kwargs):
    """triton.autotune that keeps its timings on disk (Triton's cache dir) where this Triton can,
    so a new process skips the search: a GPU suite or a second run starts at the tuned speed."""
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs.setdefault("cache_results", True)
    return triton.autotune(**kwargs)
