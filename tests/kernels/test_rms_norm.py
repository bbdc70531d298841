"""rms_norm: the fused RMSNorm equals WanRMSNorm's bf16 math: against the fp64 RMSNorm, at most twice
the error of WanRMSNorm's own bf16 math (rms_norm_ref, which rounds where the kernel rounds) plus one
bf16 ulp (tests/_numerics.py); and mostly bit-equal to it."""
import pytest
import torch
from hypothesis import given, strategies as st

from longlive_triton.kernels.rms_norm import rms_norm, rms_norm_bytes, rms_norm_ref

from .._numerics import assert_as_close_as_same_precision

# Only the fp32 sum's order differs from torch: one bf16 ulp on a few elements.
MIN_EXACT = 0.97


def _check(device, B, L, C, seed, row_stride_pad=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, L, C + row_stride_pad, generator=gen) * 3 + 0.2).to(device, torch.bfloat16)[..., :C]
    w = (1 + 0.2 * torch.randn(C, generator=gen)).to(device, torch.bfloat16)
    out = torch.full((B, L, C), float("nan"), dtype=torch.bfloat16, device=device)
    got = rms_norm(x, w, 1e-6, out=out)
    want = rms_norm_ref(x, w, 1e-6)
    assert got is out and torch.isfinite(got.float()).all()
    xd = x.double()
    exact = xd * torch.rsqrt(xd.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * w.double()
    assert_as_close_as_same_precision(got, exact, want, terms=C)
    assert (got == want).float().mean().item() >= MIN_EXACT


@given(B=st.integers(1, 2), L=st.integers(1, 11), C=st.sampled_from([16, 48, 100, 128]),
       pad=st.sampled_from([0, 8]), seed=st.integers(0, 2**16))
def test_matches_wan_rms_norm(device, B, L, C, pad, seed):
    _check(device, B, L, C, seed, pad)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 2])
def test_matches_wan_rms_norm_at_real_size(B):
    """The cross-attention queries of one 1.3B block: 4680 tokens of width 1536."""
    _check(torch.device("cuda"), B, 4680, 1536, seed=B)


@pytest.mark.parametrize("change, match", [
    (lambda x, w: (x.float(), w), "bfloat16"),
    (lambda x, w: (x, w[:8]), "weight must have shape"),
    (lambda x, w: (x[0], w), r"\[B, L, C\]"),
    (lambda x, w: (x.transpose(1, 2).contiguous().transpose(1, 2), w), "contiguous"),
])
def test_bad_input_is_refused(device, change, match):
    x = torch.randn(1, 4, 16, device=device).to(torch.bfloat16)
    w = torch.ones(16, device=device, dtype=torch.bfloat16)
    x, w = change(x, w)
    with pytest.raises((TypeError, ValueError), match=match):
        rms_norm(x, w)


def test_bytes():
    assert rms_norm_bytes(1, 4680, 1536) == 4 * 4680 * 1536
