"""What a patch is: the Patch entry, the PatchSkip a replacement raises, and the device check the
kernel patches share. Patch modules import this; patches/registry.py lists them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


class PatchSkip(Exception):
    """Raised by Patch.replace when a module cannot be patched; the message is the reason."""


def require_kernel_device(weight) -> None:
    """PatchSkip unless the Triton kernels can run where `weight` lives (CUDA, or the interpreter)."""
    from ..kernels._common import interpreting

    if weight.device.type != "cuda" and not interpreting():
        raise PatchSkip(f"the kernels need a CUDA device (or TRITON_INTERPRET=1); weights are on {weight.device}")


@dataclass(frozen=True)
class Patch:
    name: str
    matches: Callable[[nn.Module], bool]
    enabled: Callable[[object], bool]            # PatchConfig -> bool
    replace: Callable[[nn.Module, object], nn.Module]
    # What the report should say about the choices made when the patch applied (e.g. the backend).
    describe: Callable[[object], str] | None = None
    # A config rule over module paths: (path in the generator, module, PatchConfig) -> the reason to
    # leave this module as it is (it goes into the report), or None to patch it.
    keep: Callable[[str, nn.Module, object], str | None] | None = None
