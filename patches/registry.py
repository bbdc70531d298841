"""The one list of patches that patch_model applies, in order.

A Patch (patches/base.py) recognises the stock module it replaces by structure (never by import
path, so the stock LongLive classes and our reference both match), says which config switch enables
it, and builds the replacement. A replacement that cannot take a module raises PatchSkip with the
reason; the module stays as it was and the report says why.
"""
from __future__ import annotations

from .base import Patch
from .cross_attention import PATCH as fused_cross_attention
from .fp8_linear import PATCHES as fp8_patches
from .fused_block import PATCH as fused_block
from .fused_head import PATCH as fused_head
from .token_merge_ffn import PATCH as token_merge_ffn
from .window_self_attention import PATCH as window_self_attention

# In the order patch_model applies them. token_merge_ffn after fused_block: it patches the block
# that runs (and hooks it for the grid). FP8 last: it quantizes the fused q|k|v weight that
# window_self_attention builds, and the Linear layers the other patches left as plain nn.Linear
# (after merge_lora ran).
PATCHES: list[Patch] = [fused_block, window_self_attention, fused_cross_attention, fused_head, token_merge_ffn,
                        *fp8_patches]
