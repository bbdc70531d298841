"""`longlive-bench e2e --vae`: what a viewer waits for, generator + VAE decode per block in one loop.

Each row streams one video through `longlive_triton.runtime.video.iter_video`: block by block, the generator
denoises the block (BlockPipeline) and the streaming VAE decoder turns its latents into pixel frames
before the next block starts, exactly as an application shows frames. The `stock` row is the
unpatched reference generator with the unpatched reference VAE (both the stock math, bit for bit);
every other row is a patch preset (`--configs`) with `patch_vae` on the VAE (`--vae-options`).

Per block, CUDA events around the VAE decode split the block's time into generator and VAE; the
statistics (medians, p20-p80) are over the steady-state blocks, from the one where the KV window is
full (the prompt-switch block, if any, apart). Each row first runs a short warm-up video of two
blocks on the same pipeline (Triton compilation, cuDNN planning, the generator's first CUDA graphs),
then the timed video; its first block, generator + decode of 9 video frames, is the time to first
frame (`ttff_ms`), and the warm-up video's first block the same for a cold process
(`first_block_cold_ms`). Pixels of the first and last block are compared with the stock row's.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import torch

from longlive_triton.numerics import rel_l2
from longlive_triton.patch import patch_model
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.models import build_model
from longlive_triton.models.wan21_vae import build_vae_decoder
from longlive_triton.vae_patch import VAEDecoderOptions, patch_vae
from longlive_triton.runtime.vae_stream import StreamingVAEDecoder
from longlive_triton.runtime.video import iter_video

from .measure import RowSettings, variant_options
from .results import environment, fmt, format_table, quantiles, save

VAE_PRESET = {"longlive-1.3b": "wan2.1", "tiny": "tiny"}
WARMUP_VIDEO_BLOCKS = 2


def add_arguments(parser) -> None:
    parser.add_argument("--vae", action="store_true",
                        help="decode every block with the Wan VAE in the same loop (bench/e2e_vae.py): generator + "
                             "VAE per block, ms per video frame end to end, time to first frame")
    parser.add_argument("--vae-options", default="defaults", metavar="SPEC",
                        help="patch_vae options of the patched rows with --vae: 'key=value,...' over the defaults, "
                             "or 'all-off' (default: defaults)")


class _Clock:
    """CUDA events on a GPU (no sync inside the loop), host time on the CPU; ms between marks."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


class _TimedStream(StreamingVAEDecoder):
    """The streaming decoder with a mark before and after each block's decode."""

    def __init__(self, vae, clock: _Clock):
        super().__init__(vae)
        self.clock = clock
        self.marks: list[tuple] = []

    def decode_block(self, z_block: torch.Tensor) -> torch.Tensor:
        start = self.clock.mark()
        out = super().decode_block(z_block)
        self.marks.append((start, self.clock.mark()))
        return out


def _video(pipe, stream: _TimedStream, noise, prompts, switches, clock: _Clock) -> tuple[list, list, dict]:
    """One video through iter_video: (block end marks with the start first, decode marks, kept pixels)."""
    stream.marks = []
    ends = [clock.mark()]
    kept = {}
    last = noise.shape[1] // pipe.config.num_frame_per_block - 1
    for blk in iter_video(pipe, stream, noise, prompts, switches):
        ends.append(clock.mark())
        if blk.index in (0, last):
            kept[blk.index] = blk.pixels.clone()
    return ends, list(stream.marks), kept


def measure_row(settings: RowSettings, config, vae_options: dict, noise, prompts, clock: _Clock) -> tuple[dict, dict]:
    """Build (and patch) a generator and a VAE, run the warm-up and the timed video; (row, kept pixels)."""
    device, dtype = noise.device, noise.dtype
    model = build_model(settings.preset_model, dtype=dtype, device=device, seed=settings.seed)
    vae = build_vae_decoder(VAE_PRESET[settings.preset_model], dtype=dtype, device=device, seed=settings.seed)
    row = {"config": "stock" if config is None else config.name, "vae": "reference"}
    if config is not None:
        report = patch_model(model, config)
        row["patch"] = {"applied": len(report.applied), "skipped": len(report.skipped)}
        vae_report = patch_vae(vae, vae_options)
        print(report)
        print(vae_report)
        row["vae"] = "patched" if vae_report.applied else "reference (patch_vae skipped)"
        row["vae_options"] = dataclasses.asdict(vae.decoder.options) if vae_report.applied else None
    fpb, switch = settings.frames_per_block, settings.switch_block
    pipe = BlockPipeline(model, PipelineConfig(num_frame_per_block=fpb))
    stream = _TimedStream(vae, clock)
    torch.manual_seed(settings.seed)
    warm_ends, warm_dec, _ = _video(pipe, stream, noise[:, :WARMUP_VIDEO_BLOCKS * fpb], prompts[:1], [], clock)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    switches = [] if switch is None else [switch * fpb]
    torch.manual_seed(settings.seed)  # the pipeline's re-noising draws: identical for every row
    ends, dec, kept = _video(pipe, stream, noise, prompts, switches, clock)
    if device.type == "cuda":
        torch.cuda.synchronize()
    row["peak_mem_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    total = [clock.ms(a, b) for a, b in zip(ends, ends[1:])]
    vae_ms = [clock.ms(a, b) for a, b in dec]
    gen_ms = [t - v for t, v in zip(total, vae_ms)]
    steady = [i for i in range(len(total)) if i >= settings.warmup_blocks and i != switch]
    median, p20, p80 = quantiles([total[i] for i in steady])
    frames = 4 * fpb
    row.update(status="ok", block_ms=total, generator_block_ms=gen_ms, vae_block_ms=vae_ms,
               total_ms=median, p20_ms=p20, p80_ms=p80,
               generator_ms=quantiles([gen_ms[i] for i in steady])[0], vae_ms=quantiles([vae_ms[i] for i in steady])[0],
               ms_per_video_frame=median / frames, fps=1e3 * frames / median,
               ttff_ms=total[0], first_block_cold_ms=clock.ms(warm_ends[0], warm_ends[1]),
               first_block_cold_vae_ms=clock.ms(*warm_dec[0]))
    if switch is not None:
        row.update(switch_block_ms=total[switch], switch_extra_ms=total[switch] - median)
    del model, vae, pipe, stream
    return row, kept


def table(rows: list[dict], frames_per_block: int) -> str:
    body, errors = [], []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["config"], "", "FAILED"] + [""] * 9)
            errors.append(f"  {r['config']}: {r['error']}")
            continue
        body.append([r["config"], r["vae"], fmt(r["generator_ms"], ".1f"), fmt(r["vae_ms"], ".1f"),
                     fmt(r["total_ms"], ".1f"), f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}",
                     fmt(r["ms_per_video_frame"], ".2f"), fmt(r["fps"], ".1f"), fmt(r["ttff_ms"], ".1f"),
                     fmt(r.get("rel_l2_pixels_last"), ".2e"), fmt(r.get("speedup"), ".2f") + "x",
                     fmt(None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2 ** 30, ".2f")])
    headers = ["generator", "VAE", "gen ms/block", "VAE ms/block", "total ms/block", "p20-p80", "ms/frame", "FPS",
               f"TTFF ms ({4 * frames_per_block - 3} frames)", "rel L2 pixels", "speed-up", "peak GiB"]
    title = "generator + VAE decode in one loop, per block of video frames (steady-state medians)"
    return "\n".join([format_table(title, headers, body, labels=2)] + errors)


def run(args, configs: list, inputs: tuple) -> int:
    """The --vae run of `longlive-bench e2e`, after bench/e2e.py checked the arguments, parsed `configs`
    and drew the inputs: (device, dtype, noise, prompts) (bench/cli.py's run_e2e)."""
    if args.profile:
        print("e2e: --profile is not supported with --vae", file=sys.stderr)
        return 2
    try:
        vae_options = variant_options(args.vae_options)
    except (ValueError, TypeError) as e:
        print(f"e2e: --vae-options: {e}", file=sys.stderr)
        return 2
    device, dtype, noise, prompts = inputs
    clock = _Clock(device.type == "cuda")
    fpb = args.frames_per_block
    row_settings = RowSettings(preset_model=args.preset_model, seed=args.seed, frames_per_block=fpb,
                               warmup_blocks=args.warmup_blocks, switch_block=args.switch_block)
    rows, pixels = [], {}
    for config in [None] + configs:
        name = "stock" if config is None else config.name
        try:
            row, kept = measure_row(row_settings, config, vae_options, noise, prompts, clock)
        except Exception as e:  # noqa: BLE001 - a broken config is a row of the table, the others still run
            if config is None:
                raise
            rows.append({"config": name, "status": "failed", "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append(row)
        pixels[name] = kept
    base = rows[0]
    for r in rows:
        if r["status"] == "ok":
            r["speedup"] = base["total_ms"] / r["total_ms"]
            first, last = sorted(pixels["stock"])[0], sorted(pixels["stock"])[-1]
            r["rel_l2_pixels_first"] = rel_l2(pixels[r["config"]][first], pixels["stock"][first])
            r["rel_l2_pixels_last"] = rel_l2(pixels[r["config"]][last], pixels["stock"][last])
    print(table(rows, fpb))
    settings = {"preset_model": args.preset_model, "vae_preset": VAE_PRESET[args.preset_model], "device": str(device),
                "dtype": args.dtype, "blocks": args.blocks, "warmup_blocks": args.warmup_blocks,
                "warmup_video_blocks": WARMUP_VIDEO_BLOCKS, "frames_per_block": fpb,
                "video_frames_per_block": 4 * fpb, "seed": args.seed, "configs": list(args.configs),
                "vae_options_spec": args.vae_options,
                "vae_options": dataclasses.asdict(VAEDecoderOptions(**vae_options)), "switch_block": args.switch_block}
    save({"kind": "e2e_vae", "env": environment(), "settings": settings, "rows": rows}, args.json, args.append)
    return 1 if any(r["status"] != "ok" for r in rows) else 0
