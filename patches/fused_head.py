"""FusedHead: the output head's LayerNorm and per-frame adaLN modulation in one pass.

Replaces `CausalHead`. The stock head runs the LayerNorm (in fp32), the `(1 + scale)` and the
`* ... + shift` as separate passes over the [B, L, C] activations in every forward; the adaln
kernel does them in one, with the same rounding points as the stock code (the same kernel serves
each block's norm1/norm2 modulation). The head Linear is shared with the stock module.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels.adaln import adaln
from .base import Patch, PatchSkip, require_kernel_device


class FusedHead(nn.Module):
    def __init__(self, stock: nn.Module):
        super().__init__()
        self.norm, self.head, self.modulation = stock.norm, stock.head, stock.modulation
        for name in ("dim", "out_dim", "patch_size", "eps"):
            setattr(self, name, getattr(stock, name))

    @classmethod
    def from_stock(cls, stock: nn.Module, config) -> "FusedHead":
        mod = stock.modulation
        if mod.dtype != torch.bfloat16:
            raise PatchSkip(f"the adaln kernel runs the bf16 path; this head is {mod.dtype}")
        require_kernel_device(mod)
        if not isinstance(stock.norm, nn.LayerNorm) or stock.norm.elementwise_affine:
            raise PatchSkip("norm is not a LayerNorm without affine parameters")
        if tuple(mod.shape) != (1, 2, stock.dim):
            raise PatchSkip(f"modulation has shape {tuple(mod.shape)}, expected (1, 2, {stock.dim})")
        return cls(stock)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], e [B, F, 1, C] -> [B, F, L/F, prod(patch) * out_dim], as the stock head."""
        num_frames, frame_seqlen = e.shape[1], x.shape[1] // e.shape[1]
        e = (self.modulation.unsqueeze(1) + e).chunk(2, dim=2)
        _, h = adaln(x, shift=e[0], scale=e[1], eps=self.norm.eps)
        return self.head(h.unflatten(1, (num_frames, frame_seqlen)))


def _is_head(m: nn.Module) -> bool:
    """The stock CausalHead by structure: norm, head Linear, a [1, 2, C] modulation, no blocks."""
    return (all(hasattr(m, a) for a in ("norm", "head", "modulation", "patch_size", "out_dim"))
            and not hasattr(m, "blocks") and not isinstance(m, FusedHead))


PATCH = Patch(name="fused_head", matches=_is_head, enabled=lambda cfg: cfg.fused_glue, replace=FusedHead.from_stock)
