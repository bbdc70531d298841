"""FP8-cache window attention (kernels/window_attention.py, window_attention_fp8) against fp32
attention on the dequantized q, k and v.

The reference sees exactly the quantized inputs, so what is left is the kernel's own arithmetic: P
rounded to e4m3 before the P.V dot (3 mantissa bits: up to 2^-4 relative per weight, averaging out
over many keys, not over two) and the bf16 output. The bound is twice the error of the same
arithmetic in plain torch (`fp8_attention_same_precision`) plus one bf16 ulp (tests/_numerics.py).
K/V slots outside the attended set (and the v scales of groups wholly outside) and the output
buffer are NaN-poisoned, so reading a slot it should not, or leaving an output element unwritten,
fails.
"""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from longlive_triton.kernels.fp8_kv_cache import (V_GROUP, dequantize_fp8_cache, quantize_k_ref, quantize_rows_ref,
                                                  quantize_v_groups_ref)
from longlive_triton.kernels.fp8_quant import FP8_DTYPE
from longlive_triton.kernels.window_attention import window_attention_bytes, window_attention_fp8, window_attention_fp8_ref
from longlive_triton.numerics import rel_l2

from .._numerics import assert_as_close_as_same_precision
from .test_window_attention import _HEALTH, _attended, _real, attended_slots, attention_cases


def fp8_inputs(q, k, v):
    """The FP8 operands of bf16 q [B, Lq, H, D], k and v [B, C, H, D]: q per row, k with a static
    per-head scale (here amax / 448 of the head), v with group scales."""
    q8, q_scale = quantize_rows_ref(q)
    k_scale = (k.float().abs().amax(dim=(0, 1, 3)) / 448.0).clamp_min(1e-6).contiguous()
    k8 = quantize_k_ref(k, k_scale)
    v8, v_scale = quantize_v_groups_ref(v)
    return q8, q_scale, k8, k_scale, v8, v_scale


def fp8_attention_same_precision(q8, q_scale, k8, k_scale, v8, v_scale, attended, scale=None):
    """The kernel's arithmetic in plain torch, rounding where it rounds: fp32 scores of the e4m3 q
    and k times their scales; the softmax weight of each key taken as P~ = 448 vs exp(x - m) (vs its
    group's v scale, m the row's max of x + log vs, so P~ <= 448) and rounded to e4m3 before the
    P~.v8 dot; l sums the unrounded P~ / vs; fp32 sums; the output rounded to bf16. (The kernel
    takes m at the running max of its key tile: the same rounding, at other points of the grid.)
    attended: [B, C] bool."""
    B, Lq, H, D = q8.shape
    C = k8.shape[1]
    scale = D ** -0.5 if scale is None else scale
    vs = v_scale.repeat_interleave(V_GROUP, dim=1)[:, :C]
    vs = torch.where(vs > 0, vs, torch.ones_like(vs))  # an empty group's v8 are zero: any scale is right
    out = torch.zeros(B, Lq, H, D, dtype=torch.bfloat16, device=q8.device)
    for b in range(B):
        idx = attended[b]
        if not idx.any():
            continue
        s = q8[b].float().transpose(0, 1) @ k8[b, idx].float().permute(1, 2, 0)  # [H, Lq, n]
        x = s * (q_scale[b].transpose(0, 1)[..., None] * k_scale[:, None, None] * scale)
        vs_b = vs[b, idx].transpose(0, 1)[:, None, :]
        p = 448.0 * torch.exp(x + vs_b.log() - (x + vs_b.log()).amax(-1, keepdim=True))
        pv = p.to(FP8_DTYPE).float() @ v8[b, idx].float().transpose(0, 1)
        out[b] = (pv / (p / vs_b).sum(-1, keepdim=True)).transpose(0, 1).bfloat16()
    return out


def check_window_attention_fp8(case, device, use_tma=False, config=None):
    B, Lq, H, D, C = case["batch"], case["lq"], case["heads"], case["head_dim"], case["cap"]
    gen = torch.Generator().manual_seed(case["seed"])
    q = torch.randn(B, Lq, H, D, generator=gen).to(device, torch.bfloat16)
    # Rows of different magnitudes, so that a scale applied to the wrong rows would show.
    mag = torch.exp2(torch.randint(-2, 3, (B, C, H, 1), generator=gen).float())
    k = (torch.randn(B, C, H, D, generator=gen) * mag).to(device, torch.bfloat16)
    v = (torch.randn(B, C, H, D, generator=gen) * mag.flip(1)).to(device, torch.bfloat16)
    q8, q_scale, k8, k_scale, v8, v_scale = fp8_inputs(q, k, v)
    ranges = case["ranges"]
    for b in range(B):
        outside = ~_attended(C, case["ring_lo"], case["ring_size"], *ranges[b if len(ranges) > 1 else 0]).to(device)
        k8[b].view(torch.uint8)[outside] = 0x7F  # e4m3fn NaN
        v8[b].view(torch.uint8)[outside] = 0x7F
        groups_out = torch.nn.functional.pad(outside, (0, -C % V_GROUP), value=True).view(-1, V_GROUP).all(dim=1)
        v_scale[b, groups_out] = float("nan")
    sink_end, win_start, win_end = (torch.tensor([r[i] for r in ranges], dtype=case["index_dtype"], device=device)
                                    for i in range(3))
    ring = {}
    if ranges[0][3] is not None:
        ring = dict(ring_lo=case["ring_lo"], ring_size=case["ring_size"],
                    shift=torch.tensor([r[3] for r in ranges], dtype=case["index_dtype"], device=device))
    out = torch.full((B, Lq, H, D), float("nan"), dtype=torch.bfloat16, device=device)

    got = window_attention_fp8(q8, q_scale, k8, k_scale, v8, v_scale, sink_end, win_start, win_end, out=out,
                               split=case["split"], use_tma=use_tma,
                               config=config, **ring)
    want = window_attention_fp8_ref(q8, q_scale, k8, k_scale, v8, v_scale, sink_end, win_start, win_end, **ring)

    assert got is out
    assert not torch.isnan(got).any(), "an output element is unwritten or a poisoned slot was read"
    same = fp8_attention_same_precision(q8, q_scale, k8, k_scale, v8, v_scale, attended_slots(case, device))
    assert_as_close_as_same_precision(got, want, same)
    return rel_l2(got, want)


@settings(suppress_health_check=_HEALTH)
@given(case=attention_cases(max_batch=2, max_heads=3, head_dims=(32, 64), max_lq=40, max_slots=300))
# Few keys, where e4m3's rounding of P does not average out (these failed a fixed relative bound).
@example(case=dict(batch=1, lq=1, heads=1, head_dim=32, cap=2, ring_lo=0, ring_size=None, ranges=[(0, 0, 2, None)],
                   index_dtype=torch.int32, strided_q=False, split=1, seed=0))
@example(case=dict(batch=1, lq=9, heads=3, head_dim=64, cap=196, ring_lo=49, ring_size=82, ranges=[(0, 98, 102, 0)],
                   index_dtype=torch.int32, strided_q=False, split=1, seed=187))
def test_matches_dequantized_reference(case, device):
    check_window_attention_fp8(case, device)


def test_groups_straddle_every_range_edge(device):
    """Ranges that start and end inside 128-slot groups, a wrapped ring, and 3 split shares."""
    case = dict(batch=1, lq=19, heads=2, head_dim=32, cap=300, ring_lo=40, ring_size=250, split=3,
                ranges=[(37, 100, 271, 97)], index_dtype=torch.int64, strided_q=False, seed=5)
    check_window_attention_fp8(case, device)


def test_splits_agree(device):
    case = dict(batch=1, lq=33, heads=2, head_dim=64, cap=290, ring_lo=0, ring_size=None, split=1,
                ranges=[(0, 0, 290, None)], index_dtype=torch.int32, strided_q=False, seed=3)
    errs = [check_window_attention_fp8(dict(case, split=s), device) for s in (1, 2, 3)]
    # The shares only change the summation order of fp32 partials.
    assert max(errs) - min(errs) < 2e-3, errs


def _all_slots(B, C, device):
    return torch.ones(B, C, dtype=torch.bool, device=device)


def test_tile_scale_is_applied_per_group(device):
    """v groups with scales 2^-6 .. 2^6 apart: a kernel that applied one group's scale to another's
    tile, or dropped it, would be off by orders of magnitude."""
    gen = torch.Generator().manual_seed(0)
    B, Lq, H, D, C = 1, 8, 1, 32, 3 * V_GROUP
    q = torch.randn(B, Lq, H, D, generator=gen).to(device, torch.bfloat16) * 0.1
    k = torch.randn(B, C, H, D, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(B, C, H, D, generator=gen)
    v[:, :V_GROUP] *= 2.0 ** -6
    v[:, 2 * V_GROUP:] *= 2.0 ** 6
    v = v.to(device, torch.bfloat16)
    ops = fp8_inputs(q, k, v)
    got = window_attention_fp8(*ops, 0, 0, C)
    want = window_attention_fp8_ref(*ops, 0, 0, C)
    assert_as_close_as_same_precision(got, want, fp8_attention_same_precision(*ops, _all_slots(B, C, device)))


def test_empty_groups_read_as_zero(device):
    """A zero v scale marks a group that holds nothing (its v8 are zero): its keys still take
    softmax weight, as zero keys and values do in the bf16 cache."""
    gen = torch.Generator().manual_seed(1)
    B, Lq, H, D, C = 1, 5, 2, 32, 2 * V_GROUP
    q = torch.randn(B, Lq, H, D, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(B, C, H, D, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(B, C, H, D, generator=gen)
    v[:, V_GROUP:] = 0
    v = v.to(device, torch.bfloat16)
    ops = fp8_inputs(q, k, v)
    assert (ops[5][:, 1] == 0).all()
    got = window_attention_fp8(*ops, 0, 0, C)
    k_deq, v_deq = dequantize_fp8_cache(*ops[2:])
    from longlive_triton.kernels.window_attention import window_attention_ref
    want = window_attention_ref(ops[0].float() * ops[1][..., None], k_deq, v_deq, 0, 0, C)
    assert_as_close_as_same_precision(got, want, fp8_attention_same_precision(*ops, _all_slots(B, C, device)))


@pytest.mark.gpu
@settings(suppress_health_check=_HEALTH)  # drawn cases: the `gpu` profile
@given(case=attention_cases(max_batch=2, max_heads=12, head_dims=(64, 128), max_lq=700, max_slots=3000),
       tuned=st.just(False))
# Block 0 (sink only), filling, steady state, a rotated ring, the 9-frame window, batch 2. The split-2
# cases (the presets' launch) autotune and run again with TMA; the others run the fixed tile (each
# autotune key is a search of its own: every config compiled and timed).
@example(case=_real(4680, 18720, 4680, 4680, 4680), tuned=False)
@example(case=_real(4680, 18720, 4680, 4680, 9360), tuned=False)
@example(case=_real(4680, 18720, 4680, 4680, 18720), tuned=False)
@example(case=_real(4680, 18720, 4680, 4680, 18720, split=2), tuned=True)
@example(case=_real(4680, 18720, 4680, 4680, 18720, shift=7000), tuned=False)
@example(case=_real(4680, 18720, 4680, 9360, 18720, shift=7000, split=2), tuned=True)
@example(case=_real(4680, 14040, 4680, 4680, 14040), tuned=False)
@example(case=_real(1560, 18720, 4680, 4680, 18720, batch=2), tuned=False)
def test_matches_dequantized_reference_gpu(case, tuned, device):
    config = None if tuned else {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
    check_window_attention_fp8(case, device, config=config)
    if tuned and case["cap"] % 16 == 0 and torch.cuda.get_device_capability(device)[0] >= 9:
        check_window_attention_fp8(case, device, use_tma=True)


def test_bytes():
    assert window_attention_bytes(1, 4680, 18720, 12, 128, fp8=True) == \
        12 * (4680 * (128 + 4 + 256) + 18720 * 256 + 18720 / 128 * 4)


def _small(device, C=24):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 32, generator=gen).to(device, torch.bfloat16) for n in (8, C, C))
    return list(fp8_inputs(q, k, v))


@pytest.mark.parametrize("index, change, error, match", [
    (0, lambda t: t.to(torch.bfloat16), TypeError, "q8 must be torch.float8_e4m3fn"),
    (1, lambda t: t[..., :1], ValueError, r"q_scale must have shape \[1, 8, 2\]"),
    (2, lambda t: t.to(torch.bfloat16), TypeError, "k8 must be torch.float8_e4m3fn"),
    (3, lambda t: t.double(), TypeError, "k_scale must be torch.float32"),
    (3, lambda t: t[:1], ValueError, r"k_scale must have shape \[2\]"),
    (4, lambda t: t.contiguous(), ValueError, "v8 must be a .* view of a contiguous"),
    (5, lambda t: t[:, :, :1], ValueError, r"v_scale must have shape \[1, 1, 2\]"),
    (2, lambda t: t[:, :, :, :16].contiguous(), ValueError, "differ in shape"),
])
def test_rejects_bad_inputs(index, change, error, match, device):
    ops = _small(device)
    ops[index] = change(ops[index])
    with pytest.raises(error, match=match):
        window_attention_fp8(*ops, 0, 0, 8)


def test_rejects_bad_options(device):
    ops = _small(device)
    with pytest.raises(ValueError, match="BLOCK_N must be 128"):
        window_attention_fp8(*ops, 0, 0, 8, config={"BLOCK_M": 64, "BLOCK_N": 64})
    with pytest.raises(ValueError, match="outside the cache"):
        window_attention_fp8(*ops, 0, 0, 25)
    with pytest.raises(ValueError, match="split must be"):
        window_attention_fp8(*ops, 0, 0, 8, split=9)
