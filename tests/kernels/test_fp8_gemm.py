"""fp8_gemm: the W8A8 GEMM against the fp64 product of the dequantized operands: at most twice the
error of the EMULATED reference (dequantize, fp32 matmul, `fp8_gemm_ref`) rounded once to bf16 as
the kernel rounds, plus one bf16 ulp and fp32 summation noise (tests/_numerics.py); both kernels
(persistent TMA descriptors, plain pointers), per-token and per-(token, 128-group) activation
scales; the FP8 output (128-column group scales) dequantizes to the reference within one fp8 step; the gated residual epilogue equals the
unfused GEMM followed by the stock's bf16 `x + y * gate`, bit for bit."""
import pytest
import torch
from hypothesis import example, given, strategies as st

from longlive_triton.kernels.fp8_gemm import (fp8_gemm, fp8_gemm_bytes, fp8_gemm_flops, fp8_gemm_ref, fp8_linear,
                                              fp8_supported, tma_supported)
from longlive_triton.kernels.fp8_quant import (ACT_GROUP, FP8_DTYPE, FP8_MAX, Fp8Activation, quantize_groupwise_ref,
                                               quantize_rowwise, quantize_weight_per_channel)
from longlive_triton.kernels.adaln import adaln_ref
from longlive_triton.numerics import sqnr_db

from .._numerics import assert_as_close_as_same_precision, fp8_step

# Against the bf16 layer it replaces: what fp8 quantization of both operands costs.
MIN_SQNR_DB_VS_BF16 = 20.0


def _operands(device, M, N, K, seed, bias=False, grouped=False):
    gen = torch.Generator().manual_seed(seed)
    # Features of unequal size, so per-group scales differ from the per-token one.
    x = (torch.randn(M, K, generator=gen) * 2 * torch.rand(1, K, generator=gen).add(0.05)).to(torch.bfloat16)
    w = torch.randn(N, K, generator=gen) / K ** 0.5 * torch.rand(N, 1, generator=gen).add(0.1)
    quant = quantize_groupwise_ref if grouped else quantize_rowwise
    a_fp8, a_scale = quant(x.to(device))
    w_fp8, w_scale = quantize_weight_per_channel(w.to(device))
    b = (torch.randn(N, generator=gen) * 0.5).to(device, torch.bfloat16) if bias else None
    return a_fp8, w_fp8, a_scale, w_scale, b


def _exact(a_fp8, w_fp8, a_scale, w_scale, bias=None, gelu=False):
    """fp8_gemm_ref's arithmetic in fp64."""
    K = a_fp8.shape[-1]
    if a_scale.dim() == 2 and a_scale.shape[1] == K // ACT_GROUP and a_scale.shape[1] > 1:
        a = (a_fp8.double().unflatten(-1, (-1, ACT_GROUP)) * a_scale.double()[..., None]).flatten(-2)
    else:
        a = a_fp8.double() * a_scale.reshape(-1, 1).double()
    out = a @ (w_fp8.double() * w_scale.reshape(-1, 1).double()).t()
    if bias is not None:
        out = out + bias.double()
    return torch.nn.functional.gelu(out, approximate="tanh") if gelu else out


def _compare(got, a_fp8, w_fp8, a_scale, w_scale, bias=None, gelu=False):
    """got against the fp64 product; the same-precision reference is the emulated fp32 one rounded
    once to bf16, where the kernel rounds."""
    assert got.dtype == torch.bfloat16
    same = fp8_gemm_ref(a_fp8, w_fp8, a_scale, w_scale, bias, gelu=gelu).bfloat16()
    assert_as_close_as_same_precision(got, _exact(a_fp8, w_fp8, a_scale, w_scale, bias, gelu), same,
                                      terms=a_fp8.shape[-1])


def _check(device, M, N, K, seed, bias, gelu, poison=True, grouped=False, **options):
    a, w, sa, sw, b = _operands(device, M, N, K, seed, bias, grouped)
    out = torch.full((M, N), float("nan"), device=device, dtype=torch.bfloat16) if poison else None
    got = fp8_gemm(a, w, sa, sw, b, gelu=gelu, out=out, **options)
    if poison:
        assert got is out
    _compare(got, a, w, sa, sw, b, gelu)


# One tile shape for a GEMM and its twin on the GPU (the interpreter runs its own fixed tiles).
GPU_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _check_fp8_out(device, M, N, K, seed, grouped=False, **options):
    """The FP8 output (the epilogue's bias, GELU, group amax and e4m3 rounding) against the same
    GEMM's bf16 output on the same tiles, so from the same accumulator; that bf16 output against the
    fp32 reference as every GEMM here (_compare).

    Why not the fp32 reference itself: on Hopper Triton's fp8 tl.dot keeps the K reduction in the
    wgmma accumulator (about 13-14 mantissa bits, kernels/fp8_gemm.py). Emulated at 1.3B shapes
    (K 1536) that moves the group amax by up to 3.6e-3 and small values by many of their fine fp8
    steps: an error of the accumulation (which _compare bounds), not of the epilogue, and the
    reason test_real_size_ffn_fused failed against fp32 at rtol 1e-4.

    Bounds: the twin rounds each value to bf16 (half an ulp: <= 2^-8 relative), so its group amax, and
    the scale from it, is within 2^-8 of the kernel's; each dequantized value is within half an fp8
    step of the kernel's fp32 value (a whole step of the twin's value where the two straddle a
    power of two) plus that 2^-8, which is at most 1/16 of a step (an e4m3 step is >= 2^-4 of the
    value; below 2^-6, subnormal, the step is fixed and larger still)."""
    config = options.pop("config", GPU_CONFIG if device.type == "cuda" else None)
    a, w, sa, sw, b = _operands(device, M, N, K, seed, bias=True, grouped=grouped)
    q = torch.full((M, N), float("nan"), device=device).to(FP8_DTYPE)
    s = torch.full((M, N // ACT_GROUP), float("nan"), device=device)
    got = fp8_gemm(a, w, sa, sw, b, gelu=True, out_fp8=True, out=q, out_scale=s, config=config, **options)
    assert isinstance(got, Fp8Activation) and got.q is q and got.scale is s
    twin = fp8_gemm(a, w, sa, sw, b, gelu=True, config=config, **options)
    _compare(twin, a, w, sa, sw, b, gelu=True)
    want = twin.float()
    _, s_ref = quantize_groupwise_ref(want)
    assert torch.isfinite(s).all()
    rel = ((s - s_ref).abs() / s_ref).max().item()
    assert rel <= 2.0 ** -8, f"group scales off by a relative {rel:.3g} (allowed 2^-8)"
    assert q.float().abs().max() <= FP8_MAX
    deq = got.dequantize()
    scale = s.repeat_interleave(ACT_GROUP, dim=1)
    bound = fp8_step(want / scale) * scale * (1 + 2.0 ** -4) + 1e-6 * scale
    bad = (deq - want).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} values off by more than one fp8 step: {deq[bad][:4]} vs {want[bad][:4]}"


@given(M=st.integers(1, 70), N=st.integers(16, 96), K=st.sampled_from([32, 48, 64, 80, 96, 112, 128]),
       bias=st.booleans(), gelu=st.booleans(), use_tma=st.booleans(), seed=st.integers(0, 2**16))
@example(M=70, N=96, K=128, bias=True, gelu=True, use_tma=True, seed=0)
@example(M=70, N=96, K=128, bias=True, gelu=True, use_tma=False, seed=0)
@example(M=1, N=17, K=48, bias=False, gelu=False, use_tma=True, seed=1)
def test_matches_emulated_reference(device, M, N, K, bias, gelu, use_tma, seed):
    _check(device, M, N, K, seed, bias, gelu, use_tma=use_tma)


@given(M=st.integers(1, 40), N=st.integers(16, 80), K=st.sampled_from([256, 384]), use_tma=st.booleans(),
       seed=st.integers(0, 2**16))
@example(M=40, N=80, K=384, use_tma=True, seed=0)
def test_group_scaled_activation(device, M, N, K, use_tma, seed):
    """A with one scale per token and 128-feature group: each K-tile's partial product is scaled."""
    _check(device, M, N, K, seed, bias=True, gelu=False, grouped=True, use_tma=use_tma)


@given(M=st.integers(1, 40), N=st.sampled_from([128, 256]), K=st.sampled_from([64, 256]), use_tma=st.booleans(),
       seed=st.integers(0, 2**16))
@example(M=40, N=256, K=256, use_tma=True, seed=0)
def test_fp8_output(device, M, N, K, use_tma, seed):
    _check_fp8_out(device, M, N, K, seed, grouped=K > ACT_GROUP, use_tma=use_tma)


def _check_residual(device, B, L, F, N, K, seed, gated=True, grouped=False, in_place=False, **options):
    """The gated residual epilogue equals the unfused GEMM (bf16 y) followed by the stock bf16 ops
    `x + y * gate` (adaln_ref): the kernel rounds where they round, so they agree bit for bit when
    both GEMMs run the same tiles (fixed in the interpreter; `config` on the GPU)."""
    M = B * L
    a, w, sa, sw, b = _operands(device, M, N, K, seed, bias=True, grouped=grouped)
    gen = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(B, L, N, generator=gen) * 4).to(device, torch.bfloat16)
    gate = (torch.randn(B, F, 6, N, generator=gen)).to(device, torch.bfloat16)[:, :, 5:6]  # a stock chunk
    y = fp8_gemm(a, w, sa, sw, b, **options).view(B, L, N)
    want, _ = adaln_ref(x, y=y, gate=gate if gated else None, norm=False)
    x_before = x.clone()
    out = x.view(M, N) if in_place else None
    got = fp8_gemm(a, w, sa, sw, b, residual=x.view(M, N), gate=gate if gated else None, out=out, **options)
    if in_place:
        assert got.data_ptr() == x.data_ptr()
    else:
        assert torch.equal(x, x_before)
    assert torch.equal(got.view(B, L, N), want), f"max diff {(got.view(B, L, N).float() - want.float()).abs().max()}"


@given(B=st.integers(1, 2), F=st.integers(1, 3), per_frame=st.integers(1, 12), N=st.integers(16, 80),
       K=st.sampled_from([32, 64, 256]), gated=st.booleans(), in_place=st.booleans(), use_tma=st.booleans(),
       seed=st.integers(0, 2**16))
@example(B=2, F=3, per_frame=11, N=80, K=256, gated=True, in_place=True, use_tma=True, seed=0)
@example(B=1, F=3, per_frame=5, N=48, K=64, gated=True, in_place=False, use_tma=False, seed=1)
def test_gated_residual(device, B, F, per_frame, N, K, gated, in_place, use_tma, seed):
    _check_residual(device, B, F * per_frame, F, N, K, seed, gated=gated, grouped=K > ACT_GROUP,
                    in_place=in_place, use_tma=use_tma)


def test_gated_residual_fp8_linear(device):
    """fp8_linear's [B, L, ...] form of the residual, in place into x."""
    B, L, F, N, K = 2, 12, 3, 32, 64
    a, w, sa, sw, b = _operands(device, B * L, N, K, 7, bias=True)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(B, L, N, generator=gen).to(device, torch.bfloat16)
    gate = torch.randn(B, F, N, generator=gen).to(device, torch.bfloat16)
    act = Fp8Activation(a.view(B, L, K), sa.view(B, L))
    want, _ = adaln_ref(x, y=fp8_linear(act, w, sw, b), gate=gate, norm=False)
    got = fp8_linear(act, w, sw, b, residual=x, gate=gate, out=x)
    assert got.data_ptr() == x.data_ptr() and torch.equal(x, want)


def test_bad_residual_is_refused(device):
    kw = _bad(device)
    x = torch.zeros(8, 16, device=device, dtype=torch.bfloat16)
    gate = torch.zeros(1, 2, 16, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gate needs residual"):
        fp8_gemm(**kw, gate=gate)
    with pytest.raises(ValueError, match="residual must have shape"):
        fp8_gemm(**kw, residual=x[:4])
    with pytest.raises(TypeError, match="residual must be torch.bfloat16"):
        fp8_gemm(**kw, residual=x.float())
    with pytest.raises(ValueError, match="do not split"):
        fp8_gemm(**kw, residual=x, gate=torch.zeros(1, 3, 16, device=device, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="gate must be"):
        fp8_gemm(**kw, residual=x, gate=gate[0])
    with pytest.raises(ValueError, match="contiguous in its last"):
        fp8_gemm(**kw, residual=x, gate=torch.zeros(1, 16, 2, device=device, dtype=torch.bfloat16).transpose(1, 2))
    with pytest.raises(ValueError, match="overlaps residual"):
        big = torch.zeros(9, 16, device=device, dtype=torch.bfloat16)
        fp8_gemm(**kw, residual=big[:8], out=big[1:])
    a, w, sa, sw, _ = _operands(device, 8, 128, 32, 0)
    with pytest.raises(ValueError, match="out_fp8 cannot take it"):
        fp8_gemm(a, w, sa, sw, out_fp8=True, residual=torch.zeros(8, 128, device=device, dtype=torch.bfloat16))


@pytest.mark.parametrize("use_tma", [True, False])
def test_precise_accumulation(device, use_tma):
    """precise_acc (each K-tile's product added in fp32) computes the same GEMM: bf16 and FP8 outputs,
    row-scaled A (group-scaled A always accumulates so)."""
    _check(device, 37, 48, 96, 9, bias=True, gelu=True, use_tma=use_tma, precise_acc=True)
    _check_fp8_out(device, 21, 128, 64, 10, use_tma=use_tma, precise_acc=True)


def test_persistent_kernel_loop_options(device):
    """The TMA kernel's Triton loop options change scheduling, never the result."""
    if not tma_supported(device):
        pytest.skip("no TMA here")
    for flatten in (False, True):
        _check(device, 70, 80, 96, 3, bias=True, gelu=True, use_tma=True, flatten=flatten)
        _check_fp8_out(device, 33, 256, 256, 4, grouped=True, use_tma=True, flatten=flatten)


def test_ffn_pair(device):
    """The FFN as it runs fused: row-scaled A -> up GEMM + GELU -> FP8 (group scales) -> down GEMM:
    the hidden activation within one fp8 step of the emulated one (test_fp8_output's check), the
    down GEMM on it as any GEMM, and the whole against the bf16 FFN it replaces within fp8 noise."""
    gen = torch.Generator().manual_seed(11)
    M, C, Fd = 37, 128, 384
    x = torch.randn(M, C, generator=gen).to(device, torch.bfloat16)
    w1, b1 = torch.randn(Fd, C, generator=gen) / C ** 0.5, torch.randn(Fd, generator=gen) * 0.1
    w2, b2 = torch.randn(C, Fd, generator=gen) / Fd ** 0.5, torch.randn(C, generator=gen) * 0.1
    (q1, s1), (q2, s2) = (quantize_weight_per_channel(w.to(device)) for w in (w1, w2))
    b1, b2 = b1.to(device, torch.bfloat16), b2.to(device, torch.bfloat16)
    a = Fp8Activation(*quantize_rowwise(x))
    h = fp8_linear(a, q1, s1, b1, gelu=True, out_fp8=True)
    assert isinstance(h, Fp8Activation) and h.grouped
    got = fp8_linear(h, q2, s2, b2)
    want_h = fp8_gemm_ref(a.q, q1, a.scale, s1, b1, gelu=True)
    scale = h.scale.repeat_interleave(ACT_GROUP, dim=1)
    assert ((h.dequantize() - want_h).abs() <= fp8_step(want_h / scale) * scale * 1.01 + 1e-6 * scale).all()
    _compare(got, h.q, q2, h.scale, s2, b2)
    # And against the bf16-weight FFN it replaces, in fp32: fp8 quantization noise only.
    ref = torch.nn.functional.linear(x.float(), w1.to(device), b1.float())
    ref = torch.nn.functional.linear(torch.nn.functional.gelu(ref, approximate="tanh"), w2.to(device), b2.float())
    assert sqnr_db(got, ref) >= MIN_SQNR_DB_VS_BF16


def test_strided_out_and_activation(device):
    a, w, sa, sw, b = _operands(device, 33, 40, 64, 5, bias=True)
    a_wide = torch.zeros(33, 96, device=device, dtype=FP8_DTYPE)
    a_wide[:, :64] = a
    buf = torch.full((33, 64), 7.0, device=device, dtype=torch.bfloat16)
    got = fp8_gemm(a_wide[:, :64], w, sa.view(33, 1), sw.view(1, 40), b, out=buf[:, :40])
    _compare(got, a, w, sa, sw, b)
    assert (buf[:, 40:] == 7.0).all()


def test_fp32_bias(device):
    a, w, sa, sw, b = _operands(device, 20, 32, 32, 3, bias=True)
    _compare(fp8_gemm(a, w, sa, sw, b.float(), gelu=True), a, w, sa, sw, b.float(), gelu=True)


def test_gelu_tails(device):
    """Large |x| in the GELU epilogue: no inf/NaN from the exp, exact tails (x and 0)."""
    K, N = 32, 16
    a, sa = quantize_rowwise(torch.full((2, K), 1.0, device=device, dtype=torch.bfloat16))
    w, sw = quantize_weight_per_channel(torch.ones(N, K, device=device) * torch.linspace(-20, 20, N, device=device)[:, None])
    got = fp8_gemm(a, w, sa, sw, gelu=True)
    _compare(got, a, w, sa, sw, gelu=True)


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
    _compare(got.view(-1, N), q.view(-1, K), w_fp8, s.view(-1), w_scale, bias, gelu)
    # And against the bf16 Linear it replaces: fp8 quantization noise only.
    want = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    if gelu:
        want = torch.nn.functional.gelu(want, approximate="tanh")
    assert sqnr_db(got, want) >= MIN_SQNR_DB_VS_BF16


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
    a, w, sa, sw, _ = _operands(device, 8, 128, 256, 0, grouped=True)
    cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
    with pytest.raises(ValueError, match="BLOCK_K = 128"):
        fp8_gemm(a, w, sa, sw, config=cfg)
    with pytest.raises(ValueError, match="BLOCK_N = 128"):
        fp8_gemm(a, w, sa, sw, out_fp8=True, config={**cfg, "BLOCK_K": 128, "BLOCK_N": 64})


def test_bad_fp8_output_is_refused(device):
    kw = _bad(device)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_gemm(**kw, out_fp8=True)
    with pytest.raises(ValueError, match="pass out_fp8=True"):
        fp8_gemm(**kw, out_scale=torch.empty(8, 1, device=device))
    a, w, sa, sw, _ = _operands(device, 8, 128, 32, 0)
    with pytest.raises(TypeError, match="out must be torch.float8_e4m3fn"):
        fp8_gemm(a, w, sa, sw, out_fp8=True, out=torch.empty(8, 128, device=device, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out_scale must have shape"):
        fp8_gemm(a, w, sa, sw, out_fp8=True, out_scale=torch.empty(8, 2, device=device))


def test_bad_group_scales_are_refused(device):
    a, w, sa, sw, _ = _operands(device, 8, 16, 256, 0, grouped=True)
    with pytest.raises(ValueError, match="a_scale must have shape"):
        fp8_gemm(a, w, sa[:, :1].expand(8, 3).contiguous(), sw)
    with pytest.raises(ValueError, match="a_scale must be contiguous in its last"):
        fp8_gemm(a, w, sa.t().contiguous().t(), sw)


def test_capability_checks():
    # The CPU is served only through the interpreter, which emulates both.
    assert fp8_supported(torch.device("cpu")) and tma_supported(torch.device("cpu"))


SHAPES = [(1536, 1536), (1536, 4608), (1536, 8960), (8960, 1536)]
# The kernels and loop options a GPU may take, each a separate test id so one that fails to compile
# names itself: persistent TMA (flattened loops: the default; plain loops), pointer loads.
KERNELS = {"tma": dict(use_tma=True), "tma-noflatten": dict(use_tma=True, flatten=False),
           "pointer": dict(use_tma=False)}


# One tile for the 36 real-size cases, which test the arithmetic: each case's own autotune key would be
# a search of its own (36 searches, each compiling and timing up to 8 configs). The autotuned launch
# runs in the fp8 preset's GPU tests and in tests/gpu/test_warmup_gpu.py.
REAL_SIZE_TILE = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", SHAPES)
@pytest.mark.parametrize("bias, gelu", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_real_size(K, N, bias, gelu, kernel):
    """One 3-frame block of LongLive-1.3B: 4680 tokens through the q/k/v/o, fused qkv and FFN shapes."""
    _check(torch.device("cuda"), 4680, N, K, seed=K + N, bias=bias, gelu=gelu, config=REAL_SIZE_TILE,
           **KERNELS[kernel])


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_real_size_ffn_fused(kernel):
    """The FFN at 1.3B shapes: up GEMM emitting FP8 with group scales, down GEMM consuming them.
    (It failed against the fp32 reference at rtol 1e-4: Hopper's fp8 accumulation, see _check_fp8_out.)"""
    device = torch.device("cuda")
    _check_fp8_out(device, 4680, 8960, 1536, 1, **KERNELS[kernel])
    _check(device, 4680, 1536, 8960, 2, bias=True, gelu=False, grouped=True, **KERNELS[kernel])


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_real_size_gated_residual(kernel):
    """The FFN down GEMM of 1.3B with the block's gated residual in its epilogue (4680 tokens = 3
    frames), in place, against the unfused GEMM + stock bf16 ops on the same tiles: bit for bit."""
    config = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    _check_residual(torch.device("cuda"), 1, 4680, 3, 1536, 8960, 5, grouped=True, in_place=True,
                    config=config, **KERNELS[kernel])


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_real_size_ffn_up_precise_accumulation(kernel):
    """The FFN up of test_real_size_ffn_fused with precise_acc: it compiles and computes the same
    (bench/probe_fp8_block.py prints how much closer to fp32 its scales come)."""
    _check_fp8_out(torch.device("cuda"), 4680, 8960, 1536, 1, precise_acc=True, **KERNELS[kernel])


@pytest.mark.gpu
def test_real_size_warp_specialized():
    """warp_specialize=True (off by default: Triton 3.6 failed to compile it with pointer loads)."""
    device = torch.device("cuda")
    for K, N in SHAPES:
        _check(device, 4680, N, K, seed=K, bias=True, gelu=False, use_tma=True, warp_specialize=True)


def test_flops_bytes():
    assert fp8_gemm_flops(4680, 1536, 8960) == 2 * 4680 * 1536 * 8960
    assert fp8_gemm_bytes(2, 3, 16) == 2 * 16 + 3 * 16 + 4 * 5 + 2 * 6
