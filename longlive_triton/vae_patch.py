"""patch_vae: make the Wan2.1 VAE decoder fast in place, on the stock `WanVAE_` or our reference.

    from longlive_triton import patch_vae
    print(patch_vae(vae))        # WanVAEDecoder, stock WanVAE_, or a wrapper holding one (.model)
    patch_vae(vae, {"cuda_graphs": False})     # options: VAEDecoderOptions, or a dict of its fields

Every Wan `Decoder3d` found inside is replaced by `FastDecoder3d` (patches/vae_decoder.py), which keeps
the same submodules and parameter names (state dicts load as before) and the same call protocol, so
`WanVAE_.decode`, `cached_decode`, our `WanVAEDecoder.decode` and `StreamingVAEDecoder` work unchanged.
With `frames_per_call` > 1 the loops that feed the decoder one latent frame per call pass it several:
our `WanVAEDecoder.decode_frames` asks the patched decoder to, and on the stock `WanVAE_` the instance
gets `decode` / `cached_decode` that do what the stock ones do (un-normalise with `scale`, `conv2`,
the decoder over the stream cache `_feat_map`, clearing it around `decode`) with that one change.
A decoder that does not have the stock structure is left untouched and the report says why.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .patches.base import PatchEntry, PatchReport, PatchSkip, set_submodule
from .patches.vae_decoder import FastDecoder3d, VAEDecoderOptions, is_wan_decoder

__all__ = ["VAEDecoderOptions", "PatchReport", "VAEPatchReport", "patch_vae"]


# The one report type; the name stays for the VAE's callers.
VAEPatchReport = PatchReport


def _root(vae) -> nn.Module:
    if isinstance(vae, nn.Module):
        return vae
    inner = getattr(vae, "model", None)  # the stock `WanVAE` holder is a plain object with .model
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"patch_vae expects a Wan VAE module (or an object whose .model is one), "
                    f"got {type(vae).__name__}")


def _options(options) -> VAEDecoderOptions:
    if options is None:
        return VAEDecoderOptions()
    if isinstance(options, VAEDecoderOptions):
        return options
    if isinstance(options, dict):
        known = {f.name for f in dataclasses.fields(VAEDecoderOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown VAE options {unknown}; known: {sorted(known)}")
        return VAEDecoderOptions(**options)
    raise TypeError(f"options must be a VAEDecoderOptions or a dict, got {type(options).__name__}")


class _StockBlockDecode:
    """The stock WanVAE_.cached_decode(z, scale) (whole=False) or decode(z, scale) (whole=True), with
    the patched decoder's `decode_frames` (several latent frames per call) in place of the stock
    one-frame loop. An object rather than a bound method, so that copy.deepcopy of the VAE copies it."""

    def __init__(self, vae: nn.Module, whole: bool):
        self.vae = vae
        self.whole = whole

    def __call__(self, z: torch.Tensor, scale) -> torch.Tensor:
        vae = self.vae
        if self.whole:
            vae.clear_cache()
        dims = (1, vae.z_dim, 1, 1, 1)
        if isinstance(scale[0], torch.Tensor):  # the stock scale = [mean, 1/std]
            z = z / scale[1].view(dims) + scale[0].view(dims)
        else:
            z = z / scale[1] + scale[0]
        out = vae.decoder.decode_frames(vae.conv2(z), vae._feat_map)
        if self.whole:
            vae.clear_cache()
        return out


def _is_stock_wan_vae(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "decoder", None), FastDecoder3d) and isinstance(getattr(m, "conv2", None), nn.Module)
            and all(callable(getattr(m, a, None)) for a in ("decode", "cached_decode", "clear_cache"))
            and hasattr(m, "_feat_map") and hasattr(m, "z_dim"))


def patch_vae(vae, options: VAEDecoderOptions | dict | None = None) -> PatchReport:
    """Swap each Wan Decoder3d inside `vae` for FastDecoder3d, in place; returns the report.

    options: VAEDecoderOptions (or a dict of its fields); None takes the defaults. Patching twice is
    a no-op. A module with no Wan decoder inside raises TypeError. The stock WanVAE_'s own stream
    cache is cleared (a cache filled by the unpatched decoder cannot continue).
    """
    options = _options(options)
    root = _root(vae)
    report = PatchReport("VAE patch report", options)
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
            set_submodule(root, name, FastDecoder3d.from_stock(module, options))
            report.applied.append(PatchEntry(name, "fast_decoder"))
        except PatchSkip as why:
            report.skipped.append(PatchEntry(name, "fast_decoder", str(why)))
    if report.applied:
        report.notes.append("options: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(options).items()))
        for path, m in root.named_modules():
            if callable(getattr(m, "clear_cache", None)):  # the stock WanVAE_ keeps its stream cache
                m.clear_cache()
            if options.frames_per_call > 1 and _is_stock_wan_vae(m):
                m.cached_decode = _StockBlockDecode(m, whole=False)
                m.decode = _StockBlockDecode(m, whole=True)
                report.notes.append(f"{path or type(m).__name__}: decode and cached_decode pass up to "
                                    f"{options.frames_per_call} latent frames per decoder call")
    return report
