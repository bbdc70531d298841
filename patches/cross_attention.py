"""FusedCrossAttention: LongLive's text cross-attention with its query RMSNorm in one pass.

Replaces `WanT2VCrossAttention`. The stock query RMSNorm runs six passes (two in fp32) over the
[B, L, C] queries in every layer of every forward; `rms_norm` does it in one, with the same
rounding. Keys and values come from the stock cross-attention cache exactly as before (computed
from the context once, then reused until the pipeline resets the cache; written into the cache's
own tensors when their shape fits, so their addresses never change), and attention runs on
cuDNN through SDPA, which measured faster than our Triton kernel for 512 text keys
(bench/RESULTS.md) and needs no flash-attn install.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.rms_norm import rms_norm
from .base import Patch, PatchSkip, require_kernel_device


class FusedCrossAttention(nn.Module):
    def __init__(self, stock: nn.Module):
        super().__init__()
        for name in ("q", "k", "v", "o", "norm_q", "norm_k"):
            setattr(self, name, getattr(stock, name))
        self.dim, self.num_heads = stock.dim, stock.num_heads
        self.head_dim = stock.dim // stock.num_heads

    @classmethod
    def from_stock(cls, stock: nn.Module, config) -> "FusedCrossAttention":
        weight = getattr(stock.norm_q, "weight", None)
        if not isinstance(weight, torch.Tensor) or getattr(stock.norm_q, "eps", None) is None:
            raise PatchSkip("norm_q is not a WanRMSNorm (qk_norm off?)")
        if weight.dtype != torch.bfloat16:
            raise PatchSkip(f"the rms_norm kernel runs the bf16 path; this layer is {weight.dtype}")
        require_kernel_device(weight)
        return cls(stock)

    def forward(self, x, context, context_lens, crossattn_cache=None):
        b, n, d = x.size(0), self.num_heads, self.head_dim
        q = rms_norm(self.q(x), self.norm_q.weight, self.norm_q.eps).view(b, -1, n, d)
        if crossattn_cache is not None and crossattn_cache["is_init"]:
            k, v = crossattn_cache["k"], crossattn_cache["v"]
        else:
            k = self.norm_k(self.k(context)).view(b, -1, n, d)
            v = self.v(context).view(b, -1, n, d)
            if crossattn_cache is not None:
                crossattn_cache["is_init"] = True
                for name, new in (("k", k), ("v", v)):
                    old = crossattn_cache.get(name)
                    if isinstance(old, torch.Tensor) and old.shape == new.shape and old.dtype == new.dtype \
                            and old.device == new.device:
                        # In place: a captured CUDA graph keeps reading the same buffer after a prompt switch.
                        old.copy_(new)
                    else:
                        crossattn_cache[name] = new
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).flatten(2))


def _is_cross_attention(m: nn.Module) -> bool:
    """The stock WanT2VCrossAttention by structure: q/k/v/o and q/k norms, no KV-cache window."""
    return (all(hasattr(m, a) for a in ("q", "k", "v", "o", "norm_q", "norm_k", "num_heads"))
            and not hasattr(m, "sink_size") and not isinstance(m, FusedCrossAttention))


PATCH = Patch(name="fused_cross_attention", matches=_is_cross_attention, enabled=lambda cfg: cfg.fused_glue,
              replace=FusedCrossAttention.from_stock)
