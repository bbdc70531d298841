r"""`longlive-triton generate`: prompts in, an mp4 out, decoded and written block by block.

    longlive-triton generate --prompt "a cat on a sofa" --switch 40:"the cat jumps down" --output cat.mp4 \
        --wan wan_models/Wan2.1-T2V-1.3B --longlive longlive_models --longlive-src ../LongLive

With no weight option it runs the embedded default (random weights, see `engine.py`), so the
command works on any machine. The model options here are shared with `longlive-triton serve`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from longlive_triton.app.engine import FRAMES_PER_BLOCK, STOCK, Engine, embedded_engine, real_engine
from longlive_triton.app.mp4 import Mp4Writer, check_output_path, require_writer, to_uint8
from longlive_triton.app.prompts import PromptError, PromptSchedule, from_command_line, load_prompt_file, parse_switch_frames
from longlive_triton.app.embeddings import load_embeddings_file
from longlive_triton.runtime.video import iter_video
from longlive_triton.loading.weights import locate_weights

__all__ = ["UsageError", "add_model_arguments", "add_arguments", "build_engine", "choose_device", "run",
           "DEFAULT_PROMPT"]

DEFAULT_PROMPT = "a red fox trots through fresh snow in a quiet pine forest, soft morning light"
VIDEO_FPS = 16  # LongLive writes its videos at 16 fps
_WEIGHT_FLAGS = ("wan", "longlive", "base", "generator", "lora", "vae", "text_encoder", "tokenizer")


class UsageError(ValueError):
    """A command-line value that cannot work (a frame count, a device)."""


def choose_device(name: str | None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine has no CUDA GPU that torch can use")
    return device


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose the model, its weights and the prompt encoder (generate and serve)."""
    from longlive_triton.config import preset_names

    p.add_argument("--preset", default="exact", choices=preset_names() + [STOCK],
                   help="patch preset (configs/), or 'stock' to run unpatched (default: exact)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is a GPU)")
    w = p.add_argument_group("real weights (none given: the embedded random-weights model)")
    w.add_argument("--wan", metavar="DIR|REPO", help="Wan2.1-T2V-1.3B folder (base weights, VAE, umT5 encoder and "
                   "tokenizer), or its repo id in the local Hugging Face cache")
    w.add_argument("--longlive", metavar="DIR|REPO",
                   help="LongLive-1.3B folder (models/longlive_base.pt, models/lora.pt), or its repo id")
    for flag, what in (("base", "Wan2.1 diffusion_pytorch_model.safetensors"), ("generator", "longlive_base.pt"),
                       ("lora", "lora.pt, or 'none'"), ("vae", "Wan2.1_VAE.pth"),
                       ("text-encoder", "models_t5_umt5-xxl-enc-bf16.pth"),
                       ("tokenizer", "the google/umt5-xxl folder")):
        w.add_argument(f"--{flag}", metavar="PATH", help=f"{what} (overrides the file found under --wan/--longlive)")
    w.add_argument("--longlive-src", metavar="DIR", default=os.environ.get("LONGLIVE_SRC"),
                   help="LongLive checkout whose text encoder and tokenizer classes encode the prompts "
                        "(default: $LONGLIVE_SRC)")
    w.add_argument("--height", type=int, default=480, help="video height with real weights (default 480)")
    w.add_argument("--width", type=int, default=832, help="video width with real weights (default 832)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    q = p.add_argument_group("prompts")
    q.add_argument("--prompt", help=f"the first prompt (default: {DEFAULT_PROMPT!r})")
    q.add_argument("--switch", action="append", default=[], metavar="FRAME:PROMPT",
                   help="switch to PROMPT at latent frame FRAME (LongLive's switch_frame_indices); repeatable")
    q.add_argument("--prompts", metavar="FILE", help="LongLive's JSONL prompt file or its interactive YAML config")
    q.add_argument("--prompt-line", type=int, default=0, help="which line of a JSONL prompt file (default 0)")
    q.add_argument("--switch-frames", metavar="LIST", help="switch frames for --prompts or --embeddings, e.g. 40,80")
    q.add_argument("--embeddings", metavar="FILE", help="precomputed prompt embeddings [N, L, text_dim] "
                   "(.pt, .safetensors or .npy), one per prompt segment, instead of encoding text")
    p.add_argument("--frames", type=int, help="latent frames, a multiple of 3 (LongLive's num_output_frames; "
                   "a video has 4F-3 frames; default 120 on a GPU, 9 on the CPU)")
    p.add_argument("--seed", type=int, help="noise seed (default: the prompt file's, else 0)")
    p.add_argument("--output", "-o", default="video.mp4", help="the mp4 to write (default video.mp4)")
    p.add_argument("--fps", type=float, default=VIDEO_FPS, help=f"frames per second of the mp4 (default {VIDEO_FPS})")
    add_model_arguments(p)


def build_engine(args, device: torch.device, *, need_text_encoder: bool) -> Engine:
    if not any(getattr(args, flag) is not None for flag in _WEIGHT_FLAGS):
        if device.type == "cpu":
            torch.set_num_threads(1)  # the tiny model's ops are far too small to gain from threads
        return embedded_engine(args.preset, device=device)
    files = locate_weights(**{flag: getattr(args, flag) for flag in _WEIGHT_FLAGS},
                           need_text_encoder=need_text_encoder)
    return real_engine(files, args.preset, device=device, height=args.height, width=args.width,
                       encoder_src=args.longlive_src)


def prompt_schedule(args) -> PromptSchedule | None:
    """The prompts and switch frames asked for; None when --embeddings supplies the segments."""
    switch_frames = None if args.switch_frames is None else parse_switch_frames(args.switch_frames)
    if args.embeddings is not None:
        if args.prompt is not None or args.switch or args.prompts is not None:
            raise PromptError("--embeddings replaces the prompts: drop --prompt/--switch/--prompts "
                              "(give the switch points with --switch-frames)")
        return None
    if args.prompts is not None:
        if args.prompt is not None or args.switch:
            raise PromptError("give the prompts either on the command line (--prompt/--switch) "
                              "or in a file (--prompts)")
        return load_prompt_file(args.prompts, line=args.prompt_line, switch_frames=switch_frames)
    if switch_frames is not None:
        raise PromptError("--switch-frames goes with --prompts or --embeddings; "
                          "on the command line use --switch FRAME:PROMPT")
    return from_command_line(args.prompt if args.prompt is not None else DEFAULT_PROMPT, args.switch)


def _embeddings(args, engine: Engine, schedule: PromptSchedule | None) -> tuple[list[torch.Tensor], list[int]]:
    if schedule is not None:
        return engine.encoder.encode(schedule.texts), list(schedule.switch_frames)
    embeds = load_embeddings_file(args.embeddings, text_len=engine.text_len, text_dim=engine.text_dim,
                                  device=engine.device, dtype=engine.dtype)
    switches = [] if args.switch_frames is None else list(parse_switch_frames(args.switch_frames))
    return embeds, switches


def _summary(args, engine: Engine, block_ms: list[float], block_frames: list[int], switches: list[int],
             texts: tuple[str, ...], written: int, wall_s: float) -> str:
    h, w = engine.pixel_size
    per_frame = [ms / n for ms, n in zip(block_ms, block_frames)]
    steady = per_frame[1:] or per_frame
    lines = [f"wrote {args.output}: {written} frames of {w}x{h} at {args.fps:g} fps "
             f"({written / args.fps:.1f} s of video)"]
    starts = [0] + PromptSchedule(texts, tuple(switches)).effective_switches(FRAMES_PER_BLOCK)
    for text, start in zip(texts, starts):
        lines.append(f"  from latent frame {start:4d} (video frame {max(0, 4 * start - 3)}): {text}")
    lines.append(f"first frames after {block_ms[0] / 1e3:.1f} s (block 0, warm-up included); "
                 f"ms per video frame, generator + VAE: {statistics.median(steady):.1f} median over blocks "
                 f"{1 if len(per_frame) > 1 else 0}..{len(per_frame) - 1}, "
                 f"{sum(block_ms) / sum(block_frames):.1f} over all; {wall_s:.1f} s in all")
    lines.append(engine.label)
    return "\n".join(lines)


def run(args) -> int:
    from tqdm import tqdm

    output = check_output_path(args.output)
    require_writer()
    schedule = prompt_schedule(args)
    device = choose_device(args.device)
    default_frames = 120 if device.type == "cuda" else 3 * FRAMES_PER_BLOCK  # LongLive's length; 3 blocks on a CPU
    frames = args.frames or (schedule and schedule.num_frames) or default_frames
    if frames % FRAMES_PER_BLOCK or frames <= 0:
        raise UsageError(f"--frames {frames}: must be a positive multiple of {FRAMES_PER_BLOCK} "
                          f"(latent frames per block)")
    if schedule is not None:
        schedule.check_length(frames, FRAMES_PER_BLOCK)
    seed = args.seed if args.seed is not None else (schedule.seed if schedule and schedule.seed is not None else 0)
    engine = build_engine(args, device, need_text_encoder=schedule is not None)
    embeds, switches = _embeddings(args, engine, schedule)
    texts = schedule.texts if schedule is not None else tuple(f"embeddings[{i}]" for i in range(len(embeds)))
    if schedule is None:
        PromptSchedule(texts, tuple(switches), source=args.embeddings).check_length(frames, FRAMES_PER_BLOCK)
    print(engine.label)
    for report in engine.reports:
        print(report)

    started = time.perf_counter()
    noise = engine.noise(frames, seed)
    h, w = engine.pixel_size
    block_ms, block_frames = [], []
    bar = tqdm(total=frames // FRAMES_PER_BLOCK, unit="block", desc=f"generating {4 * frames - 3} frames")
    with Mp4Writer(output, width=w, height=h, fps=args.fps, comment=engine.label) as writer:
        mark = time.perf_counter()
        for block in iter_video(engine.pipeline(), engine.vae, noise, embeds, switches):
            pixels = to_uint8(block.pixels[0])  # on the host: the block is done
            block_ms.append((time.perf_counter() - mark) * 1e3)
            block_frames.append(len(pixels))
            writer.write(pixels)
            bar.set_postfix_str(f"{block_ms[-1] / len(pixels):.1f} ms/frame")
            bar.update()
            mark = time.perf_counter()  # the next block's time leaves the mp4 encoding out
        written = writer.frames
    bar.close()
    print(_summary(args, engine, block_ms, block_frames, switches, texts, written, time.perf_counter() - started))
    return 0
