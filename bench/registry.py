"""The registry of kernel microbenchmarks.

A kernel file in bench/ describes its cases and registers them; the runner (bench/kernels.py) times
every provider of every case the same way. A case only says how to set up inputs per provider.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# A provider's setup builds its inputs on the GPU and returns the zero-argument call to time.
Setup = Callable[[], Callable[[], object]]


@dataclass
class KernelCase:
    name: str                         # "window_attention" etc.: the kernel family
    shape: str                        # human-readable shape label, e.g. "q4680 kv18720"
    providers: dict[str, Setup]       # provider name -> setup; "ours" is our kernel
    baseline: str                     # the provider the speed-up is measured against
    flops: float | None = None        # per call, for TFLOP/s
    bytes: float | None = None        # per call (fewest bytes the op must move), for GB/s
    ceiling: str | None = None        # "tflops" or "bandwidth": which roofline the % column uses
    extra: dict = field(default_factory=dict)


_FAMILIES: dict[str, Callable[[], list[KernelCase]]] = {}


def register(name: str):
    """Decorator: register a function returning the KernelCases of one kernel family."""
    def wrap(fn: Callable[[], list[KernelCase]]):
        if name in _FAMILIES:
            raise ValueError(f"kernel benchmark family {name!r} registered twice")
        _FAMILIES[name] = fn
        return fn
    return wrap


def families() -> dict[str, Callable[[], list[KernelCase]]]:
    return dict(_FAMILIES)
