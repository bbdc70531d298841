"""The Wan transformer pieces both LongLive generators share, written once: the stock math (sinusoidal
time embedding, RoPE tables, attention, the norms, the output head) and what both families build and run
alike (the q/k/v/o projections, the modulated layer, the generator's modules, embeddings, init, unpatchify).

Each family's model.py (models/longlive1/, models/longlive2/) keeps what differs: the cache rules, the
RoPE application, the call protocols, the forward. The names a family's forward calls (`attention`,
`sinusoidal_embedding_1d`) are looked up through that family's module, so a test or the graph runner can
swap them there. The rounding points are the stock ones (see longlive1/model.py); modules are built in
the stock order, so a seeded stock init draws the same numbers.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["sinusoidal_embedding_1d", "rope_params", "rope_freqs", "attention", "WanRMSNorm", "WanLayerNorm",
           "roll_behind_prefix", "CausalHead", "QKVOAttention", "ModulatedBlock", "WanGenerator"]


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[len(position), dim] float64: cos half first, then sin, with w_k = 10000^(-k/(dim/2))."""
    if dim % 2:
        raise ValueError(f"sinusoidal embedding needs an even dim, got {dim}")
    half = dim // 2
    position = position.type(torch.float64)
    # arange made on the position's device: the same values, and no host copy inside a CUDA graph.
    steps = torch.arange(half, dtype=torch.float64, device=position.device)
    sinusoid = torch.outer(position, torch.pow(10000, -steps.div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def rope_params(max_seq_len: int, dim: int, theta: float = 10000) -> torch.Tensor:
    """[max_seq_len, dim/2] complex128 table exp(i * p * theta^(-2j/dim))."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even dim, got {dim}")
    # Always on the CPU, as the stock model builds it: float64 pow/cos/sin differ by an ulp
    # between devices, and an fp32 parity run must see the same table.
    freqs = torch.outer(
        torch.arange(max_seq_len, device="cpu"),
        1.0 / torch.pow(theta, torch.arange(0, dim, 2, device="cpu").to(torch.float64).div(dim)),
    )
    return torch.polar(torch.ones_like(freqs), freqs)


def rope_freqs(head_dim: int, max_frames: int = 1024) -> torch.Tensor:
    """The model's [max_frames, head_dim/2] complex128 table: temporal | height | width columns."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    d = head_dim
    return torch.cat(
        [
            rope_params(max_frames, d - 4 * (d // 6)),
            rope_params(max_frames, 2 * (d // 6)),
            rope_params(max_frames, 2 * (d // 6)),
        ],
        dim=1,
    )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention of q [B, Lq, H, D] over k, v [B, Lk, H, D], scale 1/sqrt(D).

    Like the stock flash-attention entry point, inputs that are not fp16/bf16 are computed in bf16
    and the result is cast back to q's dtype: an fp32 LongLive model still attends in bf16.
    """
    out_dtype = q.dtype
    half = (torch.float16, torch.bfloat16)
    if v.dtype not in half:
        q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
    q, k = q.to(v.dtype), k.to(v.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).type(out_dtype)


def roll_behind_prefix(k: torch.Tensor, v: torch.Tensor, kept: int, evicted: int, rolled: int) -> None:
    """Evict in place from a KV cache k, v [B, slots, H, D]: the `evicted` tokens after the first `kept` go,
    the `rolled` tokens behind them move left to slot `kept` (a copy first: the ranges may overlap)."""
    src = slice(kept + evicted, kept + evicted + rolled)
    k[:, kept:kept + rolled] = k[:, src].clone()
    v[:, kept:kept + rolled] = v[:, src].clone()


class WanRMSNorm(nn.Module):
    """RMSNorm: statistics in fp32, cast back to the input dtype, then times the weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x.float()).type_as(x) * self.weight

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm in the input's dtype (LongLive's variant has no fp32 upcast)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).type_as(x)


class QKVOAttention(nn.Module):
    """The layers every attention of both generators has: q, k, v, o Linear(dim, dim) and, with qk_norm,
    RMSNorms of q and k over all heads."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_norm = qk_norm
        self.eps = eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, s, C] -> q, k (RMS-normed over all heads), v, each [B, s, H, D] (self-attention)."""
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        return q, k, v


class ModulatedBlock(nn.Module):
    """One transformer layer's modules and its per-frame modulated residual flow. The family gives the self-
    and cross-attention classes, and its forward calls `modulated` with its own attention call protocol."""

    def __init__(self, self_attn_cls: type[nn.Module], cross_attn_cls: type[nn.Module], dim: int, ffn_dim: int,
                 num_heads: int, local_attn_size: int = -1, sink_size: int = 0, qk_norm: bool = True,
                 cross_attn_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.num_heads = num_heads
        self.local_attn_size = local_attn_size
        self.qk_norm = qk_norm
        self.cross_attn_norm = cross_attn_norm
        self.eps = eps
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = self_attn_cls(dim, num_heads, local_attn_size, sink_size, qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = cross_attn_cls(dim, num_heads, (-1, -1), qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def modulated(self, x: torch.Tensor, e: torch.Tensor, self_attention: Callable, cross_attention: Callable):
        """x [B, L, C]; e [B, F, 6, C] per-frame modulation; self_attention(x') -> (y, cache info) and
        cross_attention(x') -> y call self.self_attn and self.cross_attn. Returns (x, cache info)."""
        num_frames, frame_seqlen = e.shape[1], x.shape[1] // e.shape[1]
        e = (self.modulation.unsqueeze(1) + e).chunk(6, dim=2)

        def per_frame(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(dim=1, sizes=(num_frames, frame_seqlen))

        y, cache_info = self_attention((per_frame(self.norm1(x)) * (1 + e[1]) + e[0]).flatten(1, 2))
        x = x + (per_frame(y) * e[2]).flatten(1, 2)
        x = x + cross_attention(self.norm3(x))
        y = self.ffn((per_frame(self.norm2(x)) * (1 + e[4]) + e[3]).flatten(1, 2))
        x = x + (per_frame(y) * e[5]).flatten(1, 2)
        return x, cache_info


class CausalHead(nn.Module):
    """Output head: LayerNorm, per-frame shift/scale from the time embedding, Linear."""

    def __init__(self, dim: int, out_dim: int, patch_size, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim
        self.patch_size = patch_size
        self.eps = eps
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], e [B, F, 1, C] -> [B, F, L/F, prod(patch) * out_dim]."""
        num_frames, frame_seqlen = e.shape[1], x.shape[1] // e.shape[1]
        e = (self.modulation.unsqueeze(1) + e).chunk(2, dim=2)
        return self.head(self.norm(x).unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * (1 + e[1]) + e[0])


class WanGenerator(nn.Module):
    """The generator's modules and attributes, the stock init, the patch and text embeddings and unpatchify;
    make_block() builds one layer of the family. The family's forward and time embedding stay its own."""

    def __init__(self, make_block: Callable[[], nn.Module], model_type: str, patch_size, text_len: int, in_dim: int,
                 dim: int, ffn_dim: int, freq_dim: int, text_dim: int, out_dim: int, num_heads: int, num_layers: int,
                 local_attn_size: int, sink_size: int, num_frame_per_block: int, qk_norm: bool,
                 cross_attn_norm: bool, eps: float):
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} / num_heads {num_heads} must give an even head dim")
        super().__init__()
        self.model_type = model_type
        self.patch_size = tuple(patch_size)
        self.text_len = text_len
        self.in_dim = in_dim
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.freq_dim = freq_dim
        self.text_dim = text_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size
        self.qk_norm = qk_norm
        self.cross_attn_norm = cross_attn_norm
        self.eps = eps

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([make_block() for _ in range(num_layers)])
        self.head = CausalHead(dim, out_dim, patch_size, eps)
        # A plain attribute, not a buffer, as in the stock model: it stays complex128 through
        # .to(dtype) and stays out of the state dict, so stock checkpoints load strictly.
        self.freqs = rope_freqs(dim // num_heads)
        self.block_mask = None
        self.num_frame_per_block = num_frame_per_block
        self.independent_first_frame = False

    def init_weights(self) -> None:
        """The stock initialisation (which leaves the output head at zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def patchify(self, x) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Latents [C, F, H, W] each -> (tokens [1, L_i, C] each, grid_sizes [B, 3], seq_lens [B]), with the
        RoPE table moved to the model's device first."""
        device = self.patch_embedding.weight.device
        if self.freqs.device != device:
            self.freqs = self.freqs.to(device)
        x = [self.patch_embedding(u.unsqueeze(0)) for u in x]
        grid_sizes = torch.stack([torch.tensor(u.shape[2:], dtype=torch.long) for u in x])
        x = [u.flatten(2).transpose(1, 2) for u in x]
        seq_lens = torch.tensor([u.size(1) for u in x], dtype=torch.long)
        return x, grid_sizes, seq_lens

    def embed_text(self, context) -> torch.Tensor:
        """Prompt embeddings [L_i <= text_len, text_dim] each -> [B, text_len, C], zero-padded to text_len first."""
        return self.text_embedding(torch.stack([
            torch.cat([u, u.new_zeros(self.text_len - u.size(0), u.size(1))]) for u in context
        ]))

    def unpatchify(self, x: torch.Tensor, grid_sizes: torch.Tensor) -> list[torch.Tensor]:
        """[B, F, L/F, prod(patch)*C] -> list of [C, F*pt, H*ph, W*pw]."""
        c = self.out_dim
        out = []
        for u, v in zip(x, grid_sizes.tolist()):
            u = u[:math.prod(v)].view(*v, *self.patch_size, c)
            u = torch.einsum("fhwpqrc->cfphqwr", u)
            out.append(u.reshape(c, *[i * j for i, j in zip(v, self.patch_size)]))
        return out
