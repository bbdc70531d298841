"""token_merge: per-frame bipartite matching, merge and unmerge equal their torch references.

Scores and merged rows are judged against fp64 (the cosine similarities; the size-weighted mean of
the tokens each output row gathers): at most twice the error of the fp32 torch references (which
round where the kernels round) plus one output ulp and fp32 summation noise (tests/_numerics.py)."""
import pytest
import torch
from hypothesis import example, given, strategies as st

from longlive_triton.kernels.token_merge import (
    token_match, token_match_ref, token_merge, token_merge_bytes, token_merge_ref, token_unmerge, token_unmerge_ref,
)
from longlive_triton.kernels.token_merge_plan import frame_layout, merge_count, merge_plan, merge_plan_ref

from .._numerics import assert_as_close_as_same_precision

# Near-ties of the fp32 similarities: the kernel may pick another destination whose score is within
# this of the best (fp32 dot products of unit vectors of <= 1536 features differ by ~1e-6).
SCORE_TOL = 1e-5

GRIDS = [((2, 4), (1, 2)), ((2, 4), (2, 2)), ((2, 4), (2, 1)), ((4, 4), (2, 2)), ((4, 4), (4, 2)),
         ((4, 6), (2, 2)), ((4, 6), (2, 3)), ((4, 6), (1, 1))]


def _x(device, B, F, grid, C, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(B, F * grid[0] * grid[1], C, generator=gen)
    v = torch.where(v.abs() < 0.05, torch.full_like(v, 0.5), v)     # never zeros
    return v.to(device, dtype)


def _sim(x, frames, grid, stride, dtype=torch.float32):
    """Full cosine similarity [B, F, n_src, n_dst] in dtype, for judging near-ties."""
    dst_pos, src_pos = frame_layout(grid, stride, x.device)
    T = grid[0] * grid[1]
    xf = x.to(dtype).unflatten(1, (frames, T))
    xf = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return xf[:, :, src_pos] @ xf[:, :, dst_pos].transpose(-1, -2)


def _check_scores(x, kw, score, rscore):
    if score.numel():
        exact = _sim(x, **kw, dtype=torch.float64).amax(-1)
        assert_as_close_as_same_precision(score, exact, rscore, terms=x.shape[-1], what="scores")


def _check_merged(got, want, x, sizes):
    """got.merged against the size-weighted mean, in fp64, of the tokens mapped to each row."""
    B, L, C = x.shape
    w = torch.ones(B, L, dtype=torch.float64, device=x.device) if sizes is None else sizes.double()
    rows = (got.mapping + torch.arange(B, device=x.device)[:, None] * got.merged.shape[1]).flatten()
    num = torch.zeros(B * got.merged.shape[1], C, dtype=torch.float64, device=x.device)
    den = torch.zeros(B * got.merged.shape[1], dtype=torch.float64, device=x.device)
    num.index_add_(0, rows, (x.double() * w[..., None]).flatten(0, 1))
    den.index_add_(0, rows, w.flatten())
    exact = (num / den[:, None]).view_as(got.merged)
    assert_as_close_as_same_precision(got.merged, exact, want.merged, terms=L, what="merged rows")


def _ratio(frac, grid, stride):
    """The merge ratio (fraction of a frame's tokens merged away) that is `frac` of the most the
    stride allows (all sources merged)."""
    dst_pos, src_pos = frame_layout(grid, stride)
    return frac * src_pos.numel() / (grid[0] * grid[1])


def _case(device, B, F, gi, C, dtype, frac, seed, with_sizes):
    grid, stride = GRIDS[gi]
    ratio = _ratio(frac, grid, stride)
    x = _x(device, B, F, grid, C, dtype, seed)
    sizes = None
    if with_sizes:
        gen = torch.Generator().manual_seed(seed + 1)
        sizes = torch.randint(1, 5, (B, x.shape[1]), generator=gen).float().to(device)
    return x, dict(frames=F, grid=grid, stride=stride), ratio, sizes


cases = dict(B=st.integers(1, 2), F=st.integers(1, 3), gi=st.integers(0, len(GRIDS) - 1),
             C=st.sampled_from([16, 24, 48, 64]), dtype=st.sampled_from([torch.bfloat16, torch.float32]),
             frac=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]), seed=st.integers(0, 2**16),
             with_sizes=st.booleans())


@given(**cases)
@example(B=1, F=3, gi=5, C=64, dtype=torch.bfloat16, frac=2 / 3, seed=0, with_sizes=False)
def test_match_and_merge_equal_reference(device, B, F, gi, C, dtype, frac, seed, with_sizes):
    x, kw, ratio, sizes = _case(device, B, F, gi, C, dtype, frac, seed, with_sizes)
    x_before = x.clone()
    idx, score = token_match(x, **kw)
    ridx, rscore = token_match_ref(x, **kw)
    _check_scores(x, kw, score, rscore)
    if idx.numel():
        # The same index, unless the reference itself sees a near-tie at the kernel's choice.
        chosen = _sim(x, **kw).gather(-1, idx[..., None])[..., 0]
        assert ((idx == ridx) | (chosen >= rscore - SCORE_TOL)).all()
        assert (idx >= 0).all() and (idx < _sim(x, **kw).shape[-1]).all()

    T = kw["grid"][0] * kw["grid"][1]
    r = merge_count(kw["grid"], kw["stride"], ratio)
    t_out = T - r
    out = torch.full((B, F * t_out, x.shape[-1]), float("nan"), dtype=dtype, device=device)
    got = token_merge(x, **kw, ratio=ratio, sizes=sizes, match=(idx, score), out=out)
    want = token_merge_ref(x, **kw, ratio=ratio, sizes=sizes, match=(idx, score))
    assert torch.equal(x, x_before)
    assert got.merged is out and torch.isfinite(got.merged.float()).all()
    assert torch.equal(got.mapping, want.mapping)
    torch.testing.assert_close(got.sizes, want.sizes, atol=0, rtol=0)
    _check_merged(got, want, x, sizes)

    # Frames never mix: every token maps into its own frame's rows, and each frame keeps its size.
    frame_of_token = torch.arange(F * T, device=device) // T
    assert (got.mapping // t_out == frame_of_token).all()
    in_sizes = torch.ones(B, F * T, device=device) if sizes is None else sizes
    torch.testing.assert_close(got.sizes.view(B, F, t_out).sum(-1), in_sizes.view(B, F, T).sum(-1), atol=0, rtol=0)
    # Every merged row is hit: the mapping is onto.
    hit = torch.zeros(B, F * t_out, dtype=torch.bool, device=device)
    hit.scatter_(1, got.mapping, True)
    assert hit.all()

    # Unmerge: all rows written, equals the reference gather, and x exactly on unmerged tokens.
    full = torch.full_like(x, float("nan"))
    back = token_unmerge(got.merged, got.mapping, out=full)
    assert back is full and torch.equal(back, token_unmerge_ref(got.merged, got.mapping))
    alone = torch.bincount((got.mapping + torch.arange(B, device=device)[:, None] * F * t_out).flatten(),
                           minlength=B * F * t_out).view(B, F * t_out)
    untouched = alone.gather(1, got.mapping) == 1
    assert torch.equal(back[untouched], x[untouched])
    assert untouched.sum() >= B * F * (T - 2 * r)


@given(**cases)
def test_zero_ratio_is_identity(device, B, F, gi, C, dtype, frac, seed, with_sizes):
    x, kw, _, sizes = _case(device, B, F, gi, C, dtype, 0.0, seed, with_sizes)
    m = token_merge(x, **kw, ratio=0.0, sizes=sizes)
    assert m.merged.shape == x.shape
    assert torch.equal(token_unmerge(m.merged, m.mapping), x)
    assert torch.equal(m.sizes.gather(1, m.mapping), torch.ones_like(m.sizes) if sizes is None else sizes)


@given(B=st.integers(1, 2), F=st.integers(1, 3), gi=st.integers(0, len(GRIDS) - 1), seed=st.integers(0, 2**16))
def test_full_merge_path_equals_reference(device, B, F, gi, seed):
    """token_merge's own matching, end to end against the reference's own matching (no shared inputs)."""
    x, kw, ratio, _ = _case(device, B, F, gi, 32, torch.float32, 0.5, seed, False)
    got = token_merge(x, **kw, ratio=ratio)
    want = token_merge_ref(x, **kw, ratio=ratio)
    assert torch.equal(got.mapping, want.mapping)
    _check_merged(got, want, x, None)


# Plus grids past one 64-wide tile of the plan kernels (144 and 150 sources).
PLAN_GRIDS = GRIDS + [((12, 16), (2, 2)), ((10, 20), (2, 5))]


@given(B=st.integers(1, 2), F=st.integers(1, 3), gi=st.integers(0, len(PLAN_GRIDS) - 1), frac=st.floats(0, 1),
       levels=st.sampled_from([2, 3, 1000]), seed=st.integers(0, 2**16))
@example(B=1, F=3, gi=1, frac=0.5, levels=2, seed=0)
@example(B=2, F=2, gi=len(GRIDS), frac=0.6, levels=3, seed=1)
@example(B=1, F=1, gi=len(GRIDS) + 1, frac=1.0, levels=1000, seed=2)
def test_plan_equals_reference(device, B, F, gi, frac, levels, seed):
    """Selection and bookkeeping, exactly, on scores with many ties (few levels) and destinations
    that gather many sources or none."""
    grid, stride = PLAN_GRIDS[gi]
    dst_pos, src_pos = frame_layout(grid, stride)
    n_src, n_dst = src_pos.numel(), dst_pos.numel()
    r = round(frac * n_src)
    gen = torch.Generator().manual_seed(seed)
    score = (torch.randint(0, levels, (B, F, n_src), generator=gen).float() / levels - 0.5).to(device)
    best = torch.randint(0, n_dst, (B, F, n_src), generator=gen).to(device)
    got = merge_plan(best, score, r, grid, stride)
    want = merge_plan_ref(best, score, r, grid, stride)
    for name, g, w in zip(("keep", "grp", "off", "cnt", "mapping"), got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), name


def test_ties_go_to_lowest_indices(device):
    """Small integers make every dot product exact: all destinations equal -> index 0; all sources
    equal -> the merged ones are the r lowest source indices."""
    F, grid, stride, C = 2, (4, 4), (2, 2), 16
    x = torch.ones(1, F * 16, C, device=device)
    x[..., ::2] = 2.0
    idx, score = token_match(x, frames=F, grid=grid, stride=stride)
    assert (idx == 0).all() and torch.equal(score, torch.full_like(score, score[0, 0, 0].item()))
    m = token_merge(x, frames=F, grid=grid, stride=stride, ratio=0.5)
    r = merge_count(grid, stride, 0.5)
    dst_pos, src_pos = frame_layout(grid, stride, device)
    n_keep = src_pos.numel() - r
    for f in range(F):
        mp = m.mapping[0, f * 16:(f + 1) * 16]
        t_out = 16 - r
        assert (mp[src_pos[:r]] == f * t_out + n_keep).all()                    # merged into dst 0
        assert torch.equal(mp[src_pos[r:]], f * t_out + torch.arange(n_keep, device=device))
    assert torch.equal(m.merged, torch.where(torch.arange(C, device=device) % 2 == 0, 2.0, 1.0).expand_as(m.merged))


def test_layout():
    dst, src = frame_layout((4, 6), (2, 3))
    assert dst.tolist() == [0, 3, 12, 15]
    assert len(src) == 20 and set(src.tolist()) | set(dst.tolist()) == set(range(24))
    # ratio is the fraction of a frame's tokens merged away, up to every source.
    assert merge_count((4, 6), (2, 3), 0.5) == 12 and merge_count((30, 52), (2, 2), 0.5) == 780
    assert merge_count((30, 52), (2, 2), 0.75) == 1170 and merge_count((4, 6), (1, 1), 0.0) == 0
    with pytest.raises(ValueError, match="at most 1170/1560"):
        merge_count((30, 52), (2, 2), 0.76)


@pytest.mark.parametrize("change, match", [
    (dict(ratio=1.0), "ratio"), (dict(ratio=-0.1), "ratio"), (dict(ratio=float("nan")), "ratio"),
    (dict(ratio=True), "ratio"), (dict(ratio=0.8), "only 18 sources"),
    (dict(stride=(3, 2)), "must divide"), (dict(stride=(2, 4)), "must divide"), (dict(stride=(0, 2)), "stride"),
    (dict(grid=(4, 8)), "L="), (dict(frames=3), "L="), (dict(frames=0), "frames"),
])
def test_bad_knobs_are_refused(device, change, match):
    x = _x(device, 1, 2, (4, 6), 16, torch.bfloat16, 0)
    kw = dict(frames=2, grid=(4, 6), stride=(2, 2), ratio=0.5) | change
    with pytest.raises(ValueError, match=match):
        token_merge(x, **kw)
    if "ratio" not in change:
        kw.pop("ratio")
        with pytest.raises(ValueError, match=match):
            token_match(x, **kw)


def test_bad_tensors_are_refused(device):
    x = _x(device, 1, 2, (4, 6), 16, torch.bfloat16, 0)
    kw = dict(frames=2, grid=(4, 6), stride=(2, 2))
    with pytest.raises(TypeError, match="torch.bfloat16 or torch.float32"):
        token_merge(x.half(), **kw, ratio=0.5)
    with pytest.raises(ValueError, match="contiguous"):
        token_match(x.transpose(1, 2).contiguous().transpose(1, 2), **kw)
    with pytest.raises(ValueError, match="sizes"):
        token_merge(x, **kw, ratio=0.5, sizes=torch.ones(1, 47, device=device))
    with pytest.raises(ValueError, match="out must have shape"):
        token_merge(x, **kw, ratio=0.5, out=torch.empty_like(x))
    with pytest.raises(ValueError, match="best_dst"):
        token_merge(x, **kw, ratio=0.5, match=(torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(1, 2, 3)))
    m = token_merge(x, **kw, ratio=0.5)
    with pytest.raises(TypeError, match="mapping must be torch.int64"):
        token_unmerge(m.merged, m.mapping.int())
    with pytest.raises(ValueError, match="out must have shape"):
        token_unmerge(m.merged, m.mapping, out=torch.empty_like(m.merged))


def test_bytes():
    assert token_merge_bytes(1, 3, (30, 52), (2, 2), 0.5, 1536, op="unmerge") == \
        2 * 1536 * (3 * (1560 - 780) + 4680) + 8 * 4680


@pytest.mark.gpu
def test_real_size():
    """One 3-frame block of LongLive-1.3B: 3 x 30x52 tokens of width 1536, stride 2x2, ratio 0.5."""
    device = torch.device("cuda")
    kw = dict(frames=3, grid=(30, 52), stride=(2, 2))
    x = _x(device, 1, 3, (30, 52), 1536, torch.bfloat16, 1)
    idx, score = token_match(x, **kw)
    ridx, rscore = token_match_ref(x, **kw)
    _check_scores(x, kw, score, rscore)
    chosen = _sim(x, **kw).gather(-1, idx[..., None])[..., 0]
    assert ((idx == ridx) | (chosen >= rscore - SCORE_TOL)).all()
    for plan, want_plan in zip(merge_plan(idx, score, 780, (30, 52), (2, 2)),
                               merge_plan_ref(idx, score, 780, (30, 52), (2, 2))):
        assert torch.equal(plan, want_plan)
    got = token_merge(x, **kw, ratio=0.5, match=(idx, score))
    want = token_merge_ref(x, **kw, ratio=0.5, match=(idx, score))
    assert got.merged.shape == (1, 3 * (1560 - 780), 1536)
    assert torch.equal(got.mapping, want.mapping) and torch.equal(got.sizes, want.sizes)
    _check_merged(got, want, x, None)
    assert (got.sizes.view(3, -1).sum(-1) == 1560).all()
    back = token_unmerge(got.merged, got.mapping)
    assert torch.equal(back, token_unmerge_ref(got.merged, got.mapping))


@pytest.mark.gpu
def test_capturable_in_a_cuda_graph():
    """Match, plan, merge and unmerge at the real shape run inside a CUDA graph (no host sync), and a
    replay on new input equals the eager call."""
    device = torch.device("cuda")
    kw = dict(frames=3, grid=(30, 52), stride=(2, 2), ratio=0.5)
    x = _x(device, 1, 3, (30, 52), 1536, torch.bfloat16, 2)

    def step():
        m = token_merge(x, **kw)
        return m.merged, m.sizes, m.mapping, token_unmerge(m.merged, m.mapping)

    step()                                   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(_x(device, 1, 3, (30, 52), 1536, torch.bfloat16, 3))
    graph.replay()
    for got, want in zip(captured, step()):
        assert torch.equal(got, want)
