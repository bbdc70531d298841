"""Run the stock LongLive v1.0 Wan VAE (`wan/modules/vae.py`) beside ours, with our decoder weights.

    from longlive_triton.stock.vae import load_stock_vae, build_stock_vae, stock_decode
    sv = load_stock_vae(".stock/LongLive")                    # or $LONGLIVE_SRC
    stock = build_stock_vae(sv, reference_decoder)            # WanVAE_ holding the same decoder weights
    pixels = stock_decode(stock, z)                           # what LongLive's decode_to_pixel computes

The file is imported alone, as a module of its own name (not `wan.modules.vae`), so the stock
package `__init__` files (T5, CLIP) never run. Its only third-party import besides torch is einops,
for two `rearrange` patterns; when einops is not installed a stand-in that does exactly those two
rearrangements is in `sys.modules` during the import (the stock module keeps its reference).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn

from longlive_triton.models.wan21_vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAEDecoder

__all__ = ["load_stock_vae", "build_stock_vae", "stock_scale", "stock_decode", "stock_cached_decode"]

_LOADED: dict[Path, types.ModuleType] = {}


def _rearrange(x: torch.Tensor, pattern: str, **sizes) -> torch.Tensor:
    """The two einops patterns the stock VAE uses, and nothing else."""
    p = pattern.replace(" ", "")
    if p == "bcthw->(bt)chw":
        b, c, t, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    if p == "(bt)chw->bcthw":
        t = sizes["t"]
        bt, c, h, w = x.shape
        return x.reshape(bt // t, t, c, h, w).permute(0, 2, 1, 3, 4)
    raise NotImplementedError(f"einops stand-in from longlive_triton.stock.vae: pattern {pattern!r}")


def load_stock_vae(src_dir: str | os.PathLike | None = None) -> types.ModuleType:
    """The stock `wan/modules/vae.py` of a LongLive checkout (`src_dir`, else $LONGLIVE_SRC), imported alone."""
    src_dir = src_dir or os.environ.get("LONGLIVE_SRC")
    if not src_dir:
        raise FileNotFoundError("no LongLive source given: pass src_dir or set LONGLIVE_SRC "
                                "(tests/gpu/prepare_stock_src.sh makes .stock/LongLive)")
    path = Path(src_dir).expanduser().resolve() / "wan/modules/vae.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {src_dir} is not a LongLive checkout")
    if path in _LOADED:
        return _LOADED[path]
    stand_in = None
    if importlib.util.find_spec("einops") is None:
        stand_in = types.ModuleType("einops")
        stand_in.rearrange = _rearrange
        sys.modules["einops"] = stand_in
    try:
        spec = importlib.util.spec_from_file_location("_longlive_stock_wan_vae", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if stand_in is not None and sys.modules.get("einops") is stand_in:
            del sys.modules["einops"]
    _LOADED[path] = mod
    return mod


@torch.no_grad()
def build_stock_vae(stock_vae: types.ModuleType, reference: WanVAEDecoder) -> nn.Module:
    """A stock `WanVAE_` of the reference's shape holding its decoder weights (strictly loaded), on its
    device and dtype; the stock encoder half keeps its initial weights (decoding never reads them)."""
    p = reference.conv2.weight
    with torch.device("meta"):
        model = stock_vae.WanVAE_(dim=reference.dim, z_dim=reference.z_dim, dim_mult=list(reference.decoder.dim_mult),
                                  num_res_blocks=reference.decoder.num_res_blocks,
                                  attn_scales=list(reference.decoder.attn_scales),
                                  temperal_downsample=list(reference.temperal_downsample))
    model = model.to_empty(device=p.device)
    full = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    full.update(reference.state_dict())
    model.load_state_dict(full, strict=True)
    return model.to(p.dtype).eval().requires_grad_(False)


def stock_scale(dtype: torch.dtype, device) -> list[torch.Tensor]:
    """LongLive's `WanVAEWrapper` scale: [mean, 1/std] in the latents' dtype."""
    mean = torch.tensor(WAN21_LATENT_MEAN, dtype=torch.float32).to(device=device, dtype=dtype)
    std = torch.tensor(WAN21_LATENT_STD, dtype=torch.float32).to(device=device, dtype=dtype)
    return [mean, 1.0 / std]


@torch.no_grad()
def stock_decode(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Whole-clip decode as `WanVAEWrapper.decode_to_pixel(use_cache=False)`: z [B, C, F, H, W] -> float32."""
    out = model.decode(z, stock_scale(z.dtype, z.device)).float().clamp_(-1, 1)
    model.clear_cache()
    return out


@torch.no_grad()
def stock_cached_decode(model: nn.Module, z_block: torch.Tensor) -> torch.Tensor:
    """One block of a stream, as `decode_to_pixel(use_cache=True)`; `model.clear_cache()` starts a stream."""
    return model.cached_decode(z_block, stock_scale(z_block.dtype, z_block.device)).float().clamp_(-1, 1)
