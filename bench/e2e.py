"""`longlive-bench e2e`: the stock reference against patched models, block by block, same weights and noise.

Each row builds the reference generator from the same seed (one model alive at a time, so every row's
peak memory counts one set of weights), optionally patches it, streams N blocks through BlockPipeline
and times each block. Statistics cover the steady state only: the blocks from the one where the KV
window is full, so every block attends to the same number of tokens.
"""
from __future__ import annotations

import torch

from longlive_triton.config import PatchConfig
from longlive_triton.models import get_preset
from longlive_triton.runtime.pipeline import PipelineConfig

from .measure import (DTYPES, VIDEO_FRAMES_PER_LATENT, RowSettings, compare, configs_from_specs, draw_inputs,
                      drift_per_block, measure_row, steady_start)
from .results import environment, fmt, format_table, save


class UsageError(ValueError):
    """A command line the run cannot start from; `longlive-bench` prints it and exits with 2."""


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


def row_configs(args, on_cuda: bool) -> list[PatchConfig]:
    """After the argument checks, for every `--model`: the default model preset, and the rows' configs
    (a bad name fails here, before any model is built). Raises UsageError."""
    if args.preset_model is None:
        args.preset_model = "longlive-1.3b" if on_cuda else "tiny"
        print(f"e2e: model preset {args.preset_model} (the default on a machine with{'' if on_cuda else ' no'} GPU)")
    try:
        return configs_from_specs(args.configs)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise UsageError(str(e)) from None


def reference_inputs(args, device: torch.device) -> tuple:
    """The reference generator's block plan (warm-up blocks, checks) and its seeded inputs, shared by
    this run and the --vae run: (device, dtype, noise, prompts). Raises UsageError."""
    preset = get_preset(args.preset_model)
    fpb = args.frames_per_block
    steady = steady_start(preset.local_attn_size, fpb)
    if args.warmup_blocks is None:
        args.warmup_blocks = steady
    problem = _check_blocks(args, steady)
    if problem is not None:
        raise UsageError(problem)
    if args.warmup_blocks < steady:
        print(f"e2e: note: blocks {args.warmup_blocks}..{steady - 1} are timed before the window is full "
              f"(block {steady}): not steady state")
    dtype = DTYPES[args.dtype]
    print(f"e2e: {args.preset_model} on {device} in {args.dtype}, {args.blocks} blocks of {fpb} latent frames "
          f"({VIDEO_FRAMES_PER_LATENT * fpb} video frames), statistics over blocks {args.warmup_blocks}.."
          f"{args.blocks - 1}, seed {args.seed}")
    noise, prompts = draw_inputs(args.preset_model, blocks=args.blocks, frames_per_block=fpb, dtype=dtype,
                                 seed=args.seed, device=device, prompts=1 if args.switch_block is None else 2)
    return device, dtype, noise, prompts


def run(args, configs: list[PatchConfig], inputs: tuple) -> int:
    """The stock row and one row per config, after row_configs() and reference_inputs()."""
    device, _, noise, prompts = inputs
    on_cuda = device.type == "cuda"
    preset = get_preset(args.preset_model)
    fpb = args.frames_per_block
    # No window here: each row's pipeline takes its model's (a preset such as window9 sets its own).
    pipe_cfg = PipelineConfig(num_frame_per_block=fpb)
    settings = RowSettings(preset_model=args.preset_model, seed=args.seed, frames_per_block=fpb,
                           warmup_blocks=args.warmup_blocks, switch_block=args.switch_block, profile=args.profile)
    stock, ref = measure_row(settings, None, pipe_cfg, noise, prompts)
    stock.update(rel_l2=0.0, cosine=1.0, speedup=1.0 if on_cuda else None)
    rows = [stock]
    latents_by_config = {"stock": ref}
    for config in configs:
        try:
            row, latents = measure_row(settings, config, pipe_cfg, noise, prompts)
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
                "warmup_blocks": args.warmup_blocks, "steady_start": steady_start(preset.local_attn_size, fpb),
                "frames_per_block": fpb, "video_frames_per_block": VIDEO_FRAMES_PER_LATENT * fpb,
                "local_attn_size": preset.local_attn_size, "seed": args.seed, "configs": list(args.configs),
                "profile": args.profile, "switch_block": args.switch_block}
    save({"kind": "e2e", "env": environment(), "settings": settings, "rows": rows}, args.json, args.append)
    return 1 if any(r["status"] != "ok" for r in rows) else 0
