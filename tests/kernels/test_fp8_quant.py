"""fp8_quant: row-wise dynamic FP8 quantization equals the torch reference (scales bit-exact, values
within one fp8 step: the interpreter's fp32 -> fp8 cast differs from torch's in a few elements)."""
import pytest
import torch
from hypothesis import example, given, strategies as st

from longlive_triton.kernels.fp8_quant import (FP8_DTYPE, FP8_MAX, dequantize_rowwise, quantize_rowwise,
                                                quantize_rowwise_bytes, quantize_rowwise_ref,
                                                quantize_weight_per_channel)
from longlive_triton.numerics import rel_l2

from .._numerics import fp8_step

MIN_EXACT = 0.9  # fraction of fp8 values equal to torch's cast (about 96% in the interpreter)


def _check_quant(x: torch.Tensor):
    q, s = quantize_rowwise(x)
    q_ref, s_ref = quantize_rowwise_ref(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == x.shape[:-1]
    assert torch.equal(s, s_ref), "scales must equal the reference bit for bit"
    got, want = q.float(), q_ref.float()
    assert torch.isfinite(got).all() and got.abs().max() <= FP8_MAX
    step = fp8_step(torch.maximum(got.abs(), want.abs()))
    bad = (got - want).abs() > step
    assert not bad.any(), f"{int(bad.sum())} values more than one fp8 step off, e.g. {got[bad][:4]} vs {want[bad][:4]}"
    assert (got == want).float().mean() >= MIN_EXACT
    # And the dequantized value is close to x: within one step of the quantized magnitude.
    deq = dequantize_rowwise(q, s)
    err = (deq - x.float()).abs()
    assert (err <= fp8_step(got) * s[..., None] + 1e-30).all()
    return q, s


@given(M=st.integers(1, 70), K=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       zero_rows=st.booleans(), seed=st.integers(0, 2**16))
@example(M=3, K=1536, scale=1.0, zero_rows=True, seed=0)
def test_matches_reference_2d(device, M, K, scale, zero_rows, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * scale
    if zero_rows:
        x[::2] = 0.0
    x = x.to(device, torch.bfloat16)
    q, s = _check_quant(x)
    if zero_rows:
        assert (s[::2] == 1.0).all() and (q[::2].float() == 0).all()
        assert s[1::2].ne(1.0).all() or M == 1


@given(B=st.integers(1, 3), L=st.integers(1, 20), K=st.sampled_from([16, 48, 100]), seed=st.integers(0, 2**16))
def test_matches_reference_3d(device, B, L, K, seed):
    gen = torch.Generator().manual_seed(seed)
    _check_quant((torch.randn(B, L, K, generator=gen) * 4).to(device, torch.bfloat16))


def test_strided_rows_and_out(device):
    base = torch.randn(10, 64, device=device).to(torch.bfloat16)
    x = base[:, :48]                                     # row stride 64, last dim contiguous
    out = torch.full((10, 48), float("nan"), device=device).to(FP8_DTYPE)
    out_scale = torch.full((10,), float("nan"), device=device)
    q, s = quantize_rowwise(x, out=out, out_scale=out_scale)
    assert q is out and s is out_scale
    q_ref, s_ref = quantize_rowwise_ref(x)
    assert torch.equal(s, s_ref)
    assert ((q.float() - q_ref.float()).abs() <= fp8_step(q_ref.float())).all()


def test_saturating_values(device):
    x = torch.tensor([[1e30, -1e30, 1.0, 0.0], [3e38, 1.0, -2.0, 5.0]], device=device).to(torch.bfloat16)
    q, s = _check_quant(x)
    assert q.float().abs().max() == FP8_MAX


def test_weight_per_channel():
    w = torch.randn(24, 64) * torch.linspace(0.01, 3, 24)[:, None]
    w[5] = 0
    wq, ws = quantize_weight_per_channel(w.to(torch.bfloat16))
    assert wq.dtype == FP8_DTYPE and wq.shape == (24, 64) and ws.shape == (24,) and ws.dtype == torch.float32
    assert ws[5] == 1.0 and (wq[5].float() == 0).all()
    assert torch.equal(wq.float().abs().amax(1)[ws != 1], torch.full((23,), FP8_MAX))
    rel = rel_l2(wq.float() * ws[:, None], w.bfloat16())
    assert rel < 0.05
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight_per_channel(w[0])
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        quantize_weight_per_channel(wq)


@pytest.mark.parametrize("make, match", [
    (lambda d: torch.randn(4, 32, device=d), "bfloat16"),
    (lambda d: torch.randn(32, device=d).bfloat16(), "2-D"),
    (lambda d: torch.randn(2, 2, 2, 32, device=d).bfloat16(), "2-D"),
    (lambda d: torch.randn(32, 4, device=d).bfloat16().t(), "contiguous"),
    (lambda d: torch.randn(4, 0, device=d).bfloat16(), "K = 0"),
    (lambda d: torch.randn(4, 3, 32, device=d).bfloat16().transpose(0, 1), "without a copy"),
    (lambda d: [[1.0]], "torch.Tensor"),
])
def test_bad_input_is_refused(device, make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        quantize_rowwise(make(device))


def test_bad_out_is_refused(device):
    x = torch.randn(4, 32, device=device).bfloat16()
    with pytest.raises(TypeError, match="out must be torch.float8_e4m3fn"):
        quantize_rowwise(x, out=torch.empty(4, 32, device=device, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out_scale must be"):
        quantize_rowwise(x, out_scale=torch.empty(4, 1, device=device))


def test_empty_rows(device):
    q, s = quantize_rowwise(torch.empty(0, 32, device=device, dtype=torch.bfloat16))
    assert q.shape == (0, 32) and s.shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("K", [1536, 8960])
def test_real_size(K):
    x = torch.randn(1, 4680, K, device="cuda").to(torch.bfloat16) * 3
    _check_quant(x)


def test_bytes():
    assert quantize_rowwise_bytes(4680, 1536) == 4680 * 1536 * 3 + 4680 * 4
