"""fp8_gemm: the W8A8 row-wise-scaled GEMM equals the EMULATED reference (dequantize, fp32 matmul)
up to the one bf16 rounding of the output: relative L2 <= 1e-2 and SQNR >= 30 dB."""
import pytest
import torch
from hypothesis import example, given, strategies as st

from longlive_triton.kernels.fp8_gemm import fp8_gemm, fp8_gemm_bytes, fp8_gemm_flops, fp8_gemm_ref, fp8_linear
from longlive_triton.kernels.fp8_quant import FP8_DTYPE, quantize_rowwise, quantize_weight_per_channel

MAX_REL_L2, MIN_SQNR_DB = 1e-2, 30.0


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    noise = (got.float() - ref.float()).pow(2).sum().clamp_min(1e-30)
    return (10 * torch.log10(ref.float().pow(2).sum() / noise)).item()


def _operands(device, M, N, K, seed, bias=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=gen) * 2).to(torch.bfloat16)
    w = torch.randn(N, K, generator=gen) / K ** 0.5 * torch.rand(N, 1, generator=gen).add(0.1)
    a_fp8, a_scale = quantize_rowwise(x.to(device))
    w_fp8, w_scale = quantize_weight_per_channel(w.to(device))
    b = (torch.randn(N, generator=gen) * 0.5).to(device, torch.bfloat16) if bias else None
    return a_fp8, w_fp8, a_scale, w_scale, b


def _compare(got, want):
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.isfinite(got.float()).all()
    rel = ((got.float() - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert rel <= MAX_REL_L2, f"relative L2 error {rel:.3g}"
    assert sqnr_db(want, got) >= MIN_SQNR_DB


def _check(device, M, N, K, seed, bias, gelu, poison=True):
    a, w, sa, sw, b = _operands(device, M, N, K, seed, bias)
    out = torch.full((M, N), float("nan"), device=device, dtype=torch.bfloat16) if poison else None
    got = fp8_gemm(a, w, sa, sw, b, gelu=gelu, out=out)
    if poison:
        assert got is out
    _compare(got, fp8_gemm_ref(a, w, sa, sw, b, gelu=gelu))


@given(M=st.integers(1, 70), N=st.integers(16, 96), K=st.sampled_from([32, 48, 64, 80, 96, 112, 128]),
       bias=st.booleans(), gelu=st.booleans(), seed=st.integers(0, 2**16))
@example(M=70, N=96, K=128, bias=True, gelu=True, seed=0)
@example(M=1, N=17, K=48, bias=False, gelu=False, seed=1)
def test_matches_emulated_reference(device, M, N, K, bias, gelu, seed):
    _check(device, M, N, K, seed, bias, gelu)


def test_strided_out_and_activation(device):
    a, w, sa, sw, b = _operands(device, 33, 40, 64, 5, bias=True)
    a_wide = torch.zeros(33, 96, device=device, dtype=FP8_DTYPE)
    a_wide[:, :64] = a
    buf = torch.full((33, 64), 7.0, device=device, dtype=torch.bfloat16)
    got = fp8_gemm(a_wide[:, :64], w, sa.view(33, 1), sw.view(1, 40), b, out=buf[:, :40])
    _compare(got, fp8_gemm_ref(a, w, sa, sw, b))
    assert (buf[:, 40:] == 7.0).all()


def test_fp32_bias(device):
    a, w, sa, sw, b = _operands(device, 20, 32, 32, 3, bias=True)
    _compare(fp8_gemm(a, w, sa, sw, b.float(), gelu=True), fp8_gemm_ref(a, w, sa, sw, b.float(), gelu=True))


def test_gelu_tails(device):
    """Large |x| in the GELU epilogue: no inf/NaN from the exp, exact tails (x and 0)."""
    K, N = 32, 16
    a, sa = quantize_rowwise(torch.full((2, K), 1.0, device=device, dtype=torch.bfloat16))
    w, sw = quantize_weight_per_channel(torch.ones(N, K, device=device) * torch.linspace(-20, 20, N, device=device)[:, None])
    got = fp8_gemm(a, w, sa, sw, gelu=True)
    _compare(got, fp8_gemm_ref(a, w, sa, sw, gelu=True))


@given(B=st.integers(1, 2), L=st.integers(1, 20), N=st.sampled_from([16, 48]), gelu=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fp8_linear(device, B, L, N, gelu, seed):
    gen = torch.Generator().manual_seed(seed)
    K = 64
    x = torch.randn(B, L, K, generator=gen).to(device, torch.bfloat16)
    w = torch.randn(N, K, generator=gen).to(device) / 8
    bias = torch.randn(N, generator=gen).to(device, torch.bfloat16)
    w_fp8, w_scale = quantize_weight_per_channel(w)
    got = fp8_linear(x, w_fp8, w_scale, bias, gelu=gelu)
    assert got.shape == (B, L, N)
    q, s = quantize_rowwise(x)
    _compare(got.view(-1, N), fp8_gemm_ref(q.view(-1, K), w_fp8, s.view(-1), w_scale, bias, gelu=gelu))
    # And against the bf16 Linear it replaces: fp8 quantization noise only.
    want = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    if gelu:
        want = torch.nn.functional.gelu(want, approximate="tanh")
    assert sqnr_db(want, got) >= 20.0


def test_empty_m(device):
    a, w, sa, sw, _ = _operands(device, 1, 16, 32, 0)
    out = fp8_gemm(a[:0], w, sa[:0], sw)
    assert out.shape == (0, 16)


def _bad(device):
    a, w, sa, sw, b = _operands(device, 8, 16, 32, 0, bias=True)
    return dict(a_fp8=a, w_fp8=w, a_scale=sa, w_scale=sw, bias=b)


@pytest.mark.parametrize("change, match", [
    (lambda d, kw: {**kw, "a_fp8": kw["a_fp8"].float()}, "a_fp8 must be torch.float8_e4m3fn"),
    (lambda d, kw: {**kw, "w_fp8": kw["w_fp8"].to(torch.float8_e5m2)}, "w_fp8 must be torch.float8_e4m3fn"),
    (lambda d, kw: {**kw, "a_fp8": kw["a_fp8"][None]}, "a_fp8 must be 2-D"),
    (lambda d, kw: {**kw, "w_fp8": kw["w_fp8"][:, :16]}, "disagree on K"),
    (lambda d, kw: {**kw, "a_fp8": torch.zeros(8, 24, device=d, dtype=FP8_DTYPE),
                    "w_fp8": torch.zeros(16, 24, device=d, dtype=FP8_DTYPE)}, "multiple of 16"),
    (lambda d, kw: {**kw, "a_fp8": torch.zeros(8, 48, device=d, dtype=FP8_DTYPE)[:, 1:33],
                    "w_fp8": kw["w_fp8"]}, "16-byte aligned"),
    (lambda d, kw: {**kw, "a_fp8": torch.zeros(32, 8, device=d, dtype=FP8_DTYPE).t()}, "contiguous in its last"),
    (lambda d, kw: {**kw, "a_scale": kw["a_scale"][:4]}, "a_scale must have shape"),
    (lambda d, kw: {**kw, "w_scale": kw["w_scale"].bfloat16()}, "w_scale must be torch.float32"),
    (lambda d, kw: {**kw, "bias": kw["bias"][:8]}, "bias must have shape"),
    (lambda d, kw: {**kw, "bias": kw["bias"].half()}, "bias must be"),
    (lambda d, kw: {**kw, "w_fp8": torch.zeros(16, 32, device="meta", dtype=FP8_DTYPE)}, "is on meta"),
    (lambda d, kw: {**kw, "out": torch.empty(8, 16, device=d)}, "out must be torch.bfloat16"),
    (lambda d, kw: {**kw, "out": torch.empty(8, 17, device=d, dtype=torch.bfloat16)}, "out must have shape"),
])
def test_bad_input_is_refused(device, change, match):
    kw = change(device, _bad(device))
    with pytest.raises((TypeError, ValueError), match=match):
        fp8_gemm(**kw)


def test_bad_config_is_refused(device):
    with pytest.raises(ValueError, match="config"):
        fp8_gemm(**_bad(device), config={"BLOCK_M": 128})


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", [(1536, 1536), (1536, 4608), (1536, 8960), (8960, 1536)])
@pytest.mark.parametrize("bias, gelu", [(False, False), (True, False), (True, True)])
def test_real_size(K, N, bias, gelu):
    """One 3-frame block of LongLive-1.3B: 4680 tokens through the q/k/v/o, fused qkv and FFN shapes."""
    _check(torch.device("cuda"), 4680, N, K, seed=K + N, bias=bias, gelu=gelu)


def test_flops_bytes():
    assert fp8_gemm_flops(4680, 1536, 8960) == 2 * 4680 * 1536 * 8960
    assert fp8_gemm_bytes(2, 3, 16) == 2 * 16 + 3 * 16 + 4 * 5 + 2 * 6
