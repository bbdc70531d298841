"""TokenMergedFFN: each block's FFN on fewer tokens, by token merging within every latent frame.

Per block call: the FFN input (the modulated norm2 output, [B, F*Hg*Wg, C]) is matched within each
latent frame (cosine similarity of every source token to the destinations, one per stride cell of
the frame's token grid); the `ratio * Hg*Wg` most similar sources of each frame are merged into
their destinations (size-weighted mean); the FFN runs on the merged sequence; every token then
takes its merged row's output back (copy). Kernels: `kernels/token_merge.py`.

Only the FFN sees merged tokens: self-attention, and so the keys and values written to the KV
cache, stay at full resolution, and later blocks attend to an unmerged cache.

The FFN alone does not know the latent grid: the patched block gets `grid_sizes` in its forward
(the stock block, our reference and FusedAttentionBlock share that signature), and a forward
pre-hook on the block hands the grid to its FFN for that call. The FFN keeps its children and
their names (`ffn.0`, `ffn.2`), so the state dict is unchanged and patches of those Linear layers
still apply.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from ..kernels.token_merge import token_merge, token_unmerge
from ..kernels.token_merge_plan import merge_count
from .base import Patch, PatchSkip, require_kernel_device


class TokenMergedFFN(nn.Sequential):
    """The stock FFN's layers, run on merged tokens; built by from_stock."""

    def __init__(self, ffn: nn.Sequential, ratio: float, stride: tuple[int, int]):
        super().__init__(OrderedDict(ffn.named_children()))
        self.ratio = ratio
        self.stride = tuple(stride)
        # (frames, rows, columns) of the tokens of the current call; set by the block's pre-hook.
        self.grid: tuple[int, int, int] | None = None

    @classmethod
    def from_stock(cls, ffn: nn.Module, config) -> "TokenMergedFFN":
        if type(ffn) is not nn.Sequential:
            raise PatchSkip(f"the FFN is a {type(ffn).__name__}, not the stock nn.Sequential")
        weight = next((p for p in ffn.parameters()), None)
        if weight is None:
            raise PatchSkip("the FFN has no parameters")
        if weight.dtype not in (torch.bfloat16, torch.float32):
            raise PatchSkip(f"the merge kernels take bf16 or fp32 tokens; this FFN is {weight.dtype}")
        require_kernel_device(weight)
        return cls(ffn, config.token_merge_ratio, config.token_merge_stride)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, stride={self.stride}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is None:
            raise RuntimeError("TokenMergedFFN needs the latent grid, which its block's forward hands it: "
                               "call the block, not the FFN alone")
        frames, rows, cols = self.grid
        if x.dim() != 3 or x.shape[1] != frames * rows * cols:
            raise ValueError(f"the FFN input {tuple(x.shape)} is not [B, {frames} frames x {rows}x{cols} tokens, C]")
        try:
            merge_count((rows, cols), self.stride, self.ratio)
        except ValueError as why:
            raise ValueError(f"token_merge_stride {list(self.stride)} / token_merge_ratio {self.ratio} do not fit "
                             f"the latent token grid {rows}x{cols}: {why}") from None
        m = token_merge(x, frames=frames, grid=(rows, cols), stride=self.stride, ratio=self.ratio)
        return token_unmerge(super().forward(m.merged).contiguous(), m.mapping)


def _hand_grid_to_ffn(block: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a patched block: its FFN merges within the frames of this call's grid."""
    grid_sizes = kwargs["grid_sizes"] if "grid_sizes" in kwargs else args[3]
    # LongLive builds grid_sizes on the host from the input's shape: reading it does not sync.
    sizes = grid_sizes.tolist()
    if any(s != sizes[0] for s in sizes):
        raise ValueError(f"token merging needs one latent grid for the whole batch, got {sizes}")
    block.ffn.grid = tuple(int(v) for v in sizes[0])


def _is_block(m: nn.Module) -> bool:
    """A LongLive transformer layer (stock, reference or FusedAttentionBlock) with a stock FFN."""
    return (all(hasattr(m, a) for a in ("norm1", "self_attn", "cross_attn", "norm2", "ffn", "modulation"))
            and isinstance(m.ffn, nn.Module) and not isinstance(m.ffn, TokenMergedFFN))


def patch_block(block: nn.Module, config) -> nn.Module:
    """Swap the block's FFN for a TokenMergedFFN and hand it the grid on every call; the block stays."""
    block.ffn = TokenMergedFFN.from_stock(block.ffn, config)
    block.register_forward_pre_hook(_hand_grid_to_ffn, with_kwargs=True)
    return block


PATCH = Patch(
    name="token_merge_ffn", matches=_is_block, enabled=lambda cfg: cfg.token_merge_ratio > 0, replace=patch_block,
    describe=lambda cfg: (f"{cfg.token_merge_ratio:g} of each latent frame's tokens merged before the FFN, "
                          f"destinations one per {cfg.token_merge_stride[0]}x{cfg.token_merge_stride[1]} cell"),
)
