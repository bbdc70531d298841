"""Fused RMSNorm + causal RoPE + KV append (kernels/rope_kv_append.py) against the stock math.

The reference is the stock code path: fp32 RMSNorm statistics, float64 complex RoPE, torch-indexed
cache writes. The output q is NaN-poisoned; the caches hold random values with NaNs sprinkled in,
and every slot the call must not write is checked bit for bit afterwards.
"""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from longlive_triton.kernels.rope_kv_append import (
    rope_kv_append,
    rope_kv_append_bytes,
    rope_kv_append_ref,
    rope_tables,
)

from .._numerics import assert_as_close_as_same_precision

# Roped q/k (bf16, fp32 math) against the float64 stock math cast to bf16: each element within
# ULPS bf16 ulps of its complex pair's magnitude (the rotation keeps that magnitude; one ulp for the
# final rounding, one for a rare flip of the bf16 RMSNorm rounding), and at least MIN_EXACT of the
# elements bit-equal. v is copied, so it must be bit-equal.
TOLERANCES = {torch.bfloat16: dict(ulps=2, min_exact=0.95)}

# `device` is a constant per session, so sharing it across generated inputs is safe.
_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


def assert_rope_close(got: torch.Tensor, want: torch.Tensor) -> None:
    tol = TOLERANCES[torch.bfloat16]
    assert got.shape == want.shape
    pairs = want.float().unflatten(-1, (-1, 2))
    magnitude = pairs.norm(dim=-1, keepdim=True).expand_as(pairs).flatten(-2)
    ulp = torch.exp2(torch.floor(torch.log2(magnitude.clamp_min(1e-30))) - 7)
    err = (got.float() - want.float()).abs()
    bad = err > tol["ulps"] * ulp
    assert not bad.any(), (f"{int(bad.sum())} elements off by more than {tol['ulps']} ulps; worst at "
                           f"{tuple(int(i) for i in torch.nonzero(bad)[0])}: {got[bad][0]} vs {want[bad][0]}")
    exact = (got.view(torch.int16) == want.view(torch.int16)).float().mean().item()
    assert exact >= tol["min_exact"], f"only {exact:.1%} of elements bit-equal"


@st.composite
def append_cases(draw, max_batch, max_heads, head_dims, max_grid, max_extra_slots):
    batch = draw(st.integers(1, max_batch))
    grid = tuple(draw(st.integers(1, g)) for g in max_grid)
    n = grid[0] * grid[1] * grid[2]
    cap = n + draw(st.integers(0, max_extra_slots))
    ring = draw(st.booleans())
    if ring:
        ring_lo = draw(st.integers(0, cap - 1))
        ring_size = draw(st.integers(1, cap - ring_lo))
        shift = draw(st.one_of(st.none(), st.integers(0, ring_size - 1)))
    else:
        ring_lo, ring_size, shift = 0, None, None
    per_sample = draw(st.booleans())
    index = []
    for _ in range(batch if per_sample else 1):
        if ring:
            # Rows past ring_size collide in the ring: the kernel writes only the last ring_size.
            row_lo = draw(st.integers(0, n))
            dst_start = draw(st.integers(0, cap - 1))
        else:
            row_lo = draw(st.sampled_from([0, 0, draw(st.integers(0, n))]))
            dst_start = draw(st.integers(0, cap - n))
        start_frame = draw(st.one_of(st.integers(0, 30), st.just(1024 - grid[0])))
        index.append((start_frame, dst_start, row_lo))
    return dict(
        batch=batch, heads=draw(st.integers(1, max_heads)), head_dim=draw(st.sampled_from(head_dims)),
        grid=grid, cap=cap, ring_lo=ring_lo, ring_size=ring_size, shift=shift, index=index,
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        fused_qkv=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


def _written_slots(n, cap, ring_lo, ring_size, shift, dst_start, row_lo):
    """{row: physical slot}: logical slots below ring_lo are the sink; the rest is a rotated ring, of
    which the rows land in the ring only the last ring_size are written (as in a write in row order)."""
    ring_size = cap if ring_size is None else ring_size
    shift = shift or 0
    logical = {r: dst_start + r for r in range(row_lo, n) if dst_start + r < ring_lo or r >= n - ring_size}
    assert len({ring_lo + (l - ring_lo + shift) % ring_size for l in logical.values() if l >= ring_lo}) == \
        sum(l >= ring_lo for l in logical.values()), "the written rows collide"
    return {r: l if l < ring_lo else ring_lo + (l - ring_lo + shift) % ring_size for r, l in logical.items()}


def check_rope_kv_append(case, device, norm: bool = True):
    B, H, D, grid, C = case["batch"], case["heads"], case["head_dim"], case["grid"], case["cap"]
    n, HD = grid[0] * grid[1] * grid[2], case["heads"] * case["head_dim"]
    gen = torch.Generator().manual_seed(case["seed"])
    if case["fused_qkv"]:
        # Slices of one fused q|k|v GEMM output: row stride 3*H*D.
        qkv = torch.randn(B, n, 3 * HD, generator=gen).to(device, torch.bfloat16)
        q_lin, k_lin, v = qkv[..., :HD], qkv[..., HD:2 * HD], qkv[..., 2 * HD:]
    else:
        q_lin, k_lin, v = (torch.randn(B, n, HD, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    wq, wk = ((1 + 0.5 * torch.randn(HD, generator=gen)).to(device, torch.bfloat16) for _ in range(2))
    if not norm:
        wq = wk = None
    k_cache, v_cache = (torch.randn(B, C, H, D, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    poison = torch.rand(B, C, H, D, generator=gen).to(device) < 0.1
    k_cache[poison] = float("nan")
    v_cache[poison] = float("nan")
    k_before, v_before = k_cache.clone(), v_cache.clone()
    k_want, v_want = k_cache.clone(), v_cache.clone()
    index = case["index"]
    start_frame, dst_start, row_lo = (torch.tensor([i[j] for i in index], dtype=case["index_dtype"], device=device)
                                      for j in range(3))
    cos, sin = rope_tables(D, device=device)
    out = torch.full((B, n, H, D), float("nan"), dtype=torch.bfloat16, device=device)
    shift = case["shift"]
    kwargs = dict(ring_lo=case["ring_lo"], ring_size=case["ring_size"],
                  shift=None if shift is None else torch.tensor([shift], dtype=case["index_dtype"], device=device))

    got = rope_kv_append(q_lin, k_lin, v, wq, wk, cos, sin, k_cache, v_cache, grid,
                         start_frame, dst_start, row_lo, out=out, **kwargs)
    want = rope_kv_append_ref(q_lin, k_lin, v, wq, wk, k_want, v_want, grid, start_frame, dst_start, row_lo, **kwargs)

    assert got is out
    assert not torch.isnan(got).any(), "an output element is unwritten"
    assert_rope_close(got, want)
    # And FlashAttention's rule against the same math in fp64 (tests/_numerics.py): the stock route
    # rounds where the kernel rounds (the RMSNorm output and the roped values to bf16).
    k_exact = k_before.double()
    exact = rope_kv_append_ref(q_lin.double(), k_lin.double(), v.double(), *(None if w is None else w.double()
                               for w in (wq, wk)), k_exact, v_before.double(), grid, start_frame, dst_start,
                               row_lo, **kwargs)
    assert_as_close_as_same_precision(got, exact, want, terms=HD, what="q")
    for b in range(B):
        sf, dst, lo = index[b if len(index) > 1 else 0]
        slots = _written_slots(n, C, case["ring_lo"], case["ring_size"], shift, dst, lo)
        untouched = torch.ones(C, dtype=torch.bool)
        untouched[list(slots.values())] = False
        untouched = untouched.to(device)
        assert torch.equal(k_cache[b, untouched].view(torch.int16), k_before[b, untouched].view(torch.int16))
        assert torch.equal(v_cache[b, untouched].view(torch.int16), v_before[b, untouched].view(torch.int16))
        if slots:
            rows = torch.tensor(list(slots.keys()), device=device)
            dst_slots = torch.tensor(list(slots.values()), device=device)
            assert_rope_close(k_cache[b, dst_slots], k_want[b, dst_slots])
            assert_as_close_as_same_precision(k_cache[b, dst_slots], k_exact[b, dst_slots], k_want[b, dst_slots],
                                              terms=HD, what="k")
            assert torch.equal(v_cache[b, dst_slots].view(torch.int16),
                               v[b, rows].reshape(-1, H, D).view(torch.int16))


@settings(suppress_health_check=_HEALTH)
@given(case=append_cases(max_batch=2, max_heads=3, head_dims=(32, 64), max_grid=(3, 4, 5), max_extra_slots=40))
def test_matches_stock_math(case, device):
    check_rope_kv_append(case, device)


@settings(suppress_health_check=_HEALTH, max_examples=5)
@given(case=append_cases(max_batch=2, max_heads=3, head_dims=(32, 64), max_grid=(3, 4, 5), max_extra_slots=40))
def test_without_norm_matches_stock_rope(case, device):
    """Norm weights None (q, k already normed, as sequence parallelism passes them): RoPE + append only."""
    check_rope_kv_append(case, device, norm=False)


def _real(grid, cap, start_frame, dst_start, row_lo, ring_lo=0, ring_size=None, shift=None, batch=1):
    return dict(batch=batch, heads=12, head_dim=128, grid=grid, cap=cap, ring_lo=ring_lo, ring_size=ring_size,
                shift=shift,
                index=[(start_frame, dst_start, row_lo)], index_dtype=torch.int64, fused_qkv=False, seed=0)


@pytest.mark.gpu
@settings(suppress_health_check=_HEALTH)
@given(case=append_cases(max_batch=2, max_heads=12, head_dims=(32, 64, 128), max_grid=(4, 30, 52), max_extra_slots=2000))
# Block 0, block 3 (cache filling up), a late block (start frame near the table's end), a recompute
# with the sink protected, a rotated-ring write that wraps, and the 12-frame re-cache behind a
# protected sink.
@example(case=_real((3, 30, 52), 18720, 0, 0, 0))
@example(case=_real((3, 30, 52), 18720, 9, 14040, 0))
@example(case=_real((3, 30, 52), 18720, 1017, 14040, 0))
@example(case=_real((3, 30, 52), 18720, 3, 4680, 4680))
@example(case=_real((3, 30, 52), 18720, 21, 14040, 0, ring_lo=4680, ring_size=14040, shift=9360))
@example(case=_real((12, 30, 52), 18720, 30, 0, 4680, ring_lo=4680, ring_size=14040))
@example(case=_real((3, 30, 52), 18720, 9, 14040, 0, batch=2))
def test_matches_stock_math_gpu(case, device):
    check_rope_kv_append(case, device)


def _inputs(device, B=1, n=6, H=2, D=32, C=12):
    q_lin, k_lin, v = (torch.randn(B, n, H * D, device=device).to(torch.bfloat16) for _ in range(3))
    wq, wk = (torch.ones(H * D, device=device, dtype=torch.bfloat16) for _ in range(2))
    cos, sin = rope_tables(D, device=device)
    k_cache, v_cache = (torch.zeros(B, C, H, D, device=device, dtype=torch.bfloat16) for _ in range(2))
    return [q_lin, k_lin, v, wq, wk, cos, sin, k_cache, v_cache, (1, 2, 3), 0, 0, 0]


def _with(args, **changes):
    names = ["q_lin", "k_lin", "v", "wq", "wk", "cos", "sin", "k_cache", "v_cache", "grid", "sf", "dst", "row_lo"]
    return [changes.get(name, a) for name, a in zip(names, args)]


def test_rope_tables_match_stock_table():
    cos, sin = rope_tables(128)
    assert cos.shape == sin.shape == (1024, 64) and cos.dtype == torch.float32
    # Column 0 of each axis has frequency 1: angle = position.
    p = torch.arange(1024, dtype=torch.float64)
    for col in (0, 22, 43):
        torch.testing.assert_close(cos[:, col], torch.cos(p).float(), atol=0, rtol=0)
        torch.testing.assert_close(sin[:, col], torch.sin(p).float(), atol=0, rtol=0)


def test_bytes():
    row = 12 * 128 * 2
    assert rope_kv_append_bytes(1, 4680, 12, 128) == 6 * 4680 * row
    assert rope_kv_append_bytes(1, 4680, 12, 128, rows_written=0) == 2 * 4680 * row


def test_rejects_bad_inputs(device):
    args = _inputs(device)
    q_lin, k_lin, v, wq, wk, cos, sin, k_cache, v_cache = args[:9]
    rope_kv_append(*args)
    cases = [
        (TypeError, "bfloat16", dict(q_lin=q_lin.float())),
        (ValueError, "same shape", dict(k_lin=k_lin[:, :5])),
        (ValueError, "3-D", dict(v=v[0])),
        (ValueError, "last dim", dict(q_lin=q_lin.transpose(1, 2).contiguous().transpose(1, 2))),
        (ValueError, "too few", dict(k_cache=k_cache[:, :5], v_cache=v_cache[:, :5])),
        (ValueError, "differ in shape", dict(v_cache=v_cache[:, :11])),
        (ValueError, "head dim 48", dict(k_cache=torch.zeros(1, 12, 1, 48, device=device, dtype=torch.bfloat16),
                                         v_cache=torch.zeros(1, 12, 1, 48, device=device, dtype=torch.bfloat16),
                                         q_lin=torch.zeros(1, 6, 48, device=device, dtype=torch.bfloat16),
                                         k_lin=torch.zeros(1, 6, 48, device=device, dtype=torch.bfloat16),
                                         v=torch.zeros(1, 6, 48, device=device, dtype=torch.bfloat16))),
        (ValueError, "H\\*D=64", dict(k_cache=k_cache[:, :, :1], v_cache=v_cache[:, :, :1])),
        (ValueError, r"norm_q_weight must have shape \[64\]", dict(wq=wq[:32])),
        (ValueError, "both be None", dict(wq=None)),
        (TypeError, "float32", dict(cos=cos.double())),
        (ValueError, r"shape \[R, 16\]", dict(cos=cos[:, :8], sin=sin[:, :8])),
        (ValueError, "cover 4 tokens", dict(grid=(1, 2, 2))),
        (ValueError, "three positive ints", dict(grid=(6, 1))),
        (ValueError, "start_frame=1024", dict(sf=1024)),
        (ValueError, "dst_start=12", dict(dst=12)),
        (ValueError, "row_lo=7", dict(row_lo=7)),
        (TypeError, "torch.int32 or torch.int64", dict(dst=torch.zeros(1, device=device))),
        (ValueError, r"shape \[1\] or \[B=1\]", dict(row_lo=torch.zeros(2, 1, dtype=torch.int64, device=device))),
    ]
    for exc, match, changes in cases:
        with pytest.raises(exc, match=match):
            rope_kv_append(*_with(args, **changes))
    with pytest.raises(ValueError, match="ring"):
        rope_kv_append(*args, ring_lo=4, ring_size=9)
    with pytest.raises(ValueError, match="shift=8"):
        rope_kv_append(*args, ring_lo=4, ring_size=8, shift=8)
    with pytest.raises(ValueError, match="out must have shape"):
        rope_kv_append(*args, out=torch.empty(1, 6, 2, 16, device=device, dtype=torch.bfloat16))
