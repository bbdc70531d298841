"""`longlive-bench e2e --model stock2`: LongLive 2.0's own `CausalWanModel`, driven by LongLive 2.0's own
inference pipeline (`CausalDiffusionInferencePipeline.inference`, its block loop and caches, unchanged),
unpatched and patched per preset, same weights, noise and prompts, with a scene cut.

    longlive-bench e2e --model stock2 --configs exact fp8 --json stock2.json     # LONGLIVE_SRC: a 2.0 tree

The stock source comes from `--stock-src` or $LONGLIVE_SRC (longlive_triton/stock/longlive2.py imports it).
On CUDA the model is `longlive2-5b` (1280x704: 880 tokens a latent frame, 8-frame blocks, a 32-frame
window with an 8-frame sink, the multi-shot sink, a shot RoPE offset of 8 frames, 4 steps), elsewhere
`tiny2`; random weights (normal, 1/sqrt(fan-in)), bf16. Block `--cut-block` (default 5 of 10: the cache
is full from block 4) starts with LongLive 2.0's scene-cut prefix, so the pipeline steps the shot RoPE
offset there and pins that block as a shot sink after its cache pass; the pin floats two blocks, then
joins the global sink.

Per row: ms per block (CUDA events at the end of each block's cache pass, the pipeline's own host work
included), the median over blocks >= `--warmup-blocks` (default 4, the first with a full cache; the cut
block and the one where the pin joins the sink are in it, with the first calls of their new graphs),
the speed-up against the stock row, peak allocated memory, and per block the drift of the latents
against the stock row (relative L2, cosine). The stock row runs with whichever attention its code picks
(its flash_attention: the SDPA stand-in of the importer, cuDNN on an H100). JSON: `--json`, `--append`.
"""
from __future__ import annotations

import math
import sys

import torch

from longlive_triton.numerics import cosine, rel_l2
from longlive_triton.patch import patch_model

from .measure import intervals_ms, time_mark
from .results import environment, fmt, format_table, quantiles, save


def check_arguments(args) -> str | None:
    if args.context != "tensor" or args.cache_frames or args.switch_every is not None:
        return "--model stock2 takes no --context, --cache-frames or --switch-every (its pipeline sets them)"
    if args.profile or args.switch_block is not None or getattr(args, "vae", False):
        return "--model stock2 takes --cut-block, not --profile, --switch-block or --vae"
    return None


def random_weights(stock, kwargs: dict, device, dtype, seed: int) -> dict:
    """A state dict for the stock model: normal weights with std 1/sqrt(fan-in), norm weights 1, biases 0,
    the adaLN modulation as the stock init draws it (randn / sqrt(dim)); drawn on `device`, kept on the CPU."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in stock.CausalWanModel(**kwargs).state_dict().items()}
    gen = torch.Generator(device).manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("modulation"):
            t = torch.randn(shape, generator=gen, device=device) / math.sqrt(shape[-1])
        elif len(shape) >= 2:
            t = torch.randn(shape, generator=gen, device=device) / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("bias"):
            t = torch.zeros(shape, device=device)
        else:
            t = torch.ones(shape, device=device)
        out[name] = t.to(dtype).cpu()
    return out


def _row(stock, preset, config, weights, noise, prompts, table, device, steps_per_block):
    """One row: (block ms, peak bytes, latents, patch report text or None)."""
    from longlive_triton.stock.longlive2 import build_stock_model2, stock_pipeline
    model = build_stock_model2(stock, preset.model_kwargs(), device=device, dtype=torch.bfloat16,
                               state_dict=weights)
    report = None if config is None else str(patch_model(model, config))
    pipe = stock_pipeline(stock, model, preset, prompts=table)
    on_cuda = device.type == "cuda"
    marks, calls = [], [0]

    def after_call(*_):
        calls[0] += 1
        if calls[0] % steps_per_block == 0:
            marks.append(time_mark(on_cuda))
    hook = pipe.generator.register_forward_hook(after_call)
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    marks.append(time_mark(on_cuda))
    with torch.inference_mode():   # as LongLive 2.0's inference.py runs it
        latents = pipe.inference(noise, prompts, return_latents=True)
    hook.remove()
    block_ms = intervals_ms(marks, on_cuda)
    peak = torch.cuda.max_memory_allocated(device) if on_cuda else None
    out = latents.float().cpu()
    del pipe, model, latents
    if on_cuda:
        torch.cuda.empty_cache()
    return block_ms, peak, out, report


def run(args, configs, device) -> int:
    from longlive_triton.models.longlive2.presets import get_preset
    from longlive_triton.stock.longlive2 import SCENE_CUT_PREFIX, load_stock_longlive2

    problem = check_arguments(args)
    if problem is not None:
        print(f"e2e: {problem}", file=sys.stderr)
        return 2
    try:
        stock = load_stock_longlive2(args.stock_src)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"e2e: --model stock2: {e}", file=sys.stderr)
        return 2
    on_cuda = device.type == "cuda"
    preset = get_preset("longlive2-5b" if on_cuda else "tiny2")
    blocks, fpb = args.blocks, preset.num_frame_per_block
    cut = blocks // 2 if args.cut_block is None else args.cut_block
    warmup = math.ceil(preset.local_attn_size / fpb) if args.warmup_blocks is None else args.warmup_blocks
    if not 0 < cut < blocks or warmup >= blocks:
        print(f"e2e: --cut-block {cut} must lie in 1..{blocks - 1} and --warmup-blocks {warmup} below --blocks {blocks}",
              file=sys.stderr)
        return 2
    names = ["first shot"] * cut + [SCENE_CUT_PREFIX + "second shot"] * (blocks - cut)
    gen = torch.Generator(device).manual_seed(args.seed)
    table = {n: torch.randn(preset.text_len, preset.text_dim, generator=gen, device=device).to(torch.bfloat16)
             for n in sorted(set(names))}
    noise = torch.randn([1, blocks * fpb, preset.in_dim, preset.latent_height, preset.latent_width], generator=gen,
                        device=device).to(torch.bfloat16)
    print(f"e2e: LongLive 2.0's CausalWanModel and pipeline from {stock.src}, {preset.dim}x{preset.num_layers} "
          f"({'longlive2-5b' if on_cuda else 'tiny2'}) on {device} in bf16, {blocks} blocks of {fpb} latent frames, "
          f"scene cut at block {cut}, statistics over blocks {warmup}..{blocks - 1}, seed {args.seed}")
    weights = random_weights(stock, preset.model_kwargs(), device, torch.bfloat16, args.seed)
    steps_per_block = preset.sampling_steps + 1
    rows, ref = [], None
    for config in [None, *configs]:
        name = "stock" if config is None else config.name
        try:
            block_ms, peak, out, report = _row(stock, preset, config, weights, noise, [names], table, device,
                                               steps_per_block)
        except Exception as e:  # noqa: BLE001 - a broken config is a row of the table, the others still run
            if config is None:
                raise
            rows.append({"config": name, "status": "failed", "error": f"{type(e).__name__}: {e}"})
            continue
        if ref is None:
            ref = out
        drift = [(rel_l2(out[:, i:i + fpb], ref[:, i:i + fpb]), cosine(out[:, i:i + fpb], ref[:, i:i + fpb]))
                 for i in range(0, out.shape[1], fpb)]
        median = quantiles(block_ms[warmup:])[0]
        rows.append({"config": name, "status": "ok", "block_ms": block_ms, "median_ms": median, "peak_bytes": peak,
                     "drift_rel_l2": [d[0] for d in drift], "drift_cosine": [d[1] for d in drift],
                     "report": report})
    stock_ms = rows[0]["median_ms"]
    table_rows = []
    for r in rows:
        if r["status"] != "ok":
            table_rows.append([r["config"], "failed", "", "", "", "", r["error"][:60]])
            continue
        r["speedup"] = stock_ms / r["median_ms"] if on_cuda else None
        table_rows.append([r["config"], fmt(r["median_ms"], ".1f"), fmt(r["speedup"], ".2f") if on_cuda else "-",
                           fmt(r["peak_bytes"] / 2 ** 30, ".2f") if r["peak_bytes"] is not None else "-",
                           fmt(max(r["drift_rel_l2"]), ".2e"), fmt(min(r["drift_cosine"]), ".5f"),
                           " ".join(fmt(t, ".0f") for t in r["block_ms"])])
    print(format_table(f"LongLive 2.0 generator per block (median over blocks {warmup}..{blocks - 1}; cut at {cut})",
                       ["config", "ms/block", "speed-up", "peak GiB", "worst rel L2", "worst cosine",
                        "ms of each block"], table_rows))
    settings = {"model": "stock2", "stock_src": str(stock.src), "preset_model": "longlive2-5b" if on_cuda else "tiny2",
                "device": str(device), "dtype": "bf16", "blocks": blocks, "frames_per_block": fpb, "cut_block": cut,
                "warmup_blocks": warmup, "seed": args.seed, "configs": list(args.configs)}
    save({"kind": "e2e-stock2", "env": environment(), "settings": settings, "rows": rows}, args.json, args.append)
    return 1 if any(r["status"] != "ok" for r in rows) else 0
