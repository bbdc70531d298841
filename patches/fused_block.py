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
the FP8 GEMM reads it as is and no quantization pass runs. Where the FFN `fuses_residual` (the FP8
FFN), its down GEMM adds `x + y * gate_ffn` in its epilogue, in place, and the fourth pass is gone.
The submodules (self_attn, cross_attn, ffn, norms) are the stock ones, shared, so other patches
still apply to them and the state dict keeps its names.

In a cache pass (`cache_only_last_layer`) the last layer stops after its K/V append.
"""
from __future__ import annotations

from contextlib import contextmanager

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
        # Set by `cache_only_last_layer` around a call whose output nobody reads (a cache pass).
        self.cache_only = False

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
                          lambda h: self.cross_attn(h, context, context_lens, crossattn_cache=crossattn_cache),
                          lambda h: self.self_attn.append_kv(h, grid_sizes, kv_cache, current_start,
                                                             sink_recache_after_switch))

    def layer(self, x, e, self_attention, cross_attention, append_only=None):
        """The layer's body around its two attention calls (h -> (y, cache info) and h -> y), which
        each family's block makes with its own arguments; append_only (h -> cache info), where the
        family has it, serves a cache-only last layer (cache_only_last_layer)."""
        e = (self.modulation.unsqueeze(1) + e).chunk(6, dim=2)
        _, h = adaln(x, shift=e[0], scale=e[1], eps=self.norm1.eps, fp8=getattr(self.self_attn, "accepts_fp8", False))
        if self.cache_only and append_only is not None:
            # Only this layer's keys and values outlive the call: x goes on unchanged (to the head).
            return x, append_only(h)
        y, cache_info = self_attention(h)
        x, h = adaln(x, y=y, gate=e[2], weight=self.norm3.weight, bias=self.norm3.bias, eps=self.norm3.eps)
        y = cross_attention(h)
        x, h = adaln(x, y=y, shift=e[3], scale=e[4], eps=self.norm2.eps, fp8=getattr(self.ffn, "accepts_fp8", False))
        if getattr(self.ffn, "fuses_residual", False):
            self.ffn(h, residual=x, gate=e[5], out=x)  # x + ffn(h) * gate, in the down GEMM's epilogue
        else:
            adaln(x, y=self.ffn(h), gate=e[5], norm=False, out_x=x)
        return x, cache_info


@contextmanager
def cache_only_last_layer(generator: nn.Module):
    """Within: the generator's calls are cache passes, whose output nobody reads (LongLive's pass at
    context_noise after each block's denoising steps, and the re-cache after a prompt switch, both
    discard it): everything after the last layer's K/V append (its attention, o projection,
    cross-attention and FFN) would be dead work, so that layer only appends. Yields whether it
    applies: the generator's last block must be a FusedAttentionBlock over a self-attention with
    `append_kv` (window_attention); a wrapper without `blocks` (sequence parallelism) runs whole.
    The CUDA-graph runner keys on the flag, so such calls get graphs of their own.
    """
    blocks = getattr(generator, "blocks", None)
    last = blocks[-1] if isinstance(blocks, nn.ModuleList) and len(blocks) else None
    applies = isinstance(last, FusedAttentionBlock) and callable(getattr(last.self_attn, "append_kv", None))
    if not applies:
        yield False
        return
    last.cache_only = True
    try:
        yield True
    finally:
        last.cache_only = False


def _is_block(m: nn.Module) -> bool:
    """The stock CausalWanAttentionBlock by structure."""
    return (all(hasattr(m, a) for a in ("norm1", "self_attn", "norm3", "cross_attn", "norm2", "ffn", "modulation"))
            and not isinstance(m, FusedAttentionBlock))


PATCH = Patch(name="fused_block", matches=_is_block, enabled=lambda cfg: cfg.fused_glue,
              replace=FusedAttentionBlock.from_stock)
