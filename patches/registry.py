"""The one list of patches that patch_model applies, in order.

A Patch recognises the stock module it replaces by structure (never by import path, so the stock
LongLive classes and our reference both match), says which config switch enables it, and builds
the replacement. A replacement that cannot take a module raises PatchSkip with the reason; the
module stays as it was and the report says why.
"""
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


def _registered() -> list[Patch]:
    # Imported here: patch modules import this file for Patch and PatchSkip.
    from .cross_attention import PATCH as fused_cross_attention
    from .fp8_linear import PATCHES as fp8_patches
    from .fused_block import PATCH as fused_block
    from .fused_head import PATCH as fused_head
    from .token_merge_ffn import PATCH as token_merge_ffn
    from .window_self_attention import PATCH as window_self_attention
    # token_merge_ffn after fused_block: it patches the block that runs (and hooks it for the grid).
    # FP8 last: it quantizes the fused q|k|v weight that window_self_attention builds, and the
    # Linear layers the other patches left as plain nn.Linear (after merge_lora ran).
    return [fused_block, window_self_attention, fused_cross_attention, fused_head, token_merge_ffn, *fp8_patches]


# Each kernel issue adds its entry here, in the order patch_model applies them.
PATCHES: list[Patch] = _registered()
