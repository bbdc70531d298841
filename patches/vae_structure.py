"""Recognising the Wan2.1 VAE decoder's structure (stock `wan/modules/vae.py` and our reference alike).

The fast decoder (patches/vae_decoder.py) adopts the stock submodules as they are; these checks make
sure each one is laid out as the stock one (kernel sizes, causal padding, norms followed by SiLU...)
and raise PatchSkip naming the first difference, so that an unknown variant is left untouched.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .base import PatchSkip

__all__ = ["looks_like_wan_decoder", "check_conv", "check_norm", "norm_bias", "plan_of"]


def looks_like_wan_decoder(m: nn.Module) -> bool:
    """conv1 (a CausalConv3d), middle, upsamples and head."""
    return (all(isinstance(getattr(m, a, None), nn.Module) for a in ("conv1", "middle", "upsamples", "head"))
            and _is_causal_conv(m.conv1))


def _is_causal_conv(m) -> bool:
    return isinstance(m, nn.Conv3d) and isinstance(getattr(m, "_padding", None), (tuple, list))


def check_conv(m, where: str, kernel: tuple, padding: tuple) -> None:
    if not _is_causal_conv(m):
        raise PatchSkip(f"{where} is {type(m).__name__}, not a CausalConv3d")
    if tuple(m.kernel_size) != kernel or tuple(m._padding) != padding:
        raise PatchSkip(f"{where}: kernel {tuple(m.kernel_size)} / causal padding {tuple(m._padding)}, "
                        f"expected {kernel} / {padding}")
    if tuple(m.stride) != (1, 1, 1) or tuple(m.dilation) != (1, 1, 1) or m.groups != 1:
        raise PatchSkip(f"{where}: strided, dilated or grouped convolutions are not in the Wan decoder")


def check_norm(m, where: str) -> None:
    gamma = getattr(m, "gamma", None)
    if not isinstance(gamma, nn.Parameter) or not getattr(m, "channel_first", False):
        raise PatchSkip(f"{where} is {type(m).__name__}, not a channel-first RMS_norm")
    if not math.isclose(float(m.scale), gamma.shape[0] ** 0.5):
        raise PatchSkip(f"{where}: scale {m.scale} is not sqrt(dim)")
    if not isinstance(m.bias, torch.Tensor) and m.bias != 0.0:
        raise PatchSkip(f"{where}: a constant bias {m.bias} is not the stock RMS_norm's")


def norm_bias(m) -> torch.Tensor | None:
    return m.bias if isinstance(m.bias, torch.Tensor) else None


def _classify(m: nn.Module, where: str) -> str:
    """'res', 'attn' or 'up', after checking the block is laid out as the stock one."""
    if isinstance(getattr(m, "residual", None), nn.Sequential) and hasattr(m, "shortcut"):
        layers = list(m.residual)
        kinds = [type(x).__name__ for x in layers]
        if len(layers) != 7 or not isinstance(layers[1], nn.SiLU) or not isinstance(layers[4], nn.SiLU) \
                or not isinstance(layers[5], nn.Dropout):
            raise PatchSkip(f"{where}: residual layers {kinds} are not RMS_norm, SiLU, conv, RMS_norm, SiLU, "
                            "Dropout, conv")
        if layers[5].p != 0.0 and m.training:
            raise PatchSkip(f"{where}: dropout {layers[5].p} in training mode")
        check_norm(layers[0], f"{where}.residual.0")
        check_norm(layers[3], f"{where}.residual.3")
        check_conv(layers[2], f"{where}.residual.2", (3, 3, 3), (1, 1, 1, 1, 2, 0))
        check_conv(layers[6], f"{where}.residual.6", (3, 3, 3), (1, 1, 1, 1, 2, 0))
        if not isinstance(m.shortcut, nn.Identity):
            check_conv(m.shortcut, f"{where}.shortcut", (1, 1, 1), (0, 0, 0, 0, 0, 0))
        return "res"
    if all(hasattr(m, a) for a in ("to_qkv", "proj", "norm")):
        check_norm(m.norm, f"{where}.norm")
        for name in ("to_qkv", "proj"):
            conv = getattr(m, name)
            if not isinstance(conv, nn.Conv2d) or tuple(conv.kernel_size) != (1, 1):
                raise PatchSkip(f"{where}.{name} is not a 1x1 Conv2d")
        return "attn"
    mode = getattr(m, "mode", None)
    if mode in ("upsample2d", "upsample3d"):
        up, conv = m.resample[0], m.resample[1]
        if getattr(up, "mode", "nearest") != "nearest" or list(up.parameters()):
            raise PatchSkip(f"{where}.resample.0 is not a nearest upsample")
        if tuple(getattr(up, "scale_factor", None) or (2.0, 2.0)) != (2.0, 2.0):
            raise PatchSkip(f"{where}.resample.0 scales by {up.scale_factor}, not 2x2")
        if not isinstance(conv, nn.Conv2d) or tuple(conv.kernel_size) != (3, 3) or tuple(conv.padding) != (1, 1) \
                or tuple(conv.stride) != (1, 1):
            raise PatchSkip(f"{where}.resample.1 is not a 3x3 Conv2d with padding 1")
        if mode == "upsample3d":
            check_conv(m.time_conv, f"{where}.time_conv", (3, 1, 1), (0, 0, 0, 0, 2, 0))
        return "up"
    raise PatchSkip(f"{where} ({type(m).__name__}, mode {mode!r}) is not a decoder block the fast decoder knows")


def plan_of(seq: nn.Sequential, where: str) -> list[tuple[str, nn.Module]]:
    return [(_classify(m, f"{where}.{i}"), m) for i, m in enumerate(seq)]
