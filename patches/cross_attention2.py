"""FusedCrossAttention2: LongLive 2.0's text cross-attention with its query RMSNorm in one pass.

Replaces 2.0's `MultiShotT2VCrossAttention`. Like the stock module it recomputes the text keys and
values on every call and never reads the cross-attention cache (2.0 bypasses it so that nothing
escapes a CUDA graph; the K/V GEMMs over 512 text tokens are ~1% of a forward), so a prompt that
changes between calls is always the one attended, with or without a reset of the cache flags. A
context holding several prompts per video ([B * chunks, L, C]) splits the tokens into as many equal
chunks, each attending its own prompt, as the stock module does. Attention runs on cuDNN through SDPA.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..kernels.rms_norm import rms_norm
from .base import Patch
from .cross_attention import FusedCrossAttention, _is_cross_attention


class FusedCrossAttention2(FusedCrossAttention):
    def forward(self, x, context, context_lens, is_teacher_forcing=False, crossattn_cache=None):
        if is_teacher_forcing:
            raise NotImplementedError("FusedCrossAttention2 serves LongLive 2.0's inference path, not teacher forcing")
        if context_lens is not None:
            raise NotImplementedError("FusedCrossAttention2 attends every text token, as LongLive 2.0's model calls "
                                      "it (context_lens None); got context_lens")
        b, length, c = x.shape
        chunks = context.size(0) // b
        if chunks * b != context.size(0) or length % chunks:
            raise ValueError(f"the context batch {context.size(0)} must be a multiple of x's batch {b}, and the "
                             f"{length} tokens divisible by the {chunks} prompts per video")
        n, d = self.num_heads, self.head_dim
        q = rms_norm(self.q(x), self.norm_q.weight, self.norm_q.eps).view(b * chunks, length // chunks, n, d)
        k = self.norm_k(self.k(context)).view(b * chunks, -1, n, d)
        v = self.v(context).view(b * chunks, -1, n, d)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).reshape(b, length, c))


def _is_cross_attention2(m: nn.Module) -> bool:
    return _is_cross_attention(m) and not isinstance(m, FusedCrossAttention)


PATCH = Patch(name="fused_cross_attention", matches=_is_cross_attention2, enabled=lambda cfg: cfg.fused_glue,
              replace=FusedCrossAttention2.from_stock)
