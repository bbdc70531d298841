"""`longlive-bench e2e --devices N` and `longlive-bench vae --devices 2`: several GPUs under torchrun.

    torchrun --nproc-per-node 2 -m longlive_triton.bench e2e --devices 2 --configs exact
    torchrun --nproc-per-node 2 -m longlive_triton.bench vae --devices 2 --generator exact

e2e: per config, the one-GPU row on rank 0 (as configured, CUDA graphs included, and eager), then
the same weights, noise and draws sequence-parallel over the N ranks (longlive_triton.distributed:
eager, input check off); ms per block in steady state, the speed-up, and the SP latents' drift
against the one-GPU row.

vae: per generator config, on rank 0 the generator alone, then generation with the streaming decode
(patch_vae) on rank 1 -- the interval between consecutive blocks' frames arriving back on rank 0 --
and, for reference, generator and decode one after the other on rank 0's GPU. Rank 1 reports its
decode time per block and when its first frames were ready after the stream started.

Without GPUs both run on gloo with the tiny model (a smoke test of the code path, not a timing).
"""
from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from longlive_triton.distributed import close_distributed, init_distributed, iter_video_split, sequence_parallel, \
    serve_vae
from longlive_triton.patch import patch_model
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.models import build_model, get_preset
from longlive_triton.models.wan21_vae import build_vae_decoder
from longlive_triton.vae_patch import patch_vae
from longlive_triton.runtime.vae_stream import StreamingVAEDecoder
from longlive_triton.runtime.video import iter_video

from .measure import DTYPES, compare, config_from_spec, draw_inputs, run_blocks, steady_start
from .results import environment, fmt, format_table, quantiles, save


class _Clock:
    """Marks on the device's stream (CUDA events, no sync) or the host clock; ms between marks."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def _setup(args, devices: int):
    """(context, preset, dtype, noise, prompts), the same on every rank."""
    ctx = init_distributed(expected_world_size=devices)
    on_cuda = ctx.device.type == "cuda"
    name = getattr(args, "preset_model", None) or ("longlive-1.3b" if on_cuda else "tiny")
    dtype = DTYPES[args.dtype]
    noise, prompts = draw_inputs(name, blocks=args.blocks_total, frames_per_block=args.frames_per_block, dtype=dtype,
                                 seed=args.seed, device=ctx.device)
    return ctx, name, dtype, noise, prompts


def _model(name, dtype, device, seed, config):
    model = build_model(name, dtype=dtype, device=device, seed=seed)
    if config is not None:
        patch_model(model, config)
    return model


def _steady(block_ms: list[float], warmup: int) -> tuple[float, float, float]:
    return quantiles(block_ms[warmup:])


def run_e2e(args) -> int:
    args.blocks_total = args.blocks
    ctx, name, dtype, noise, prompts = _setup(args, args.devices)
    fpb = args.frames_per_block
    warmup = steady_start(get_preset(name).local_attn_size, fpb) if args.warmup_blocks is None else args.warmup_blocks
    if args.blocks <= warmup:
        raise SystemExit(f"e2e --devices: --blocks {args.blocks} leaves no timed block after {warmup} warm-up blocks")
    pipe_cfg = PipelineConfig(num_frame_per_block=fpb)
    specs = [None] + [config_from_spec(s) for s in args.configs]
    rows = []
    for config in specs:
        label = "stock" if config is None else config.name
        row = {"config": label}
        if ctx.rank == 0:  # one GPU: alone on rank 0, the other ranks wait
            variants = [(label, config)]
            if config is not None and config.cuda_graphs and ctx.device.type == "cuda":
                variants.append((f"{label},cuda_graphs=false", config_from_spec(f"{label},cuda_graphs=false")))
            for key, cfg in variants:
                model = _model(name, dtype, ctx.device, args.seed, cfg)
                ms, latents, _ = run_blocks(model, pipe_cfg, noise, prompts, [], args.seed)
                row["one_gpu" if key == label else "one_gpu_eager"] = _steady(ms, warmup)[0]
                if key == label:
                    row["one_gpu_block_ms"], one_latents = ms, latents
                del model
        dist.barrier()
        model = _model(name, dtype, ctx.device, args.seed, config)
        sp = sequence_parallel(model, check_inputs=False)
        ms, latents, _ = run_blocks(sp, pipe_cfg, noise, prompts, [], args.seed)
        del sp, model
        if ctx.rank == 0:
            row["sp"], row["sp_block_ms"] = _steady(ms, warmup)[0], ms
            row["speedup"] = row["one_gpu"] / row["sp"]
            row["speedup_vs_eager"] = row.get("one_gpu_eager", row["one_gpu"]) / row["sp"]
            row["rel_l2"], row["cosine"] = compare(latents, one_latents)
            rows.append(row)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    if ctx.rank == 0:
        body = [[r["config"], fmt(r["one_gpu"], ".1f"), fmt(r.get("one_gpu_eager"), ".1f"), fmt(r["sp"], ".1f"),
                 f"{r['speedup']:.2f}x", f"{r['speedup_vs_eager']:.2f}x", fmt(r["rel_l2"], ".2e"),
                 fmt(r["cosine"], ".6f")] for r in rows]
        headers = ["config", "1 GPU ms/block", "1 GPU eager", f"SP={ctx.world_size} ms/block", "speed-up",
                   "vs eager", "rel L2", "cosine"]
        print(format_table(f"sequence-parallel generation over {ctx.world_size} {ctx.device.type} ranks "
                           f"({name}, {args.dtype}, steady-state medians from block {warmup})", headers, body))
        settings = {"preset_model": name, "devices": ctx.world_size, "backend": ctx.backend, "dtype": args.dtype,
                    "blocks": args.blocks, "warmup_blocks": warmup, "frames_per_block": fpb, "seed": args.seed,
                    "configs": list(args.configs)}
        save({"kind": "e2e_sp", "env": environment(), "settings": settings, "rows": rows}, args.json, args.append)
    close_distributed()
    return 0


def _vae(ctx, name: str, dtype, seed: int):
    vae = build_vae_decoder("wan2.1" if name == "longlive-1.3b" else "tiny", dtype=dtype, device=ctx.device, seed=seed)
    if ctx.device.type == "cuda":
        patch_vae(vae)
    return vae


def _vae_alone(ctx, vae, latents: torch.Tensor, fpb: int, warmup: int) -> float:
    """The streaming decode by itself on this rank: steady-state ms per block of fpb latent frames."""
    stream, clock = StreamingVAEDecoder(vae), _Clock(ctx.device)
    param = vae.conv2.weight
    clock.mark()
    for start in range(0, latents.shape[1], fpb):
        stream.decode_block(latents[:, start:start + fpb].permute(0, 2, 1, 3, 4).to(param.device, param.dtype))
        clock.mark()
    return _steady(clock.intervals(), warmup)[0]


def _serve(ctx, vae) -> dict:
    """Rank 1's side of the split stream: when its first frames were ready, and how the stream ended."""
    first: list[float] = []
    started = time.perf_counter()

    def on_block(blk) -> None:
        if not first:
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            first.append((time.perf_counter() - started) * 1e3)

    result = serve_vae(vae, on_block=on_block)
    return {"blocks": result.blocks, "ended": result.ended, "first_frames_ms": first[0] if first else None}


def run_vae(args) -> int:
    args.blocks_total = args.generator_blocks
    args.preset_model = None
    ctx, name, dtype, noise, prompts = _setup(args, 2)
    fpb = args.frames_per_block
    warmup = steady_start(get_preset(name).local_attn_size, fpb)
    if args.generator_blocks <= warmup + 1:
        raise SystemExit(f"vae --devices 2: --generator-blocks {args.generator_blocks} leaves no timed interval "
                         f"after {warmup} warm-up blocks")
    pipe_cfg = PipelineConfig(num_frame_per_block=fpb)
    rows = []
    for spec in args.generator or ["exact"]:
        config = config_from_spec(spec)
        row = {"config": config.name}
        if ctx.rank == 0:
            # Alone on each GPU at once: the generator here, the decode on rank 1.
            model = _model(name, dtype, ctx.device, args.seed, config)
            ms, _, _ = run_blocks(model, pipe_cfg, noise, prompts, [], args.seed)
            row["generator_ms"] = _steady(ms, warmup)[0]
            # One GPU, one after the other: the baseline the split is for.
            row["sequential_ms"], sequential = _one_gpu_sequential(ctx, model, name, dtype, noise, prompts, args, warmup)
        else:
            vae = _vae(ctx, name, dtype, args.seed)
            row["vae_ms"] = _vae_alone(ctx, vae, noise, fpb, 2)
        dist.barrier()
        if ctx.rank == 0:
            clock, pixels = _Clock(ctx.device), []
            torch.manual_seed(args.seed)
            started = time.perf_counter()
            clock.mark()
            for blk in iter_video_split(BlockPipeline(model, pipe_cfg), noise, prompts):
                clock.mark()
                if not pixels:
                    if ctx.device.type == "cuda":
                        torch.cuda.synchronize()
                    row["first_frames_rank0_ms"] = (time.perf_counter() - started) * 1e3
                pixels.append(blk.pixels)
            intervals = clock.intervals()
            # Mark i+1 is block i's frames back on rank 0: interval i (i >= 1) is block i's after block i-1's.
            row["split_interval_ms"], row["split_intervals"] = _steady(intervals[1:], warmup)[0], intervals
            row["ratio_to_generator"] = row["split_interval_ms"] / row["generator_ms"]
            video = torch.cat(pixels, dim=2)
            row["pixels_rel_l2_vs_sequential"] = compare(video, sequential.to(video.device))[0]
            del model
        else:
            row["vae_rank"] = _serve(ctx, vae)
            del vae
        gathered = [None, None]
        dist.all_gather_object(gathered, row)
        if ctx.rank == 0:
            row.update(gathered[1])
            rows.append(row)
    if ctx.rank == 0:
        body = [[r["config"], fmt(r["generator_ms"], ".1f"), fmt(r["vae_ms"], ".1f"), fmt(r["split_interval_ms"], ".1f"),
                 f"{r['ratio_to_generator']:.3f}", fmt(r["sequential_ms"], ".1f"),
                 fmt(r["vae_rank"]["first_frames_ms"], ".0f"), fmt(r["first_frames_rank0_ms"], ".0f"),
                 fmt(r["pixels_rel_l2_vs_sequential"], ".1e")] for r in rows]
        headers = ["generator", "gen alone ms/block", "VAE alone (rank 1)", "split interval", "split/gen",
                   "1 GPU gen+VAE", "first frames rank 1 (ms)", "on rank 0 (ms)", "pixels rel L2"]
        print(format_table(f"VAE on rank 1, generator on rank 0 ({name}, {args.dtype}, steady-state medians)",
                           headers, body))
        settings = {"preset_model": name, "backend": ctx.backend, "dtype": args.dtype,
                    "blocks": args.generator_blocks, "warmup_blocks": warmup, "frames_per_block": fpb,
                    "seed": args.seed, "vae_patched": ctx.device.type == "cuda"}
        save({"kind": "vae_split", "env": environment(), "settings": settings, "rows": rows}, args.json, args.append)
    close_distributed()
    return 0


def _one_gpu_sequential(ctx, model, name, dtype, noise, prompts, args, warmup) -> tuple[float, torch.Tensor]:
    """Generator then decode, one block after the other, both on this rank's device (iter_video)."""
    vae = _vae(ctx, name, dtype, args.seed)
    clock, pixels = _Clock(ctx.device), []
    torch.manual_seed(args.seed)
    clock.mark()
    for blk in iter_video(BlockPipeline(model, PipelineConfig(num_frame_per_block=args.frames_per_block)), vae,
                          noise, prompts):
        clock.mark()
        pixels.append(blk.pixels)
    median = _steady(clock.intervals(), warmup)[0]
    del vae
    return median, torch.cat(pixels, dim=2)


def run(args) -> int:
    """The entry `longlive-bench` calls when --devices is above 1."""
    try:
        return run_vae(args) if args.command == "vae" else run_e2e(args)
    except Exception as e:  # noqa: BLE001 - one line on stderr, then the exit status
        print(f"{args.command} --devices {args.devices}: {type(e).__name__}: {e}", file=sys.stderr)
        raise
