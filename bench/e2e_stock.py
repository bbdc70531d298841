"""`longlive-bench e2e --model stock`: the stock LongLive v1.0 `CausalWanModel` itself, unpatched and
patched per preset, driven block by block as LongLive's pipeline drives it, same weights and noise.

    longlive-bench e2e --model stock --configs exact fp8 window9 fastest --cache-frames 12 window
    longlive-bench e2e --model stock --configs exact fp8 fastest --blocks 100 --switch-every 25   # the soak
    longlive-bench e2e --model stock --configs fp8 --blocks 16 --switch-every 5 --warmup-shapes  # cold start

The stock source comes from `--stock-src` or $LONGLIVE_SRC (longlive_triton/stock/longlive1.py imports it).
What LongLive's pipeline does and this bench does too: its config's `local_attn_size` sizes the KV
cache, resets every module's attention budget and sets the re-cache length (`--cache-frames N`,
default the model's own, LongLive's 12; `window`: sized to each preset's window); the text context
is LongLive's [B, 512, 4096] tensor or Wan's list of [512, 4096] tensors (`--context`).

Per row and block: time (CUDA events), allocated memory after the block, and the drift of the
block's latents against the unpatched row; per row the CUDA-graph runner's counts over the steady
blocks (any eager call there but the text-cache refill of a prompt switch is a defect), and the
worst steady block. Rows of the same preset with a cache larger than its window and with one
sized to it are compared: the acceptance bar is the worst block within 5% of the window-sized median.
The cold-start table gives each row's first block and its switch blocks against the steady median
and against later switches; `--warmup-shapes` runs `longlive_triton.warmup` on each model before its
first block (its time is reported apart), which is how a run reaches steady speed from its first block.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from longlive_triton.models import build_model, get_preset
from longlive_triton.patch import patch_model
from longlive_triton.runtime.graphs import graph_runner
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.stock.longlive1 import build_stock_model, free_memory, load_stock_longlive

from .e2e_stock2 import check_arguments as check_stock2
from .measure import DTYPES, RowSettings, draw_inputs, drift_per_block, intervals_ms, time_mark
from .progress import announce, block_bar
from .results import environment, fmt, format_table, quantiles, save

# Eager calls a steady block may make: the prompt switch's re-cache and the call after it refill the text cache.
SWITCH_EAGER = "cross-attention cache being filled"


@dataclass(frozen=True)
class StockModel:
    """A stock model family as this bench drives it: its class's name, where its source came from, and
    `build(preset_model, *, device, dtype, state_dict, num_frame_per_block)`: the model holding our
    reference's weights (`state_dict`), unpatched."""

    title: str
    src: Path
    build: Callable[..., nn.Module]


def longlive1(stock_src: str | None) -> StockModel:
    """LongLive v1.0's CausalWanModel, imported from `stock_src` or $LONGLIVE_SRC."""
    stock = load_stock_longlive(stock_src)
    return StockModel("stock CausalWanModel", stock.src,
                      lambda preset_model, **kw: build_stock_model(stock, preset_model, **kw))


# --model NAME -> the function that loads the family's source (a second family is one more entry).
MODELS: dict[str, Callable[[str | None], StockModel]] = {"stock": longlive1}


def add_arguments(parser) -> None:
    """The e2e options of the stock-class bench (on the `e2e` subcommand's parser)."""
    parser.add_argument("--model", choices=["reference", *MODELS, "stock2"], default="reference",
                        help="reference: our generator (default); stock: LongLive v1.0's CausalWanModel itself, "
                             "from --stock-src or $LONGLIVE_SRC; stock2: LongLive 2.0's, driven by its own pipeline "
                             "(bench/e2e_stock2.py)")
    parser.add_argument("--stock-src", metavar="PATH",
                        help="LongLive v1.0 (--model stock) or 2.0 (--model stock2) checkout; default $LONGLIVE_SRC")
    parser.add_argument("--cut-block", type=int, metavar="N",
                        help="--model stock2: the block that starts with LongLive 2.0's scene-cut prefix (default: "
                             "the middle one)")
    parser.add_argument("--context", choices=["tensor", "list"], default="tensor",
                        help="--model stock: the text context as LongLive's [B, L, 4096] tensor (default) or Wan's "
                             "list of [L, 4096] tensors")
    parser.add_argument("--cache-frames", nargs="+", metavar="N|window",
                        help="--model stock: KV cache capacity in latent frames, as LongLive's config sets it "
                             "(default: the model's, 12), or `window` (sized to each preset's window); several "
                             "values give a row each")
    parser.add_argument("--switch-every", type=int, metavar="K",
                        help="--model stock: switch to another prompt every K blocks (the soak: --blocks 100 "
                             "--switch-every 25)")
    parser.add_argument("--warmup-shapes", action="store_true",
                        help="--model stock: run longlive_triton.warmup on each model before its first block "
                             "(compiles and tunes every shape of the run; timed apart)")


def _cache_values(args, fpb: int) -> list[int | str] | str:
    values = []
    for v in args.cache_frames or []:
        if v == "window":
            values.append(v)
        elif v.isdigit() and int(v) >= fpb:
            values.append(int(v))
        else:
            return f"--cache-frames takes latent frame counts >= one block ({fpb}) or `window`, got {v!r}"
    return values


def check_arguments(args) -> str | None:
    """What is wrong with the stock options, before anything is built (None: nothing)."""
    if args.model == "stock2":
        return check_stock2(args)
    if args.cut_block is not None:
        return "--cut-block needs --model stock2"
    stock_only = {"--stock-src": args.stock_src, "--cache-frames": args.cache_frames,
                  "--switch-every": args.switch_every, "--context list": args.context == "list" or None,
                  "--warmup-shapes": args.warmup_shapes or None}
    if args.model not in MODELS:
        given = [name for name, value in stock_only.items() if value]
        return f"{', '.join(given)} need --model {' or '.join(MODELS)}" if given else None
    if args.profile or args.switch_block is not None:
        return f"--model {args.model} takes --switch-every, not --profile or --switch-block"
    if args.switch_every is not None and args.switch_every < 1:
        return f"--switch-every must be >= 1, got {args.switch_every}"
    values = _cache_values(args, args.frames_per_block)
    return values if isinstance(values, str) else None


def _rows_to_run(configs, cache_values, model_window: int) -> list[tuple]:
    """(config or None, cache frames): the unpatched model at its own window, then each config at each
    cache size; `window` is the config's window, and a size twice for one config runs once."""
    rows, seen = [(None, model_window)], set()
    for config in configs:
        for value in cache_values or [model_window]:
            frames = (config.local_attn_size or model_window) if value == "window" else value
            if (config.name, frames) not in seen:
                seen.add((config.name, frames))
                rows.append((config, frames))
    return rows


def _block_loop(model, pipe_cfg, noise, prompts, switches, seed, steady: int, desc: str):
    """Run every block; returns (ms per block, allocated bytes after each block or None, latents,
    graph counts over blocks >= steady or None, KV cache slots)."""
    on_cuda = noise.device.type == "cuda"
    fpb = pipe_cfg.num_frame_per_block
    pipe = BlockPipeline(model, pipe_cfg)
    out = torch.empty_like(noise)
    torch.manual_seed(seed)
    runner = graph_runner(model)
    marks, memory, before = [], [], None

    def mark():
        return time_mark(on_cuda)

    count = noise.shape[1] // fpb
    with block_bar(count, desc) as bar:
        marks.append(mark())
        for index, (start, x0) in enumerate(pipe.iter_blocks(noise, prompts, switches)):
            out[:, start:start + fpb].copy_(x0)
            marks.append(mark())
            memory.append(torch.cuda.memory_allocated(noise.device) if on_cuda else None)
            if index + 1 == steady and runner is not None:
                before = (dict(runner.stats.eager_reasons), runner.stats.replays)
            bar.update()
    block_ms = intervals_ms(marks, on_cuda)
    graphs = None
    if runner is not None:
        reasons0, replays0 = before or ({}, 0)
        steady_reasons = {k: v - reasons0.get(k, 0) for k, v in runner.stats.eager_reasons.items()
                          if v - reasons0.get(k, 0)}
        graphs = {"total": dataclasses.asdict(runner.stats), "steady_eager_reasons": steady_reasons,
                  "steady_replays": runner.stats.replays - replays0,
                  "steady_eager_other": sum(v for k, v in steady_reasons.items() if k != SWITCH_EAGER)}
    return block_ms, (memory if on_cuda else None), out, graphs, pipe.caches.kv[0]["k"].shape[1]


def measure(stock: StockModel, settings: RowSettings, config, cache_frames: int, context_as_list: bool, weights,
            noise, prompts, switches, ref, warmup_shapes: bool = False):
    """One row: build the stock model from `weights`, patch it (config None: unpatched), warm it up if
    asked (longlive_triton.warmup, timed apart), run the blocks; statistics from block
    settings.warmup_blocks (the first with the cache full)."""
    fpb, steady = settings.frames_per_block, settings.warmup_blocks
    announce(f"building the {stock.title} ({settings.preset_model}) for {config.name if config else 'stock'}")
    model = stock.build(settings.preset_model, device=noise.device, dtype=noise.dtype, state_dict=weights,
                        num_frame_per_block=fpb)
    row = {"config": "stock" if config is None else config.name, "cache_frames": cache_frames}
    if config is not None:
        report = patch_model(model, config)
        print(report)
        row["patch"] = {"applied": len(report.applied), "skipped": len(report.skipped), "notes": report.notes}
    if warmup_shapes:
        from longlive_triton.runtime.warmup import warmup
        preset = get_preset(settings.preset_model)
        done = warmup(model, latent_hw=(preset.latent_height, preset.latent_width), num_frame_per_block=fpb,
                      local_attn_size=cache_frames)
        print(done)
        row["warmup_s"] = done.seconds
    if noise.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    pipe_cfg = PipelineConfig(num_frame_per_block=fpb, local_attn_size=cache_frames, context_as_list=context_as_list)
    block_ms, memory, out, graphs, slots = _block_loop(model, pipe_cfg, noise, prompts, switches, settings.seed, steady,
                                                       f"{row['config']}, cache {cache_frames}")
    row["window_frames"] = _window_frames(model)
    del model
    free_memory(noise.device)
    steady_blocks = [i for i in range(steady, len(block_ms)) if i * fpb not in switches]
    timed = [block_ms[i] for i in steady_blocks] or block_ms
    median, p20, p80 = quantiles(timed)
    worst = max(steady_blocks or range(len(block_ms)), key=lambda i: block_ms[i])
    row.update(status="ok", kv_cache_slots=slots, block_ms=block_ms, median_ms=median, p20_ms=p20, p80_ms=p80,
               worst_block=worst, worst_ms=block_ms[worst], switch_block_ms={i: block_ms[i] for i in range(len(block_ms))
                                                                             if i * fpb in switches},
               mem_allocated=memory, graphs=graphs,
               drift_rel_l2=None if ref is None else drift_per_block(out, ref, fpb)["rel_l2"])
    return row, out


def _window_frames(model) -> int | None:
    """The window the patched layers read (their cap), else None (the pipeline's)."""
    caps = {getattr(b.self_attn, "window_frames", None) for b in model.blocks}
    return caps.pop() if len(caps) == 1 else None


def compare_to_window(rows: list[dict]) -> list[list[str]]:
    """Each preset's rows with a cache larger than its window against its row with the cache sized to it."""
    body = []
    for r in rows:
        window = r.get("window_frames")
        base = next((b for b in rows if b["config"] == r["config"] and b.get("status") == "ok"
                     and b["cache_frames"] == window), None)
        if r.get("status") != "ok" or base is None or base is r:
            continue
        body.append([r["config"], str(r["cache_frames"]), str(window), fmt(base["median_ms"], ".1f"),
                     fmt(r["median_ms"], ".1f"), f"{r['worst_ms']:.1f} (block {r['worst_block']})",
                     f"{100 * (r['worst_ms'] / base['median_ms'] - 1):+.1f}%"])
    return body


def cold_start(rows: list[dict]) -> list[list[str]]:
    """Per row: the first block and the switch blocks against the steady median and later switches."""
    body = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        first, median = r["block_ms"][0], r["median_ms"]
        switches = [ms for _, ms in sorted(r["switch_block_ms"].items(), key=lambda kv: int(kv[0]))]
        later = sorted(switches[1:])
        later_median = later[len(later) // 2] if later else None
        body.append([r["config"], "-" if r.get("warmup_s") is None else f"{r['warmup_s']:.1f}", f"{first:.1f}",
                     f"{first / median:.2f}x", " / ".join(f"{ms:.1f}" for ms in switches) or "-",
                     "-" if later_median is None else f"{switches[0] / later_median:.2f}x"])
    return body


def _summary(title: str, rows: list[dict], on_cuda: bool, blocks: int) -> str:
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["config"], str(r.get("cache_frames", "-")), "FAILED", r["error"]] + [""] * 6)
            continue
        mem = r["mem_allocated"]
        drift = r["drift_rel_l2"]
        at = min(20, len(r["block_ms"]) - 1)
        graphs = r["graphs"]
        body.append([r["config"], str(r["cache_frames"]), fmt(r["median_ms"], ".1f"),
                     f"{r['worst_ms']:.1f} (block {r['worst_block']})",
                     "-" if graphs is None else str(graphs["steady_eager_other"]),
                     "-" if drift is None else f"{drift[at]:.2e}", "-" if drift is None else f"{drift[-1]:.2e}",
                     "-" if mem is None else f"{mem[at] / 2**30:.3f}", "-" if mem is None else f"{mem[-1] / 2**30:.3f}",
                     "-" if not r["switch_block_ms"] else fmt(max(r["switch_block_ms"].values()), ".1f")])
    last = blocks - 1
    headers = ["config", "cache", "ms/block", "worst steady block ms", "eager steady calls",
               f"drift block {min(20, last)}", f"drift block {last}", f"GiB block {min(20, last)}",
               f"GiB block {last}", "switch block ms"]
    title += ", per block (steady blocks: after the cache fills, prompt switches apart)"
    if not on_cuda:
        title += "; CPU times are no speed figures"
    return format_table(title, headers, body, labels=2)


def run(args, configs, device) -> int:
    """The bench (module docstring); arguments checked by check_arguments already. Returns the exit code."""
    try:
        stock = MODELS[args.model](args.stock_src)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"e2e: --model {args.model}: {e}", file=sys.stderr)
        return 2
    preset = get_preset(args.preset_model)
    fpb, dtype = args.frames_per_block, DTYPES[args.dtype]
    cache_values = _cache_values(args, fpb)
    plan = _rows_to_run(configs, cache_values, preset.local_attn_size)
    steady = max(math.ceil(frames / fpb) for _, frames in plan) if args.warmup_blocks is None else args.warmup_blocks
    if args.blocks <= steady:
        print(f"e2e: --blocks {args.blocks} leaves no steady block (the cache is full from block {steady})",
              file=sys.stderr)
        return 2
    every = args.switch_every
    switches = [k * fpb for k in range(every, args.blocks, every)] if every else []
    print(f"e2e: {stock.title} from {stock.src}, {args.preset_model} on {device} in {args.dtype}, "
          f"{args.blocks} blocks of {fpb} latent frames, context as a {args.context}, steady from block {steady}, "
          f"prompt switches at blocks {[s // fpb for s in switches]}")

    announce(f"drawing the {args.preset_model} weights")
    weights = {k: v.to("cpu") for k, v in build_model(args.preset_model, dtype=dtype, device=device,
                                                       seed=args.seed).state_dict().items()}
    noise, prompts = draw_inputs(args.preset_model, blocks=args.blocks, frames_per_block=fpb, dtype=dtype,
                                 seed=args.seed, device=device, prompts=2)
    segments = [prompts[i % 2] for i in range(len(switches) + 1)]

    row_settings = RowSettings(preset_model=args.preset_model, seed=args.seed, frames_per_block=fpb,
                               warmup_blocks=steady)
    rows, ref = [], None
    for config, frames in plan:
        try:
            row, out = measure(stock, row_settings, config, frames, args.context == "list", weights, noise, segments,
                               switches, ref, warmup_shapes=args.warmup_shapes)
        except Exception as e:  # noqa: BLE001 - a broken config is a row of the table, the others still run
            if config is None:
                raise
            rows.append({"config": config.name, "cache_frames": frames, "status": "failed",
                         "error": f"{type(e).__name__}: {e}"})
            continue
        if config is None:
            ref = out
            row["drift_rel_l2"] = [0.0] * (args.blocks)
        rows.append(row)
    on_cuda = device.type == "cuda"
    print(_summary(stock.title, rows, on_cuda, args.blocks))
    print(format_table("cold start: first block and prompt switches (acceptance on a second process: first block "
                       "<= 2x steady, first switch <= 1.3x the later ones)",
                       ["config", "warm-up s", "first block ms", "first / steady", "switch blocks ms, in order",
                        "first switch / later median"], cold_start(rows), labels=1))
    comparison = compare_to_window(rows)
    if comparison:
        print(format_table("a cache larger than the window against one sized to it (acceptance: worst block "
                           "within +5% of the window-sized median)",
                           ["config", "cache", "window", "ms/block, cache = window", "ms/block", "worst block ms",
                            "worst vs window-sized median"], comparison, labels=3))
    settings = {"model": args.model, "stock_src": str(stock.src), "preset_model": args.preset_model, "device": str(device),
                "dtype": args.dtype, "blocks": args.blocks, "frames_per_block": fpb, "steady_start": steady,
                "context": args.context, "cache_frames": [str(v) for v in cache_values] or None,
                "warmup_shapes": args.warmup_shapes,
                "switch_blocks": [s // fpb for s in switches], "seed": args.seed, "configs": list(args.configs)}
    save({"kind": "e2e-stock", "env": environment(), "settings": settings, "rows": rows}, args.json, args.append)
    failed = any(r["status"] != "ok" for r in rows)
    graph_defect = any(r.get("graphs") and r["graphs"]["steady_eager_other"] for r in rows)
    if graph_defect:
        print("e2e: a patched row ran eagerly in steady state (see 'eager steady calls')", file=sys.stderr)
    return 1 if failed or graph_defect else 0
