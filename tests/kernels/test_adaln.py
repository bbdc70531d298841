"""adaln: the fused residual + LayerNorm + modulation equals the stock bf16 torch ops: the residual
bit for bit; h against the same ops in fp64 at most twice as far as the stock bf16 ops (which round
where the kernel rounds) plus one bf16 ulp (tests/_numerics.py), and mostly bit-equal to them."""
import pytest
import torch
from hypothesis import given, strategies as st

from longlive_triton.kernels.adaln import adaln, adaln_bytes, adaln_ref
from longlive_triton.kernels.fp8_quant import FP8_DTYPE, FP8_MAX, Fp8Activation, quantize_rowwise_ref

from .._numerics import assert_as_close_as_same_precision, fp8_step, ulp

# The kernel rounds at the stock's points; only the LayerNorm's fp32 reduction order differs, which
# can move a bf16 output by one ulp (2^-8 relative) and, through the modulation, its neighbours.
MIN_EXACT = 0.97

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


def _exact_h(x, kw):
    """adaln_ref's h with every operand in fp64: no rounding anywhere."""
    up = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return adaln_ref(x.double(), **up)[1]


def _compare(got, want, x, kw):
    assert got.dtype == want.dtype == torch.bfloat16
    assert_as_close_as_same_precision(got, _exact_h(x, kw), want, terms=x.shape[-1])
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
        _compare(got_h, want_h, x, kw)
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


def _check_fp8(device, B, F, T, C, variant, seed):
    """fp8=True: x_new exactly as the bf16 call; h quantized per token from the bf16 h the same
    kernel computes (scales bit-exact, values within one fp8 step: the interpreter's cast may differ
    from torch's); and against the fp64 h at most twice as far as the stock ops' h quantized by the
    torch quantizer, plus one bf16 ulp (the bf16 h it quantizes may differ from the stock's by one)."""
    x, kw = _case(device, B, F, T, C, VARIANTS[variant], seed)
    B, L, C = x.shape
    out_h = Fp8Activation(torch.full((B, L, C), float("nan"), device=device).to(FP8_DTYPE),
                          torch.full((B, L), float("nan"), device=device))
    got_x, got = adaln(x, **kw, fp8=True, out_h=out_h)
    bf16_x, bf16_h = adaln(x, **kw)
    assert isinstance(got, Fp8Activation) and got.q is out_h.q and got.scale is out_h.scale
    if "y" in kw:
        assert torch.equal(got_x, bf16_x)
    q_ref, s_ref = quantize_rowwise_ref(bf16_h)
    assert torch.equal(got.scale, s_ref)
    g, w = got.q.float(), q_ref.float()
    assert g.abs().max() <= FP8_MAX
    bad = (g - w).abs() > fp8_step(torch.maximum(g.abs(), w.abs()))
    assert not bad.any(), f"{int(bad.sum())} values more than one fp8 step off"
    _, stock = adaln_ref(x, **kw, fp8=True)
    exact = _exact_h(x, kw)
    assert_as_close_as_same_precision(got.dequantize(), exact, stock.dequantize(),
                                      floor=ulp(torch.bfloat16, exact.abs().max().item()))


FP8_VARIANTS = sorted(k for k, v in VARIANTS.items() if v.get("norm", True))


@given(B=st.integers(1, 2), F=st.integers(1, 3), T=st.integers(1, 6), C=st.sampled_from([16, 48, 100, 128]),
       variant=st.sampled_from(FP8_VARIANTS), seed=st.integers(0, 2**16))
def test_fp8_output(device, B, F, T, C, variant, seed):
    _check_fp8(device, B, F, T, C, variant, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", FP8_VARIANTS)
def test_fp8_output_at_real_size(variant):
    _check_fp8(torch.device("cuda"), 1, 3, 1560, 1536, variant, seed=3)


def test_fp8_ref_and_bad_fp8_calls(device):
    x, kw = _case(device, 1, 2, 4, 48, VARIANTS["residual + modulated LN (after cross-attention)"], 5)
    _, h = adaln_ref(x, **kw, fp8=True)
    assert isinstance(h, Fp8Activation) and h.q.dtype == FP8_DTYPE and h.scale.shape == (1, 8)
    with pytest.raises(ValueError, match="norm=False has none"):
        adaln(x, y=kw["y"], norm=False, fp8=True)
    with pytest.raises(TypeError, match="out_h must be an Fp8Activation"):
        adaln(x, **kw, fp8=True, out_h=torch.empty_like(x))
    with pytest.raises(ValueError, match="out_h.scale must be"):
        adaln(x, **kw, fp8=True, out_h=Fp8Activation(torch.empty(1, 8, 48, device=device).to(FP8_DTYPE),
                                                      torch.empty(1, 8, 1, device=device)))


def test_in_place_residual(device):
    x, kw = _case(device, 1, 2, 3, 48, VARIANTS["gated residual + affine LN (after self-attention)"], 7)
    want_x, want_h = adaln_ref(x, **kw)
    x_before = x.clone()
    got_x, got_h = adaln(x, **kw, out_x=x)
    assert got_x is x and torch.equal(x, want_x)
    _compare(got_h, want_h, x_before, kw)


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
    assert adaln_bytes(1, 10, 16, residual=False, norm=True, fp8=True) == 2 * 160 + 160 + 40
