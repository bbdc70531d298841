"""FP8-cache window attention (kernels/window_attention_fp8.py) against fp32 attention on the
dequantized cache, for each choice of fp8 dots.

K/V slots outside the attended set (their scales too) and the output buffer are NaN-poisoned, so
reading a slot it should not, or leaving an output element unwritten, fails.
"""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from longlive_triton.kernels.kv_quant_append import quantize_kv_rows
from longlive_triton.kernels.window_attention_fp8 import (
    FP8_DOTS,
    fp8_cache_like,
    window_attention_fp8,
    window_attention_fp8_bytes,
    window_attention_fp8_ref,
)

from .test_window_attention import _HEALTH, _attended, _real, attention_cases

# fp8_dots -> (max relative L2 error of the output, max abs error as a fraction of max |reference|)
# against fp32 attention on the dequantized cache with the bf16 q. "none" is bf16 attention (bf16 P,
# bf16 output): the bound of test_window_attention. "pv" rounds P * v_scale to e4m3 (3 mantissa
# bits: up to 2^-4 relative per element); "qk" quantizes q per row to e4m3, which perturbs the
# scores by about 2^-5 of |q||k| and the weights through the exponential. Measured in the
# interpreter on these inputs (seeds 0-3, D 32/64): none 0.2%, pv 1.6-2.9%, qk 2.7-4.8%, both
# 3.4-5.1% relative L2; the bounds leave about 1.7x.
TOLERANCES = {"none": (1e-2, 2e-2), "pv": (5e-2, 1e-1), "qk": (8e-2, 2e-1), "both": (9e-2, 2e-1)}


def _quantized_cache(B, C, H, D, gen, device):
    # Rows of different magnitudes (as RMSNorm-ed and RoPE-d keys and raw values have).
    x = torch.randn(B, C, H, D, generator=gen) * torch.exp2(torch.randint(-2, 2, (B, C, H, 1), generator=gen).float())
    x8, s = quantize_kv_rows(x.to(torch.bfloat16))
    return x8.to(device), s.to(device)


def check_window_attention_fp8(case, fp8_dots, device, use_tma=False, config=None):
    B, Lq, H, D, C = case["batch"], case["lq"], case["heads"], case["head_dim"], case["cap"]
    gen = torch.Generator().manual_seed(case["seed"])
    if case["strided_q"]:
        q = (torch.randn(B, Lq, 3, H, D, generator=gen)).to(device, torch.bfloat16)[:, :, 0]
    else:
        q = (torch.randn(B, Lq, H, D, generator=gen)).to(device, torch.bfloat16)
    k_cache, k_scale = _quantized_cache(B, C, H, D, gen, device)
    v_cache, v_scale = _quantized_cache(B, C, H, D, gen, device)
    ranges = case["ranges"]
    for b in range(B):
        outside = ~_attended(C, case["ring_lo"], case["ring_size"], *ranges[b if len(ranges) > 1 else 0]).to(device)
        k_cache.view(torch.uint8)[b, outside] = 0x7F  # e4m3fn NaN
        v_cache.view(torch.uint8)[b, outside] = 0x7F
        k_scale[b, outside] = float("nan")
        v_scale[b, outside] = float("nan")
    sink_end, win_start, win_end = (torch.tensor([r[i] for r in ranges], dtype=case["index_dtype"], device=device)
                                    for i in range(3))
    ring = {}
    if ranges[0][3] is not None:
        ring = dict(ring_lo=case["ring_lo"], ring_size=case["ring_size"],
                    shift=torch.tensor([r[3] for r in ranges], dtype=case["index_dtype"], device=device))
    out = torch.full((B, Lq, H, D), float("nan"), dtype=torch.bfloat16, device=device)

    got = window_attention_fp8(q, k_cache, v_cache, k_scale, v_scale, sink_end, win_start, win_end, out=out,
                               fp8_dots=fp8_dots, use_tma=use_tma, config=config, **ring)
    want = window_attention_fp8_ref(q, k_cache, v_cache, k_scale, v_scale, sink_end, win_start, win_end, **ring)

    assert got is out
    assert not torch.isnan(got).any(), "an output element is unwritten or a poisoned slot was read"
    max_rel_l2, atol = TOLERANCES[fp8_dots]
    err = got.float() - want
    rel_l2 = (err.norm() / want.norm().clamp_min(1e-30)).item()
    assert want.norm() == 0 or rel_l2 <= max_rel_l2, f"{fp8_dots}: relative L2 error {rel_l2:.3e} > {max_rel_l2}"
    worst = err.abs().max().item()
    assert worst <= atol * max(1.0, want.abs().max().item()), f"{fp8_dots}: max abs error {worst:.3e}"
    return rel_l2


@settings(suppress_health_check=_HEALTH, max_examples=6)
@given(case=attention_cases(max_batch=2, max_heads=2, head_dims=(32, 64), max_lq=24, max_slots=80),
       fp8_dots=st.sampled_from(FP8_DOTS))
def test_matches_dequantized_reference(case, fp8_dots, device):
    check_window_attention_fp8(case, fp8_dots, device)


def _one(lq=20, cap=70, ranges=(5, 20, 70, None), seed=0, heads=2, head_dim=64):
    return dict(batch=1, lq=lq, heads=heads, head_dim=head_dim, cap=cap, ring_lo=ranges[0] if ranges[3] is not None else 0,
                ring_size=None, ranges=[ranges], index_dtype=torch.int64, strided_q=False, seed=seed)


@pytest.mark.parametrize("fp8_dots", FP8_DOTS)
def test_each_mode_on_a_wrapped_ring(fp8_dots, device):
    # Sink [0, 5), window of 50 logical slots in a 65-slot ring rotated by 40: it wraps.
    check_window_attention_fp8(_one(ranges=(5, 20, 70, 40)), fp8_dots, device)


def test_fp8_dots_are_less_exact_than_the_dequant_mode(device):
    """A test that the modes really differ: the fp8 dots lose precision against bf16 (if "both"
    silently ran bf16 dots, its error would equal "none"'s)."""
    case = _one(lq=32, cap=96, ranges=(0, 0, 96, None), seed=3)
    errs = {mode: check_window_attention_fp8(case, mode, device) for mode in FP8_DOTS}
    assert errs["none"] < errs["pv"] and errs["none"] < errs["qk"], errs


@pytest.mark.gpu
@settings(suppress_health_check=_HEALTH, max_examples=20)
@given(case=attention_cases(max_batch=2, max_heads=12, head_dims=(64, 128), max_lq=700, max_slots=3000),
       fp8_dots=st.sampled_from(FP8_DOTS), use_tma=st.booleans(), tuned=st.just(False))
@example(case=_real(4680, 18720, 4680, 4680, 4680), fp8_dots="both", use_tma=False, tuned=True)
@example(case=_real(4680, 18720, 4680, 4680, 18720), fp8_dots="both", use_tma=False, tuned=True)
@example(case=_real(4680, 18720, 4680, 4680, 18720), fp8_dots="none", use_tma=False, tuned=True)
@example(case=_real(4680, 18720, 4680, 4680, 18720), fp8_dots="qk", use_tma=False, tuned=True)
@example(case=_real(4680, 18720, 4680, 4680, 18720), fp8_dots="pv", use_tma=False, tuned=True)
@example(case=_real(4680, 18720, 4680, 4680, 18720), fp8_dots="both", use_tma=True, tuned=True)
@example(case=_real(4680, 18720, 4680, 4680, 18720, shift=7000), fp8_dots="both", use_tma=True, tuned=True)
@example(case=_real(4680, 18720, 4680, 9360, 18720, shift=7000), fp8_dots="both", use_tma=False, tuned=True)
@example(case=_real(1560, 18720, 4680, 4680, 18720, batch=2), fp8_dots="both", use_tma=False, tuned=True)
def test_matches_dequantized_reference_gpu(case, fp8_dots, use_tma, tuned, device):
    config = None if tuned else {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    check_window_attention_fp8(case, fp8_dots, device, use_tma=use_tma, config=config)


def test_bytes():
    assert window_attention_fp8_bytes(1, 4680, 18720, 12, 128) == 12 * (4 * 128 * 4680 + 18720 * (256 + 8))


def test_fp8_cache_like(device):
    k = torch.randn(1, 7, 2, 32, device=device).to(torch.bfloat16)
    k8, v8, ks, vs = fp8_cache_like(k)
    assert k8.shape == v8.shape == k.shape and k8.dtype == torch.float8_e4m3fn
    assert ks.shape == vs.shape == (1, 7, 2) and ks.dtype == torch.float32
    assert k8.element_size() * k8.numel() * 2 + ks.numel() * 4 * 2 == 7 * 2 * (32 + 4) * 2


def test_rejects_bad_inputs(device):
    q = torch.randn(1, 8, 2, 32, device=device).to(torch.bfloat16)
    k8, v8, ks, vs = fp8_cache_like(torch.empty(1, 24, 2, 32, device=device))
    window_attention_fp8(q, k8, v8, ks, vs, 0, 0, 8)
    with pytest.raises(ValueError, match="fp8_dots"):
        window_attention_fp8(q, k8, v8, ks, vs, 0, 0, 8, fp8_dots="int8")
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        window_attention_fp8(q, k8.to(torch.bfloat16), v8, ks, vs, 0, 0, 8)
    with pytest.raises(TypeError, match="bfloat16"):
        window_attention_fp8(q.float(), k8, v8, ks, vs, 0, 0, 8)
    with pytest.raises(ValueError, match=r"k_scale must have shape"):
        window_attention_fp8(q, k8, v8, ks[:, :3], vs, 0, 0, 8)
    with pytest.raises(ValueError, match="does not match q"):
        window_attention_fp8(q[:, :, :1], k8, v8, ks, vs, 0, 0, 8)
    with pytest.raises(ValueError, match="outside the cache"):
        window_attention_fp8(q, k8, v8, ks, vs, 0, 0, 25)
    with pytest.raises(ValueError, match="out has shape"):
        window_attention_fp8(q, k8, v8, ks, vs, 0, 0, 8, out=torch.empty_like(q)[:, :4])
