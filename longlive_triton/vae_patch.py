"""patch_vae: make the Wan2.1 VAE decoder fast in place, on the stock `WanVAE_` or our reference.

    from longlive_triton import patch_vae
    print(patch_vae(vae))        # WanVAEDecoder, stock WanVAE_, or a wrapper holding one (.model)

Every Wan `Decoder3d` found inside is replaced by `FastDecoder3d` (patches/vae_decoder.py), which keeps
the same submodules and parameter names (state dicts load as before) and the same call protocol, so
`WanVAE_.decode`, `cached_decode`, our `WanVAEDecoder.decode` and `StreamingVAEDecoder` work unchanged.
A decoder that does not have the stock structure is left untouched and the report says why.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .patches.registry import PatchSkip
from .patches.vae_decoder import FastDecoder3d, is_wan_decoder

__all__ = ["VAEPatchReport", "patch_vae"]


@dataclass
class VAEPatchReport:
    applied: list[str] = field(default_factory=list)           # module paths replaced
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = ["longlive-triton VAE patch report"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  fast_decoder applied at {p}" for p in self.applied]
        lines += [f"  fast_decoder skipped at {p}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


def _root(vae) -> nn.Module:
    if isinstance(vae, nn.Module):
        return vae
    inner = getattr(vae, "model", None)  # the stock `WanVAE` holder is a plain object with .model
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"patch_vae expects a Wan VAE module (or an object whose .model is one), "
                    f"got {type(vae).__name__}")


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, leaf, module)


def patch_vae(vae) -> VAEPatchReport:
    """Swap each Wan Decoder3d inside `vae` for FastDecoder3d, in place; returns the report.

    Patching twice is a no-op. A module with no Wan decoder inside raises TypeError. The stock
    WanVAE_'s own stream cache is cleared (a cache filled by the unpatched decoder cannot continue).
    """
    root = _root(vae)
    report = VAEPatchReport()
    if is_wan_decoder(root):
        raise TypeError("patch_vae takes the VAE that holds the decoder (it replaces the `decoder` child), "
                        f"not the {type(root).__name__} itself")
    targets = [(name, m) for name, m in root.named_modules() if is_wan_decoder(m)]
    if not targets:
        if any(isinstance(m, FastDecoder3d) for m in root.modules()):
            report.notes.append("already patched: nothing done")
            return report
        raise TypeError(f"{type(root).__name__} holds no Wan VAE decoder (a Decoder3d with conv1, middle, "
                        "upsamples and head)")
    for name, module in targets:
        try:
            _set_submodule(root, name, FastDecoder3d.from_stock(module))
            report.applied.append(name)
        except PatchSkip as why:
            report.skipped.append((name, str(why)))
    if report.applied:  # the stock WanVAE_ (also inside LongLive's WanVAEWrapper) keeps its stream cache
        for m in root.modules():
            if callable(getattr(m, "clear_cache", None)):
                m.clear_cache()
    return report
