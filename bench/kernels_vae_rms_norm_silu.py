"""Benchmark cases for the VAE's fused residual add + RMS_norm + SiLU: ours vs the stock torch ops.

Shapes: the decoder's widest activations in one steady-state latent frame at 480x832 (4 video
frames): 96 channels at 480x832 and 192 at 240x416. "ours" reads x and the residual and writes the
sum and the normalised output; "stock" is the add and the stock RMS_norm + SiLU ops, channel-first.
"""
from __future__ import annotations

import torch

from ..kernels.vae_rms_norm_silu import vae_rms_norm_silu, vae_rms_norm_silu_bytes, vae_rms_norm_silu_ref
from .registry import KernelCase, register

SHAPES = [(96, 4, 480, 832), (192, 4, 240, 416)]


def _ours(shape):
    def setup():
        x, r = (torch.randn(1, *shape, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last_3d) for _ in range(2))
        g = torch.randn(shape[0], device="cuda", dtype=torch.bfloat16)
        out, s = torch.empty_like(x), torch.empty_like(x)
        return lambda: vae_rms_norm_silu(x, g, residual=r, out=out, sum_out=s)
    return setup


def _stock(shape):
    def setup():
        x, r = (torch.randn(1, *shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        g = torch.randn(shape[0], 1, 1, 1, device="cuda", dtype=torch.bfloat16)
        return lambda: vae_rms_norm_silu_ref(x, g, residual=r)
    return setup


@register("vae_rms_norm_silu")
def cases() -> list[KernelCase]:
    return [KernelCase(name="vae_rms_norm_silu", shape=f"C{c} T{t} {h}x{w}",
                       providers={"ours": _ours((c, t, h, w)), "stock": _stock((c, t, h, w))},
                       baseline="stock", ceiling="bandwidth",
                       bytes=vae_rms_norm_silu_bytes(c * t * h * w, 2, residual=True, sum_out=True))
            for c, t, h, w in SHAPES]
