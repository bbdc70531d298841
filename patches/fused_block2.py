"""FusedAttentionBlock2: LongLive 2.0's transformer layer on the fused glue of FusedAttentionBlock.

Replaces 2.0's `CausalWanAttentionBlock` (wan_5b/modules/causal_model.py): the same four adaln
passes and stock rounding points as v1.0's (patches/fused_block.py), with 2.0's call. Its block
takes five RoPE arguments more (`t_scale`, `use_relative_rope`, `method`, `original_seq_len`,
`temporal_offset`), hands them to the self-attention, and calls the cross-attention with
`is_teacher_forcing` (false on the cached inference path this serves). The self-attention checks
the RoPE arguments (patches/window_self_attention2.py); a stock one (left unpatched) gets them as is.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import Patch
from .fused_block import FusedAttentionBlock
from .fused_block import _is_block as _is_v1_block


class FusedAttentionBlock2(FusedAttentionBlock):
    def forward(self, x, e, seq_lens, grid_sizes, freqs, context, context_lens, block_mask, kv_cache=None,
                crossattn_cache=None, current_start=0, cache_start=None, t_scale=1.0, use_relative_rope=False,
                method="linear", original_seq_len=None, temporal_offset=0.0):
        if kv_cache is None:
            raise NotImplementedError("FusedAttentionBlock2 serves LongLive 2.0's KV-cached inference path (its "
                                      "teacher-forcing training path is not patched); pass kv_cache")
        if torch.compiler.is_compiling():
            # LongLive 2.0's SafeCompiledCallable falls back to the eager model on this error.
            raise RuntimeError("a patched LongLive 2.0 model runs eagerly (its layers are Triton kernels, "
                               "CUDA-graphed): do not torch.compile it (leave its torch_compile option off)")
        rope = dict(t_scale=t_scale, use_relative_rope=use_relative_rope, method=method,
                    original_seq_len=original_seq_len, temporal_offset=temporal_offset)
        return self.layer(x, e, lambda h: self.self_attn(h, seq_lens, grid_sizes, freqs, block_mask, kv_cache,
                                                         current_start, cache_start, **rope),
                          lambda h: self.cross_attn(h, context, context_lens, is_teacher_forcing=False,
                                                    crossattn_cache=crossattn_cache))


def _is_block(m: nn.Module) -> bool:
    return _is_v1_block(m) and not isinstance(m, FusedAttentionBlock2)


PATCH = Patch(name="fused_block", matches=_is_block, enabled=lambda cfg: cfg.fused_glue,
              replace=FusedAttentionBlock2.from_stock)
