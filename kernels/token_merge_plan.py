"""The bookkeeping of token merging (kernels/token_merge.py, whose docstring states the rules): the
fixed per-frame layout of destinations and sources (`frame_layout`), how many sources a ratio
merges (`merge_count`), and the selection (`merge_plan`: two Triton kernels that rank the sources
and lay out the merge by counting, no sort and no host sync; `merge_plan_ref`, the same in torch).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_src"])
def _rank_kernel(score_ptr, rank_ptr, n_src, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr):
    """rank[s] = how many sources of the frame come first in (score descending, index ascending)."""
    bf = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    sm = s < n_src
    base = score_ptr + bf * n_src
    sc = tl.load(base + s, mask=sm, other=0.0)
    rank = tl.zeros([BLOCK_S], tl.int32)
    for j0 in range(0, n_src, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        jm = j < n_src
        sj = tl.load(base + j, mask=jm, other=0.0)
        first = (sj[None, :] > sc[:, None]) | ((sj[None, :] == sc[:, None]) & (j[None, :] < s[:, None]))
        rank += tl.sum((first & jm[None, :]).to(tl.int32), 1)
    tl.store(rank_ptr + bf * n_src + s, rank, mask=sm)


@triton.jit(do_not_specialize=["n_src", "n_dst", "r", "T", "T_out"])
def _layout_kernel(
    idx_ptr, rank_ptr, src_pos_ptr, dst_pos_ptr, keep_ptr, grp_ptr, off_ptr, cnt_ptr, map_ptr,
    n_src, n_dst, r, T, T_out, n_frames,
    BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """The merge's bookkeeping from the ranks, by counting (no sort): per frame, the kept sources in
    ascending order, the merged ones grouped by destination (then source), each destination's count
    and offset in that list, and every token's merged row."""
    bf = tl.program_id(1).to(tl.int64)
    b = bf // n_frames
    f = bf % n_frames
    n_keep = n_src - r
    t = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)    # this program's sources, and destinations
    sm = t < n_src
    dm = t < n_dst
    merged = (tl.load(rank_ptr + bf * n_src + t, mask=sm, other=0) < r) & sm
    ds = tl.load(idx_ptr + bf * n_src + t, mask=sm, other=0).to(tl.int32)
    merged_before = tl.zeros([BLOCK_S], tl.int32)    # merged sources with a lower index
    slot = tl.zeros([BLOCK_S], tl.int32)             # merged sources ahead in (destination, index) order
    cnt = tl.zeros([BLOCK_S], tl.int32)              # sources merged into destination t
    off = tl.zeros([BLOCK_S], tl.int32)              # sources merged into destinations below t
    for j0 in range(0, n_src, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        jm = j < n_src
        mj = (tl.load(rank_ptr + bf * n_src + j, mask=jm, other=0) < r) & jm
        dj = tl.load(idx_ptr + bf * n_src + j, mask=jm, other=0).to(tl.int32)
        lower = j[None, :] < t[:, None]
        merged_before += tl.sum((mj[None, :] & lower).to(tl.int32), 1)
        ahead = (dj[None, :] < ds[:, None]) | ((dj[None, :] == ds[:, None]) & lower)
        slot += tl.sum((mj[None, :] & ahead).to(tl.int32), 1)
        cnt += tl.sum((mj[None, :] & (dj[None, :] == t[:, None])).to(tl.int32), 1)
        off += tl.sum((mj[None, :] & (dj[None, :] < t[:, None])).to(tl.int32), 1)
    keep_row = t - merged_before
    spos = tl.load(src_pos_ptr + t, mask=sm, other=0).to(tl.int32)
    tl.store(keep_ptr + bf * n_keep + keep_row, spos, mask=sm & ~merged)
    tl.store(grp_ptr + bf * r + slot, spos, mask=merged)
    tl.store(cnt_ptr + bf * n_dst + t, cnt, mask=dm)
    tl.store(off_ptr + bf * n_dst + t, off, mask=dm)
    mrow = b * n_frames * T + f * T
    orow = f * T_out + n_keep
    tl.store(map_ptr + mrow + spos, tl.where(merged, orow + ds, f * T_out + keep_row).to(tl.int64), mask=sm)
    dpos = tl.load(dst_pos_ptr + t, mask=dm, other=0)
    tl.store(map_ptr + mrow + dpos, (orow + t).to(tl.int64), mask=dm)


def as_pair(name: str, v) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in v)):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v!r}")
    return int(v[0]), int(v[1])


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    return float(ratio)


def frame_layout(grid, stride, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dst_pos [n_dst], src_pos [n_src]) int64: token positions inside a frame, ascending."""
    hg, wg = as_pair("grid", grid)
    sh, sw = as_pair("stride", stride)
    # Sizes from the host and no boolean-mask indexing: a mask index waits for the device
    # (nonzero), which a CUDA graph capture refuses (GPU run 1).
    rows, cols = -(-hg // sh), -(-wg // sw)
    k = torch.arange(rows * cols, device=device)
    dst = (k // cols) * (sh * wg) + (k % cols) * sw
    t = torch.arange(hg * wg, device=device)
    is_dst = ((t // wg) % sh == 0) & ((t % wg) % sw == 0)
    src = torch.sort(is_dst.to(torch.int32), stable=True).indices[:hg * wg - rows * cols]
    return dst, src


def merge_count(grid, stride, ratio) -> int:
    """r: sources merged away per frame, floor(ratio * T); refused when a frame has fewer sources."""
    hg, wg = as_pair("grid", grid)
    sh, sw = as_pair("stride", stride)
    if hg % sh or wg % sw:
        raise ValueError(f"stride {(sh, sw)} must divide the frame grid {(hg, wg)}")
    T = hg * wg
    n_src = T - (hg // sh) * (wg // sw)
    r = int(math.floor(check_ratio(ratio) * T))
    if r > n_src:
        raise ValueError(f"ratio {ratio} merges {r} of the {T} tokens of a {hg}x{wg} frame, but stride {(sh, sw)} "
                         f"leaves only {n_src} sources (the ratio can be at most {n_src}/{T} = {n_src / T:.4g})")
    return r


def merge_plan(best_dst: torch.Tensor, best_score: torch.Tensor, r: int, grid, stride):
    """Selection and bookkeeping, two Triton kernels (no sync, no sort): returns (keep [B, F, n_src - r],
    grp [B, F, r] int32 token positions in the frame; off, cnt [B, F, n_dst] int32; mapping [B, F*T] int64).

    The r sources with the highest score are merged (ties: the lower source index); keep lists the
    others ascending; grp the merged ones grouped by destination, ascending within a group, the
    group of destination d at grp[off[d] : off[d] + cnt[d]]; mapping every token's merged row.
    """
    dst_pos, src_pos = frame_layout(grid, stride, best_score.device)
    B, F, n_src = best_score.shape
    n_dst, T = dst_pos.numel(), src_pos.numel() + dst_pos.numel()
    if not 0 <= r <= n_src:
        raise ValueError(f"r={r} is outside [0, n_src={n_src}]")
    dev = best_score.device

    def nonempty(*shape):
        # A view of a non-empty buffer: a kernel argument must not be a null pointer when r = 0 or n_src.
        n = math.prod(shape)
        return torch.empty(max(n, 1), dtype=torch.int32, device=dev)[:n].view(shape)

    rank = nonempty(B, F, n_src)
    keep = nonempty(B, F, n_src - r)
    grp = nonempty(B, F, r)
    off = torch.empty(B, F, n_dst, dtype=torch.int32, device=dev)
    cnt = torch.empty(B, F, n_dst, dtype=torch.int32, device=dev)
    mapping = torch.empty(B, F * T, dtype=torch.int64, device=dev)
    if B == 0 or F == 0:
        return keep, grp, off, cnt, mapping
    if n_src:
        _rank_kernel[(triton.cdiv(n_src, 64), B * F)](best_score.contiguous(), rank, n_src, BLOCK_S=64, BLOCK_J=64)
    _layout_kernel[(triton.cdiv(max(n_src, n_dst), 64), B * F)](
        best_dst.contiguous(), rank, src_pos, dst_pos, keep, grp, off, cnt, mapping,
        n_src, n_dst, r, T, T - r, F, BLOCK_S=64, BLOCK_J=64,
    )
    return keep, grp, off, cnt, mapping


def merge_plan_ref(best_dst, best_score, r, grid, stride):
    """merge_plan in plain torch (sorts and scatters; no sync)."""
    dst_pos, src_pos = frame_layout(grid, stride, best_score.device)
    T = dst_pos.numel() + src_pos.numel()
    B, F, n_src = best_score.shape
    n_dst = dst_pos.numel()
    n_keep = n_src - r
    t_out = T - r
    dev = best_score.device
    order = torch.sort(best_score, dim=-1, descending=True, stable=True).indices
    merged_src = order[..., :r].sort(-1).values
    kept_src = order[..., r:].sort(-1).values
    mdst = best_dst.gather(-1, merged_src)
    grp_src = (mdst * n_src + merged_src).sort(-1).values % n_src     # by destination, then source
    cnt = torch.zeros(B, F, n_dst, dtype=torch.int64, device=dev).scatter_add_(-1, mdst, torch.ones_like(mdst))
    off = cnt.cumsum(-1) - cnt
    local = torch.empty(B, F, T, dtype=torch.int64, device=dev)
    local[..., dst_pos] = n_keep + torch.arange(n_dst, device=dev)
    local.scatter_(-1, src_pos[kept_src], torch.arange(n_keep, device=dev).expand(B, F, n_keep))
    local.scatter_(-1, src_pos[merged_src], n_keep + mdst)
    mapping = (local + torch.arange(F, device=dev)[:, None] * t_out).reshape(B, F * T)
    i32 = torch.int32
    return (src_pos[kept_src].to(i32).contiguous(), src_pos[grp_src].to(i32).contiguous(),
            off.to(i32), cnt.to(i32), mapping)
