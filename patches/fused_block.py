"""FusedAttentionBlock: a LongLive transformer layer whose glue runs as four fused adaln passes.

Replaces `CausalWanAttentionBlock`. The stock layer spends ~15 full passes over its [B, L, C]
activation on LayerNorms, adaLN modulation and gated residual adds between the big ops; here
each stretch between two big ops is one `adaln` kernel:

    h = LN1(x) * (1 + scale_attn) + shift_attn                   -> self-attention
    x = x + y * gate_attn;    h = LN3_affine(x)                  -> cross-attention
    x = x + y;                h = LN2(x) * (1 + scale_ffn) + shift_ffn -> FFN
    x = x + y * gate_ffn

with the stock bf16 rounding points. Where the self-attention or the FFN `accepts_fp8` (the fp8
patches, patches/fp8_linear.py), the adaln before it writes h in FP8 with one scale per token, so
the FP8 GEMM reads it as is and no quantization pass runs. The submodules (self_attn, cross_attn, ffn, norms) are the
stock ones, shared, so other patches still apply to them and the state dict keeps its names.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels.adaln import adaln
from .base import Patch, PatchSkip, require_kernel_device


class FusedAttentionBlock(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        for name in ("norm1", "self_attn", "norm3", "cross_attn", "norm2", "ffn"):
            setattr(self, name, getattr(block, name))
        self.modulation = block.modulation
        for name in ("dim", "ffn_dim", "num_heads", "local_attn_size", "qk_norm", "cross_attn_norm", "eps"):
            if hasattr(block, name):
                setattr(self, name, getattr(block, name))

    @classmethod
    def from_stock(cls, block: nn.Module, config) -> "FusedAttentionBlock":
        """Build from a stock CausalWanAttentionBlock (or our reference of it), sharing its modules."""
        mod = block.modulation
        if mod.dtype != torch.bfloat16:
            raise PatchSkip(f"the adaln kernel runs the bf16 path; this block is {mod.dtype}")
        require_kernel_device(mod)
        for name in ("norm1", "norm2"):
            norm = getattr(block, name)
            if not isinstance(norm, nn.LayerNorm) or norm.elementwise_affine:
                raise PatchSkip(f"{name} is not a LayerNorm without affine parameters")
        norm3 = block.norm3
        if not isinstance(norm3, nn.LayerNorm) or norm3.weight is None or norm3.bias is None:
            raise PatchSkip("norm3 is not an affine LayerNorm (cross_attn_norm off?)")
        return cls(block)

    def forward(self, x, e, seq_lens, grid_sizes, freqs, context, context_lens, block_mask, kv_cache=None,
                crossattn_cache=None, current_start=0, cache_start=None, sink_recache_after_switch=False):
        if kv_cache is None:
            raise NotImplementedError("FusedAttentionBlock serves LongLive's KV-cached inference path; pass kv_cache")
        return self.layer(x, e, lambda h: self.self_attn(h, seq_lens, grid_sizes, freqs, block_mask, kv_cache,
                                                         current_start, cache_start, sink_recache_after_switch),
                          lambda h: self.cross_attn(h, context, context_lens, crossattn_cache=crossattn_cache))

    def layer(self, x, e, self_attention, cross_attention):
        """The layer's body around its two attention calls (h -> (y, cache info) and h -> y), which
        each family's block makes with its own arguments."""
        e = (self.modulation.unsqueeze(1) + e).chunk(6, dim=2)
        _, h = adaln(x, shift=e[0], scale=e[1], eps=self.norm1.eps, fp8=getattr(self.self_attn, "accepts_fp8", False))
        y, cache_info = self_attention(h)
        x, h = adaln(x, y=y, gate=e[2], weight=self.norm3.weight, bias=self.norm3.bias, eps=self.norm3.eps)
        y = cross_attention(h)
        x, h = adaln(x, y=y, shift=e[3], scale=e[4], eps=self.norm2.eps, fp8=getattr(self.ffn, "accepts_fp8", False))
        x, _ = adaln(x, y=self.ffn(h), gate=e[5], norm=False, out_x=x)
        return x, cache_info


def _is_block(m: nn.Module) -> bool:
    """The stock CausalWanAttentionBlock by structure."""
    return (all(hasattr(m, a) for a in ("norm1", "self_attn", "norm3", "cross_attn", "norm2", "ffn", "modulation"))
            and not isinstance(m, FusedAttentionBlock))


PATCH = Patch(name="fused_block", matches=_is_block, enabled=lambda cfg: cfg.fused_glue,
              replace=FusedAttentionBlock.from_stock)
