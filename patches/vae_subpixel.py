"""Nearest 2x upsample + 3x3 convolution as one 2x2 convolution on the low-resolution input (sub-pixel).

The Wan decoder's Resample blocks upsample each frame 2x by repeating pixels and then run a 3x3
convolution (padding 1). Output pixel (2i + a, 2j + b) of that convolution reads upsampled rows
2i + a - 1 .. 2i + a + 1, which are low-resolution rows i - 1, i, i (a = 0) or i, i, i + 1 (a = 1),
and the same for columns. So each of the four output phases (a, b) is a 2x2 convolution of the
low-resolution input, whose taps are sums of the 3x3 taps:

    rows, phase a = 0:  [w0, w1 + w2] at low rows (i - 1, i);   a = 1: [w0 + w1, w2] at rows (i, i + 1)

One convolution with the four phases as 4 * C_out output channels, a 2x2 kernel and padding 1 gives
all of them: its output (o_h, o_w) reads low rows o_h - 1, o_h, so phase a of output row i sits at
o_h = i + a. The pixel shuffle out[2i + a, 2j + b] = y[i + a, j + b, phase (a, b)] is then one
strided copy, because that address is linear in (i, a, j, b). The zero padding agrees too: upsampled
row -1 and row 2H are low rows -1 and H. Same numbers as the stock pair up to summation order (and
in bf16 the rounding of the summed taps), with 16 instead of 36 multiply-adds per output pixel and
no upsampled copy of the input.

Layouts: channels-last (NHWC storage) images [N, C, H, W] in, channels-last 3-D video out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["subpixel_weight", "subpixel_conv", "upsample_conv_ref"]

# _ROWS[a][k, u]: how 3x3 tap row u contributes to 2x2 tap row k of phase a (columns alike).
_ROWS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, 3, 3] -> [4 * C_out, C_in, 2, 2] (phase-major: channel (2a + b) * C_out + o),
    summed in float64 and rounded once to the weight's dtype, stored channels-last."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"sub-pixel decomposition needs a 3x3 Conv2d weight [C_out, C_in, 3, 3], got {tuple(weight.shape)}")
    rows = _ROWS.to(weight.device)
    w4 = torch.einsum("aku,blv,ocuv->abockl", rows, rows, weight.double())
    cout, cin = weight.shape[:2]
    return w4.reshape(4 * cout, cin, 2, 2).to(weight.dtype).contiguous(memory_format=torch.channels_last)


def subpixel_conv(x: torch.Tensor, weight4: torch.Tensor, bias4: torch.Tensor | None, frames: int) -> torch.Tensor:
    """The upsampled convolution of x [N = B*T, C_in, H, W] (channels-last) as video [B, C_out, T, 2H, 2W]
    (channels-last 3-D), from `subpixel_weight`'s weights; bias4 is the bias repeated per phase (or None)."""
    n, _, h, w = x.shape
    if n % frames:
        raise ValueError(f"{n} images are not a whole number of {frames}-frame videos")
    cout = weight4.shape[0] // 4
    y = F.conv2d(x, weight4, bias4, padding=1).contiguous(memory_format=torch.channels_last)  # [N, 4C, H+1, W+1]
    s_n, _, s_h, s_w = y.stride()
    # out[n, i, a, j, b, o] = y[n, (2a + b) * C + o, i + a, j + b]: one strided view, one copy.
    phases = y.as_strided((n, h, 2, w, 2, cout), (s_n, s_h, s_h + 2 * cout, s_w, s_w + cout, 1), y.storage_offset())
    out = torch.empty((n // frames, frames, 2 * h, 2 * w, cout), dtype=y.dtype, device=y.device)
    out.view(n, h, 2, w, 2, cout).copy_(phases)
    return out.permute(0, 4, 1, 2, 3)


def upsample_conv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The stock pair: nearest 2x upsample, then the 3x3 convolution with padding 1 ([N, C_out, 2H, 2W])."""
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
