"""The LongLive model families patch_model serves, told apart by structure, each with its patch list
and its cache rules (what the patched model does once per forward, outside the layers).

- LongLive v1.0 (Wan2.1-T2V-1.3B, branch v1.0 of NVlabs/LongLive): patches/registry.py's PATCHES,
  patches/cache_rules.py.
- LongLive 2.0 (Wan2.2-TI2V-5B, branch main): its model carries the multi-shot RoPE settings
  (`rope_temporal_offset`, `t_scale`, `use_relative_rope`) that its blocks hand to every layer.
  The same list with its own block, self-attention and cross-attention (patches/*2.py, which take
  2.0's call), and patches/cache_rules2.py (shot sinks, RoPE offset, graph keys).
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from . import cache_rules, cache_rules2
from .base import Patch
from .cross_attention2 import PATCH as fused_cross_attention2
from .fused_block2 import PATCH as fused_block2
from .registry import PATCHES, fused_block, fused_cross_attention, window_self_attention
from .window_self_attention2 import PATCH as window_self_attention2


@dataclass(frozen=True)
class Family:
    name: str
    recognise: Callable[[nn.Module], bool]
    patches: list[Patch]
    rules: types.ModuleType   # before_forward (a forward pre-hook or None), graph_key, crossattn_cache_used


def _is_longlive2(generator: nn.Module) -> bool:
    return all(hasattr(generator, a) for a in ("rope_temporal_offset", "t_scale", "use_relative_rope"))


_V2_SWAP = {fused_block: fused_block2, window_self_attention: window_self_attention2,
            fused_cross_attention: fused_cross_attention2}

LONGLIVE2 = Family("LongLive 2.0", _is_longlive2, [_V2_SWAP.get(p, p) for p in PATCHES], cache_rules2)
LONGLIVE1 = Family("LongLive v1.0", lambda generator: True, PATCHES, cache_rules)
FAMILIES = (LONGLIVE2, LONGLIVE1)


def family_of(generator: nn.Module) -> Family:
    """The first family that recognises the generator (v1.0 takes any LongLive generator 2.0 does not)."""
    return next(f for f in FAMILIES if f.recognise(generator))
