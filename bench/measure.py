"""The measuring helpers every end-to-end command shares, with explicit parameters (no argparse here).

Config specs ("exact,cuda_graphs=false"), VAE option specs, the seeded inputs, the block loop and its
timing, one row of the reference generator (build, patch, run, statistics) and the latents' drift.
The commands (e2e.py, e2e_stock.py, e2e_vae.py, vae.py, multi_gpu.py) sit above this module;
it imports none of them.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import yaml

from longlive_triton.config import PatchConfig, load_preset
from longlive_triton.models import build_model, get_preset
from longlive_triton.numerics import cosine, rel_l2
from longlive_triton.patch import patch_model
from longlive_triton.runtime.graphs import graph_runner
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.vae_patch import VAEDecoderOptions

from .breakdown import format_breakdown, profile_block
from .progress import announce, block_bar
from .results import quantiles

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Wan's causal VAE turns each latent frame into 4 video frames once past the first block.
VIDEO_FRAMES_PER_LATENT = 4
# patch_vae with every option off: the patch as it was before the options.
VAE_ALL_OFF = dict(subpixel_upsample=False, fused_bias=False, frames_per_call=1, cuda_graphs=False,
                   cudnn_benchmark=False, triton_conv=False)


def config_from_spec(spec: str) -> PatchConfig:
    """A preset name or YAML path, optionally with overrides: "exact,cuda_graphs=false"."""
    name, *overrides = spec.split(",")
    config = load_preset(name)
    if not overrides:
        return config
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config override {item!r} in {spec!r} is not key=value")
        changes[key.strip()] = yaml.safe_load(value)
    # from_dict names unknown keys and lists the known ones; a tuning knob is a flat key like the others.
    return PatchConfig.from_dict({**config.to_dict(), **changes, "name": spec})


def configs_from_specs(specs: list[str]) -> list[PatchConfig]:
    """The rows' configs; `none` (alone) is the stock row only."""
    if specs == ["none"]:
        return []
    return [config_from_spec(spec) for spec in specs]


def variant_options(spec: str) -> dict:
    """patch_vae options: 'defaults', 'all-off', or 'key=value,...' (YAML values) over VAEDecoderOptions' defaults."""
    if spec == "defaults":
        return {}
    if spec == "all-off":
        return dict(VAE_ALL_OFF)
    changes = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"VAE variant {spec!r}: {item!r} is not key=value")
        changes[key.strip()] = yaml.safe_load(value)
    VAEDecoderOptions(**changes)  # unknown keys and bad values fail here, before anything is built
    return changes


def steady_start(local_attn_size: int, frames_per_block: int) -> int:
    """The first block index at which the KV window is full."""
    return math.ceil(local_attn_size / frames_per_block)


def draw_inputs(preset_model: str, *, blocks: int, frames_per_block: int, dtype: torch.dtype, seed: int,
                device, prompts: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Seeded noise [1, blocks * frames_per_block, C, H, W] and `prompts` text embeddings [1, L, D] in
    `dtype`, drawn in that order from one generator: the same on every row, rank and command."""
    preset = get_preset(preset_model)
    gen = torch.Generator(device).manual_seed(seed)
    noise = torch.randn([1, blocks * frames_per_block, preset.in_dim, preset.latent_height, preset.latent_width],
                        generator=gen, device=device).to(dtype)
    texts = [torch.randn([1, preset.text_len, preset.text_dim], generator=gen, device=device).to(dtype)
             for _ in range(prompts)]
    return noise, texts


def time_mark(on_cuda: bool):
    """A point in time between blocks: a recorded CUDA event on a GPU, the host clock otherwise.

    Events instead of host clocks: no sync inside the loop, so the timing does not add one."""
    if not on_cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def intervals_ms(marks: list, on_cuda: bool) -> list[float]:
    """Milliseconds between consecutive `time_mark`s (on a GPU after a sync, so every event has fired)."""
    if on_cuda:
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]


def run_blocks(model, pipe_cfg: PipelineConfig, noise: torch.Tensor, prompts: list[torch.Tensor],
               switches: list[int], seed: int, profile: bool = False) -> tuple[list[float], torch.Tensor, dict | None]:
    """Stream every block; returns the ms per block, all latents [B, F, C, H, W] on noise's device and,
    with profile, the breakdown of the last two blocks (not timed): one eager with module annotations
    (the split by kind of work), one as configured (CUDA graphs included: its idle share)."""
    on_cuda = noise.device.type == "cuda"

    def mark():
        return time_mark(on_cuda)

    pipe = BlockPipeline(model, pipe_cfg)
    fpb = pipe_cfg.num_frame_per_block
    out = torch.empty_like(noise)
    torch.manual_seed(seed)  # the pipeline's re-noising draws: identical for every row
    blocks = pipe.iter_blocks(noise, prompts, switches)

    def one_block():
        start, x0 = next(blocks)
        out[:, start:start + fpb].copy_(x0)  # a copy: a captured graph may hand back a reused buffer

    count = noise.shape[1] // fpb
    marks = [mark()]
    with block_bar(count - 2 if profile else count, "blocks") as bar:
        for _ in range(count - 2 if profile else count):
            one_block()
            marks.append(mark())
            bar.update()
    profiles = None
    if profile:
        runner = graph_runner(model)
        enabled = runner is not None and runner.enabled
        if runner is not None:
            runner.enabled = False
        by_kind = profile_block(one_block, model)
        if runner is not None:
            runner.enabled = enabled
        profiles = {"eager_annotated": by_kind, "as_run": profile_block(one_block), "graphs": enabled}
    next(blocks, None)  # let the pipeline finish its loop
    return intervals_ms(marks, on_cuda), out, profiles


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, cosine similarity) of all latents against the stock reference's."""
    return rel_l2(out, ref), cosine(out, ref)


def drift_per_block(out: torch.Tensor, ref: torch.Tensor, frames_per_block: int) -> dict:
    """Relative L2 and cosine of each block's latents against the same block of `ref`, and of all."""
    blocks = [compare(out[:, i:i + frames_per_block], ref[:, i:i + frames_per_block])
              for i in range(0, out.shape[1], frames_per_block)]
    rel_all, cos_all = compare(out, ref)
    return {"rel_l2": [b[0] for b in blocks], "cosine": [b[1] for b in blocks], "rel_l2_all": rel_all,
            "cosine_all": cos_all}


@dataclass(frozen=True)
class RowSettings:
    """What every row of one run shares: the model preset, the seed and the block bookkeeping."""

    preset_model: str
    seed: int
    frames_per_block: int
    warmup_blocks: int               # blocks left out of the statistics
    switch_block: int | None = None  # the block that starts the second prompt (timed apart), or None
    profile: bool = False            # profile two extra blocks (CUDA only)


def measure_row(settings: RowSettings, config: PatchConfig | None, pipe_cfg: PipelineConfig, noise: torch.Tensor,
                prompts: list[torch.Tensor]) -> tuple[dict, torch.Tensor]:
    """Build (and patch, if config is given) the reference generator, run it, and return its timing row
    and latents."""
    device = noise.device
    announce(f"building the {settings.preset_model} reference generator on {device}")
    model = build_model(settings.preset_model, dtype=noise.dtype, device=device, seed=settings.seed)
    row = {"config": "stock" if config is None else config.name}
    if config is not None:
        report = patch_model(model, config)
        print(report)
        row["patch"] = {"applied": len(report.applied), "skipped": len(report.skipped),
                        "counts": report.counts(), "notes": report.notes,
                        "skip_reasons": sorted({e.reason for e in report.skipped})}
    if device.type == "cuda":
        # Reset after building and patching: transients there (fp32 init, LoRA merge, quantization) are one-off.
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    switch = settings.switch_block
    switches = [] if switch is None else [switch * settings.frames_per_block]
    block_ms, latents, profiles = run_blocks(model, pipe_cfg, noise, prompts, switches, settings.seed,
                                             profile=settings.profile)
    row["local_attn_size"] = model.local_attn_size       # the window the row's pipeline used
    row["peak_mem_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    runner = graph_runner(model)
    if runner is not None:
        row["graphs"] = dataclasses.asdict(runner.stats)
    if profiles is not None:
        row["breakdown"] = profiles
        print(format_breakdown(f"{row['config']}: one block eager, by kind", profiles["eager_annotated"]))
        print(format_breakdown(f"{row['config']}: one block as run (graphs {'on' if profiles['graphs'] else 'off'})",
                               profiles["as_run"]))
    del model
    timed = [ms for i, ms in enumerate(block_ms) if i >= settings.warmup_blocks and i != switch]
    median, p20, p80 = quantiles(timed)
    if switch is not None:
        # The block that starts the new prompt re-caches the window first (LongLive's rule).
        row.update(switch_block_ms=block_ms[switch], switch_extra_ms=block_ms[switch] - median)
        print(f"{row['config']}: the prompt-switch block took {block_ms[switch]:.1f} ms, "
              f"{block_ms[switch] - median:+.1f} ms over the steady median {median:.1f} ms")
    per_frame = median / (VIDEO_FRAMES_PER_LATENT * settings.frames_per_block)
    row.update(status="ok", block_ms=block_ms, median_ms=median, p20_ms=p20, p80_ms=p80,
               ms_per_video_frame=per_frame, fps=1e3 / per_frame)
    return row, latents
