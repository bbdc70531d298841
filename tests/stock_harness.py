"""The parity harness: our reference generator and the stock LongLive v1.0 one, same weights, noise,
prompts and seed, and the figures that judge them (rel L2 per block, the peft LoRA merge).

    from ..stock_harness import compare_with_stock        # from a test module one folder down
    figures = compare_with_stock(stock, "tiny", torch.float32, "cpu", frames=18)

Used by tests/reference/ (test_stock_parity_cpu, test_patch_stock_class, test_stock_harness) and
tests/gpu/test_stock_parity.py. The stock code itself is imported and built by `longlive_triton.stock.longlive1`
(load_stock_longlive, build_stock_model, free_memory), which `longlive-bench e2e --model stock` uses
too; what only the tests need is here.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn as nn

from longlive_triton import patch_model
from longlive_triton.numerics import rel_l2
from longlive_triton.runtime.pipeline import BlockPipeline
from longlive_triton.models.longlive1.presets import build_model, get_preset
from longlive_triton.stock.longlive1 import StockLongLive, build_stock_model, free_memory, load_stock_longlive


def lora_target_modules(model: nn.Module) -> list[str]:
    """Every nn.Linear inside a `CausalWanAttentionBlock`, by full name: LongLive's LoRA target list."""
    names = set()
    for name, module in model.named_modules():
        if type(module).__name__ == "CausalWanAttentionBlock":
            names.update(sub for sub, m in module.named_modules(prefix=name) if isinstance(m, nn.Linear))
    return sorted(names)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_pipeline(model: nn.Module, noise: torch.Tensor, prompts, switches=(), *, seed: int = 1234,
                 config=None) -> tuple[torch.Tensor, float]:
    """Latents from our BlockPipeline after torch.manual_seed(seed) (the re-noising draws); (latents, seconds)."""
    pipe = BlockPipeline(model, config)
    _sync(noise.device)
    start = time.perf_counter()
    torch.manual_seed(seed)
    out = pipe.generate(noise, prompts, switches)
    _sync(noise.device)
    return out, time.perf_counter() - start


def parity_inputs(preset: str, frames: int, dtype: torch.dtype, device, *, num_prompts: int = 1,
                  prompt_len: int | None = None, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Seeded noise [1, frames, C, H, W] and prompt embeddings [1, L, text_dim] at a preset's shapes."""
    cfg = get_preset(preset)
    gen = torch.Generator(device).manual_seed(seed)
    noise = torch.randn([1, frames, cfg.in_dim, cfg.latent_height, cfg.latent_width], generator=gen, device=device)
    length = prompt_len or cfg.text_len
    prompts = [torch.randn([1, length, cfg.text_dim], generator=gen, device=device).to(dtype)
               for _ in range(num_prompts)]
    return noise.to(dtype), prompts


def _models(stock: StockLongLive, preset: str, dtype: torch.dtype, device, seed: int, num_layers: int | None):
    """Our reference at a preset (with num_layers of its layers, None: all) and the stock model holding its weights."""
    overrides = {} if num_layers is None else {"num_layers": num_layers}
    ref = build_model(preset, seed=seed, device=device, dtype=dtype, **overrides)
    kwargs = {**get_preset(preset).model_kwargs(), **overrides}
    stock_model = build_stock_model(stock, kwargs, device=device, dtype=dtype, state_dict=ref.state_dict(),
                                    num_frame_per_block=get_preset(preset).num_frame_per_block)
    return ref, stock_model


def compare_with_stock(stock: StockLongLive | str | os.PathLike | None, preset: str, dtype: torch.dtype, device,
                       frames: int, *, num_prompts: int = 1, switches=(), config=None,
                       prompt_len: int | None = None, seed: int = 0, num_layers: int | None = None) -> dict:
    """Our reference and the stock generator, same weights, noise, prompts and seed; the figures as a dict.

    num_layers: build both with that many of the preset's layers (None: all), the layer shapes kept.
    The reference runs first and is freed before the stock model runs. Keys: rel_l2, rel_l2_per_block,
    max_abs_diff, stock_latent_norm, finite, seconds_reference, seconds_stock, and the setup.
    """
    if not isinstance(stock, StockLongLive):
        stock = load_stock_longlive(stock)
    per_block = get_preset(preset).num_frame_per_block
    noise, prompts = parity_inputs(preset, frames, dtype, device, num_prompts=num_prompts,
                                   prompt_len=prompt_len, seed=seed)
    prompt_arg = prompts[0] if num_prompts == 1 else prompts

    ref, stock_model = _models(stock, preset, dtype, device, seed, num_layers)
    ours, t_ours = run_pipeline(ref, noise, prompt_arg, switches, config=config)
    del ref
    free_memory(device)
    theirs, t_stock = run_pipeline(stock_model, noise, prompt_arg, switches, config=config)
    stock_class = f"{type(stock_model).__module__}.{type(stock_model).__qualname__}"
    del stock_model
    free_memory(device)

    blocks = [rel_l2(ours[:, s:s + per_block], theirs[:, s:s + per_block]) for s in range(0, frames, per_block)]
    on_cuda = torch.device(device).type == "cuda"
    return {
        "preset": preset, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "device_name": torch.cuda.get_device_name() if on_cuda else "cpu", "torch": torch.__version__,
        "latent_frames": frames, "blocks": len(blocks), "switches": list(switches),
        "num_layers": num_layers or get_preset(preset).num_layers,
        "rel_l2": rel_l2(ours, theirs), "rel_l2_per_block": blocks,
        "max_abs_diff": (ours.double() - theirs.double()).abs().max().item(),
        "stock_latent_norm": theirs.double().norm().item(),
        "finite": bool(torch.isfinite(ours).all() and torch.isfinite(theirs).all()),
        "seconds_reference": t_ours, "seconds_stock": t_stock, "stock_class": stock_class,
        "stock_src": str(stock.src), "stock_notes": list(stock.notes),
    }


def lora_merge_figures(stock: StockLongLive | str | os.PathLike | None, preset: str, device, *, rank: int = 8,
                       frames: int | None = None, prompt_len: int | None = None, seed: int = 0,
                       num_layers: int | None = None) -> dict:
    """patch_model on the stock generator wrapped with peft LoRA, as LongLive wraps it; fp32.

    LoRA (r=rank, alpha=rank, no dropout) on every Linear inside the blocks, lora_B drawn non-zero;
    one BlockPipeline run (one block by default at 1.3B shapes, two at tiny) unmerged, with the
    adapters disabled, and after `patch_model`. num_layers: that many of the preset's layers (None:
    all). Returns the figures and the report (key "report"). Needs peft.

    Latent figures cannot show an fp32 merge to 1e-5: LongLive attends in bf16 even in an fp32 model,
    so fp32 rounding in q/k/v flips bf16 roundings and the latents move by ~1e-4 (rel L2) for any
    reassociation of the Linear math. Two more figures judge the merge instead:
    "layer_max_rel_err", each merged Linear against its unmerged LoRA layer on a random input (fp32,
    no attention in between), and "rounding_control_rel_l2", what perturbing the merged weights by
    one fp32 rounding (x(1 + 2^-24 randn)) does to the latents, the scale merged-vs-unmerged should match.
    """
    import peft  # here, not at the top: peft is optional and only this function needs it

    if not isinstance(stock, StockLongLive):
        stock = load_stock_longlive(stock)
    dtype = torch.float32
    ref, base = _models(stock, preset, dtype, device, seed, num_layers)
    del ref
    targets = lora_target_modules(base)
    torch.manual_seed(seed)  # peft draws lora_A from the global generator
    model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                      target_modules=targets))
    lora_layers = [name for name, m in model.named_modules()
                   if isinstance(getattr(m, "base_layer", None), nn.Linear) and hasattr(m, "lora_B")]
    gen = torch.Generator(device).manual_seed(seed + 7)
    with torch.no_grad():
        for name in lora_layers:
            w = model.get_submodule(name).lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=gen, device=device) * 0.02)

    frames = frames or (6 if preset == "tiny" else 3)
    noise, prompts = parity_inputs(preset, frames, dtype, device, prompt_len=prompt_len, seed=seed)
    unmerged, _ = run_pipeline(model, noise, prompts[0])
    with model.disable_adapter():
        no_lora, _ = run_pipeline(model, noise, prompts[0])
    probes = {}
    with torch.no_grad():
        for name in lora_layers:
            layer = model.get_submodule(name)
            x = torch.randn([16, layer.base_layer.in_features], generator=gen, device=device)
            probes[name] = (x, layer(x))
    report = patch_model(model)
    merged, _ = run_pipeline(model, noise, prompts[0])
    left = [n for n, m in model.named_modules() if hasattr(m, "lora_B")]
    layer_err = 0.0
    with torch.no_grad():
        for name, (x, y) in probes.items():
            layer_err = max(layer_err, rel_l2(model.get_submodule(name)(x), y))
        for name in lora_layers:  # one fp32 rounding on every merged weight: the control
            w = model.get_submodule(name).weight
            w.mul_(1 + 2.0**-24 * torch.randn(w.shape, generator=gen, device=device))
    control, _ = run_pipeline(model, noise, prompts[0])
    figures = {
        "preset": preset, "device": str(device), "frames": frames, "rank": rank,
        "lora_targets": len(targets), "lora_layers": lora_layers,
        "merged_paths": sorted(e.path for e in report.applied if e.patch == "merge_lora"),
        "merge_skipped": [(e.path, e.reason) for e in report.skipped if e.patch == "merge_lora"],
        "lora_layers_left": left, "num_layers": base.num_layers,
        "merged_vs_unmerged_rel_l2": rel_l2(merged, unmerged),
        "lora_effect_rel_l2": rel_l2(no_lora, unmerged),
        "layer_max_rel_err": layer_err, "rounding_control_rel_l2": rel_l2(control, merged),
        "report": report,
    }
    del model, base
    free_memory(device)
    return figures


def lora_merge_problems(figures: dict) -> list[str]:
    """What is wrong with a `lora_merge_figures` result (empty when the merge is right)."""
    problems = []
    if not figures["lora_targets"] == 10 * figures["num_layers"] == len(figures["lora_layers"]):
        problems.append(f"{len(figures['lora_layers'])} LoRA layers for {figures['num_layers']} blocks, expected 10 each")
    if figures["merged_paths"] != sorted(figures["lora_layers"]):
        problems.append("merge_lora did not apply on every LoRA layer")
    if figures["merge_skipped"] or figures["lora_layers_left"]:
        problems.append(f"skipped {figures['merge_skipped']}, left unmerged {figures['lora_layers_left']}")
    if not figures["lora_effect_rel_l2"] > 1e-4:
        problems.append("the LoRA adapters did not change the output")
    if not figures["layer_max_rel_err"] <= 1e-5:  # each merged Linear equals its LoRA layer to fp32 rounding
        problems.append(f"a merged Linear differs from its LoRA layer by {figures['layer_max_rel_err']:.1e}")
    # LongLive attends in bf16 even in fp32, so one fp32 rounding of the weights already moves the latents
    # by ~1e-4: the merge must stay within a few times that control (1e-5 is out of any merge's reach).
    bound = max(1e-5, 4 * figures["rounding_control_rel_l2"])
    if not figures["merged_vs_unmerged_rel_l2"] <= bound:
        problems.append(f"merged vs unmerged rel L2 {figures['merged_vs_unmerged_rel_l2']:.3e} > {bound:.3e} "
                        f"(fp32-rounding control {figures['rounding_control_rel_l2']:.3e})")
    return problems
