"""LongLive v1.0's cache rules outside the layers: none. Its layers keep their host-side copy of the
cache pointers by the stock rules alone (patches/window_self_attention.py), and its cross-attention
reads the cross-attention cache, so a call that fills it runs eagerly (longlive_triton/runtime/graphs.py).
The LongLive 2.0 counterpart is patches/cache_rules2.py; patches/families.py pairs each with its patches."""
from __future__ import annotations

before_forward = None


def check_patchable(generator, config) -> None:
    """Nothing v1.0 refuses beyond what each patch checks."""


def graph_key(generator, kv_cache) -> tuple:
    return ()


crossattn_cache_used = True
