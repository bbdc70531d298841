"""Where one steady-state block's GPU time goes: the torch profiler over one block of the pipeline.

    python -m longlive_triton.bench.profile_block [--config exact] [--blocks 6] [--rows 30]

Runs the reference generator at 1.3B shapes (random weights, bf16) through the block-step
pipeline until the window is full, profiles the next block, and prints the CUDA kernels by total
time plus the share of the block the GPU sat idle. With --config the model is patched first.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from longlive_triton import patch_model
from longlive_triton.runtime.pipeline import BlockPipeline
from longlive_triton.models import build_model, get_preset


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="patch preset to apply first (default: unpatched)")
    ap.add_argument("--blocks", type=int, default=6, help="blocks generated before the profiled one")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_block needs a CUDA GPU")
    preset = get_preset("longlive-1.3b")
    model = build_model("longlive-1.3b", dtype=torch.bfloat16, device="cuda", seed=0)
    if args.config:
        print(patch_model(model, args.config))
    pipe = BlockPipeline(model)
    per_block = preset.num_frame_per_block
    frames = (args.blocks + 1) * per_block
    gen = torch.Generator("cuda").manual_seed(0)
    noise = torch.randn(1, frames, 16, preset.latent_height, preset.latent_width, generator=gen,
                        device="cuda", dtype=torch.bfloat16)
    prompt = torch.randn(1, preset.text_len, preset.text_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    blocks = pipe.iter_blocks(noise, prompt)
    for _ in range(args.blocks):
        next(blocks)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        next(blocks)
        end.record()
        torch.cuda.synchronize()
    block_ms = start.elapsed_time(end)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time for e in kernels) / 1e3
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    print(f"block: {block_ms:.1f} ms, kernels: {busy_ms:.1f} ms summed, "
          f"GPU idle at most {max(0.0, 100 * (1 - busy_ms / block_ms)):.1f}% (profiler overhead included)")


if __name__ == "__main__":
    main()
