"""The block-step streaming loop of LongLive inference, prompt embeddings in, latents out.

Per block of `num_frame_per_block` latent frames: the denoising steps (flow prediction -> x0, then
re-noise to the next step), then one cache pass at `context_noise` that rewrites the block's KV
slots with clean keys and values. Interactive prompt switches reset the cross-attention cache and
re-cache the KV window under the new prompt, as LongLive's interactive pipeline does.

The generator is called exactly as the stock `WanDiffusionWrapper` calls it, so this loop drives
our reference, the stock `CausalWanModel` (also peft-wrapped) and patched models alike. The random
draws happen in the stock order (the caller's noise, then three `randn_like` per block), so a
seeded run reproduces LongLive's latents.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from contextlib import nullcontext

from longlive_triton.runtime.graphs import graph_runner, install_graphs
from longlive_triton.patches.attention_window import sink_frames
from longlive_triton.patches.fused_block import cache_only_last_layer
from longlive_triton.runtime.scheduler import FlowMatchSchedule


@dataclass
class PipelineConfig:
    num_frame_per_block: int = 3
    denoising_steps: Sequence[int] = (1000, 750, 500, 250)
    warp_denoising_step: bool = True
    timestep_shift: float = 5.0
    context_noise: float = 0.0
    # Latent frames held in the KV cache, sink included; -1: the whole video. None: the model's own
    # `local_attn_size` (its constructor's, or the window patch_model set), as LongLive's pipeline
    # takes it from the model's arguments.
    local_attn_size: int | None = None
    global_sink: bool = True           # keep the first prompt's sink across prompt switches
    # The text context as Wan's list of B [L, text_dim] tensors instead of LongLive's one
    # [B, L, text_dim] tensor (the stock model takes both).
    context_as_list: bool = False
    frame_seqlen: int | None = None    # tokens per latent frame; None: from the latent size
    # CUDA graphs (longlive_triton/runtime/graphs.py): None keeps what patch_model set up, False runs this
    # pipeline eagerly, True installs the graph runner if patch_model did not (a patched CUDA model).
    cuda_graphs: bool | None = None
    # The cache passes (and the re-cache after a switch), whose output is discarded, stop the last
    # layer after its K/V append (patches/fused_block.py, cache_only_last_layer): the same latents,
    # less work. False runs them whole.
    cache_pass_append_only: bool = True

    def __post_init__(self):
        if self.num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be >= 1, got {self.num_frame_per_block}")
        if self.local_attn_size not in (None, -1) and self.local_attn_size < self.num_frame_per_block:
            raise ValueError(f"local_attn_size {self.local_attn_size} is smaller than one block "
                             f"({self.num_frame_per_block} frames)")


@dataclass
class Caches:
    """The stock cache protocol: one dict per transformer layer."""
    kv: list[dict] = field(default_factory=list)
    crossattn: list[dict] = field(default_factory=list)


def _inner_model(model: nn.Module) -> nn.Module:
    """The CausalWanModel itself, through a peft wrapper if there is one."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class BlockPipeline:
    """Streams latents block by block from prompt embeddings, as LongLive's inference loop does."""

    def __init__(self, model: nn.Module, config: PipelineConfig | None = None):
        self.model = model
        config = config or PipelineConfig()
        inner = _inner_model(model)
        for attr in ("num_layers", "num_heads", "dim", "text_len", "patch_size"):
            if not hasattr(inner, attr):
                raise TypeError(f"{type(inner).__name__} is not a LongLive CausalWanModel (no {attr!r})")
        if config.local_attn_size is None:
            config = replace(config, local_attn_size=inner.local_attn_size)
        window, sink = config.local_attn_size, sink_frames(inner)
        if window != -1 and window < sink + config.num_frame_per_block:
            raise ValueError(f"a window of {window} latent frames cannot hold the {sink}-frame sink and one "
                             f"{config.num_frame_per_block}-frame block")
        self.config = config
        self.num_layers = inner.num_layers
        self.num_heads = inner.num_heads
        self.head_dim = inner.dim // inner.num_heads
        # The heads this process keeps KV caches for: all of them, or a sequence-parallel rank's share
        # (longlive_triton/distributed/sequence_parallel.py). The text cache always holds every head.
        self.kv_heads = getattr(inner, "kv_cache_heads", inner.num_heads)
        self.text_len = inner.text_len
        self.patch_size = tuple(inner.patch_size)
        self.schedule = FlowMatchSchedule(self.config.timestep_shift)
        self.timesteps = self.schedule.denoising_timesteps(self.config.denoising_steps,
                                                            self.config.warp_denoising_step)
        self.caches = Caches()
        self.frame_seqlen = 0
        # Interactive pipelines write local_attn_size on the inner model before the loop.
        inner.local_attn_size = self.config.local_attn_size

    # -- caches ---------------------------------------------------------------------------------
    def init_caches(self, batch_size: int, num_frames: int, dtype: torch.dtype, device) -> Caches:
        """Zeroed KV caches (window or whole video) and cross-attention caches, stock layout.

        Caches of the same shape are reset in place rather than allocated again, so a new video
        reuses the previous one's buffers (and the CUDA graphs captured on their addresses)."""
        n, d = self.num_heads, self.head_dim
        frames = num_frames if self.config.local_attn_size == -1 else self.config.local_attn_size
        size = frames * self.frame_seqlen
        if self._caches_fit(batch_size, size, dtype, device):
            for cache in self.caches.kv:
                cache["k"].zero_()
                cache["v"].zero_()
                cache["global_end_index"].zero_()
                cache["local_end_index"].zero_()
                # Patched layers keep their ring state beside the stock entries: start it afresh.
                for extra in [key for key in cache if key not in ("k", "v", "global_end_index", "local_end_index")]:
                    if isinstance(cache[extra], torch.Tensor):
                        cache[extra].zero_()
                    else:
                        del cache[extra]
            self.reset_crossattn_cache()
            return self.caches

        def zeros(length: int, heads: int = n) -> torch.Tensor:
            return torch.zeros([batch_size, length, heads, d], dtype=dtype, device=device)

        self.caches = Caches(
            kv=[{"k": zeros(size, self.kv_heads), "v": zeros(size, self.kv_heads),
                 "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
                 "local_end_index": torch.tensor([0], dtype=torch.long, device=device)}
                for _ in range(self.num_layers)],
            crossattn=[{"k": zeros(self.text_len), "v": zeros(self.text_len), "is_init": False}
                       for _ in range(self.num_layers)],
        )
        return self.caches

    def _caches_fit(self, batch_size: int, size: int, dtype: torch.dtype, device) -> bool:
        if len(self.caches.kv) != self.num_layers or len(self.caches.crossattn) != self.num_layers:
            return False
        kv = (batch_size, size, self.kv_heads, self.head_dim)
        text = (batch_size, self.text_len, self.num_heads, self.head_dim)
        # A patched layer may keep its KV cache in e4m3 (kv_cache_dtype: fp8): same slots, reused as well.
        return all(cache[name].shape == shape and cache[name].dtype in (dtype, torch.float8_e4m3fn)
                   and cache[name].device == torch.device(device)
                   for caches, shape in ((self.caches.kv, kv), (self.caches.crossattn, text))
                   for cache in caches for name in ("k", "v"))

    def reset_crossattn_cache(self) -> None:
        for cache in self.caches.crossattn:
            cache["k"].zero_()
            cache["v"].zero_()
            cache["is_init"] = False

    def _set_attention_budget(self) -> None:
        """As the stock pipeline does: every module with a max_attention_size gets the window size
        in tokens, or LongLive's global default of 32760 tokens when local_attn_size is -1."""
        local = self.config.local_attn_size
        budget = 32760 if local == -1 else local * self.frame_seqlen
        for module in _inner_model(self.model).modules():
            if hasattr(module, "max_attention_size"):
                module.max_attention_size = budget

    # -- one generator call ---------------------------------------------------------------------
    def _seq_len(self) -> int:
        # The stock wrapper's bound on tokens per call; only asserted against.
        local = self.config.local_attn_size
        return self.frame_seqlen * local if local > 21 else 32760

    def _forward(self, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor, start_frame: int,
                 sink_recache_after_switch: bool = False) -> torch.Tensor:
        """One generator call, as the stock wrapper makes it: the flow prediction [B, F, C, H, W]."""
        kwargs = {}
        if sink_recache_after_switch:
            kwargs["sink_recache_after_switch"] = True
        context = list(prompt_embeds.unbind(0)) if self.config.context_as_list else prompt_embeds
        return self.model(
            x.permute(0, 2, 1, 3, 4), t=t, context=context, seq_len=self._seq_len(),
            kv_cache=self.caches.kv, crossattn_cache=self.caches.crossattn,
            current_start=start_frame * self.frame_seqlen, **kwargs,
        ).permute(0, 2, 1, 3, 4)

    def predict_x0(self, x: torch.Tensor, timestep: float | torch.Tensor, prompt_embeds: torch.Tensor,
                   start_frame: int, *, sink_recache_after_switch: bool = False) -> torch.Tensor:
        """One generator forward on x [B, F, C, H, W] at frames start_frame..: returns x0."""
        b, f = x.shape[:2]
        t = torch.full([b, f], float(timestep), dtype=torch.float32, device=x.device)
        flow = self._forward(x, t, prompt_embeds, start_frame, sink_recache_after_switch)
        return self.schedule.flow_to_x0(flow.flatten(0, 1), x.flatten(0, 1), t.flatten()).unflatten(0, (b, f))

    def _cache_call(self, x: torch.Tensor, prompt_embeds: torch.Tensor, start_frame: int,
                    sink_recache_after_switch: bool = False) -> None:
        """A generator call at context_noise for its KV writes only (its output is discarded, as
        LongLive discards it): with cache_pass_append_only the last layer stops after its append."""
        t = torch.full(x.shape[:2], float(self.config.context_noise), dtype=torch.float32, device=x.device)
        skip = cache_only_last_layer(_inner_model(self.model)) if self.config.cache_pass_append_only else nullcontext()
        with skip:
            self._forward(x, t, prompt_embeds, start_frame, sink_recache_after_switch)

    def denoise_block(self, noisy: torch.Tensor, prompt_embeds: torch.Tensor, start_frame: int) -> torch.Tensor:
        """The denoising steps of one block: returns the block's clean latents x0."""
        steps = self.timesteps
        for index, t in enumerate(steps):
            x0 = self.predict_x0(noisy, t, prompt_embeds, start_frame)
            if index < len(steps) - 1:
                flat = x0.flatten(0, 1)
                t_next = torch.full([flat.shape[0]], float(steps[index + 1]), dtype=torch.float32, device=flat.device)
                noisy = self.schedule.add_noise(flat, torch.randn_like(flat), t_next).unflatten(0, x0.shape[:2])
        return x0

    def cache_pass(self, x0: torch.Tensor, prompt_embeds: torch.Tensor, start_frame: int) -> None:
        """Re-run the block at context_noise so its cache slots hold clean keys and values."""
        self._cache_call(x0, prompt_embeds, start_frame)

    def recache_after_switch(self, output: torch.Tensor, start_frame: int, prompt_embeds: torch.Tensor) -> None:
        """A prompt switch at start_frame: reset the text cache and re-cache the window (stock rules)."""
        if not self.config.global_sink:
            for cache in self.caches.kv:  # the pointers are kept
                cache["k"].zero_()
                cache["v"].zero_()
        self.reset_crossattn_cache()
        if start_frame == 0:
            return
        local = self.config.local_attn_size
        count = start_frame if local == -1 else min(local, start_frame)
        first = start_frame - count
        self._cache_call(output[:, first:start_frame], prompt_embeds, first,
                         sink_recache_after_switch=not self.config.global_sink)
        self.reset_crossattn_cache()

    # -- the loop -------------------------------------------------------------------------------
    def _check_inputs(self, noise: torch.Tensor, prompts: list[torch.Tensor], switches: list[int]) -> None:
        if not isinstance(noise, torch.Tensor) or noise.dim() != 5:
            raise ValueError(f"noise must be [B, F, C, H, W], got shape {tuple(getattr(noise, 'shape', ()))}")
        b, f, c, h, w = noise.shape
        inner = _inner_model(self.model)
        param = inner.patch_embedding.weight
        if noise.device != param.device:
            raise ValueError(f"noise is on {noise.device}, but the generator is on {param.device}")
        if noise.dtype != param.dtype:
            raise TypeError(f"noise is {noise.dtype}, but the generator's weights are {param.dtype}")
        if c != inner.patch_embedding.in_channels:
            raise ValueError(f"noise has {c} latent channels, the generator takes {inner.patch_embedding.in_channels} "
                             "(noise is [B, F, C, H, W])")
        _, ph, pw = self.patch_size
        if h % ph or w % pw or h == 0 or w == 0:
            raise ValueError(f"latent height and width must be positive multiples of the patch size {ph}x{pw}, "
                             f"got {h}x{w}")
        if f % self.config.num_frame_per_block:
            raise ValueError(f"{f} latent frames is not a multiple of num_frame_per_block "
                             f"{self.config.num_frame_per_block}")
        if not bool(torch.isfinite(noise).all()):
            raise ValueError("noise holds NaN or infinite values")
        text_dim = inner.text_embedding[0].in_features
        for i, p in enumerate(prompts):
            if not isinstance(p, torch.Tensor) or p.dim() != 3 or p.shape[0] != b or p.shape[2] != text_dim:
                raise ValueError(f"prompt embeddings must be [B={b}, L, text_dim={text_dim}], got "
                                 f"{tuple(getattr(p, 'shape', ()))} (prompt {i})")
            if p.shape[1] > self.text_len:
                raise ValueError(f"prompt embeddings have {p.shape[1]} tokens, more than text_len {self.text_len}")
            if p.device != noise.device:
                raise ValueError(f"prompt embeddings on {p.device}, noise on {noise.device}")
            if p.dtype != param.dtype:
                raise TypeError(f"prompt embeddings are {p.dtype}, but the generator's weights are {param.dtype}")
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"prompt embeddings {i} hold NaN or infinite values")
        if len(switches) != len(prompts) - 1:
            raise ValueError(f"{len(prompts)} prompts need {len(prompts) - 1} switch frame indices, got {len(switches)}")
        if list(switches) != sorted(switches) or any(s < 0 for s in switches):
            raise ValueError(f"switch frame indices must be non-negative and increasing, got {list(switches)}")
        if switches and switches[-1] >= f:
            raise ValueError(f"switch frame index {switches[-1]} is past the last latent frame ({f} frames): that "
                             "prompt would never be used")

    def iter_blocks(self, noise: torch.Tensor, prompt_embeds: torch.Tensor | Sequence[torch.Tensor],
                    switch_frame_indices: Sequence[int] = (), *,
                    next_prompt: Callable[[int], torch.Tensor | None] | None = None,
                    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start_frame, x0 [B, F_block, C, H, W]) as each block is generated.

        `prompt_embeds` is one [B, L, text_dim] tensor, or one per segment with the frame indices
        at which each next segment starts (the switch happens at the first block starting at or
        after the index, as in LongLive). `next_prompt(start_frame)`, if given, is asked before
        every block without a scheduled switch: new embeddings switch to them there (the same
        re-cache), None keeps the current prompt. That is how a live session changes the prompt.
        """
        prompts = [prompt_embeds] if isinstance(prompt_embeds, torch.Tensor) else list(prompt_embeds)
        switches = list(switch_frame_indices)
        self._check_inputs(noise, prompts, switches)
        b, num_frames, _, h, w = noise.shape
        self.frame_seqlen = self.config.frame_seqlen or (h // self.patch_size[1]) * (w // self.patch_size[2])
        per_block = self.config.num_frame_per_block
        runner = self._graph_runner(b)
        self.init_caches(b, num_frames, noise.dtype, noise.device)
        self._set_attention_budget()
        output = torch.zeros_like(noise)
        segment = 0
        current = prompts[0]
        enabled = runner.enabled if runner is not None else None
        try:
            if runner is not None:
                runner.enabled = self.config.cuda_graphs is not False
            with torch.no_grad():
                for start in range(0, num_frames, per_block):
                    if segment < len(switches) and start >= switches[segment]:
                        segment += 1
                        current = prompts[segment]
                        self.recache_after_switch(output, start, current)
                    elif next_prompt is not None and (live := next_prompt(start)) is not None:
                        self._check_inputs(noise, [live], [])
                        current = live
                        self.recache_after_switch(output, start, current)
                    x0 = self.denoise_block(noise[:, start:start + per_block], current, start)
                    output[:, start:start + per_block] = x0
                    self.cache_pass(x0, current, start)
                    if runner is not None and runner.enabled:
                        runner.pipeline_shape = (b, per_block)
                    yield start, x0
        finally:
            if runner is not None:
                runner.enabled = enabled

    def _graph_runner(self, batch_size: int):
        """The model's CUDA-graph runner for this run (installed if config.cuda_graphs asks), after
        refusing a batch size or block length other than the one its graphs were captured for."""
        inner = _inner_model(self.model)
        runner = graph_runner(inner)
        if runner is None and self.config.cuda_graphs:
            runner = install_graphs(inner)  # a clear error if the model is not patched or not on CUDA
        if runner is None or self.config.cuda_graphs is False:
            return runner
        shape = (batch_size, self.config.num_frame_per_block)
        if runner.graphs and runner.pipeline_shape not in (None, shape):
            raise ValueError(f"this model's CUDA graphs were captured for batch {runner.pipeline_shape[0]} with "
                             f"{runner.pipeline_shape[1]} latent frames per block; got batch {shape[0]} with "
                             f"{shape[1]}: call graph_runner(model).release() first, or run with cuda_graphs=False")
        return runner

    def generate(self, noise: torch.Tensor, prompt_embeds: torch.Tensor | Sequence[torch.Tensor],
                 switch_frame_indices: Sequence[int] = (),
                 on_block: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """All latents [B, F, C, H, W] for noise [B, F, C, H, W]; on_block(start, x0) after each block."""
        output = torch.empty_like(noise)
        per_block = self.config.num_frame_per_block
        for start, x0 in self.iter_blocks(noise, prompt_embeds, switch_frame_indices):
            output[:, start:start + per_block] = x0
            if on_block is not None:
                on_block(start, x0)
        return output
