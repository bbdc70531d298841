"""vae_rms_norm_silu: the fused (residual add +) RMS_norm (+ SiLU) equals the stock VAE ops, channels-last.

Judged against the ops in fp64: at most twice the error of the same ops in fp32 rounded once to the
output dtype (where the kernel rounds; the stock bf16 ops round after each op) plus one output ulp
and fp32 summation noise (tests/_numerics.py)."""
import pytest
import torch
from hypothesis import example, given, strategies as st

from longlive_triton.kernels.vae_rms_norm_silu import (vae_add, vae_add_ref, vae_rms_norm_silu,
                                                       vae_rms_norm_silu_bytes, vae_rms_norm_silu_ref)

from .._numerics import assert_as_close_as_same_precision

CL = torch.channels_last_3d


def _video(gen, shape, dtype, device, offset=0.0):
    return (torch.randn(shape, generator=gen) * 2 + offset).to(dtype).to(device).contiguous(memory_format=CL)


def _check(device, dtype, B, C, T, H, W, residual, silu, bias, sum_out, into_buffer, seed, x_bias=False):
    gen = torch.Generator().manual_seed(seed)
    x = _video(gen, (B, C, T, H, W), dtype, device, 0.3)
    r = _video(gen, (B, C, T, H, W), dtype, device) if residual else None
    g = (1 + 0.3 * torch.randn(C, 1, 1, 1, generator=gen)).to(dtype).to(device)
    bvec = (0.1 * torch.randn(C, 1, 1, 1, generator=gen)).to(dtype).to(device) if bias else None
    xb = (0.5 * torch.randn(C, generator=gen)).to(dtype).to(device) if x_bias else None
    if into_buffer:  # the decoder's case: outputs are the frames after two cached ones of a larger buffer
        buf = torch.full((B, C, T + 2, H, W), float("nan"), dtype=dtype, device=device).contiguous(memory_format=CL)
        out = buf[:, :, 2:]
        cached = torch.randn(B, C, 2, H, W, generator=gen).to(dtype).to(device)
        buf[:, :, :2] = cached
    else:
        out = torch.full((B, C, T, H, W), float("nan"), dtype=dtype, device=device).contiguous(memory_format=CL)
    s_out = torch.full((B, C, T, H, W), float("nan"), dtype=dtype, device=device).contiguous(memory_format=CL) \
        if sum_out else None
    got = vae_rms_norm_silu(x, g, bvec, x_bias=xb, residual=r, silu=silu, out=out, sum_out=s_out)
    assert got is out and torch.isfinite(got.float()).all()

    y_stock, s_stock = vae_rms_norm_silu_ref(x, g, bvec, x_bias=xb, residual=r, silu=silu)
    up = (lambda t, dt: None if t is None else t.to(dt))
    y_exact, s_exact = vae_rms_norm_silu_ref(x.double(), g.double(), up(bvec, torch.float64),
                                             x_bias=up(xb, torch.float64), residual=up(r, torch.float64), silu=silu)
    y_same, s_same = vae_rms_norm_silu_ref(x.float(), g.float(), up(bvec, torch.float32),
                                           x_bias=up(xb, torch.float32), residual=up(r, torch.float32), silu=silu)
    assert_as_close_as_same_precision(got, y_exact, y_same.to(dtype), terms=C)
    if sum_out and x_bias and dtype == torch.bfloat16:  # one rounding where the stock rounds twice
        assert_as_close_as_same_precision(s_out, s_exact, s_same.to(dtype), what="sum")
    elif sum_out:
        torch.testing.assert_close(s_out, s_stock, atol=0, rtol=2e-7 if x_bias else 0)  # torch's add(s)
    if into_buffer:
        assert torch.equal(buf[:, :, :2], cached)  # the cached frames are not touched


@given(dtype=st.sampled_from([torch.float32, torch.bfloat16]), B=st.integers(1, 2),
       C=st.sampled_from([8, 32, 96, 100]), T=st.integers(1, 4), H=st.integers(1, 5), W=st.integers(1, 6),
       residual=st.booleans(), silu=st.booleans(), bias=st.booleans(), sum_out=st.booleans(),
       into_buffer=st.booleans(), seed=st.integers(0, 2**16), x_bias=st.booleans())
@example(dtype=torch.bfloat16, B=1, C=96, T=4, H=3, W=5, residual=True, silu=True, bias=False, sum_out=True,
         into_buffer=True, seed=1, x_bias=True)
@example(dtype=torch.float32, B=2, C=100, T=4, H=5, W=6, residual=True, silu=True, bias=True, sum_out=True,
         into_buffer=True, seed=2, x_bias=False)  # several programs per batch (in the interpreter too), a ragged last
def test_matches_stock_ops(device, dtype, B, C, T, H, W, residual, silu, bias, sum_out, into_buffer, seed, x_bias):
    _check(device, dtype, B, C, T, H, W, residual, silu, bias, sum_out, into_buffer, seed, x_bias)


@given(dtype=st.sampled_from([torch.float32, torch.bfloat16]), C=st.sampled_from([3, 8, 96, 100]),
       T=st.integers(1, 3), H=st.integers(1, 5), W=st.integers(1, 6), x_bias=st.booleans(), residual=st.booleans(),
       seed=st.integers(0, 2**16))
@example(dtype=torch.bfloat16, C=96, T=3, H=5, W=6, x_bias=True, residual=True, seed=3)
def test_add_matches_stock_adds(device, dtype, C, T, H, W, x_bias, residual, seed):
    """vae_add: the conv bias and the residual added in one pass, into the frames after a buffer's cache."""
    gen = torch.Generator().manual_seed(seed)
    x = _video(gen, (1, C, T, H, W), dtype, device, 0.3)
    r = _video(gen, (1, C, T, H, W), dtype, device) if residual else None
    xb = (0.5 * torch.randn(C, generator=gen)).to(dtype).to(device) if x_bias else None
    buf = torch.full((1, C, T + 2, H, W), float("nan"), dtype=dtype, device=device).contiguous(memory_format=CL)
    buf[:, :, :2] = 7.0
    got = vae_add(x, xb, r, out=buf[:, :, 2:])
    assert got.data_ptr() == buf[:, :, 2:].data_ptr() and bool((buf[:, :, :2] == 7.0).all())
    exact = vae_add_ref(x.double(), None if xb is None else xb.double(), None if r is None else r.double())
    if dtype == torch.bfloat16:  # one rounding of the exact sum
        torch.testing.assert_close(got, exact.to(dtype), atol=0, rtol=0)
    else:  # the stock's adds, in its order
        assert_as_close_as_same_precision(got, exact, vae_add_ref(x, xb, r))


@pytest.mark.gpu
@pytest.mark.parametrize("C,T,H,W", [(96, 4, 480, 832), (192, 4, 240, 416), (384, 1, 60, 104)])
def test_matches_stock_ops_at_real_size(C, T, H, W):
    """The decoder's three widths at 480x832, steady-state frame counts, into a time-padded buffer."""
    _check(torch.device("cuda"), torch.bfloat16, 1, C, T, H, W, residual=True, silu=True, bias=False,
           sum_out=True, into_buffer=True, seed=C)


def _inputs(device):
    x = torch.randn(1, 8, 2, 3, 4, device=device).contiguous(memory_format=CL)
    return x, torch.ones(8, device=device)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, g: vae_rms_norm_silu(x.contiguous(), g), ValueError, "channels-last"),
    (lambda x, g: vae_rms_norm_silu(x[:, :, 0], g), ValueError, "5-D"),
    (lambda x, g: vae_rms_norm_silu(x.half(), g), TypeError, "torch.bfloat16 or torch.float32"),
    (lambda x, g: vae_rms_norm_silu(x, g[:4]), ValueError, r"gamma must have shape \[8\]"),
    (lambda x, g: vae_rms_norm_silu(x, g, residual=x[:, :, :1]), ValueError, "residual must have shape"),
    (lambda x, g: vae_rms_norm_silu(x, g, residual=x.bfloat16()), TypeError, "residual must be torch.float32"),
    (lambda x, g: vae_rms_norm_silu(x, g, out=torch.empty_like(x).contiguous()), ValueError, "out must be channels"),
    (lambda x, g: vae_rms_norm_silu(x, g, sum_out=x[:, :4]), ValueError, "sum_out must have shape"),
    (lambda x, g: vae_rms_norm_silu(x, "g"), TypeError, "gamma must be a torch.Tensor"),
    (lambda x, g: vae_rms_norm_silu(x, g, x_bias=g[:5]), ValueError, r"x_bias must have shape \[8\]"),
    (lambda x, g: vae_add(x, g, out=x[:, :, :1]), ValueError, "out must have shape"),
    (lambda x, g: vae_add(x, residual=x.contiguous()), ValueError, "residual must be channels-last"),
])
def test_bad_input_is_refused(device, call, error, match):
    x, g = _inputs(device)
    with pytest.raises(error, match=match):
        call(x, g)


def test_bytes():
    assert vae_rms_norm_silu_bytes(10, 2, residual=True, sum_out=True) == 80
    assert vae_rms_norm_silu_bytes(10, 4, residual=False, sum_out=False) == 80
