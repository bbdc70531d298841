"""`longlive-bench e2e`: the stock reference against patched models, block by block, same weights and noise.

Each row builds the reference generator from the same seed (one model alive at a time, so every row's
peak memory counts one set of weights), optionally patches it, streams N blocks through BlockPipeline
and times each block. Statistics cover the steady state only: the blocks from the one where the KV
window is full, so every block attends to the same number of tokens.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time

import torch
import yaml

from longlive_triton.config import PatchConfig, load_preset
from longlive_triton.runtime.graphs import graph_runner
from longlive_triton.numerics import cosine, rel_l2
from longlive_triton.patch import patch_model
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.models import build_model, get_preset

from . import e2e_stock
from .breakdown import format_breakdown, profile_block
from .progress import announce, block_bar
from .results import environment, fmt, format_table, quantiles, save

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Wan's causal VAE turns each latent frame into 4 video frames once past the first block.
VIDEO_FRAMES_PER_LATENT = 4


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
    # from_dict names unknown keys and lists the known ones.
    return PatchConfig.from_dict({**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
                                  **changes, "name": spec})


def configs_from_specs(specs: list[str]) -> list[PatchConfig]:
    """The rows' configs; `none` (alone) is the stock row only."""
    if specs == ["none"]:
        return []
    return [config_from_spec(spec) for spec in specs]


def check_arguments(args, on_cuda: bool) -> str | None:
    """What is wrong with the command line before any model is built (None: nothing)."""
    if args.frames_per_block < 1:
        return f"--frames-per-block must be >= 1, got {args.frames_per_block}"
    if args.blocks < 1:
        return f"--blocks must be >= 1, got {args.blocks}"
    if args.warmup_blocks is not None and args.warmup_blocks < 0:
        return f"--warmup-blocks must be >= 0, got {args.warmup_blocks}"
    if args.profile and not on_cuda:
        return "--profile needs a CUDA GPU (it reads the GPU's kernel timeline)"
    return None


def speedup_note(row: dict, on_cuda: bool) -> str | None:
    """Why a row gets no speed-up figure (None: it gets one): never between identical models, and
    not from CPU timings (the patched rows run in Triton's interpreter there)."""
    if row["patch"]["applied"] == 0:
        reasons = sorted({r for r in row["patch"].get("skip_reasons", [])})
        return (f"{row['config']}: nothing was patched ({'; '.join(reasons) or 'no patch enabled'}): "
                "the row is the unpatched model again, so it has no speed-up")
    if not on_cuda:
        return (f"{row['config']}: on the CPU the patched layers run in Triton's interpreter: its time is no speed "
                "figure, so the row has no speed-up")
    return None


def steady_start(local_attn_size: int, frames_per_block: int) -> int:
    """The first block index at which the KV window is full."""
    return math.ceil(local_attn_size / frames_per_block)


def run_blocks(model, pipe_cfg: PipelineConfig, noise: torch.Tensor, prompts: list[torch.Tensor],
               switches: list[int], seed: int, profile: bool = False) -> tuple[list[float], torch.Tensor, dict | None]:
    """Stream every block; returns the ms per block, all latents [B, F, C, H, W] on noise's device and,
    with profile, the breakdown of the last two blocks (not timed): one eager with module annotations
    (the split by kind of work), one as configured (CUDA graphs included: its idle share)."""
    on_cuda = noise.device.type == "cuda"

    def mark():
        if not on_cuda:
            return time.perf_counter()
        # Events instead of host clocks: no sync inside the loop, so the timing does not add one.
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

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
    if on_cuda:
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])], out, profiles
    return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])], out, profiles


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


def add_drift(rows: list[dict], latents: dict[str, torch.Tensor], frames_per_block: int) -> str:
    """Per-block drift of every ok row against the stock row and, when it ran, the `exact` row (the
    speed/quality presets change the output on purpose: exact is what they are judged against).
    Adds `drift_vs_stock` / `drift_vs_exact` to the rows; returns the table to print."""
    body = []
    for r in rows:
        if r["status"] != "ok" or r["config"] not in latents:
            continue
        out = latents[r["config"]]
        for ref_name in ("stock", "exact"):
            if ref_name in latents:
                r[f"drift_vs_{ref_name}"] = drift_per_block(out, latents[ref_name], frames_per_block)
        d = r.get("drift_vs_exact")
        body.append([r["config"], str(r.get("local_attn_size", "-")),
                     fmt(d and d["rel_l2_all"], ".2e"), fmt(d and d["rel_l2"][-1], ".2e"),
                     fmt(d and max(d["rel_l2"]), ".2e"), fmt(d and d["cosine_all"], ".6f"),
                     fmt(d and min(d["cosine"]), ".6f")])
    headers = ["config", "window", "rel L2 all", "rel L2 last block", "rel L2 worst block", "cosine all",
               "cosine worst block"]
    return format_table("drift of the latents against the exact row, per block (JSON: drift_vs_exact)", headers, body)


def measure_row(args, config, pipe_cfg, noise, prompts) -> tuple[dict, torch.Tensor]:
    """Build (and patch, if config is given) a model, run it, and return its timing row and latents."""
    device = noise.device
    announce(f"building the {args.preset_model} reference generator on {device}")
    model = build_model(args.preset_model, dtype=noise.dtype, device=device, seed=args.seed)
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
    switches = [] if args.switch_block is None else [args.switch_block * args.frames_per_block]
    block_ms, latents, profiles = run_blocks(model, pipe_cfg, noise, prompts, switches, args.seed, profile=args.profile)
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
    timed = [ms for i, ms in enumerate(block_ms) if i >= args.warmup_blocks and i != args.switch_block]
    median, p20, p80 = quantiles(timed)
    if args.switch_block is not None:
        # The block that starts the new prompt re-caches the window first (LongLive's rule).
        row.update(switch_block_ms=block_ms[args.switch_block], switch_extra_ms=block_ms[args.switch_block] - median)
        print(f"{row['config']}: the prompt-switch block took {block_ms[args.switch_block]:.1f} ms, "
              f"{block_ms[args.switch_block] - median:+.1f} ms over the steady median {median:.1f} ms")
    per_frame = median / (VIDEO_FRAMES_PER_LATENT * args.frames_per_block)
    row.update(status="ok", block_ms=block_ms, median_ms=median, p20_ms=p20, p80_ms=p80,
               ms_per_video_frame=per_frame, fps=1e3 / per_frame)
    return row, latents


def table(rows: list[dict]) -> str:
    body, errors = [], []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["config"], "FAILED"] + [""] * 7)
            errors.append(f"  {r['config']}: {r['error']}")
            continue
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2 ** 30
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        body.append([r["config"], fmt(r["median_ms"], ".1f"), f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}",
                     fmt(r["ms_per_video_frame"], ".2f"), fmt(r["fps"], ".1f"), fmt(mem, ".2f"),
                     fmt(r["rel_l2"], ".2e"), fmt(r["cosine"], ".6f"), speedup])
    headers = ["config", "ms/block", "p20-p80", "ms/frame", "FPS", "peak GiB", "rel L2", "cosine", "speed-up"]
    return "\n".join([format_table("end to end, steady state (medians over blocks)", headers, body)] + errors)


def _check_blocks(args, steady: int) -> str | None:
    """What is wrong with the block counts (warm-up, switch, profiled blocks), or None."""
    profiled = 2 if args.profile else 0
    if args.switch_block is not None and not args.warmup_blocks <= args.switch_block < args.blocks - profiled - 1:
        return (f"--switch-block {args.switch_block} must be a timed block before the last one "
                f"({args.warmup_blocks}..{args.blocks - profiled - 2})")
    if args.blocks - profiled <= args.warmup_blocks:
        return (f"--blocks {args.blocks} leaves no timed block after {args.warmup_blocks} warm-up blocks "
                f"(the window is full from block {steady}){' and 2 profiled blocks' if profiled else ''}")
    return None


def run(args) -> int:
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    problem = check_arguments(args, on_cuda) or e2e_stock.check_arguments(args)
    if problem is not None:
        print(f"e2e: {problem}", file=sys.stderr)
        return 2
    if args.model == "stock2":  # LongLive 2.0's class and pipeline: bench/e2e_stock2.py
        from . import e2e_stock2
        try:
            configs = configs_from_specs(args.configs)
        except (ValueError, FileNotFoundError, TypeError) as e:
            print(f"e2e: {e}", file=sys.stderr)
            return 2
        return e2e_stock2.run(args, configs, device)
    if args.preset_model is None:
        args.preset_model = "longlive-1.3b" if on_cuda else "tiny"
        print(f"e2e: model preset {args.preset_model} (the default on a machine with{'' if on_cuda else ' no'} GPU)")
    try:
        configs = configs_from_specs(args.configs)  # a bad name fails before any model is built
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"e2e: {e}", file=sys.stderr)
        return 2
    if args.model == "stock":
        return e2e_stock.run(args, configs, device)
    preset = get_preset(args.preset_model)
    fpb = args.frames_per_block
    # No window here: each row's pipeline takes its model's (a preset such as window9 sets its own).
    pipe_cfg = PipelineConfig(num_frame_per_block=fpb)
    steady = steady_start(preset.local_attn_size, fpb)
    if args.warmup_blocks is None:
        args.warmup_blocks = steady
    problem = _check_blocks(args, steady)
    if problem is not None:
        print(f"e2e: {problem}", file=sys.stderr)
        return 2
    if args.warmup_blocks < steady:
        print(f"e2e: note: blocks {args.warmup_blocks}..{steady - 1} are timed before the window is full "
              f"(block {steady}): not steady state")
    dtype = DTYPES[args.dtype]
    print(f"e2e: {args.preset_model} on {device} in {args.dtype}, {args.blocks} blocks of {fpb} latent frames "
          f"({VIDEO_FRAMES_PER_LATENT * fpb} video frames), statistics over blocks {args.warmup_blocks}.."
          f"{args.blocks - 1}, seed {args.seed}")

    gen = torch.Generator(device).manual_seed(args.seed)
    noise = torch.randn([1, args.blocks * fpb, preset.in_dim, preset.latent_height, preset.latent_width],
                        generator=gen, device=device).to(dtype)
    prompts = [torch.randn([1, preset.text_len, preset.text_dim], generator=gen, device=device).to(dtype)
               for _ in range(1 if args.switch_block is None else 2)]

    if getattr(args, "vae", False):  # generator + VAE in one loop: bench/e2e_vae.py
        from . import e2e_vae
        return e2e_vae.run(args, configs, (device, dtype, noise, prompts))
    stock, ref = measure_row(args, None, pipe_cfg, noise, prompts)
    stock.update(rel_l2=0.0, cosine=1.0, speedup=1.0 if on_cuda else None)
    rows = [stock]
    latents_by_config = {"stock": ref}
    for config in configs:
        try:
            row, latents = measure_row(args, config, pipe_cfg, noise, prompts)
        except Exception as e:  # noqa: BLE001 - a broken config is a row of the table, the others still run
            rows.append({"config": config.name, "status": "failed", "error": f"{type(e).__name__}: {e}"})
            continue
        row["rel_l2"], row["cosine"] = compare(latents, ref)
        note = speedup_note(row, on_cuda)
        row["speedup"] = None if note else stock["median_ms"] / row["median_ms"]
        if note:
            row["speedup_note"] = note
        rows.append(row)
        latents_by_config[config.name] = latents
    drift = add_drift(rows, latents_by_config, fpb)
    print(table(rows))
    for row in rows:
        if row.get("speedup_note"):
            print(f"e2e: {row['speedup_note']}")
    print(drift)

    settings = {"preset_model": args.preset_model, "device": str(device), "dtype": args.dtype, "blocks": args.blocks,
                "warmup_blocks": args.warmup_blocks, "steady_start": steady, "frames_per_block": fpb,
                "video_frames_per_block": VIDEO_FRAMES_PER_LATENT * fpb, "local_attn_size": preset.local_attn_size,
                "seed": args.seed, "configs": list(args.configs), "profile": args.profile,
                "switch_block": args.switch_block}
    save({"kind": "e2e", "env": environment(), "settings": settings, "rows": rows}, args.json, args.append)
    return 1 if any(r["status"] != "ok" for r in rows) else 0
