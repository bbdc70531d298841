"""The LongLive 2.0 parity harness: our 2.0 reference and the stock 2.0 generator, same weights, noise and
prompts, both driven by LongLive 2.0's own `CausalDiffusionInferencePipeline`, judged per block and per layer.

    from ..stock_harness2 import compare_with_stock2
    figures = compare_with_stock2(stock, "tiny2", torch.float32, "cpu", blocks=7, cuts=(2, 5))

A scene cut is a block whose prompt starts with LongLive 2.0's scene-cut prefix: the pipeline then adds
the shot RoPE offset from that block on and pins the block in the cache after its cache pass. Random
weights make v1.0 and 2.0 semantics differ by only a few 1e-3 in the latents, so besides the latents of
every block the output of every layer at every generator call is compared: a missing offset or an
untracked pinned chunk shows at the first layer that reads it. The stock code is imported and built by
`longlive_triton.stock.longlive2`; the v1.0 harness is `tests/stock_harness.py`.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch
import torch.nn as nn

from longlive_triton.models.longlive2.presets import build_model, get_preset
from longlive_triton.numerics import rel_l2
from longlive_triton.stock.longlive2 import (SCENE_CUT_PREFIX, StockLongLive2, build_stock_model2, load_stock_longlive2,
                                             stock_pipeline)
from longlive_triton.stock.longlive1 import free_memory
from longlive_triton.stock.source import detect_family


def stock2_src() -> str | None:
    """The LongLive 2.0 checkout the tests use: $LONGLIVE_SRC2, else $LONGLIVE_SRC when it is a 2.0 tree."""
    for var in ("LONGLIVE_SRC2", "LONGLIVE_SRC"):
        value = os.environ.get(var, "")
        if value and Path(value).is_dir() and detect_family(Path(value)) == "longlive2":
            return value
    return None


def block_prompts(blocks: int, cuts=()) -> list[str]:
    """One prompt per block: shot j's own text, its first block prefixed as a scene cut (cuts: block indices > 0)."""
    if any(not 0 < c < blocks for c in cuts):
        raise ValueError(f"scene cuts {cuts} must be block indices in 1..{blocks - 1}")
    prompts, shot = [], 0
    for block in range(blocks):
        shot += block in cuts
        prompts.append(f"{SCENE_CUT_PREFIX if block in cuts else ''}shot {shot}")
    return prompts


def parity_inputs2(preset: str, blocks: int, prompts: list[str], dtype: torch.dtype, device, seed: int = 0
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Seeded noise [1, blocks x block frames, C, H, W] and an embedding [text_len, text_dim] per distinct prompt."""
    cfg = get_preset(preset)
    gen = torch.Generator(device).manual_seed(seed)
    frames = blocks * cfg.num_frame_per_block
    noise = torch.randn([1, frames, cfg.in_dim, cfg.latent_height, cfg.latent_width], generator=gen, device=device)
    table = {p: torch.randn([cfg.text_len, cfg.text_dim], generator=gen, device=device).to(dtype)
             for p in dict.fromkeys(prompts)}
    return noise.to(dtype), table


@contextlib.contextmanager
def record_layers(model: nn.Module, keep=None):
    """Every layer's output x at every generator call, as calls[i][layer] (cloned: the next call must not change
    it). keep: the call indices to record (None: all); the others are empty lists (at 5B shapes one call's
    layers are 1.3 GB)."""
    calls: list[list[torch.Tensor]] = []

    def hook(index):
        def record(module, args, result):
            x = result[0] if isinstance(result, tuple) else result
            if index == 0:
                calls.append([])
            if keep is None or len(calls) - 1 in keep:
                calls[-1].append(x.detach().clone())
        return record

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(model.blocks)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def run_stock_pipeline(stock: StockLongLive2, model: nn.Module, preset: str, noise: torch.Tensor,
                       table: dict[str, torch.Tensor], prompts: list[str], *, layer_calls=None,
                       initial_latent: torch.Tensor | None = None, **inference) -> dict:
    """LongLive 2.0's pipeline driving `model` (quiet, under torch.inference_mode() as its inference.py runs it:
    the stock Triton kernels, when on, run only with grad off): {"latents", "layers" (per call, per layer),
    "pinned"}."""
    pipe = stock_pipeline(stock, model, preset, prompts=table, **inference)
    with record_layers(model, layer_calls) as calls, torch.inference_mode(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        latents = pipe.inference(noise, [prompts], initial_latent=initial_latent, return_latents=True)
    pinned = [(int(c["pinned_start"]), int(c["pinned_len"])) for c in pipe.kv_cache_pos]
    return {"latents": latents, "layers": calls, "pinned": pinned}


def compare_with_stock2(stock: StockLongLive2 | str | os.PathLike | None, preset: str, dtype: torch.dtype, device,
                        blocks: int, cuts=(), *, seed: int = 0, ours: dict | None = None, layer_calls=None,
                        i2v: bool = False, **inference) -> dict:
    """Our reference and the stock 2.0 generator through the stock pipeline; the figures as a dict.

    `inference` overrides the pipeline's inference settings for both sides; `ours` overrides them for our
    reference only (a deliberate semantic change, to show the comparison catches it). layer_calls: the
    generator calls whose layers are compared (None: all; 5 calls a block: 4 steps, then the cache pass).
    i2v: LongLive 2.0's image-to-video path (a seeded clean first latent frame, independent_first_frame).
    Keys: rel_l2, rel_l2_per_block, rel_l2_per_layer (the worst over the compared calls, per layer),
    rel_l2_per_call (the worst layer; None where not compared), first_differing_call_layer (the first
    (call, layer) above 0, or None), pinned (final pinned_start/len, stock and ours), finite,
    stock_latent_norm, calls, calls_per_block, and the setup.
    """
    if not isinstance(stock, StockLongLive2):
        stock = load_stock_longlive2(stock)
    cfg = get_preset(preset)
    prompts = block_prompts(blocks, cuts)
    noise, table = parity_inputs2(preset, blocks, prompts, dtype, device, seed=seed)
    initial_latent = None
    if i2v:
        initial_latent = torch.randn(noise[:, :1].shape, generator=torch.Generator(device).manual_seed(seed + 1),
                                     device=device).to(dtype)
        inference = {**inference, "independent_first_frame": True}
    ref = build_model(preset, seed=seed, device=device, dtype=dtype)
    stock_model = build_stock_model2(stock, preset, device=device, dtype=dtype, state_dict=ref.state_dict())
    mine = run_stock_pipeline(stock, ref, preset, noise, table, prompts, layer_calls=layer_calls,
                              initial_latent=initial_latent, **{**inference, **(ours or {})})
    del ref
    free_memory(device)
    theirs = run_stock_pipeline(stock, stock_model, preset, noise, table, prompts, layer_calls=layer_calls,
                                initial_latent=initial_latent, **inference)
    stock_class = f"{type(stock_model).__module__}.{type(stock_model).__qualname__}"
    del stock_model
    free_memory(device)

    a, b = mine["latents"], theirs["latents"]
    step = cfg.num_frame_per_block
    per_block = [rel_l2(a[:, s:s + step], b[:, s:s + step]) for s in range(0, a.shape[1], step)]
    if len(mine["layers"]) != len(theirs["layers"]):
        raise AssertionError(f"{len(mine['layers'])} generator calls against stock's {len(theirs['layers'])}")
    # Per call, per layer; an empty row for a call whose layers were not recorded.
    per_call = [[rel_l2(x, y) for x, y in zip(xs, ys)] for xs, ys in zip(mine["layers"], theirs["layers"])]
    first = next(((c, l) for c, row in enumerate(per_call) for l, v in enumerate(row) if v > 0), None)
    return {
        "preset": preset, "dtype": str(dtype).replace("torch.", ""), "device": str(device), "blocks": blocks,
        "i2v": i2v, "first_frame_kept": bool(i2v and torch.equal(a[:, :1], initial_latent)),
        "cuts": list(cuts), "prompts": prompts, "calls": len(per_call), "calls_per_block": len(per_call) // blocks,
        "rel_l2": rel_l2(a, b), "rel_l2_per_block": per_block,
        "rel_l2_per_layer": [max(col) for col in zip(*(row for row in per_call if row))],
        "rel_l2_per_call": [max(row) if row else None for row in per_call], "first_differing_call_layer": first,
        "pinned": {"stock": theirs["pinned"][0], "ours": mine["pinned"][0]},
        "finite": bool(torch.isfinite(a).all() and torch.isfinite(b).all()),
        "stock_latent_norm": b.double().norm().item(), "stock_class": stock_class,
        "stock_src": str(stock.src), "stock_notes": list(stock.notes),
    }
