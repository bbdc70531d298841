"""FP8 quantize/append (kernels/kv_quant_append.py) against the torch quantizers on the stock-math
rope output (kv_quant_append_ref), both starting from the same FP8 cache.

- q8 / q_scale: each row dequantized within one e4m3 step of the reference row, plus the slack of
  the kernel's fp32 RoPE against the reference's float64 (test_rope_kv_append's bf16 bound).
- k8: every slot the call must not write bit-equal to before (they are NaN-poisoned); written ones
  within one e4m3 step (same RoPE slack).
- v8 and v_scale: equal to the reference everywhere: v is raw input, so the group scales
  (max(old, amax / 448)), the new rows and the re-rounded old rows are the same arithmetic.
"""
import pytest
import torch
from hypothesis import example, given, settings

from longlive_triton.kernels.fp8_kv_cache import V_GROUP, fp8_kv_cache, k_head_scale
from longlive_triton.kernels.fp8_quant import FP8_DTYPE
from longlive_triton.kernels.kv_quant_append import kv_quant_append, kv_quant_append_bytes, kv_quant_append_ref
from longlive_triton.kernels.rope_kv_append import rope_tables

from .test_rope_kv_append import _HEALTH, _real, _written_slots, append_cases

STEP_REL = 2.0 ** -3        # one e4m3 step, relative, for normals
SUBNORMAL_STEP = 2.0 ** -9  # below 2^-6, times the scale
ROPE_REL = 2.0 ** -7        # two bf16 ulps of the element's pair magnitude (test_rope_kv_append)


def _existing_cache(B, C, H, D, gen, device):
    """An FP8 cache with content: random k8 with NaNs sprinkled in, random v8 under group scales of
    different magnitudes, some groups empty (scale 0, values 0)."""
    k8, v8, v_scale = fp8_kv_cache(B, C, H, D, device)
    k = torch.randn(B, C, H, D, generator=gen) * 20
    poison = torch.rand(B, C, H, generator=gen) < 0.1
    k[poison] = float("nan")
    k8.copy_(k.clamp(-448, 448).to(FP8_DTYPE))
    v8.copy_((torch.randn(B, C, H, D, generator=gen) * 100).clamp(-448, 448).to(FP8_DTYPE))
    scales = torch.exp2(torch.randint(-8, 3, v_scale.shape, generator=gen).float())
    scales[torch.rand(v_scale.shape, generator=gen) < 0.2] = 0.0
    v_scale.copy_(scales)
    empty = (v_scale == 0).repeat_interleave(V_GROUP, dim=1)[:, :C]  # [B, C, H]
    v8.view(torch.uint8)[empty] = 0
    return k8, v8, v_scale


def _within_one_step(got8, want8, scale, rope_slack, what):
    got, want = got8.float() * scale, want8.float() * scale
    err = (got - want).abs()
    bad = err > STEP_REL * want.abs() + SUBNORMAL_STEP * scale + rope_slack
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off by more than one e4m3 step"


def check_kv_quant_append(case, device):
    B, H, D, grid, C = case["batch"], case["heads"], case["head_dim"], case["grid"], case["cap"]
    n, HD = grid[0] * grid[1] * grid[2], H * D
    gen = torch.Generator().manual_seed(case["seed"])
    if case["fused_qkv"]:
        qkv = torch.randn(B, n, 3 * HD, generator=gen).to(device, torch.bfloat16)
        q_lin, k_lin, v = qkv[..., :HD], qkv[..., HD:2 * HD], qkv[..., 2 * HD:]
    else:
        q_lin, k_lin, v = (torch.randn(B, n, HD, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    # Rows of very different magnitudes, so that a scale mixing rows or heads up would show.
    row_scale = torch.exp2(torch.randint(-6, 6, (B, n, H, 1), generator=gen).float()).expand(B, n, H, D)
    v = v * row_scale.reshape(B, n, HD).to(device, torch.bfloat16)
    wq, wk = ((1 + 0.5 * torch.randn(HD, generator=gen)).to(device, torch.bfloat16) for _ in range(2))
    k_scale = k_head_scale(wk, H)
    k8, v8, v_scale = _existing_cache(B, C, H, D, gen, device)
    k_before = k8.clone()
    want = [k8.clone(), None, v_scale.clone()]
    want[1] = torch.empty_like(v8.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    want[1].copy_(v8)
    index = case["index"]
    start_frame, dst_start, row_lo = (torch.tensor([i[j] for i in index], dtype=case["index_dtype"], device=device)
                                      for j in range(3))
    cos, sin = rope_tables(D, device=device)
    q_out = (torch.full((B, n, H, D), float("nan"), device=device).to(FP8_DTYPE),
             torch.full((B, n, H), float("nan"), device=device))
    shift = case["shift"]
    kwargs = dict(ring_lo=case["ring_lo"], ring_size=case["ring_size"],
                  shift=None if shift is None else torch.tensor([shift], dtype=case["index_dtype"], device=device))

    q8, q_scale = kv_quant_append(q_lin, k_lin, v, wq, wk, cos, sin, k8, k_scale, v8, v_scale, grid,
                                  start_frame, dst_start, row_lo, q_out=q_out, **kwargs)
    q8_want, qs_want = kv_quant_append_ref(q_lin, k_lin, v, wq, wk, want[0], k_scale, want[1], want[2], grid,
                                           start_frame, dst_start, row_lo, **kwargs)

    assert q8 is q_out[0] and q_scale is q_out[1]
    assert not torch.isnan(q_scale).any() and not torch.isnan(q8.float()).any(), "a q element is unwritten"
    torch.testing.assert_close(q_scale, qs_want, rtol=ROPE_REL, atol=0)
    amax = (qs_want * 448)[..., None]
    _within_one_step(q8, q8_want, q_scale[..., None], ROPE_REL * amax, "q")
    # As values, so -0 and +0 are equal (the interpreter's e4m3 rounding of tiny negatives gives +0).
    assert torch.equal(v8.float(), want[1].float()), "v8 differs from the reference"
    assert torch.equal(v_scale, want[2]), "v_scale differs from the reference"
    for b in range(B):
        sf, dst, lo = index[b if len(index) > 1 else 0]
        slots = _written_slots(n, C, case["ring_lo"], case["ring_size"], shift, dst, lo)
        untouched = torch.ones(C, dtype=torch.bool)
        untouched[list(slots.values())] = False
        untouched = untouched.to(device)
        assert torch.equal(k8[b, untouched].view(torch.uint8), k_before[b, untouched].view(torch.uint8))
        if slots:
            s = torch.tensor(list(slots.values()), device=device)
            ks = k_scale[None, :, None]
            pair_mag = (want[0][b, s].float() * ks).unflatten(-1, (-1, 2)).norm(dim=-1).repeat_interleave(2, -1)
            _within_one_step(k8[b, s], want[0][b, s], ks, ROPE_REL * pair_mag, "k")


@settings(suppress_health_check=_HEALTH)
@given(case=append_cases(max_batch=2, max_heads=3, head_dims=(32, 64), max_grid=(3, 4, 5), max_extra_slots=300))
def test_matches_torch_quantizers(case, device):
    check_kv_quant_append(case, device)


def test_partly_written_group_keeps_its_other_rows(device):
    """A write that starts inside a group whose scale must grow: the old rows are re-rounded to the
    new scale (and stay within half a step of their values); a second write whose values are small
    leaves the grown scale and the old rows alone."""
    case = dict(batch=1, heads=2, head_dim=32, grid=(1, 2, 5), cap=300, ring_lo=0, ring_size=None, shift=None,
                index=[(0, 123, 0)], index_dtype=torch.int64, fused_qkv=False, seed=11)
    check_kv_quant_append(case, device)
    check_kv_quant_append(dict(case, index=[(0, 250, 3)], seed=12), device)


def test_k_head_scale_bounds_every_key():
    """No roped key can exceed 448 times its head's scale: the worst row puts all of its RMS into
    one element, at the head's largest weight."""
    H, D = 3, 32
    w = torch.linspace(-3, 2, H * D).to(torch.bfloat16)
    scale = k_head_scale(w, H)
    x = torch.zeros(H * D)
    for h in range(H):
        i = h * D + int(w[h * D:(h + 1) * D].float().abs().argmax())
        x.zero_()
        x[i] = 1.0
        y = (x * torch.rsqrt(x.pow(2).mean())).to(torch.bfloat16).float() * w.float()
        assert y.abs().max() <= 448 * scale[h], (h, y.abs().max(), 448 * scale[h])
        assert y.abs().max() >= 448 * scale[h] * 0.95  # and the bound is tight for that row
    with pytest.raises(ValueError, match="not a multiple of 5 heads"):
        k_head_scale(w, 5)


@pytest.mark.gpu
@settings(suppress_health_check=_HEALTH)  # drawn cases: the `gpu` profile
@given(case=append_cases(max_batch=2, max_heads=12, head_dims=(64, 128), max_grid=(4, 30, 52), max_extra_slots=2000))
@example(case=_real((3, 30, 52), 18720, 0, 0, 0))
@example(case=_real((3, 30, 52), 18720, 9, 14040, 0))
@example(case=_real((3, 30, 52), 18720, 3, 4680, 4680))
@example(case=_real((3, 30, 52), 18720, 21, 14040, 0, ring_lo=4680, ring_size=14040, shift=9360))
@example(case=_real((12, 30, 52), 18720, 30, 0, 4680, ring_lo=4680, ring_size=14040))
@example(case=_real((3, 30, 52), 18720, 9, 14040, 0, batch=2))
def test_matches_torch_quantizers_gpu(case, device):
    check_kv_quant_append(case, device)


def test_bytes():
    row = 12 * 128
    assert kv_quant_append_bytes(1, 4680, 12, 128) == 4680 * (2 * row + row + 12 * 4 + 6 * row)
    assert kv_quant_append_bytes(1, 4680, 12, 128, rows_written=0) == 4680 * (2 * row + row + 12 * 4)


def test_rejects_bad_inputs(device):
    B, n, H, D, C = 1, 6, 2, 32, 12
    q_lin, k_lin, v = (torch.randn(B, n, H * D, device=device).to(torch.bfloat16) for _ in range(3))
    w = torch.ones(H * D, device=device, dtype=torch.bfloat16)
    cos, sin = rope_tables(D, device=device)
    k8, v8, vs = fp8_kv_cache(B, C, H, D, device)
    ks = k_head_scale(w, H)
    kv_quant_append(q_lin, k_lin, v, w, w, cos, sin, k8, ks, v8, vs, (1, 2, 3), 0, 0, 0)
    small = fp8_kv_cache(B, 5, H, D, device)
    # The kernel steps only q8's batch and token strides: a q8 strided in H would be written wrongly.
    q_sparse = (torch.zeros(B, n, H, 2 * D, device=device).to(FP8_DTYPE)[..., :D], torch.zeros(B, n, H, device=device))
    cases = [
        (TypeError, "k8 must be torch.float8_e4m3fn", dict(k8=k8.to(torch.bfloat16))),
        (TypeError, "k_scale must be torch.float32", dict(ks=ks.double())),
        (ValueError, r"v_scale must have shape \[1, 1, 2\]", dict(vs=vs[:, :, :1])),
        (ValueError, "view of a contiguous", dict(v8=v8.contiguous())),
        (ValueError, "too few", dict(k8=small[0], v8=small[1], vs=small[2])),
        (ValueError, "dst_start=12", dict(dst=12)),
        (ValueError, "q8 must hold each token's 2 x 32 block densely", dict(q_out=q_sparse)),
    ]
    for exc, match, changes in cases:
        a = dict(k8=k8, v8=v8, ks=ks, vs=vs, dst=0, q_out=None)
        a.update(changes)
        with pytest.raises(exc, match=match):
            kv_quant_append(q_lin, k_lin, v, w, w, cos, sin, a["k8"], a["ks"], a["v8"], a["vs"], (1, 2, 3), 0, a["dst"], 0,
                            q_out=a["q_out"])

