"""Window attention (kernels/window_attention.py) against the gathered float32 SDPA reference.

Every case poisons the K/V slots outside the attended set and the output buffer with NaN, so a
kernel that reads a slot it should not, or leaves an output element unwritten, fails.
"""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from longlive_triton.kernels.window_attention import (
    window_attention,
    window_attention_bytes,
    window_attention_flops,
    window_attention_ref,
)

from .._numerics import assert_as_close_as_same_precision

# `device` is a constant per session, so sharing it across generated inputs is safe.
_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


@st.composite
def attention_cases(draw, max_batch, max_heads, head_dims, max_lq, max_slots):
    batch = draw(st.integers(1, max_batch))
    cap = draw(st.integers(1, max_slots))
    per_sample = draw(st.booleans())
    ring = draw(st.booleans())
    ring_lo, ring_size = (draw(st.integers(0, cap - 1)), None) if ring else (0, None)
    if ring:
        ring_size = draw(st.integers(1, cap - ring_lo))
    ranges = []
    for _ in range(batch if per_sample else 1):
        if ring:
            # Logical slots: the sink below ring_lo, the window inside the ring, rotated by shift.
            sink_end = draw(st.integers(0, ring_lo))
            win_start = draw(st.integers(ring_lo, ring_lo + ring_size))
            win_end = draw(st.integers(win_start, ring_lo + ring_size))
            ranges.append((sink_end, win_start, win_end, draw(st.integers(0, ring_size - 1))))
        else:
            sink_end = draw(st.sampled_from([0, 0, draw(st.integers(0, cap))]))
            win_start = draw(st.integers(0, cap))
            win_end = draw(st.one_of(st.just(cap), st.integers(win_start, cap)))
            ranges.append((sink_end, win_start, win_end, None))
    return dict(ring_lo=ring_lo, ring_size=ring_size,
        batch=batch,
        lq=draw(st.integers(1, max_lq)),
        heads=draw(st.integers(1, max_heads)),
        head_dim=draw(st.sampled_from(head_dims)),
        cap=cap,
        ranges=ranges,
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        strided_q=draw(st.booleans()),
        split=draw(st.sampled_from([1, 1, 2, 3])),
        seed=draw(st.integers(0, 2**16)),
    )


def _attended(cap, ring_lo, ring_size, sink_end, win_start, win_end, shift):
    """Physical slots read: logical ones below ring_lo as they are, the others rotated by shift."""
    ring_size = cap - ring_lo if ring_size is None else ring_size
    logical = set(range(sink_end)) | set(range(max(win_start, sink_end), win_end))
    mask = torch.zeros(cap, dtype=torch.bool)
    for slot in logical:
        mask[slot if shift is None or slot < ring_lo else ring_lo + (slot - ring_lo + shift) % ring_size] = True
    return mask


def attended_slots(case, device) -> torch.Tensor:
    """[B, C] bool: the physical slots each sample attends to."""
    ranges = case["ranges"]
    return torch.stack([_attended(case["cap"], case["ring_lo"], case["ring_size"], *ranges[b if len(ranges) > 1 else 0])
                        for b in range(case["batch"])]).to(device)


def attention_same_precision(q, k_cache, v_cache, attended, scale=None):
    """The kernel's arithmetic in plain torch, rounding where it rounds: fp32 scores of the bf16 q
    and k, softmax weights (unnormalised, <= 1) rounded to bf16 before P.V, fp32 sums, the output
    rounded to bf16. (The kernel rounds P at the running max of its key tile, this at the row's
    max: the same rounding, at other points of the grid.) attended: [B, C] bool."""
    B, Lq, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, Lq, H, D, dtype=torch.bfloat16, device=q.device)
    for b in range(B):
        if not attended[b].any():
            continue
        qb, kb, vb = (t.float().transpose(0, 1) for t in (q[b], k_cache[b, attended[b]], v_cache[b, attended[b]]))
        s = qb @ kb.transpose(-1, -2) * scale
        p = torch.exp(s - s.amax(-1, keepdim=True))
        out[b] = ((p.bfloat16().float() @ vb) / p.sum(-1, keepdim=True)).transpose(0, 1).bfloat16()
    return out


def check_window_attention(case, device, use_tma=False, config=None):
    B, Lq, H, D, C = case["batch"], case["lq"], case["heads"], case["head_dim"], case["cap"]
    gen = torch.Generator().manual_seed(case["seed"])
    if case["strided_q"]:
        # q as the first third of a fused q|k|v projection: row stride 3*H*D.
        q = torch.randn(B, Lq, 3, H, D, generator=gen).to(device, torch.bfloat16)[:, :, 0]
    else:
        q = torch.randn(B, Lq, H, D, generator=gen).to(device, torch.bfloat16)
    k_cache = torch.randn(B, C, H, D, generator=gen).to(device, torch.bfloat16)
    v_cache = torch.randn(B, C, H, D, generator=gen).to(device, torch.bfloat16)
    ranges = case["ranges"]
    for b in range(B):
        outside = ~_attended(C, case["ring_lo"], case["ring_size"], *ranges[b if len(ranges) > 1 else 0]).to(device)
        k_cache[b, outside] = float("nan")
        v_cache[b, outside] = float("nan")
    sink_end, win_start, win_end = (torch.tensor([r[i] for r in ranges], dtype=case["index_dtype"], device=device)
                                    for i in range(3))
    ring = {}
    if ranges[0][3] is not None:
        ring = dict(ring_lo=case["ring_lo"], ring_size=case["ring_size"],
                    shift=torch.tensor([r[3] for r in ranges], dtype=case["index_dtype"], device=device))
    out = torch.full((B, Lq, H, D), float("nan"), dtype=torch.bfloat16, device=device)

    got = window_attention(q, k_cache, v_cache, sink_end, win_start, win_end, out=out,
                           use_tma=use_tma, split=case["split"], config=config, **ring)
    want = window_attention_ref(q, k_cache, v_cache, sink_end, win_start, win_end, **ring)

    assert got is out
    assert not torch.isnan(got).any(), "an output element is unwritten or a poisoned slot was read"
    attended = attended_slots(case, device)
    same = attention_same_precision(q, k_cache, v_cache, attended)
    return assert_as_close_as_same_precision(got, want, same)


@settings(suppress_health_check=_HEALTH)
@given(case=attention_cases(max_batch=2, max_heads=3, head_dims=(32, 64), max_lq=40, max_slots=96))
def test_matches_reference(case, device):
    check_window_attention(case, device)


def _real(lq, cap, sink_end, win_start, win_end, shift=None, heads=12, batch=1, split=1):
    return dict(batch=batch, lq=lq, heads=heads, head_dim=128, cap=cap, ring_lo=sink_end, ring_size=None,
                ranges=[(sink_end, win_start, win_end, shift)],
                index_dtype=torch.int64, strided_q=False, split=split, seed=0)


@pytest.mark.gpu
@settings(suppress_health_check=_HEALTH)  # drawn cases: the `gpu` profile
@given(case=attention_cases(max_batch=2, max_heads=12, head_dims=(32, 64, 128), max_lq=700, max_slots=3000),
       use_tma=st.booleans(), tuned=st.just(False))
# Block 0 (sink only), blocks 1-3 (filling), steady state, rotated rings (full and 9-frame windows),
# cross-attention. Only the steady TMA split-2 case autotunes (the Triton backend's launch); the others
# run the fixed tile: each autotune key is a search of its own (every config compiled and timed).
@example(case=_real(4680, 18720, 4680, 4680, 4680), use_tma=False, tuned=False)
@example(case=_real(4680, 18720, 4680, 4680, 9360), use_tma=False, tuned=False)
@example(case=_real(4680, 18720, 4680, 4680, 14040), use_tma=False, tuned=False)
@example(case=_real(4680, 18720, 4680, 4680, 18720), use_tma=False, tuned=False)
@example(case=_real(4680, 18720, 4680, 4680, 18720), use_tma=True, tuned=False)
@example(case=_real(4680, 18720, 4680, 4680, 18720, split=2), use_tma=True, tuned=True)
@example(case=_real(4680, 18720, 4680, 4680, 14040, split=2), use_tma=False, tuned=False)
@example(case=_real(4680, 18720, 4680, 4680, 18720, shift=7000), use_tma=True, tuned=False)
@example(case=_real(4680, 18720, 4680, 9360, 18720, shift=7000), use_tma=False, tuned=False)
@example(case=_real(4680, 512, 0, 0, 512), use_tma=False, tuned=False)
@example(case=_real(4680, 512, 0, 0, 512), use_tma=True, tuned=False)
@example(case=_real(1560, 18720, 4680, 4680, 18720, batch=2), use_tma=False, tuned=False)
def test_matches_reference_gpu(case, use_tma, tuned, device):
    use_tma = use_tma and torch.cuda.get_device_capability(device)[0] >= 9
    # Random cases run one fixed config: autotuning every Lq bucket they hit would take minutes.
    config = None if tuned else {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    check_window_attention(case, device, use_tma=use_tma, config=config)


def _inputs(device, B=1, Lq=8, H=2, D=32, C=24):
    q = torch.randn(B, Lq, H, D, device=device).to(torch.bfloat16)
    k = torch.randn(B, C, H, D, device=device).to(torch.bfloat16)
    v = torch.randn(B, C, H, D, device=device).to(torch.bfloat16)
    return q, k, v


def _check_unpoisoned(got, q, k, v, sink_end, win_start, win_end, scale=None):
    want = window_attention_ref(q, k, v, sink_end, win_start, win_end, scale=scale)
    attended = _attended(k.shape[1], 0, None, sink_end, win_start, win_end, None)[None].to(q.device)
    assert_as_close_as_same_precision(got, want, attention_same_precision(q, k, v, attended, scale))


def test_cross_attention_full_cache(device):
    # Cross-attention: a cache of exactly the text length, no sink, window over all of it.
    q, k, v = _inputs(device, Lq=19, C=512)
    got = window_attention(q, k, v, 0, 0, 512)
    _check_unpoisoned(got, q, k, v, 0, 0, 512)


def test_empty_key_set_gives_zeros(device):
    q, k, v = _inputs(device)
    got = window_attention(q, k, v, 0, 5, 5)
    assert torch.equal(got, torch.zeros_like(got))


def test_overlapping_ranges_attend_to_the_union(device):
    # [0, 10) U [4, 20) is [0, 20): keys in the overlap count once.
    q, k, v = _inputs(device)
    got = window_attention(q, k, v, 10, 4, 20)
    _check_unpoisoned(got, q, k, v, 20, 20, 20)


def test_custom_scale(device):
    q, k, v = _inputs(device)
    got = window_attention(q, k, v, 3, 9, 24, scale=0.3)
    _check_unpoisoned(got, q, k, v, 3, 9, 24, scale=0.3)


def test_flops_and_bytes():
    assert window_attention_flops(1, 4680, 18720, 12, 128) == 4 * 12 * 4680 * 18720 * 128
    assert window_attention_bytes(1, 4680, 18720, 12, 128) == 2 * 12 * 128 * (2 * 4680 + 2 * 18720)


def test_rejects_bad_inputs(device):
    q, k, v = _inputs(device)
    idx = torch.tensor([4], device=device)
    with pytest.raises(TypeError, match="bfloat16"):
        window_attention(q.float(), k, v, 0, 0, 8)
    with pytest.raises(TypeError, match="bfloat16"):
        window_attention(q, k.half(), v, 0, 0, 8)
    with pytest.raises(ValueError, match="4-D"):
        window_attention(q[0], k, v, 0, 0, 8)
    with pytest.raises(ValueError, match="head dim 48"):
        qq, kk, vv = _inputs(device, D=48)
        window_attention(qq, kk, vv, 0, 0, 8)
    with pytest.raises(ValueError, match="does not match q"):
        window_attention(q, k[:, :, :1], v[:, :, :1], 0, 0, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        window_attention(q, k, v[:, :20], 0, 0, 8)
    with pytest.raises(ValueError, match="last"):
        window_attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, 0, 0, 8)
    with pytest.raises(ValueError, match="outside the cache"):
        window_attention(q, k, v, 0, 0, 25)
    with pytest.raises(ValueError, match="outside the cache"):
        window_attention(q, k, v, -1, 0, 8)
    with pytest.raises(TypeError, match="torch.int32 or torch.int64"):
        window_attention(q, k, v, idx.float(), idx, idx)
    with pytest.raises(ValueError, match=r"shape \[1\] or \[B=1\]"):
        window_attention(q, k, v, torch.tensor([1, 2], device=device), idx, idx)
    with pytest.raises(TypeError, match="int tensor or an int"):
        window_attention(q, k, v, 1.5, idx, idx)
    with pytest.raises(ValueError, match="out must have shape"):
        window_attention(q, k, v, 0, 0, 8, out=torch.empty_like(q)[:, :4])
    with pytest.raises(ValueError, match="ring"):
        window_attention(q, k, v, 0, 0, 8, ring_lo=20, ring_size=5)
    with pytest.raises(ValueError, match="shift=4"):
        window_attention(q, k, v, 0, 0, 8, ring_lo=20, shift=4)
    with pytest.raises(ValueError, match="config"):
        window_attention(q, k, v, 0, 0, 8, config={"BLOCK_M": 100, "BLOCK_N": 64})
    with pytest.raises(ValueError, match="split must be"):
        window_attention(q, k, v, 0, 0, 8, split=0)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="is on cpu"):
            window_attention(q, k, v, torch.tensor([4]), idx, idx)

