"""kv_cache_plan: the kernel equals the stock rules exactly, and a ring-buffered cache driven by its
plans attends to exactly the keys that the stock memmove layout attends to, call after call, with
the ring sized to the window (a cache larger than the window reads every full window in place)."""
import pytest
import torch
from hypothesis import given, strategies as st

from longlive_triton.kernels.kv_cache_plan import (NEW_GLOBAL, NEW_LOCAL, NEW_PINNED, ROW_LO, SHIFT, SINK_END, WIN_END,
                                                   WIN_START, LOCAL_START, START_FRAME, kv_cache_plan, kv_cache_plan_ref,
                                                   physical_slot, unroll_ring, window_ring_size)


@st.composite
def layouts(draw):
    """A LongLive-like cache: tokens per frame, frames per block, window and sink frames."""
    fs = draw(st.integers(1, 4))
    per_block = draw(st.integers(1, 3))
    window = draw(st.integers(per_block + 1, 9))
    sink = draw(st.integers(0, window - per_block))
    # A budget below the cache: a patch's window in a cache sized by LongLive's config.
    budget_frames = draw(st.sampled_from([window, window - 1, window + 2, draw(st.integers(1, window))]))
    return fs, per_block, window, sink, max(budget_frames, 1)


@st.composite
def call_sequences(draw):
    """Calls as the LongLive pipelines make them: per block a first pass, recomputes at the same
    start, and now and then a prompt-switch re-cache of the window (with or without the sink)."""
    fs, per_block, window, sink, budget = draw(layouts())
    calls = []
    for block in range(draw(st.integers(1, 9))):
        start = block * per_block
        if block and draw(st.booleans()):
            count = min(window, start)
            calls.append(((start - count) * fs, count * fs, draw(st.booleans())))
        for _ in range(draw(st.integers(1, 3))):
            calls.append((start * fs, per_block * fs, False))
    return fs, window, sink, budget, calls


def _stock_step(cache, g, loc, s, n, C, S, M, sink_recache, ids):
    """One call on a stock-layout cache (the clone-roll-write of CausalWanSelfAttention)."""
    plan = kv_cache_plan_ref(g, loc, 0, current_start=s, num_new=n, capacity=C, sink_tokens=S, budget=M,
                             sink_recache=sink_recache)
    e = s + n
    if e > g and n + loc > C:
        evicted = n + loc - C
        rolled = loc - evicted - S
        cache[S:S + rolled] = cache[S + evicted:S + evicted + rolled].clone()
    ls, lo, new_local = plan[LOCAL_START], plan[ROW_LO], plan[WIN_END]
    if lo < n:
        cache[ls + lo:new_local] = ids[lo:]
    attended = torch.cat([cache[:plan[SINK_END]], cache[plan[WIN_START]:new_local]])
    return plan[NEW_GLOBAL], plan[NEW_LOCAL], attended


@given(call_sequences())
def test_ring_cache_attends_to_the_stock_keys(case):
    fs, window, sink, budget, calls = case
    C, S, M = window * fs, sink * fs, budget * fs
    R = window_ring_size(C, S, M)
    stock = torch.zeros(C, dtype=torch.long)
    ring = torch.zeros(C, dtype=torch.long)
    g_stock = l_stock = 0
    g = torch.zeros(1, dtype=torch.long)
    loc = torch.zeros(1, dtype=torch.long)
    shift = torch.zeros(1, dtype=torch.long)
    for index, (s, n, sink_recache) in enumerate(calls):
        ids = torch.arange(n) + 1000 * (index + 1)  # every written key is unique
        g_stock, l_stock, expected = _stock_step(stock, g_stock, l_stock, s, n, C, S, M, sink_recache, ids)
        plan = kv_cache_plan(g, loc, shift, current_start=s, num_new=n, capacity=C, sink_tokens=S, budget=M,
                             sink_recache=sink_recache, ring_size=R).tolist()
        rows = torch.arange(plan[ROW_LO], n)
        # The append kernels' rule: of the rows landing in the ring, the last R.
        rows = rows[(plan[LOCAL_START] + rows < S) | (rows >= n - R)]
        ring[physical_slot(plan[LOCAL_START] + rows, S, R, plan[SHIFT])] = ids[rows]
        # An empty window (start past end) attends to the sink alone, as the stock slicing does.
        window = torch.arange(plan[WIN_START], max(plan[WIN_START], plan[WIN_END]))
        logical = torch.cat([torch.arange(plan[SINK_END]), window])
        got = ring[physical_slot(logical, S, R, plan[SHIFT])]
        assert torch.equal(got.sort().values, expected.sort().values), (index, plan)
        if len(window) == R:  # a full window is the whole ring: slots [S, S + R), read in place
            assert torch.equal(physical_slot(window, S, R, plan[SHIFT]).sort().values, torch.arange(S, S + R))
        g.fill_(plan[NEW_GLOBAL])
        loc.fill_(plan[NEW_LOCAL])
        assert (plan[NEW_GLOBAL], plan[NEW_LOCAL]) == (g_stock, l_stock)
        assert int(shift) == plan[SHIFT]


@given(g=st.integers(0, 400), loc=st.integers(0, 96), shift=st.integers(0, 71), s=st.integers(0, 400),
       n=st.integers(1, 96), sink=st.sampled_from([0, 8, 24]), budget=st.sampled_from([8, 72, 96, 120]),
       local=st.booleans(), sink_recache=st.booleans(), frame_tokens=st.sampled_from([1, 8, 13]),
       start_on_device=st.booleans())
def test_plan_kernel_equals_stock_rules(g, loc, shift, s, n, sink, budget, local, sink_recache, frame_tokens,
                                        start_on_device):
    C = 96
    args = dict(num_new=n, capacity=C, sink_tokens=sink, budget=budget, local=local, sink_recache=sink_recache,
                frame_tokens=frame_tokens)
    shift_t = torch.tensor([shift])
    start = torch.tensor([s]) if start_on_device else s
    got = kv_cache_plan(torch.tensor([g]), torch.tensor([loc]), shift_t, current_start=start, **args)
    want = kv_cache_plan_ref(g, loc, shift % (C - sink), current_start=s, **args)
    assert got.tolist()[:SHIFT] == want[:SHIFT]
    assert got[SHIFT].item() % (C - sink) == want[SHIFT]
    ring = window_ring_size(C, sink, budget)
    got_ring = kv_cache_plan(torch.tensor([g]), torch.tensor([loc]), torch.tensor([shift % ring]), current_start=start,
                             ring_size=ring, **args)
    assert got_ring.tolist() == kv_cache_plan_ref(g, loc, shift % ring, current_start=s, ring_size=ring, **args)
    assert got[START_FRAME].item() == want[START_FRAME] == s // frame_tokens
    assert shift_t.item() == got[SHIFT].item()


def test_longlive_trace():
    """LongLive's cache trace at 1.3B shapes: the first calls of blocks 0..5, then a recompute."""
    fs, C, S = 1560, 18720, 4680
    g, loc, shift = (torch.zeros(1, dtype=torch.long) for _ in range(3))
    expected_local = [4680, 9360, 14040, 18720, 18720, 18720]
    for block, want in enumerate(expected_local):
        plan = kv_cache_plan(g, loc, shift, current_start=block * 3 * fs, num_new=3 * fs, capacity=C,
                             sink_tokens=S, budget=C)
        assert plan[NEW_LOCAL].item() == want and plan[NEW_GLOBAL].item() == (block + 1) * 4680
        assert plan[WIN_START].item() == S and plan[WIN_END].item() == want
        assert plan[SHIFT].item() == (4680 * max(0, block - 3)) % (C - S)
        g.fill_(plan[NEW_GLOBAL])
        loc.fill_(plan[NEW_LOCAL])
    again = kv_cache_plan(g, loc, shift, current_start=5 * 3 * fs, num_new=3 * fs, capacity=C, sink_tokens=S, budget=C)
    assert again[NEW_GLOBAL].item() == g.item() and again[NEW_LOCAL].item() == loc.item()
    assert again[ROW_LO].item() == 0 and again[LOCAL_START].item() == 14040


@pytest.mark.parametrize("bad, match", [
    (dict(num_new=0), "num_new"),
    (dict(current_start=-1), "current_start"),
    (dict(sink_tokens=96), "sink tokens"),
    (dict(num_new=97), "do not fit"),
    (dict(budget=0), "budget"),
    (dict(frame_tokens=0), "frame_tokens"),
    (dict(ring_size=73), "ring_size"),
    (dict(ring_size=0), "ring_size"),
])
def test_bad_arguments(bad, match):
    args = dict(current_start=0, num_new=8, capacity=96, sink_tokens=24, budget=96, **{})
    args.update(bad)
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        kv_cache_plan(one, one.clone(), one.clone(), **args)


def test_window_ring_size():
    fs = 1560
    assert window_ring_size(12 * fs, 3 * fs, 9 * fs) == 6 * fs      # window9 in LongLive's 12-frame cache
    assert window_ring_size(12 * fs, 3 * fs, 12 * fs) == 9 * fs     # the stock window: the whole cache
    assert window_ring_size(12 * fs, 3 * fs, 32760) == 9 * fs       # a budget past the cache
    assert window_ring_size(12 * fs, 3 * fs, 3 * fs) == 9 * fs      # no window beyond the sink


def test_device_start_is_checked():
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(TypeError, match="current_start"):
        kv_cache_plan(one, one.clone(), one.clone(), current_start=torch.zeros(1, dtype=torch.int32), num_new=8,
                      capacity=96, sink_tokens=24, budget=96)
    with pytest.raises(TypeError, match="current_start"):
        kv_cache_plan(one, one.clone(), one.clone(), current_start=2.0, num_new=8, capacity=96, sink_tokens=24, budget=96)


def test_pointer_dtype_is_checked():
    with pytest.raises(TypeError, match="global_end"):
        kv_cache_plan(torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                      current_start=0, num_new=8, capacity=96, sink_tokens=24, budget=96)


# LongLive 2.0: a global sink, a shot sink pinned at scene cuts, and the multi-shot RoPE offset.

def _effective_sink(global_sink: int, sink: int, pinned: tuple[int, int]) -> int:
    """LongLive 2.0's effective sink (CausalWanSelfAttention.forward of wan_5b/modules/causal_model.py)."""
    ps, pl = pinned
    if ps >= 0 and pl > 0:
        return global_sink + pl if ps == global_sink else global_sink
    return max(global_sink, sink)


def _stock2_step(cache, g, loc, pinned, s, n, C, Se, ids):
    """One call on LongLive 2.0's stock layout (clone, roll around the effective sink, insert; the
    budget is the cache, as its pipeline sets it): (global end, local end, pinned start, keys)."""
    e = s + n
    ps, pl = pinned
    if e > g and n + loc > C:
        evicted = n + loc - C
        rolled = loc - evicted - Se
        cache[Se:Se + rolled] = cache[Se + evicted:Se + evicted + rolled].clone()
        new_local = loc + e - g - evicted
        if ps >= 0 and pl > 0 and ps >= Se:
            ps -= evicted
    else:
        new_local = loc + e - g
    cache[new_local - n:new_local] = ids
    return e, new_local, ps, cache[:new_local].clone()


@st.composite
def shot_sequences(draw):
    """LongLive 2.0's pipeline calls: per block a first pass and recomputes at the same start, the
    cache pass last; at a scene cut the cached block is pinned (and, with shot_clean_recache, the
    cache emptied back to the global sink before the cache pass)."""
    fs = draw(st.integers(1, 3))
    per_block = draw(st.integers(1, 3))
    sink = draw(st.integers(1, per_block))
    multi_shot = draw(st.booleans())
    # The largest effective sink (the global sink plus a pinned shot of min(sink, block) frames with the
    # multi-shot sink) must leave room for a block: LongLive 2.0's layout cannot roll otherwise, and the
    # plan refuses a sink that fills the cache.
    kept = sink + min(sink, per_block) if multi_shot else sink
    window = draw(st.integers(kept + per_block, kept + 4 * per_block))
    events = []
    for block in range(draw(st.integers(1, 10))):
        cut = block > 0 and draw(st.booleans())
        events.append((block * per_block * fs, draw(st.integers(1, 3)), cut, cut and draw(st.booleans())))
    return fs, per_block, sink, window, multi_shot, events


@given(shot_sequences(), st.integers(0, 2))
def test_shot_sinks_ring_attends_to_the_stock_keys(case, offset_step):
    """A ring driven by plans with `pinned`, unrolled whenever the effective sink changes, attends to
    exactly LongLive 2.0's keys and keeps its pointers and pinned start, scene cut after scene cut."""
    fs, per_block, sink, window, multi_shot, events = case
    C, n, St = window * fs, per_block * fs, sink * fs
    Gt = St if multi_shot else 0
    stock = torch.full((C,), -1, dtype=torch.long)
    ring = torch.full((1, C), -1, dtype=torch.long)
    g_s, loc_s, pin_s = 0, 0, (-1, 0)
    g, loc, shift = (torch.zeros(1, dtype=torch.long) for _ in range(3))
    ps, pl = torch.tensor([-1]), torch.tensor([0])
    ring_lo, next_id = None, 0
    for start, passes, cut, clean in events:
        for p in range(passes + 1):
            if p == passes and clean:
                g_s, loc_s, pin_s = start, Gt, (-1, 0)
                g.fill_(start), loc.fill_(Gt), ps.fill_(-1), pl.fill_(0)
            Se = _effective_sink(Gt, St, pin_s)
            if ring_lo is not None and Se != ring_lo:
                unroll_ring(ring, ring_lo, C - ring_lo, shift.item())
                shift.zero_()
            ring_lo = Se
            ids = torch.arange(next_id, next_id + n)
            next_id += n
            g_s, loc_s, new_ps, want = _stock2_step(stock, g_s, loc_s, pin_s, start, n, C, Se, ids)
            pin_s = (new_ps, pin_s[1])
            plan = kv_cache_plan(g, loc, shift, current_start=start, num_new=n, capacity=C, sink_tokens=Se, budget=C,
                                 frame_tokens=fs, sink_recache=True, frame_offset=offset_step * 8, pinned=(ps, pl))
            assert plan[START_FRAME].item() == start // fs + offset_step * 8
            assert (plan[NEW_GLOBAL].item(), plan[NEW_LOCAL].item(), plan[NEW_PINNED].item(), ps.item()) \
                == (g_s, loc_s, pin_s[0], pin_s[0])
            ls, lo = plan[LOCAL_START].item(), plan[ROW_LO].item()
            assert lo == 0
            ring[0, physical_slot(torch.arange(ls, ls + n), Se, C - Se, plan[SHIFT].item())] = ids
            keys = torch.arange(plan[SINK_END].item()).tolist() + torch.arange(plan[WIN_START].item(),
                                                                                 plan[WIN_END].item()).tolist()
            got = ring[0, physical_slot(torch.tensor(keys, dtype=torch.long), Se, C - Se, plan[SHIFT].item())]
            assert sorted(got.tolist()) == sorted(want.tolist())
            g.fill_(plan[NEW_GLOBAL].item()), loc.fill_(plan[NEW_LOCAL].item())
        if cut and multi_shot:
            pin_len = min(St, n)
            pin_s = (loc_s - n, pin_len)
            ps.fill_(loc_s - n), pl.fill_(pin_len)


def test_v1_plans_carry_no_pinned_entry():
    one = torch.zeros(1, dtype=torch.long)
    plan = kv_cache_plan(one, one.clone(), one.clone(), current_start=0, num_new=8, capacity=96, sink_tokens=24,
                         budget=96)
    assert plan[NEW_PINNED].item() == -1 and plan[START_FRAME].item() == 0
    with pytest.raises(ValueError, match="frame_offset"):
        kv_cache_plan(one, one.clone(), one.clone(), current_start=0, num_new=8, capacity=96, sink_tokens=24,
                      budget=96, frame_offset=-1)
