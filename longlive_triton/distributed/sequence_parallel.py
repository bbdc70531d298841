"""Sequence parallelism (Ulysses) for the LongLive generator: each block's tokens spread over N ranks.

    ctx = init_distributed()                        # torchrun --nproc-per-node N, N divides the heads
    model = build_model("longlive-1.3b", device=ctx.device, dtype=torch.bfloat16)   # the same on every rank
    patch_model(model)                              # optional, as on one GPU
    sp = sequence_parallel(model)                   # the default group
    torch.manual_seed(seed)                         # every rank draws the same noise and re-noising
    latents = BlockPipeline(sp).generate(noise, prompt_embeds)     # the one-GPU call; every rank gets them

Rank r holds rows [r*S/N, (r+1)*S/N) of each latent frame's S tokens; around self-attention two
all-to-alls trade tokens for heads and back, so each rank's KV cache holds H/N heads of every token
(`kv_cache_heads`); the head's output is all-gathered, so every rank returns the whole flow. How
the shards move: docs/distributed.md.

Every rank must run the same loop on the same inputs (same noise, prompts, seeds). With check_inputs
(the default) each forward compares a fingerprint of its inputs across ranks and raises a
DistributedError if they differ; that costs a tiny all-gather and a host sync per forward, so turn it
off for timing. Not here yet: CUDA graphs (the forward runs eagerly; a graph runner patch_model
installed stays on the generator, unused), the fp8 KV cache (its append fuses the RMSNorm), token
merging (it picks the pairs to merge across a whole frame), and the stock LongLive class (load its
weights into our reference: longlive_triton.loading.checkpoints).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..patch import find_generator
from ..patches.token_merge_ffn import TokenMergedFFN
from .group import DistributedError, agree, comm_errors

__all__ = ["SequenceParallelGenerator", "UlyssesSelfAttention", "check_sp_shapes", "sequence_parallel"]


def check_sp_shapes(num_heads: int, frame_tokens: int | None, world: int) -> None:
    """ValueError unless `world` ranks can split the heads and each latent frame's tokens evenly
    (frame_tokens None: the heads only)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if num_heads % world:
        raise ValueError(f"{num_heads} attention heads do not split over {world} ranks: "
                         f"use a world size that divides {num_heads}")
    if frame_tokens is not None and frame_tokens % world:
        raise ValueError(f"{frame_tokens} tokens per latent frame do not split over {world} ranks: "
                         f"use a world size that divides {frame_tokens}")


class UlyssesSelfAttention(nn.Module):
    """Wraps one layer's self-attention (ours or WindowSelfAttention): local tokens in and out, all
    tokens of H/N heads inside (module docstring)."""

    def __init__(self, attn: nn.Module, group, world: int):
        super().__init__()
        self.attn = attn
        self.group = group
        self.world = world

    @property
    def accepts_fp8(self) -> bool:
        # The fp8 preset's adaln writes FP8 for a projection that takes it; project() passes it through.
        return getattr(self.attn, "accepts_fp8", False)

    def extra_repr(self) -> str:
        return f"ulysses over {self.world} ranks"

    def forward(self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0,
                cache_start=None, sink_recache_after_switch=False):
        if kv_cache is None:
            raise NotImplementedError("sequence parallelism serves LongLive's KV-cached inference path; pass kv_cache")
        frames = int(grid_sizes[0][0])
        q, k, v = self.attn.project(x)                                          # [B, l, H, D] each
        qkv = self._to_heads(torch.stack([q, k, v], dim=2), frames)             # [B, L, 3, H/N, D]
        out, info = self.attn.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], grid_sizes, freqs, kv_cache,
                                     current_start, sink_recache_after_switch)
        return self.attn.o(self._to_tokens(out, frames).flatten(2)), info

    def _all_to_all(self, send: torch.Tensor, what: str) -> torch.Tensor:
        recv = torch.empty_like(send)
        with comm_errors(f"sequence parallelism: the all-to-all of {what}"):
            dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def _to_heads(self, t: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, l, 3, H, D] local tokens, all heads -> [B, L, 3, H/N, D] all tokens in order, this rank's heads."""
        n = self.world
        send = t.unflatten(-2, (n, t.shape[-2] // n)).movedim(-3, 0).contiguous()      # chunk j: heads of rank j
        recv = self._all_to_all(send, "q, k, v")                                          # chunk i: rank i's tokens
        # Rank i's tokens are rows [i*S/N, (i+1)*S/N) of every frame: interleave them back per frame.
        recv = recv.unflatten(2, (frames, recv.shape[2] // frames))                      # [N, B, F, S/N, 3, h, D]
        return recv.movedim(0, 2).flatten(1, 3)

    def _to_tokens(self, out: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, L, H/N, D] all tokens, this rank's heads -> [B, l, H, D] local tokens, all heads."""
        n = self.world
        b, length, h, d = out.shape
        send = out.unflatten(1, (frames, n, length // (frames * n))).movedim(2, 0).contiguous()  # chunk i: rank i's rows
        recv = self._all_to_all(send, "the attention output")                           # chunk j: rank j's heads
        return recv.permute(1, 2, 3, 0, 4, 5).reshape(b, length // n, n * h, d)


class SequenceParallelGenerator(nn.Module):
    """A LongLive generator whose forward runs sequence-parallel over a process group; called exactly
    as the generator is (so BlockPipeline drives it unchanged). Build it with `sequence_parallel`."""

    def __init__(self, generator: nn.Module, group, check_inputs: bool):
        super().__init__()
        self.generator = generator
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.check_inputs = check_inputs
        # What BlockPipeline reads from the model it drives.
        self.num_layers, self.num_heads, self.dim = generator.num_layers, generator.num_heads, generator.dim
        self.text_len, self.patch_size, self.sink_size = generator.text_len, generator.patch_size, generator.sink_size
        self.kv_cache_heads = generator.num_heads // self.world

    @property
    def patch_embedding(self) -> nn.Module:
        # BlockPipeline checks the noise against it (channels, dtype, device).
        return self.generator.patch_embedding

    @property
    def text_embedding(self) -> nn.Module:
        # BlockPipeline checks the prompt embeddings' width against it.
        return self.generator.text_embedding

    @property
    def local_attn_size(self) -> int:
        return self.generator.local_attn_size

    @local_attn_size.setter
    def local_attn_size(self, frames: int) -> None:
        # BlockPipeline writes the window on the model it drives, as LongLive's pipeline does.
        self.generator.local_attn_size = frames

    def extra_repr(self) -> str:
        return f"rank {self.rank} of {self.world}, {self.kv_cache_heads} KV heads per rank"

    def forward(self, x, t, context, seq_len=None, clip_fea=None, y=None, kv_cache=None, crossattn_cache=None,
                current_start: int = 0, cache_start=None, sink_recache_after_switch: bool = False):
        g = self.generator
        if kv_cache is None:
            raise NotImplementedError("sequence parallelism serves LongLive's KV-cached inference path; pass kv_cache")
        if clip_fea is not None or y is not None:
            raise NotImplementedError("image conditioning (i2v) is not part of LongLive's t2v generator")
        self._check_caches(kv_cache)
        if self.check_inputs:
            self._check_same_inputs(x, t, context, current_start)
        tokens, e, e0, context, grid_sizes, seq_lens = g.embed(x, t, context, seq_len)
        frames, s = int(grid_sizes[0][0]), int(grid_sizes[0][1] * grid_sizes[0][2])
        check_sp_shapes(self.num_heads, s, self.world)
        # This rank's rows of every frame (module docstring).
        local = tokens.unflatten(1, (frames, self.world, s // self.world))[:, :, self.rank].flatten(1, 2).contiguous()
        local = g.run_blocks(local, e0, grid_sizes, seq_lens, context, kv_cache, crossattn_cache, current_start,
                             cache_start, sink_recache_after_switch)
        head = g.head(local, e.unflatten(dim=0, sizes=t.shape).unsqueeze(2)).contiguous()   # [B, F, S/N, P]
        shards = [torch.empty_like(head) for _ in range(self.world)]
        with comm_errors("sequence parallelism: the all-gather of the head's output"):
            dist.all_gather(shards, head, group=self.group)
        return torch.stack(g.unpatchify(torch.cat(shards, dim=2), grid_sizes))

    def _check_caches(self, kv_cache) -> None:
        if len(kv_cache) != self.num_layers:
            raise ValueError(f"kv_cache has {len(kv_cache)} layers, the generator {self.num_layers}")
        heads = kv_cache[0]["k"].shape[2]
        if heads != self.kv_cache_heads:
            raise ValueError(f"the KV cache holds {heads} heads, but a rank of this {self.world}-way sequence-parallel "
                             f"generator keeps {self.kv_cache_heads} (H/N); BlockPipeline allocates them from "
                             "kv_cache_heads")

    def _check_same_inputs(self, x, t, context, current_start) -> None:
        """DistributedError unless every rank calls with the same inputs (module docstring)."""
        texts = [context] if isinstance(context, torch.Tensor) else list(context)
        xs = [x] if isinstance(x, torch.Tensor) else list(x)
        fingerprint = torch.stack([
            torch.tensor(float(sum(u.numel() for u in xs)), dtype=torch.float64, device=xs[0].device),
            sum(u.double().sum() for u in xs), sum(u.double().square().sum() for u in xs),
            t.double().sum(), sum(u.double().sum() for u in texts),
            torch.tensor(float(int(current_start)), dtype=torch.float64, device=xs[0].device),
        ])
        prints = [torch.empty_like(fingerprint) for _ in range(self.world)]
        with comm_errors("sequence parallelism: comparing the ranks' inputs"):
            dist.all_gather(prints, fingerprint, group=self.group)
        table = torch.stack(prints).cpu()
        names = ["the latents' size", "the latents", "the latents", "the timesteps", "the prompt embeddings",
                 "current_start"]
        for r in range(1, self.world):
            differ = sorted({names[i] for i in range(len(names)) if table[r, i] != table[0, i]})
            if differ:
                raise DistributedError(f"sequence parallelism: rank {r} called the generator with other inputs than "
                                       f"rank 0 ({', '.join(differ)} differ): every rank must run the same loop with the "
                                       "same noise, prompts and seeds (torch.manual_seed before generating)")


def _refusal(generator: nn.Module) -> str | None:
    """Why this generator cannot run sequence-parallel, or None."""
    if not all(callable(getattr(generator, name, None)) for name in ("embed", "run_blocks")):
        return (f"{type(generator).__name__} is not our reference generator (no embed/run_blocks): load the "
                "LongLive weights into longlive_triton.models (longlive_triton.loading.checkpoints), patched or not")
    for index, block in enumerate(generator.blocks):
        attn = block.self_attn
        if isinstance(attn, UlyssesSelfAttention):
            return "this generator is already sequence-parallel"
        if not (callable(getattr(attn, "project", None)) and callable(getattr(attn, "attend", None))):
            return f"blocks.{index}.self_attn ({type(attn).__name__}) has no project/attend split"
        if getattr(attn, "kv_cache_dtype", "bf16") == "fp8":
            return "the fp8 KV cache fuses the q/k RMSNorm into its append: patch with kv_cache_dtype bf16"
        if isinstance(block.ffn, TokenMergedFFN):
            return "token merging picks its pairs across a whole latent frame: patch without token_merge_ratio"
    return None


def sequence_parallel(model: nn.Module, group=None, *, check_inputs: bool = True) -> SequenceParallelGenerator:
    """Make `model` (our reference generator, patched or not, or a wrapper holding one) run
    sequence-parallel over `group` (default: the whole world); returns the model to drive.

    The generator's self-attention layers are wrapped in place, so run the one-GPU model before
    this call if you want both. Every rank must call this with an equal model; the ranks compare
    the model's shapes and window and fail together (DistributedError) if they differ.
    """
    if not dist.is_initialized():
        raise DistributedError("sequence_parallel needs a process group: call init_distributed() first (under torchrun)")
    generator = find_generator(model)
    world = dist.get_world_size(group)
    why = _refusal(generator)
    if why is not None:
        raise ValueError(f"sequence_parallel: {why}")
    check_sp_shapes(generator.num_heads, None, world)  # the frame's tokens are checked per call
    agree("sequence_parallel: the generator's shape", {
        "layers": generator.num_layers, "dim": generator.dim, "heads": generator.num_heads,
        "ffn": generator.ffn_dim, "window": generator.local_attn_size, "sink": generator.sink_size,
        "dtype": str(generator.patch_embedding.weight.dtype),
        "patched": getattr(getattr(generator, "_longlive_triton_patch", None), "name", None)}, group)
    for block in generator.blocks:
        block.self_attn = UlyssesSelfAttention(block.self_attn, group, world)
    return SequenceParallelGenerator(generator, group, check_inputs)
