"""adaln: the fused residual + LayerNorm + modulation equals the stock bf16 torch ops."""
import pytest
import torch
from hypothesis import given, strategies as st

from longlive_triton.kernels.adaln import adaln, adaln_bytes, adaln_ref

# The kernel rounds at the stock's points; only the LayerNorm's fp32 reduction order differs, which
# can move a bf16 output by one ulp (2^-8 relative) and, through the modulation, its neighbours.
ATOL, RTOL, MIN_EXACT = 2e-2, 1e-2, 0.97

VARIANTS = {
    "modulated LN (norm1, norm2 without residual)": dict(y=False, gate=False, affine=False, modulate=True),
    "gated residual + affine LN (after self-attention)": dict(y=True, gate=True, affine=True, modulate=False),
    "residual + modulated LN (after cross-attention)": dict(y=True, gate=False, affine=False, modulate=True),
    "gated residual only (after the FFN)": dict(y=True, gate=True, affine=False, modulate=False, norm=False),
}


def _case(device, B, F, T, C, variant, seed):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen) * scale + offset).to(device, torch.bfloat16)

    L = F * T
    kw = dict(norm=variant.get("norm", True))
    x = rnd(B, L, C, scale=3.0, offset=0.5)
    if variant["y"]:
        kw["y"] = rnd(B, L, C)
    if variant["gate"]:
        kw["gate"] = rnd(B, F, 6, C)[:, :, 2]          # a strided chunk, as the stock block passes it
    if variant["affine"]:
        kw["weight"], kw["bias"] = rnd(C, scale=0.2, offset=1.0), rnd(C, scale=0.1)
    if variant["modulate"]:
        mod = rnd(B, F, 6, 1, C, scale=0.5)
        kw["shift"], kw["scale"] = mod[:, :, 0], mod[:, :, 1]   # [B, F, 1, C] views
    return x, kw


def _compare(got, want):
    assert got.dtype == want.dtype == torch.bfloat16 and torch.isfinite(got.float()).all()
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL, rtol=RTOL)
    assert (got == want).float().mean().item() >= MIN_EXACT


def _check(device, B, F, T, C, variant, seed):
    x, kw = _case(device, B, F, T, C, VARIANTS[variant], seed)
    x_before = x.clone()
    poison = dict(out_x=torch.full_like(x, float("nan")) if "y" in kw else None,
                  out_h=torch.full_like(x, float("nan")) if kw["norm"] else None)
    got_x, got_h = adaln(x, **kw, **poison)
    want_x, want_h = adaln_ref(x, **kw)
    assert torch.equal(x, x_before)
    if "y" in kw:
        assert got_x is poison["out_x"]
        assert torch.equal(got_x, want_x)       # the residual path has no reduction: bit-exact
    else:
        assert got_x is None
    if kw["norm"]:
        _compare(got_h, want_h)
    else:
        assert got_h is None


@given(B=st.integers(1, 2), F=st.integers(1, 3), T=st.integers(1, 6), C=st.sampled_from([16, 48, 100, 128]),
       variant=st.sampled_from(sorted(VARIANTS)), seed=st.integers(0, 2**16))
def test_matches_stock_ops(device, B, F, T, C, variant, seed):
    _check(device, B, F, T, C, variant, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("B", [1, 2])
def test_matches_stock_ops_at_real_size(B, variant):
    """One 3-frame block of LongLive-1.3B: 4680 tokens of width 1536, per-frame modulation."""
    _check(torch.device("cuda"), B, 3, 1560, 1536, variant, seed=B)


def test_in_place_residual(device):
    x, kw = _case(device, 1, 2, 3, 48, VARIANTS["gated residual + affine LN (after self-attention)"], 7)
    want_x, want_h = adaln_ref(x, **kw)
    got_x, got_h = adaln(x, **kw, out_x=x)
    assert got_x is x and torch.equal(x, want_x)
    _compare(got_h, want_h)


@pytest.mark.parametrize("change, match", [
    (lambda x, kw: (x.float(), kw), "bfloat16"),
    (lambda x, kw: (x, {**kw, "gate": kw["gate"][..., :32]}), "gate must have shape"),
    (lambda x, kw: (x, {**kw, "y": None}), "gate needs y"),
    (lambda x, kw: (x, {**kw, "bias": None}), "both LayerNorm weight and bias"),
    (lambda x, kw: (x, {**kw, "norm": False}), "norm=False"),
    (lambda x, kw: (x[..., :32].contiguous(), kw), "y must have shape"),
    (lambda x, kw: (x.transpose(1, 2).contiguous().transpose(1, 2), kw), "contiguous"),
])
def test_bad_input_is_refused(device, change, match):
    x, kw = _case(device, 1, 2, 4, 48, VARIANTS["gated residual + affine LN (after self-attention)"], 3)
    x, kw = change(x, kw)
    with pytest.raises((TypeError, ValueError), match=match):
        adaln(x, **kw)


def test_tokens_must_split_into_frames(device):
    x = torch.randn(1, 7, 16, device=device).to(torch.bfloat16)
    mod = torch.randn(1, 2, 16, device=device).to(torch.bfloat16)
    with pytest.raises(ValueError, match="do not split"):
        adaln(x, shift=mod, scale=mod)


def test_bytes():
    assert adaln_bytes(1, 4680, 1536, residual=True, norm=True) == 2 * 4680 * 1536 * 4
