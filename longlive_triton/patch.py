"""patch_model: swap stock LongLive modules for our kernels' modules, and report what happened.

    from longlive_triton import patch_model
    report = patch_model(pipeline.generator.model)      # the stock CausalWanModel, peft-wrapped or not
    print(report)

The generator is recognised by structure. Unmerged peft LoRA adapters are folded into their base
weights first (W += scaling * B @ A in fp32), leaving plain nn.Linear layers with the stock names.
Patching twice with the same settings is a no-op, with other settings an error (the first patch
cannot be undone in place); a module that is not a LongLive generator is refused. The patched
layers hold copies made at patch time (fused, quantized): a patched model refuses to run after a
.to() / .float() that changed its weights' dtype or device, and to load a checkpoint.
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from .config import PatchConfig, as_config
from longlive_triton.runtime.graphs import install_graphs
from longlive_triton.loading.lora import merge_lora_weight
from .patches.attention_window import longlive_cache_note, set_attention_window
from .patches.base import Patch, PatchEntry, PatchReport, PatchSkip, set_submodule
from .patches.families import family_of

_MARK = "_longlive_triton_patch"
_PATCHED_FOR = "_longlive_triton_patched_for"  # (dtype, device) of the weights when patched


def _is_block(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("self_attn", "cross_attn", "ffn", "modulation", "norm1", "norm2"))


def find_generator(model: nn.Module) -> nn.Module:
    """The LongLive CausalWanModel inside `model` (itself, or under a peft wrapper)."""
    for m in model.modules():
        blocks = getattr(m, "blocks", None)
        if (isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and all(_is_block(b) for b in blocks)
                and all(hasattr(m, a) for a in ("patch_embedding", "time_projection", "head", "text_embedding"))):
            return m
    raise TypeError(f"patch_model expects a LongLive CausalWanModel (a module with patch_embedding, "
                    f"text/time embeddings, a head and blocks of self_attn/cross_attn/ffn); got {type(model).__name__}")


def _is_lora_layer(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "base_layer", None), nn.Linear) and isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(m, "lora_B", None), nn.ModuleDict) and isinstance(getattr(m, "scaling", None), dict))


def _merge_lora_layer(layer: nn.Module) -> nn.Linear:
    """The peft layer's base Linear with its active adapters folded in (DoRA and peft-merged ones refused)."""
    base = layer.base_layer
    if any(getattr(layer, "use_dora", {}).values()) or len(getattr(layer, "lora_magnitude_vector", ())):
        raise PatchSkip("DoRA adapters are not a plain W += B @ A merge; merge them with peft first")
    merged = list(getattr(layer, "merged_adapters", ()))
    if merged:
        raise PatchSkip(f"adapters {merged} are already merged by peft; unmerge them first")
    active = [name for name in getattr(layer, "active_adapters", list(layer.lora_A.keys())) if name in layer.lora_A]
    try:
        merge_lora_weight(base.weight, [(layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
                                        for name in active])
    except ValueError as e:  # a misshapen adapter: the layer stays as it was, and the report says why
        raise PatchSkip(str(e)) from None
    return base


def patch_model(model: nn.Module, config: PatchConfig | str | dict | None = None,
                patches: list[Patch] | None = None) -> PatchReport:
    """Patch a LongLive generator in place; returns the report of swapped and skipped modules.

    config: a PatchConfig, a preset name from configs/ (default "exact"), a YAML path or a dict.
    patches: the patch list to apply (default: every registered patch).
    """
    config = as_config(config)
    generator = find_generator(model)
    if any(type(m).__name__ == "OptimizedModule" for m in model.modules()):
        raise TypeError("patch_model got a torch.compile'd model: patch the model first (its layers are Triton "
                        "kernels, CUDA-graphed), and do not compile it afterwards")
    family = family_of(generator)
    report = PatchReport(f"patch report (config {config.name!r}, {family.name})", config, family=family.name)
    previous = getattr(generator, _MARK, None)
    if previous is not None:
        if dataclasses.replace(previous, name="") != dataclasses.replace(config, name=""):
            raise ValueError(f"this model is already patched with config {previous.name!r}; patching it again with "
                             f"{config.name!r} (other settings) is not supported: patch a freshly built model")
        report.notes.append(f"already patched with config {previous.name!r}: nothing done")
        return report

    family.rules.check_patchable(generator, config)
    window_before = generator.local_attn_size
    if config.local_attn_size is not None:
        # First, so a refused window leaves the model untouched.
        report.notes.append(set_attention_window(generator, config.local_attn_size))

    lora_layers = [name for name, m in model.named_modules() if _is_lora_layer(m)]
    if lora_layers:
        if not config.merge_lora:
            report.notes.append(f"{len(lora_layers)} unmerged LoRA layers left in place (merge_lora is off); "
                                "patches skip their parents' Linear layers")
        else:
            for name in lora_layers:
                try:
                    set_submodule(model, name, _merge_lora_layer(model.get_submodule(name)))
                    report.applied.append(PatchEntry(name, "merge_lora"))
                except PatchSkip as why:
                    report.skipped.append(PatchEntry(name, "merge_lora", str(why)))

    for patch in family.patches if patches is None else patches:
        if not patch.enabled(config):
            continue
        # Collect first: swapping while iterating named_modules would visit the replacements.
        targets = [(name, m) for name, m in generator.named_modules() if patch.matches(m)]
        applied = 0
        for name, module in targets:
            kept = patch.keep(name, module, config) if patch.keep is not None else None
            if kept:
                report.skipped.append(PatchEntry(name, patch.name, kept))
                continue
            try:
                set_submodule(generator, name, patch.replace(module, config))
                report.applied.append(PatchEntry(name, patch.name))
                applied += 1
            except PatchSkip as why:
                report.skipped.append(PatchEntry(name, patch.name, str(why)))
        if applied and patch.describe is not None:
            report.notes.append(f"{patch.name}: {patch.describe(config)}")
    if config.local_attn_size is not None:
        patched = any(e.patch == "window_self_attention" for e in report.applied)
        note = longlive_cache_note(window_before, config.local_attn_size, patched)
        if note is not None:
            report.notes.append(note)
    if config.cuda_graphs:
        report.notes.append(f"cuda_graphs: {_install_graphs(generator, family.rules)}")
    setattr(generator, _MARK, config)
    if report.applied:
        weight = generator.patch_embedding.weight
        setattr(generator, _PATCHED_FOR, (weight.dtype, weight.device))
        generator.register_forward_pre_hook(_check_unmoved)
        if family.rules.before_forward is not None:
            generator.register_forward_pre_hook(family.rules.before_forward, with_kwargs=True)
    return report


def patched_config(model: nn.Module) -> PatchConfig | None:
    """The config `model` (or the generator inside it) was patched with, or None."""
    for m in model.modules():
        config = getattr(m, _MARK, None)
        if config is not None:
            return config
    return None


def _check_unmoved(generator: nn.Module, args) -> None:
    """A forward pre-hook: the patched layers serve the dtype and device the model had when patched."""
    dtype, device = getattr(generator, _PATCHED_FOR)
    weight = generator.patch_embedding.weight
    if (weight.dtype, weight.device) != (dtype, device):
        raise RuntimeError(f"this model was patched for {dtype} on {device} but its weights are now {weight.dtype} "
                           f"on {weight.device}: the patched layers hold copies made at patch time, so .to() or "
                           ".float() after patching cannot reach them; call patch_model after moving the model (.to())")


def _install_graphs(generator: nn.Module, rules) -> str:
    device = next(generator.parameters()).device
    if device.type != "cuda":
        return f"off (the model is on {device}; graphs need CUDA)"
    try:
        install_graphs(generator, rules=rules)
    except ValueError as why:
        return f"off ({why})"
    return "on (each distinct forward captured on its second call and replayed after; see longlive_triton/runtime/graphs.py)"
