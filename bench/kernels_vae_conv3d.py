"""Benchmark cases for the VAE's causal 3x3x3 convolution: our implicit GEMM vs cuDNN (channels-last).

Shapes: the decoder's residual convolutions at 480x832 (input frames = 2 cached + new), with one
latent frame per decoder call (the stock loop) and with three (`frames_per_call` = 3): 96 channels
at 480x832, 192 at 240x416, 384 at 120x208 and at 60x104. Both providers read the same time-padded
channels-last bf16 input and write bf16 without bias (as the decoder with fused_bias calls them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.vae_conv3d import vae_conv3d, vae_conv3d_flops, vae_conv3d_weight
from .registry import KernelCase, register

# (channels, new frames, H, W): one latent frame per call, then three
SHAPES = [(96, 4, 480, 832), (192, 4, 240, 416), (384, 2, 120, 208), (384, 1, 60, 104),
          (96, 12, 480, 832), (384, 6, 120, 208), (384, 3, 60, 104)]


def _inputs(c, t, h, w):
    x = torch.randn(1, c, t + 2, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    weight = (torch.randn(c, c, 3, 3, 3, device="cuda") / (27 * c) ** 0.5).to(torch.bfloat16)
    return x, weight


def _ours(shape):
    def setup():
        x, weight = _inputs(*shape)
        wk = vae_conv3d_weight(weight)
        out = torch.empty(1, shape[0], *shape[1:], device="cuda", dtype=torch.bfloat16,
                          memory_format=torch.channels_last_3d)
        return lambda: vae_conv3d(x, wk, out=out)
    return setup


def _cudnn(shape):
    def setup():
        x, weight = _inputs(*shape)
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
        return lambda: F.conv3d(x, weight, padding=(0, 1, 1))
    return setup


@register("vae_conv3d")
def cases() -> list[KernelCase]:
    return [KernelCase(name="vae_conv3d", shape=f"C{c} T{t}+2 {h}x{w}",
                       providers={"ours": _ours((c, t, h, w)), "cudnn": _cudnn((c, t, h, w))},
                       baseline="cudnn", ceiling="tflops", flops=vae_conv3d_flops(1, c, c, t, h, w))
            for c, t, h, w in SHAPES]
