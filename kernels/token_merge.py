"""Token merging (ToMe-style bipartite soft matching) inside each frame of a LongLive block.

Layout. x [B, L, C] (bf16 or fp32, last dim contiguous) holds F frames of T = Hg * Wg tokens each,
token t of a frame at grid position (t // Wg, t % Wg). With stride (sh, sw), the *destinations* of a
frame are the tokens at rows 0, sh, 2sh, ... and columns 0, sw, 2sw, ... (one per sh x sw cell,
n_dst = (Hg/sh) * (Wg/sw), in row-major order); the other n_src = T - n_dst tokens, in ascending
token order, are the *sources*. Nothing ever crosses a frame boundary.

1. Matching (`token_match`): each source's best destination of its own frame by cosine similarity
   (fp32 norms and accumulation; ties -> lowest index) and its score, each [B, F, n_src].
2. Selection (`merge_plan`, kernels/token_merge_plan.py): per frame the r = floor(ratio * T)
   best-scoring sources are merged (r <= n_src; ties -> the lower source index).
3. Merge (`token_merge`): out [B, L', C], L' = F * (T - r): per frame the kept sources in token
   order, then the destinations, each the size-weighted fp32 mean of itself and its merged sources
   (copied bit-exactly when nothing merged into it); also the new sizes [B, L'] fp32 and the
   mapping [B, L] int64 (each token's row in the merged sequence).
4. Unmerge (`token_unmerge`): out[b, t] = merged[b, mapping[b, t]], [B, L, C].
How each step runs and rounds: docs/token-merge.md.

The launchers never call .item(): the whole path can sit inside a CUDA graph.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import cast_bf16, check_kernel_device, check_tensor, interpreting, row_warps
from .token_merge_plan import as_pair, frame_layout, merge_count, merge_plan

_DTYPES = (torch.bfloat16, torch.float32)


@triton.jit(do_not_specialize=["T", "C", "n_src", "n_dst"])
def _match_kernel(
    x_ptr, src_pos_ptr, dst_pos_ptr, idx_ptr, score_ptr,
    stride_xb, stride_xl,
    T, C, n_src, n_dst, n_frames, eps,
    UPCAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    f = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < n_src
    spos = tl.load(src_pos_ptr + s, mask=smask, other=0)
    xb = x_ptr + b * stride_xb
    srow = xb + ((f * T + spos).to(tl.int64) * stride_xl)[:, None]
    best = tl.full([BLOCK_S], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK_S], tl.int32)
    for d0 in range(0, n_dst, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < n_dst
        dpos = tl.load(dst_pos_ptr + d, mask=dmask, other=0)
        drow = xb + ((f * T + dpos).to(tl.int64) * stride_xl)[:, None]
        acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        ss = tl.zeros([BLOCK_S], tl.float32)
        sd = tl.zeros([BLOCK_D], tl.float32)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = (k < C)[None, :]
            a = tl.load(srow + k[None, :], mask=smask[:, None] & kmask, other=0.0)
            bt = tl.load(drow + k[None, :], mask=dmask[:, None] & kmask, other=0.0)
            if UPCAST:
                # bf16 tl.dot is wrong in the interpreter; fp32 x keeps IEEE fp32 (tf32 would move the argmax).
                acc = tl.dot(a.to(tl.float32), tl.trans(bt.to(tl.float32)), acc, input_precision="ieee")
            else:
                # The similarity is a small GEMM: on FMA units it would cost more than the FFN time it saves.
                acc = tl.dot(a, tl.trans(bt), acc)
            af = a.to(tl.float32)
            bf = bt.to(tl.float32)
            ss += tl.sum(af * af, 1)
            sd += tl.sum(bf * bf, 1)
        na = tl.maximum(tl.sqrt(ss), eps)
        nd = tl.maximum(tl.sqrt(sd), eps)
        sc = acc / (na[:, None] * nd[None, :])
        sc = tl.where(dmask[None, :], sc, float("-inf"))
        m = tl.max(sc, 1)
        mi = tl.min(tl.where(sc == m[:, None], d[None, :], 2147483647), 1)
        upd = m > best                       # strictly greater: earlier tiles win ties
        best_i = tl.where(upd, mi, best_i)
        best = tl.where(upd, m, best)
    o = (b * n_frames + f) * n_src + s
    tl.store(idx_ptr + o, best_i.to(tl.int64), mask=smask)
    tl.store(score_ptr + o, best, mask=smask)


@triton.jit(do_not_specialize=["T", "T_out", "C", "n_keep", "n_dst", "r"])
def _merge_kernel(
    x_ptr, size_ptr, keep_ptr, dst_pos_ptr, grp_ptr, off_ptr, cnt_ptr, out_ptr, osize_ptr,
    stride_xb, stride_xl, stride_ob, stride_ol,
    T, T_out, C, n_frames, n_keep, n_dst, r,
    OUT_BF16: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0)
    bf = tl.program_id(1)
    b = bf // n_frames
    f = bf % n_frames
    L = n_frames * T
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    xb = x_ptr + b.to(tl.int64) * stride_xb
    sb = size_ptr + b.to(tl.int64) * L + f * T
    orow = out_ptr + b.to(tl.int64) * stride_ob + (f * T_out + p).to(tl.int64) * stride_ol
    osz = osize_ptr + b.to(tl.int64) * n_frames * T_out + f * T_out + p
    bf64 = bf.to(tl.int64)
    if p < n_keep:
        pos = tl.load(keep_ptr + bf64 * n_keep + p)
        v = tl.load(xb + (f * T + pos).to(tl.int64) * stride_xl + c, mask=cm)
        tl.store(orow + c, v, mask=cm)
        tl.store(osz, tl.load(sb + pos))
    else:
        j = p - n_keep
        pos = tl.load(dst_pos_ptr + j)
        xd = tl.load(xb + (f * T + pos).to(tl.int64) * stride_xl + c, mask=cm, other=0.0).to(tl.float32)
        tot = tl.load(sb + pos)
        acc = xd * tot
        cnt = tl.load(cnt_ptr + bf64 * n_dst + j)
        off = tl.load(off_ptr + bf64 * n_dst + j)
        for i in range(0, cnt):
            sp = tl.load(grp_ptr + bf64 * r + off + i)
            ssz = tl.load(sb + sp)
            xs = tl.load(xb + (f * T + sp).to(tl.int64) * stride_xl + c, mask=cm, other=0.0).to(tl.float32)
            acc += xs * ssz
            tot += ssz
        res = tl.where(cnt == 0, xd, acc / tot)
        if OUT_BF16:
            res = cast_bf16(res, INTERPRET)
        tl.store(orow + c, res, mask=cm)
        tl.store(osz, tot)


@triton.jit(do_not_specialize=["L", "C"])
def _unmerge_kernel(m_ptr, map_ptr, out_ptr, stride_mb, stride_ml, stride_ob, stride_ol, L, C,
                    BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    row = tl.load(map_ptr + b * L + t).to(tl.int64)
    v = tl.load(m_ptr + b * stride_mb + row * stride_ml + c, mask=cm)
    tl.store(out_ptr + b * stride_ob + t.to(tl.int64) * stride_ol + c, v, mask=cm)


class MergeResult(NamedTuple):
    merged: torch.Tensor    # [B, L', C], x's dtype; per frame: kept sources, then destinations
    sizes: torch.Tensor     # [B, L'] fp32: how many original tokens (or summed sizes) each row holds
    mapping: torch.Tensor   # [B, L] int64: the merged row of every original token


# ----------------------------------------------------------------------------------------------
# Checks


def _check(x, frames, grid, stride) -> tuple[int, int, int, tuple[int, int], tuple[int, int]]:
    check_tensor("x", x, dtype=_DTYPES, shape=("B", "L", "C"))
    check_kernel_device("token merging", x.device)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames <= 0:
        raise ValueError(f"frames must be a positive int, got {frames!r}")
    hg, wg = as_pair("grid", grid)
    sh, sw = as_pair("stride", stride)
    if hg % sh or wg % sw:
        raise ValueError(f"stride {(sh, sw)} must divide the frame grid {(hg, wg)}")
    B, L, C = x.shape
    if L != frames * hg * wg:
        raise ValueError(f"L={L} != frames * Hg * Wg = {frames} * {hg} * {wg}")
    if C == 0:
        raise ValueError("x has no channels")
    return B, L, C, (hg, wg), (sh, sw)


# ----------------------------------------------------------------------------------------------
# Launchers


def token_match(x: torch.Tensor, *, frames: int, grid, stride=(2, 2), eps: float = 1e-6,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(best_dst [B, F, n_src] int64 local destination index, best_score [B, F, n_src] fp32)."""
    B, L, C, grid, stride = _check(x, frames, grid, stride)
    dst_pos, src_pos = frame_layout(grid, stride, x.device)
    n_src, n_dst = src_pos.numel(), dst_pos.numel()
    idx = torch.empty(B, frames, n_src, dtype=torch.int64, device=x.device)
    score = torch.empty(B, frames, n_src, dtype=torch.float32, device=x.device)
    if B == 0 or n_src == 0:
        return idx, score
    upcast = interpreting() or x.dtype == torch.float32
    bs = min(32, max(16, triton.next_power_of_2(n_src)))
    # Wider tiles on the tensor-core path: each source tile is reloaded once per destination tile.
    bd = min(64 if upcast else 128, max(16, triton.next_power_of_2(n_dst)))
    bk = min(32 if upcast else 64, max(16, triton.next_power_of_2(C)))
    _match_kernel[(triton.cdiv(n_src, bs), frames, B)](
        x, src_pos, dst_pos, idx, score, x.stride(0), x.stride(1),
        grid[0] * grid[1], C, n_src, n_dst, frames, eps,
        UPCAST=upcast, BLOCK_S=bs, BLOCK_D=bd, BLOCK_K=bk, num_warps=4,
    )
    return idx, score


def _check_match(match, B, F, n_src, device):
    if not isinstance(match, (tuple, list)) or len(match) != 2:
        raise ValueError("match must be the (best_dst, best_score) pair token_match returns")
    check_tensor("best_dst", match[0], dtype=torch.int64, shape=(B, F, n_src), device=device, layout="any")
    check_tensor("best_score", match[1], dtype=torch.float32, shape=(B, F, n_src), device=device, layout="any")


def token_merge(x: torch.Tensor, *, frames: int, grid, stride=(2, 2), ratio: float,
                sizes: torch.Tensor | None = None, match=None, eps: float = 1e-6,
                out: torch.Tensor | None = None) -> MergeResult:
    """Match (unless `match` = token_match's output is given), select r per frame, merge.

    sizes: optional [B, L] fp32 token sizes (default 1). out: optional [B, L', C] output, x's dtype.
    """
    B, L, C, grid, stride = _check(x, frames, grid, stride)
    r = merge_count(grid, stride, ratio)
    T = grid[0] * grid[1]
    dst_pos, src_pos = frame_layout(grid, stride, x.device)
    n_src, n_dst = src_pos.numel(), dst_pos.numel()
    t_out = T - r
    if sizes is not None:
        check_tensor("sizes", sizes, dtype=torch.float32, shape=(B, L), device=x.device, layout="any")
    if match is not None:
        _check_match(match, B, frames, n_src, x.device)
    if out is not None:
        check_tensor("out", out, dtype=x.dtype, shape=(B, frames * t_out, C), device=x.device)

    sizes = torch.ones(B, L, dtype=torch.float32, device=x.device) if sizes is None else sizes.contiguous()
    if out is None:
        out = torch.empty(B, frames * t_out, C, dtype=x.dtype, device=x.device)
    new_sizes = torch.empty(B, frames * t_out, dtype=torch.float32, device=x.device)

    if match is None:
        match = token_match(x, frames=frames, grid=grid, stride=stride, eps=eps)
    keep, grp, off, cnt, mapping = merge_plan(match[0], match[1], r, grid, stride)
    if B == 0:
        return MergeResult(out, new_sizes, mapping)
    dst32 = dst_pos.to(torch.int32)
    block_c = triton.next_power_of_2(C)
    _merge_kernel[(t_out, B * frames)](
        x, sizes, keep, dst32, grp, off, cnt, out, new_sizes,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        T, t_out, C, frames, n_src - r, n_dst, r,
        OUT_BF16=x.dtype == torch.bfloat16, INTERPRET=interpreting(), BLOCK_C=block_c,
        num_warps=row_warps(block_c),
    )
    return MergeResult(out, new_sizes, mapping)


def token_unmerge(merged: torch.Tensor, mapping: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, C]: every original token takes the merged row `mapping` [B, L] (int64) names."""
    check_tensor("merged", merged, dtype=_DTYPES, shape=("B", "L'", "C"))
    check_kernel_device("token_unmerge", merged.device)
    B, _, C = merged.shape
    check_tensor("mapping", mapping, dtype=torch.int64, shape=(B, "L"), device=merged.device, layout="any")
    L = mapping.shape[1]
    if out is not None:
        check_tensor("out", out, dtype=merged.dtype, shape=(B, L, C), device=merged.device)

    mapping = mapping.contiguous()
    if out is None:
        out = torch.empty(B, L, C, dtype=merged.dtype, device=merged.device)
    if B == 0 or L == 0:
        return out
    block_c = triton.next_power_of_2(C)
    _unmerge_kernel[(L, B)](merged, mapping, out, merged.stride(0), merged.stride(1),
                            out.stride(0), out.stride(1), L, C, BLOCK_C=block_c,
                            num_warps=row_warps(block_c))
    return out


# ----------------------------------------------------------------------------------------------
# Plain torch references (loops over batch and frames)


def token_match_ref(x, *, frames, grid, stride=(2, 2), eps=1e-6):
    B, L, C, grid, stride = _check(x, frames, grid, stride)
    T = grid[0] * grid[1]
    dst_pos, src_pos = frame_layout(grid, stride, x.device)
    idx = torch.zeros(B, frames, src_pos.numel(), dtype=torch.int64, device=x.device)
    score = torch.zeros(B, frames, src_pos.numel(), dtype=torch.float32, device=x.device)
    if src_pos.numel() == 0:
        return idx, score
    ar = torch.arange(dst_pos.numel(), device=x.device)
    for b in range(B):
        for f in range(frames):
            xf = x[b, f * T:(f + 1) * T].float()
            xf = xf / xf.norm(dim=-1, keepdim=True).clamp_min(eps)
            sim = xf[src_pos] @ xf[dst_pos].T
            m = sim.max(-1).values
            score[b, f] = m
            idx[b, f] = torch.where(sim == m[:, None], ar, dst_pos.numel()).min(-1).values
    return idx, score


def token_merge_ref(x, *, frames, grid, stride=(2, 2), ratio, sizes=None, match=None, eps=1e-6) -> MergeResult:
    B, L, C, grid, stride = _check(x, frames, grid, stride)
    r = merge_count(grid, stride, ratio)
    T = grid[0] * grid[1]
    dst_pos, src_pos = frame_layout(grid, stride, x.device)
    n_src, n_dst = src_pos.numel(), dst_pos.numel()
    n_keep, t_out = n_src - r, T - r
    if sizes is None:
        sizes = torch.ones(B, L, dtype=torch.float32, device=x.device)
    idx, score = match if match is not None else token_match_ref(x, frames=frames, grid=grid, stride=stride, eps=eps)
    out = torch.empty(B, frames * t_out, C, dtype=x.dtype, device=x.device)
    new_sizes = torch.empty(B, frames * t_out, dtype=torch.float32, device=x.device)
    mapping = torch.empty(B, L, dtype=torch.int64, device=x.device)
    for b in range(B):
        for f in range(frames):
            xf, sf = x[b, f * T:(f + 1) * T], sizes[b, f * T:(f + 1) * T]
            order = torch.sort(score[b, f], descending=True, stable=True).indices
            merged, kept = order[:r].sort().values, order[r:].sort().values
            to = idx[b, f, merged]
            acc = xf[dst_pos].float() * sf[dst_pos, None]
            tot = sf[dst_pos].clone()
            acc.index_add_(0, to, xf[src_pos[merged]].float() * sf[src_pos[merged], None])
            tot.index_add_(0, to, sf[src_pos[merged]])
            got_any = torch.zeros(n_dst, dtype=torch.bool, device=x.device)
            got_any[to] = True
            dst_val = torch.where(got_any[:, None], (acc / tot[:, None]).to(x.dtype), xf[dst_pos])
            base = f * t_out
            out[b, base:base + n_keep] = xf[src_pos[kept]]
            out[b, base + n_keep:base + t_out] = dst_val
            new_sizes[b, base:base + n_keep] = sf[src_pos[kept]]
            new_sizes[b, base + n_keep:base + t_out] = tot
            m = mapping[b, f * T:(f + 1) * T]
            m[dst_pos] = base + n_keep + torch.arange(n_dst, device=x.device)
            m[src_pos[kept]] = base + torch.arange(n_keep, device=x.device)
            m[src_pos[merged]] = base + n_keep + to
    return MergeResult(out, new_sizes, mapping)


def token_unmerge_ref(merged, mapping):
    B = merged.shape[0]
    return merged[torch.arange(B, device=merged.device)[:, None], mapping]


def token_merge_bytes(batch: int, frames: int, grid, stride, ratio: float, dim: int, *, op: str,
                      elt: int = 2) -> float:
    """Fewest bytes one call moves. op: "match" (x read; index + score written), "merge" (x read,
    merged rows and sizes written), "unmerge" (merged rows read, full rows written)."""
    hg, wg = as_pair("grid", grid)
    T = hg * wg
    L = frames * T
    r = merge_count(grid, stride, ratio)
    Lm = frames * (T - r)
    if op == "match":
        n_src = T - (hg // as_pair("stride", stride)[0]) * (wg // as_pair("stride", stride)[1])
        return float(batch * (L * dim * elt + frames * n_src * 12))
    if op == "merge":
        return float(batch * (L * dim * elt + Lm * dim * elt + Lm * 4 + L * 8))
    if op == "unmerge":
        return float(batch * (Lm * dim * elt + L * dim * elt + L * 8))
    raise ValueError(f"op must be 'match', 'merge' or 'unmerge', got {op!r}")
