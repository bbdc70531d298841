"""Helpers shared by the kernels: bf16 rounding that the compiler and the interpreter both honour."""
from __future__ import annotations

import os

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
