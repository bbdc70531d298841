"""`longlive-bench vae`: streaming VAE decode of one block, stock reference vs patch_vae, same run.

Each provider decodes one long stream with the causal feature cache, one block of `frames_per_block`
latent frames (random, 16 x 60 x 104 for 480x832 by default) per call, exactly as LongLive's
`decode_to_pixel(use_cache=True)` would in the loop. The first blocks are warm-up (block 0 gives
4T-3 frames and allocates); the statistics are over the following steady-state blocks (4T frames
each), timed with CUDA events around each call, with no sync inside the loop. Weights are random
(seeded), bf16 by default; every provider holds the same weights.

Providers: `reference` (our decoder, bit-exact with the stock code: the baseline), the reference
with its Conv3d weights stored channels-last (the layout change alone, stock ops otherwise), `patched`
(`patch_vae` on it with the default options), one `patched, <options>` row per variant (--variants:
by default each option of VAEDecoderOptions switched the other way, then all of them off, which is
the patch as it was before the options) and, with --stock-src (or $LONGLIVE_SRC), the stock `WanVAE_`
itself before and after `patch_vae` (defaults, and all options off). rel L2 compares each provider's
last block with the reference's. The default warm-up (4 blocks) covers the calls a stream runs
eagerly before its CUDA graph replays (patches/vae_graphs.py).

With --generator CONFIG..., the generator's steady-state ms per block (bench/e2e.py's measurement, one
row per patch preset) is added to the patched VAE's, giving the total per block and per video frame.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from longlive_triton.models import get_preset
from longlive_triton.models.wan21_vae import build_vae_decoder
from longlive_triton.numerics import rel_l2
from longlive_triton.patches.vae_decoder import FastDecoder3d
from longlive_triton.runtime.pipeline import PipelineConfig
from longlive_triton.runtime.vae_stream import StreamingVAEDecoder
from longlive_triton.stock.vae import build_stock_vae, load_stock_vae, stock_cached_decode
from longlive_triton.vae_patch import VAEDecoderOptions, patch_vae

from .measure import DTYPES, VAE_ALL_OFF, RowSettings, config_from_spec, draw_inputs, measure_row, steady_start, \
    variant_options
from .results import environment, fmt, format_table, quantiles, save


def default_variants() -> list[str]:
    """Each option switched away from its default, then everything off."""
    flips = []
    for f in dataclasses.fields(VAEDecoderOptions):
        value = f.default
        flips.append(f"{f.name}={'false' if value else 'true'}" if isinstance(value, bool)
                     else f"{f.name}={1 if value > 1 else 3}")
    return flips + ["all-off"]


def _stream_stats(cache) -> dict | None:
    return FastDecoder3d.stream_stats(cache) if cache is not None else None


def time_stream(decode_block: Callable[[torch.Tensor], torch.Tensor], blocks: list[torch.Tensor],
                warmup: int) -> tuple[list[float], torch.Tensor]:
    """Decode `blocks` in order as one stream; ms of each block after the first `warmup`, and the last output."""
    for z in blocks[:warmup]:
        decode_block(z)
    marks, out = [], None
    for z in blocks[warmup:]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = decode_block(z)
        end.record()
        marks.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in marks], out


def profile_block(vae, z: torch.Tensor, rows: int) -> str:
    """The top GPU ops of one steady-state block (after two warm-up blocks), by total device time."""
    stream = StreamingVAEDecoder(vae)
    stream.decode_block(z)
    stream.decode_block(z)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        stream.decode_block(z)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def block_flops(vae, z: torch.Tensor) -> float:
    """FLOPs of one steady-state block (convolutions, GEMMs, attention), counted by torch on the reference."""
    stream = StreamingVAEDecoder(vae)
    stream.decode_block(z[:, :, :1])
    with FlopCounterMode(display=False) as counter:
        stream.decode_block(z)
    return float(counter.get_total_flops())


def _row(name: str, ms: list[float], out: torch.Tensor, ref_out: torch.Tensor | None, video_frames: int,
         flops: float, base_ms: float | None) -> dict:
    median, p20, p80 = quantiles(ms)
    rel = 0.0 if ref_out is None else rel_l2(out, ref_out)
    return {"provider": name, "block_ms": ms, "median_ms": median, "p20_ms": p20, "p80_ms": p80,
            "ms_per_video_frame": median / video_frames, "tflops": flops / median / 1e9,
            "peak_mem_bytes": torch.cuda.max_memory_allocated(), "rel_l2": rel,
            "speedup": 1.0 if base_ms is None else base_ms / median}


def measure_vae(*, latent_hw=(60, 104), frames_per_block: int = 3, blocks: int = 12, warmup: int = 4,
                dtype: torch.dtype = torch.bfloat16, seed: int = 0, stock_src: str | None = None,
                preset: str = "wan2.1", device="cuda", variants: list[str] | None = None) -> dict:
    """Time the streaming block decode per provider (module docstring); returns the settings and rows."""
    device = torch.device(device)
    h, w = latent_hw
    gen = torch.Generator(device).manual_seed(seed)
    zs = [torch.randn(1, 16, frames_per_block, h, w, generator=gen, device=device).to(dtype) for _ in range(blocks)]
    video_frames = 4 * frames_per_block
    reference = build_vae_decoder(preset, dtype=dtype, device=device, seed=seed)
    flops = block_flops(reference, zs[0])

    variants = default_variants() if variants is None else variants
    specs = {spec: variant_options(spec) for spec in variants}
    # A setup returns (decode one block, the stream's cache for its statistics or None).
    providers: list[tuple[str, Callable[[], tuple[Callable, object]]]] = []

    def ours(how: str, options: dict | None = None):
        def setup():
            vae = copy.deepcopy(reference)
            if how == "patched":
                print(patch_vae(vae, options))
            elif how == "channels_last":  # the layout alone, stock ops otherwise (the earlier 203 ms probe)
                for m in vae.modules():
                    if isinstance(m, torch.nn.Conv3d):
                        m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            stream = StreamingVAEDecoder(vae)
            return stream.decode_block, (lambda: stream.cache) if how == "patched" else None
        return setup

    providers += [("reference", ours("reference")), ("reference, channels-last weights", ours("channels_last")),
                  ("patched", ours("patched"))]
    providers += [(f"patched, {spec}", ours("patched", options)) for spec, options in specs.items() if spec != "defaults"]
    if stock_src:
        sv = load_stock_vae(stock_src)

        def stock(options: dict | None):
            def setup():
                model = build_stock_vae(sv, reference)
                if options is not None:
                    print(patch_vae(model, options))
                model.clear_cache()
                return (lambda z: stock_cached_decode(model, z)), (lambda: model._feat_map) if options is not None else None
            return setup
        providers += [("stock WanVAE_", stock(None)), ("stock WanVAE_ + patch_vae", stock({})),
                      ("stock WanVAE_ + patch_vae, all-off", stock(dict(VAE_ALL_OFF)))]

    rows, ref_out, base = [], None, None
    for name, setup in providers:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            decode, cache = setup()
            ms, out = time_stream(decode, zs, warmup)
        except Exception as e:  # noqa: BLE001 - one broken provider is a row, the others still run
            rows.append({"provider": name, "status": "failed", "error": f"{type(e).__name__}: {e}"})
            continue
        row = _row(name, ms, out, ref_out, video_frames, flops, base)
        row["status"] = "ok"
        row["stream"] = _stream_stats(cache() if cache is not None else None)
        if name == "reference":
            ref_out, base = out, row["median_ms"]
        rows.append(row)
        del decode, out
        torch.cuda.empty_cache()
    settings = {"cudnn_benchmark": torch.backends.cudnn.benchmark, "latent_hw": list(latent_hw), "frames_per_block": frames_per_block, "video_frames_per_block":
                video_frames, "blocks": blocks, "warmup": warmup, "dtype": str(dtype), "seed": seed,
                "flops_per_block": flops, "stock_src": stock_src, "preset": preset,
                "default_options": dataclasses.asdict(VAEDecoderOptions()), "variants": variants}
    return {"settings": settings, "rows": rows}


def table(rows: list[dict]) -> str:
    body, errors = [], []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["provider"], "FAILED"] + [""] * 8)
            errors.append(f"  {r['provider']}: {r['error']}")
            continue
        graphs = ((r.get("stream") or {}).get("graphs") or {}).get("replays")
        body.append([r["provider"], fmt(r["median_ms"], ".1f"), f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}",
                     fmt(r["ms_per_video_frame"], ".2f"), fmt(r["tflops"], ".0f"),
                     fmt(r["peak_mem_bytes"] / 2 ** 30, ".2f"), fmt(r["rel_l2"], ".2e"), f"{r['speedup']:.2f}x",
                     "-" if graphs is None else str(graphs)])
    headers = ["provider", "ms/block", "p20-p80", "ms/frame", "TFLOP/s", "peak GiB", "rel L2", "speed-up",
               "graph replays"]
    return "\n".join([format_table("VAE streaming decode of one block, steady state (medians)", headers, body)]
                     + errors)


def generator_rows(configs: list[str], *, blocks: int, frames_per_block: int, dtype_name: str, seed: int) -> list[dict]:
    """The generator's steady-state ms per block at 1.3B shapes: the stock reference and each preset."""
    name = "longlive-1.3b"
    settings = RowSettings(preset_model=name, seed=seed, frames_per_block=frames_per_block,
                           warmup_blocks=steady_start(get_preset(name).local_attn_size, frames_per_block))
    pipe_cfg = PipelineConfig(num_frame_per_block=frames_per_block)  # each row takes its model's window
    noise, prompts = draw_inputs(name, blocks=blocks, frames_per_block=frames_per_block, dtype=DTYPES[dtype_name],
                                 seed=seed, device="cuda")
    rows = []
    for config in [None] + [config_from_spec(c) for c in configs]:
        row, _ = measure_row(settings, config, pipe_cfg, noise, prompts)
        rows.append({"config": row["config"], "generator_ms": row["median_ms"]})
    return rows


def total_table(gen_rows: list[dict], vae_rows: list[dict], video_frames: int) -> tuple[str, list[dict]]:
    vae_ms = {r["provider"]: r["median_ms"] for r in vae_rows if r["status"] == "ok"}
    out, body = [], []
    for g in gen_rows:
        vae_name = "reference" if g["config"] == "stock" else "patched"
        if vae_name not in vae_ms:
            continue
        total = g["generator_ms"] + vae_ms[vae_name]
        out.append({"config": g["config"], "vae": vae_name, "generator_ms": g["generator_ms"],
                    "vae_ms": vae_ms[vae_name], "total_ms": total, "ms_per_video_frame": total / video_frames,
                    "fps": 1e3 * video_frames / total})
        body.append([g["config"], vae_name, fmt(g["generator_ms"], ".1f"), fmt(vae_ms[vae_name], ".1f"),
                     fmt(total, ".1f"), fmt(total / video_frames, ".2f"), fmt(1e3 * video_frames / total, ".1f")])
    headers = ["generator", "VAE", "gen ms/block", "VAE ms/block", "total ms/block", "ms/frame", "FPS"]
    return format_table("generator + VAE decode per block (sequential, steady state)", headers, body, labels=2), out


def run(args) -> int:
    if not torch.cuda.is_available():
        print("vae: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.blocks <= args.warmup:
        print(f"vae: --blocks {args.blocks} leaves no timed block after {args.warmup} warm-up blocks", file=sys.stderr)
        return 2
    stock_src = args.stock_src or os.environ.get("LONGLIVE_SRC") or None
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    h, w = args.latent_hw
    print(f"vae: Wan2.1 decoder, random weights, {args.dtype}, latents 16x{h}x{w} ({8 * h}x{8 * w} pixels), "
          f"{args.frames_per_block} latent frames per block, {args.blocks} blocks, {args.warmup} warm-up, "
          f"cudnn.benchmark {args.cudnn_benchmark}")
    try:
        variants = [] if args.variants == ["none"] else args.variants
        for spec in variants or []:
            variant_options(spec)
    except (ValueError, TypeError) as e:
        print(f"vae: {e}", file=sys.stderr)
        return 2
    result = measure_vae(latent_hw=(h, w), frames_per_block=args.frames_per_block, blocks=args.blocks,
                         warmup=args.warmup, dtype=DTYPES[args.dtype], seed=args.seed, stock_src=stock_src,
                         variants=variants)
    print(f"FLOPs per steady-state block: {result['settings']['flops_per_block'] / 1e12:.1f} T")
    print(table(result["rows"]))
    record = {"kind": "vae", "env": environment(), **result}
    if args.generator is not None:
        gen = generator_rows(args.generator, blocks=args.generator_blocks, frames_per_block=args.frames_per_block,
                             dtype_name=args.dtype, seed=args.seed)
        text, totals = total_table(gen, result["rows"], 4 * args.frames_per_block)
        print(text)
        record["totals"] = totals
    if args.profile:
        h, w = args.latent_hw
        z = torch.randn(1, 16, args.frames_per_block, h, w, device="cuda").to(DTYPES[args.dtype])
        # The patched decoder eagerly: kernels replayed from a CUDA graph carry no op names.
        for name in ("reference", "patched, cuda_graphs=false"):
            vae = build_vae_decoder("wan2.1", dtype=DTYPES[args.dtype], device="cuda", seed=args.seed)
            if name != "reference":
                patch_vae(vae, {"cuda_graphs": False})
            print(f"--- {name}: one steady-state block, top {args.profile} ops by GPU time")
            print(profile_block(vae, z, args.profile))
            del vae
            torch.cuda.empty_cache()
    save(record, args.json, args.append)
    return 1 if any(r["status"] != "ok" for r in result["rows"]) else 0


def add_parser(sub) -> None:
    v = sub.add_parser("vae", help="streaming VAE decode per block: stock reference vs patch_vae (CUDA only)")
    v.add_argument("--latent-hw", type=int, nargs=2, default=(60, 104), metavar=("H", "W"),
                   help="latent height and width (default 60 104: 480x832 pixels)")
    v.add_argument("--frames-per-block", type=int, default=3, help="latent frames per block (default 3)")
    v.add_argument("--blocks", type=int, default=12, help="blocks decoded per provider (default 12)")
    v.add_argument("--warmup", type=int, default=4, help="blocks left out of the statistics (default 4)")
    v.add_argument("--variants", nargs="*", metavar="SPEC", default=None,
                   help="patch_vae option variants, one row each: 'key=value,...' over the defaults, 'all-off', "
                        "or 'none' for no variant rows (default: each option switched, then all off)")
    v.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights and latents (default bf16)")
    v.add_argument("--seed", type=int, default=0, help="weights and latents seed (default 0)")
    v.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its algorithms for each convolution shape (all providers)")
    v.add_argument("--stock-src", metavar="DIR", help="LongLive v1.0 checkout: also time the stock WanVAE_ "
                   "(default: $LONGLIVE_SRC if set)")
    v.add_argument("--generator", nargs="*", metavar="CONFIG",
                   help="also time the 1.3B generator (stock and these patch presets) and report totals")
    v.add_argument("--generator-blocks", type=int, default=8,
                   help="blocks the generator runs per row (default 8; statistics from the full window)")
    v.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="also print the top ROWS GPU ops of one block, reference and patched (torch.profiler)")
    v.add_argument("--json", metavar="PATH", help="write the run as one JSON document")
    v.add_argument("--append", metavar="PATH", help="append the run as one line of a JSON-lines log")
    v.set_defaults(run=run)
