"""Sub-pixel decomposition (patches/vae_subpixel.py): nearest 2x + 3x3 conv == four-phase 2x2 conv + shuffle."""
import pytest
import torch
from hypothesis import example, given, strategies as st

from longlive_triton.numerics import rel_l2
from longlive_triton.patches.vae_subpixel import subpixel_conv, subpixel_weight, upsample_conv_ref


def _case(n, c, h, w, cout, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, c, 3, 3, generator=gen) / (3 * c ** 0.5)).to(dtype)
    bias = torch.randn(cout, generator=gen).to(dtype)
    return x, weight, bias


@given(frames=st.integers(1, 3), videos=st.integers(1, 2), c=st.integers(1, 12), h=st.integers(1, 6),
       w=st.integers(1, 7), cout=st.integers(1, 9), bias=st.booleans(), seed=st.integers(0, 2**16))
@example(frames=4, videos=1, c=16, h=5, w=6, cout=8, bias=True, seed=0)
def test_equals_upsample_then_conv_fp32(frames, videos, c, h, w, cout, bias, seed):
    x, weight, b = _case(frames * videos, c, h, w, cout, torch.float32, seed)
    b = b if bias else None
    want = upsample_conv_ref(x, weight, b)  # [N, C_out, 2H, 2W]
    out = subpixel_conv(x, subpixel_weight(weight), None if b is None else b.repeat(4), frames)
    assert out.shape == (videos, cout, frames, 2 * h, 2 * w)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    got = out.permute(0, 2, 1, 3, 4).reshape(videos * frames, cout, 2 * h, 2 * w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_within_the_rounding_of_the_summed_taps():
    x, weight, b = _case(4, 32, 6, 8, 16, torch.bfloat16, 1)
    exact = upsample_conv_ref(x.double(), weight.double(), b.double())
    naive = rel_l2(upsample_conv_ref(x, weight, b), exact)
    got = subpixel_conv(x, subpixel_weight(weight), b.repeat(4), 4).permute(0, 2, 1, 3, 4).reshape(4, 16, 12, 16)
    err = rel_l2(got, exact)
    assert err <= 2 * naive + 1e-3, (err, naive)


def test_weight_layout_and_refusals():
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    w4 = subpixel_weight(weight)
    assert w4.shape == (12, 2, 2, 2) and w4.dtype == torch.float64
    # phase (a=1, b=0), output channel 1, top-left tap: rows w0 + w1, column w0
    torch.testing.assert_close(w4[2 * 3 + 1, :, 0, 0], weight[1, :, 0, 0] + weight[1, :, 1, 0])
    assert torch.allclose(w4.sum(dim=(2, 3)).view(4, 3, 2), weight.sum(dim=(2, 3)).expand(4, 3, 2))
    with pytest.raises(ValueError, match="3x3 Conv2d weight"):
        subpixel_weight(torch.randn(3, 2, 1, 1))
    with pytest.raises(ValueError, match="whole number of 2-frame"):
        subpixel_conv(torch.randn(3, 2, 4, 4).contiguous(memory_format=torch.channels_last), w4.float(), None, 2)
