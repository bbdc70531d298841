"""`longlive-bench e2e`: the stock reference against patched models, block by block, same weights and noise.

Each row builds the reference generator from the same seed (one model alive at a time, so every row's
peak memory counts one set of weights), optionally patches it, streams N blocks through BlockPipeline
and times each block. Statistics cover the steady state only: the blocks from the one where the KV
window is full, so every block attends to the same number of tokens.
"""
from __future__ import annotations

import math
import sys
import time

import torch

from longlive_triton.config import load_preset
from longlive_triton.patch import patch_model
from longlive_triton.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.reference import build_model, get_preset

from .results import environment, fmt, format_table, quantiles, save

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Wan's causal VAE turns each latent frame into 4 video frames once past the first block.
VIDEO_FRAMES_PER_LATENT = 4


def steady_start(local_attn_size: int, frames_per_block: int) -> int:
    """The first block index at which the KV window is full."""
    return math.ceil(local_attn_size / frames_per_block)


def run_blocks(model, pipe_cfg: PipelineConfig, noise: torch.Tensor, prompt: torch.Tensor,
               seed: int) -> tuple[list[float], torch.Tensor]:
    """Stream every block; returns the ms per block and all latents [B, F, C, H, W] on noise's device."""
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
    marks = [mark()]
    for start, x0 in pipe.iter_blocks(noise, prompt):
        out[:, start:start + fpb].copy_(x0)  # a copy: a captured graph may hand back a reused buffer
        marks.append(mark())
    if on_cuda:
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])], out
    return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])], out


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, cosine similarity) of all latents against the stock reference's."""
    a, b = out.double().flatten(), ref.double().flatten()
    rel = ((a - b).norm() / b.norm()).item()
    cos = (a @ b / (a.norm() * b.norm())).item()
    return rel, cos


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


def measure_row(args, config, pipe_cfg, noise, prompt) -> tuple[dict, torch.Tensor]:
    """Build (and patch, if config is given) a model, run it, and return its timing row and latents."""
    device = noise.device
    model = build_model(args.preset_model, dtype=noise.dtype, device=device, seed=args.seed)
    row = {"config": "stock" if config is None else config.name}
    if config is not None:
        report = patch_model(model, config)
        print(report)
        row["patch"] = {"applied": len(report.applied), "skipped": len(report.skipped),
                        "counts": report.counts(), "notes": report.notes}
    if device.type == "cuda":
        # Reset after building and patching: transients there (fp32 init, LoRA merge, quantization) are one-off.
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    block_ms, latents = run_blocks(model, pipe_cfg, noise, prompt, args.seed)
    row["local_attn_size"] = model.local_attn_size       # the window the row's pipeline used
    row["peak_mem_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    del model
    median, p20, p80 = quantiles(block_ms[args.warmup_blocks:])
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
        body.append([r["config"], fmt(r["median_ms"], ".1f"), f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}",
                     fmt(r["ms_per_video_frame"], ".2f"), fmt(r["fps"], ".1f"), fmt(mem, ".2f"),
                     fmt(r["rel_l2"], ".2e"), fmt(r["cosine"], ".6f"), f"{r['speedup']:.2f}x"])
    headers = ["config", "ms/block", "p20-p80", "ms/frame", "FPS", "peak GiB", "rel L2", "cosine", "speed-up"]
    return "\n".join([format_table("end to end, steady state (medians over blocks)", headers, body)] + errors)


def run(args) -> int:
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    if args.preset_model is None:
        args.preset_model = "longlive-1.3b" if on_cuda else "tiny"
        print(f"e2e: model preset {args.preset_model} (the default on a machine with{'' if on_cuda else ' no'} GPU)")
    try:
        configs = [load_preset(name) for name in args.configs]  # a bad name fails before any model is built
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"e2e: {e}", file=sys.stderr)
        return 2
    preset = get_preset(args.preset_model)
    fpb = args.frames_per_block
    # No window here: each row's pipeline takes its model's (a preset such as window9 sets its own).
    pipe_cfg = PipelineConfig(num_frame_per_block=fpb)
    steady = steady_start(preset.local_attn_size, fpb)
    if args.warmup_blocks is None:
        args.warmup_blocks = steady
    if args.blocks <= args.warmup_blocks:
        print(f"e2e: --blocks {args.blocks} leaves no timed block after {args.warmup_blocks} warm-up blocks "
              f"(the window is full from block {steady})", file=sys.stderr)
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
    prompt = torch.randn([1, preset.text_len, preset.text_dim], generator=gen, device=device).to(dtype)

    stock, ref = measure_row(args, None, pipe_cfg, noise, prompt)
    stock.update(rel_l2=0.0, cosine=1.0, speedup=1.0)
    rows = [stock]
    latents_by_config = {"stock": ref}
    for config in configs:
        try:
            row, latents = measure_row(args, config, pipe_cfg, noise, prompt)
        except Exception as e:  # noqa: BLE001 - a broken config is a row of the table, the others still run
            rows.append({"config": config.name, "status": "failed", "error": f"{type(e).__name__}: {e}"})
            continue
        row["rel_l2"], row["cosine"] = compare(latents, ref)
        row["speedup"] = stock["median_ms"] / row["median_ms"]
        rows.append(row)
        latents_by_config[config.name] = latents
    drift = add_drift(rows, latents_by_config, fpb)
    print(table(rows))
    print(drift)

    settings = {"preset_model": args.preset_model, "device": str(device), "dtype": args.dtype, "blocks": args.blocks,
                "warmup_blocks": args.warmup_blocks, "steady_start": steady, "frames_per_block": fpb,
                "video_frames_per_block": VIDEO_FRAMES_PER_LATENT * fpb, "local_attn_size": preset.local_attn_size,
                "seed": args.seed, "configs": list(args.configs)}
    save({"kind": "e2e", "env": environment(), "settings": settings, "rows": rows}, args.json, args.append)
    return 1 if any(r["status"] != "ok" for r in rows) else 0
