"""q/k RMSNorm + causal 3-axis RoPE + KV-cache append, in one pass over the new projections.

Shapes, layout and dtypes:
- q_lin, k_lin, v: [B, n, H*D] bf16, the q/k/v Linear outputs (any batch/row strides with the last
  one 1, so slices of a fused q|k|v GEMM output work).
- norm_q_weight, norm_k_weight: [H*D] bf16, the RMSNorm weights (RMSNorm is over the full H*D row);
  both None when q_lin and k_lin arrive already normed (sequence parallelism norms the full row
  before the heads are split across ranks, longlive_triton/distributed/sequence_parallel.py).
- cos, sin: [R, D/2] fp32 RoPE tables from `rope_tables` (R = 1024 for the model).
- k_cache, v_cache: [B, C, H, D] bf16, the stock slot-major cache, written in place.
- grid_sizes: host ints (F, Hg, Wg) with F*Hg*Wg == n; token t = (f*Hg + h)*Wg + w.
- start_frame, dst_start, row_lo: int32/int64 tensors of shape [1] or [B] on the device (read
  there: no host sync, capturable), or Python ints (checked on the host).
- returns q: [B, n, H, D] bf16, roped.

Math, keeping the stock rounding points: RMSNorm x * rsqrt(mean(x^2) + eps) in fp32, cast to bf16,
then times the bf16 weight (rounded to bf16); RoPE on D/2 complex pairs of adjacent values
(2i, 2i+1) in fp32 (the stock uses float64; the tables are built in float64), cast to bf16. Pair
slots [0, c - 2(c//3)) rotate by the temporal table at absolute frame start_frame + f, the next c//3
by the height table at h, the last c//3 by the width table at w (c = D/2).

Cache writes: rows r in [row_lo, n) of the roped k and the raw v go to the physical slot of the
logical slot dst_start + r by the ring rule of kernels/kv_cache_plan.py (shift a device int tensor,
0 if not given; the defaults ring_lo 0, ring_size C make it the contiguous write, wrapping past C).
Rows below row_lo are not written (the stock's protected sink); of more than ring_size rows landing
in the ring only the last ring_size are written, as a write in row order would leave it
(docs/kv-cache-ring.md).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_HEAD_DIMS, cast_bf16, check_kernel_device, check_tensor, index_arg, interpreting

_SUPPORTED_HEAD_DIMS = SUPPORTED_HEAD_DIMS


@triton.jit
def _rms_norm_bf16(x, w, inv_n, eps, INTERPRET: tl.constexpr):
    # x [T, BLOCK_H, D], one RMSNorm per token over all heads. Stock rounding points: fp32
    # statistics, cast to bf16, then a bf16 multiply by the weight (exact in fp32, then rounded
    # once, as torch's bf16 multiply does).
    r = tl.math.rsqrt(tl.sum(tl.sum(x * x, 2), 1) * inv_n + eps)
    # The plain casts, not _common.round_bf16: integer rounding here measured 64% of the copy
    # bandwidth against 80% (H200), and a folded cast pair changes at most one ulp.
    xn = cast_bf16(x * r[:, None, None], INTERPRET).to(tl.float32)
    return cast_bf16(xn * w[None, :, :], INTERPRET).to(tl.float32)


@triton.jit
def _rotate(x, cos, sin, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr):
    # Adjacent pairs (2i, 2i+1) are one complex number; cos/sin are [T, D/2] per token.
    re, im = tl.split(tl.reshape(x, [BLOCK_T, BLOCK_H, HEAD_DIM // 2, 2]))
    c = cos[:, None, :]
    s = sin[:, None, :]
    return tl.reshape(tl.join(re * c - im * s, re * s + im * c), [BLOCK_T, BLOCK_H, HEAD_DIM])


@triton.jit
def _token_tables(cos_ptr, sin_ptr, t, t_ok, start_frame, hg, wg, stride_tab, table_rows,
                  HALF: tl.constexpr, T_SLOTS: tl.constexpr, HW_SLOTS: tl.constexpr):
    # cos/sin [T, D/2] for tokens t = (f*Hg + h)*Wg + w: temporal, height and width slots.
    f = t // (hg * wg)
    hh = (t // wg) % hg
    ww = t % wg
    j = tl.arange(0, HALF)[None, :]
    pos = tl.where(j < T_SLOTS, start_frame + f[:, None], tl.where(j < T_SLOTS + HW_SLOTS, hh[:, None], ww[:, None]))
    # Frames past the table (the stock asserts on them) must not read out of bounds.
    pos_ok = (pos >= 0) & (pos < table_rows) & t_ok[:, None]
    cos = tl.load(cos_ptr + pos * stride_tab + j, mask=pos_ok, other=1.0)
    sin = tl.load(sin_ptr + pos * stride_tab + j, mask=pos_ok, other=0.0)
    return cos, sin


@triton.jit
def _ring_slot(logical, ring_lo, ring_size, shift):
    """Physical cache slot of a logical one (module docstring); int64."""
    rel = (logical - ring_lo + shift) % ring_size
    # Triton's % truncates toward zero; fold a negative remainder back into [0, ring_size).
    rel = tl.where(rel < 0, rel + ring_size, rel)
    return tl.where(logical < ring_lo, logical, ring_lo + rel).to(tl.int64)


@triton.jit
def _rows_written(t, n, row_lo, dst_start, ring_lo, ring_size):
    """Which rows go to the cache: from row_lo on, and of those in the ring only the last ring_size
    (a write in row order would overwrite the earlier ones in the same slots)."""
    return (t >= row_lo) & ((dst_start + t < ring_lo) | (t >= n - ring_size))


@triton.jit(do_not_specialize=["n", "H", "hg", "wg", "ring_lo", "ring_size"])
def _rope_kv_append_kernel(
    ql_ptr, kl_ptr, v_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr,
    qo_ptr, kc_ptr, vc_ptr,
    start_frame_ptr, dst_start_ptr, row_lo_ptr, shift_ptr,
    stride_sf, stride_ds, stride_rl, stride_shift,
    stride_qlb, stride_qlt, stride_klb, stride_klt, stride_vb, stride_vt,
    stride_qob, stride_qot, stride_qoh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_tab, table_rows,
    n, H, hg, wg, ring_lo, ring_size, inv_n, eps,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
    T_SLOTS: tl.constexpr, HW_SLOTS: tl.constexpr,
    HAS_SHIFT: tl.constexpr, NORM: tl.constexpr, INTERPRET: tl.constexpr,
):
    # BLOCK_T tokens per program: one token's 3 x H*D values are too few to keep the memory
    # system busy, and the per-token table lookups and index math amortise over the heads.
    b = tl.program_id(1)
    b64 = b.to(tl.int64)

    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    t_ok = t < n
    hd_offs = offs_h[:, None] * HEAD_DIM + offs_d[None, :]                      # [H, D]
    mask = t_ok[:, None, None] & (offs_h[None, :, None] < H)                   # [T, H, 1]

    start_frame = tl.load(start_frame_ptr + b * stride_sf).to(tl.int32)
    dst_start = tl.load(dst_start_ptr + b * stride_ds).to(tl.int32)
    row_lo = tl.load(row_lo_ptr + b * stride_rl).to(tl.int32)
    cos, sin = _token_tables(cos_ptr, sin_ptr, t, t_ok, start_frame, hg, wg, stride_tab, table_rows,
                             HEAD_DIM // 2, T_SLOTS, HW_SLOTS)

    t64 = t.to(tl.int64)[:, None, None]
    hd = hd_offs[None, :, :]
    q = tl.load(ql_ptr + b64 * stride_qlb + t64 * stride_qlt + hd, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        wq = tl.load(wq_ptr + hd_offs, mask=offs_h[:, None] < H, other=0.0).to(tl.float32)
        q = _rms_norm_bf16(q, wq, inv_n, eps, INTERPRET)
    q = _rotate(q, cos, sin, BLOCK_T, BLOCK_H, HEAD_DIM)
    qo_offs = offs_h[None, :, None] * stride_qoh + offs_d[None, None, :]
    tl.store(qo_ptr + b64 * stride_qob + t64 * stride_qot + qo_offs, cast_bf16(q, INTERPRET), mask=mask)

    # Rows not written are not read either (masked lanes move no memory).
    w_mask = mask & _rows_written(t, n, row_lo, dst_start, ring_lo, ring_size)[:, None, None]
    k = tl.load(kl_ptr + b64 * stride_klb + t64 * stride_klt + hd, mask=w_mask, other=0.0).to(tl.float32)
    if NORM:
        wk = tl.load(wk_ptr + hd_offs, mask=offs_h[:, None] < H, other=0.0).to(tl.float32)
        k = _rms_norm_bf16(k, wk, inv_n, eps, INTERPRET)
    k = _rotate(k, cos, sin, BLOCK_T, BLOCK_H, HEAD_DIM)
    v = tl.load(v_ptr + b64 * stride_vb + t64 * stride_vt + hd, mask=w_mask, other=0.0)

    shift = 0
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + b * stride_shift).to(tl.int32)
    slot = _ring_slot(dst_start + t, ring_lo, ring_size, shift)[:, None, None]
    kc_offs = offs_h[None, :, None] * stride_kch + offs_d[None, None, :]
    vc_offs = offs_h[None, :, None] * stride_vch + offs_d[None, None, :]
    tl.store(kc_ptr + b64 * stride_kcb + slot * stride_kcs + kc_offs, cast_bf16(k, INTERPRET), mask=w_mask)
    tl.store(vc_ptr + b64 * stride_vcb + slot * stride_vcs + vc_offs, v, mask=w_mask)


def check_append_inputs(q_lin, k_lin, v, norm_q_weight, norm_k_weight, cos, sin, cache_shape,
                        grid_sizes, start_frame, dst_start, row_lo, ring_lo, ring_size, shift,
                        norm_optional: bool = False):
    """Validate the inputs that rope_kv_append and kv_quant_append share (everything but q_lin, which
    the launcher checks first, and the caches' dtypes); returns (start_frame, dst_start, row_lo,
    shift) as device tensors and the ring size. With norm_optional, both norm weights may be None
    (inputs already normed)."""
    device = q_lin.device
    check_tensor("k_lin", k_lin, dtype=torch.bfloat16, shape=("B", "n", "H*D"), device=device)
    check_tensor("v", v, dtype=torch.bfloat16, shape=("B", "n", "H*D"), device=device)
    if k_lin.shape != q_lin.shape or v.shape != q_lin.shape:
        raise ValueError(f"q_lin {list(q_lin.shape)}, k_lin {list(k_lin.shape)} and v {list(v.shape)} "
                         "must have the same shape [B, n, H*D]")
    B, n, HD = q_lin.shape
    Bc, C, H, D = cache_shape
    if D not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported; expected one of {_SUPPORTED_HEAD_DIMS}")
    if Bc != B or H * D != HD:
        raise ValueError(f"cache shape {list(cache_shape)} does not match q_lin {list(q_lin.shape)}: "
                         f"need B={B} and H*D={HD}")
    if n > C:
        raise ValueError(f"the cache has {C} slots, too few for {n} new rows")
    if norm_optional and (norm_q_weight is None) != (norm_k_weight is None):
        raise ValueError("norm_q_weight and norm_k_weight must both be given, or both be None (inputs already normed)")
    for name, w in (("norm_q_weight", norm_q_weight), ("norm_k_weight", norm_k_weight)):
        if w is None and norm_optional:
            continue
        check_tensor(name, w, dtype=torch.bfloat16, shape=(HD,), device=device)
    for name, tab in (("cos", cos), ("sin", sin)):
        check_tensor(name, tab, dtype=torch.float32, shape=("R", D // 2), device=device)
        if tab.shape[0] == 0:
            raise ValueError(f"{name} has no rows: it must have shape [R > 0, {D // 2}]")
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        raise ValueError(f"cos {list(cos.shape)} and sin {list(sin.shape)} must match in shape and strides")
    rows = cos.shape[0]
    if len(grid_sizes) != 3 or not all(isinstance(g, int) and g > 0 for g in grid_sizes):
        raise ValueError(f"grid_sizes must be three positive ints (F, Hg, Wg), got {grid_sizes!r}")
    F_, hg, wg = grid_sizes
    if F_ * hg * wg != n:
        raise ValueError(f"grid_sizes {tuple(grid_sizes)} cover {F_ * hg * wg} tokens, but there are {n}")
    if max(hg, wg, F_) > rows:
        raise ValueError(f"grid_sizes {tuple(grid_sizes)} exceed the {rows}-row RoPE tables")
    ring_size = C if ring_size is None else ring_size
    if not (0 <= ring_lo and ring_size >= 1 and ring_lo + ring_size <= C):
        raise ValueError(f"ring [{ring_lo}, {ring_lo}+{ring_size}) must be a non-empty range inside the {C}-slot cache")
    start_frame = index_arg("start_frame", start_frame, batch=B, lo=0, hi=rows - F_, device=device)
    dst_start = index_arg("dst_start", dst_start, batch=B, lo=0, hi=C - 1, device=device)
    row_lo = index_arg("row_lo", row_lo, batch=B, lo=0, hi=n, device=device)
    if shift is not None:
        shift = index_arg("shift", shift, batch=B, lo=0, hi=ring_size - 1, device=device)
    return start_frame, dst_start, row_lo, shift, ring_size


def append_block_t(n: int, H: int, D: int) -> int:
    """Tokens per program: four at real widths (H*D = 1536); the tiny test widths take more."""
    return max(1, min(triton.next_power_of_2(n), 8192 // (triton.next_power_of_2(H) * D)))


def rope_kv_append(q_lin: torch.Tensor, k_lin: torch.Tensor, v: torch.Tensor,
                   norm_q_weight: torch.Tensor | None, norm_k_weight: torch.Tensor | None,
                   cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor,
                   grid_sizes: tuple[int, int, int], start_frame, dst_start, row_lo, *,
                   ring_lo: int = 0, ring_size: int | None = None, shift=None, eps: float = 1e-6,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm + RoPE q and k, write roped k and raw v rows [row_lo, n) into the caches; return q.

    See the module docstring for layouts and the slot rule. ring_size defaults to the cache size C;
    shift (int tensor [1]/[B] on the device, or an int) rotates the ring. Norm weights None: q_lin
    and k_lin are already normed, only RoPE and the append run.
    """
    check_tensor("q_lin", q_lin, dtype=torch.bfloat16, shape=("B", "n", "H*D"))
    device = q_lin.device
    check_kernel_device("rope_kv_append", device)
    check_tensor("k_cache", k_cache, dtype=torch.bfloat16, shape=("B", "C", "H", "D"), device=device)
    check_tensor("v_cache", v_cache, dtype=torch.bfloat16, shape=("B", "C", "H", "D"), device=device)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ in shape")
    start_frame, dst_start, row_lo, shift, ring_size = check_append_inputs(
        q_lin, k_lin, v, norm_q_weight, norm_k_weight, cos, sin, k_cache.shape, grid_sizes,
        start_frame, dst_start, row_lo, ring_lo, ring_size, shift, norm_optional=True)
    B, n, _ = q_lin.shape
    _, C, H, D = k_cache.shape
    if out is not None:
        check_tensor("out", out, dtype=torch.bfloat16, shape=(B, n, H, D), device=device)

    if out is None:
        out = torch.empty((B, n, H, D), dtype=torch.bfloat16, device=device)
    norm = norm_q_weight is not None
    if B == 0 or n == 0:
        return out

    c = D // 2
    block_t = append_block_t(n, H, D)
    _, hg, wg = grid_sizes
    _rope_kv_append_kernel[(triton.cdiv(n, block_t), B)](
        q_lin, k_lin, v, norm_q_weight if norm else q_lin, norm_k_weight if norm else k_lin, cos, sin,
        out, k_cache, v_cache,
        start_frame, dst_start, row_lo, dst_start if shift is None else shift,
        0 if start_frame.numel() == 1 else 1, 0 if dst_start.numel() == 1 else 1, 0 if row_lo.numel() == 1 else 1,
        0 if shift is None or shift.numel() == 1 else 1,
        q_lin.stride(0), q_lin.stride(1), k_lin.stride(0), k_lin.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        cos.stride(0), cos.shape[0],
        n, H, hg, wg, ring_lo, ring_size, 1.0 / (H * D), eps,
        HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_T=block_t, T_SLOTS=c - 2 * (c // 3), HW_SLOTS=c // 3,
        HAS_SHIFT=shift is not None, NORM=norm, INTERPRET=interpreting(),
        num_warps=8,
    )
    return out


def _rope_params(max_seq_len: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    # The stock table, built on the CPU in float64 as the stock model does.
    freqs = torch.outer(
        torch.arange(max_seq_len, dtype=torch.float64),
        1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim)),
    )
    return torch.polar(torch.ones_like(freqs), freqs)


def _rope_freqs(head_dim: int, max_frames: int) -> torch.Tensor:
    d = head_dim
    return torch.cat([_rope_params(max_frames, d - 4 * (d // 6)),
                      _rope_params(max_frames, 2 * (d // 6)),
                      _rope_params(max_frames, 2 * (d // 6))], dim=1)


def rope_tables(head_dim: int, max_frames: int = 1024,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [max_frames, head_dim/2] fp32: the stock complex128 table rounded once."""
    if head_dim % 2 or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    freqs = _rope_freqs(head_dim, max_frames)
    return (freqs.real.float().contiguous().to(device), freqs.imag.float().contiguous().to(device))


def rope_kv_append_ref(q_lin: torch.Tensor, k_lin: torch.Tensor, v: torch.Tensor,
                       norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor,
                       grid_sizes: tuple[int, int, int], start_frame, dst_start, row_lo, *,
                       ring_lo: int = 0, ring_size: int | None = None, shift=None, eps: float = 1e-6,
                       max_frames: int = 1024) -> torch.Tensor:
    """The stock math literally: WanRMSNorm, float64 complex causal RoPE, torch-indexed cache writes.

    Writes the caches in place and returns roped q [B, n, H, D] bf16. Index arguments may be ints or
    tensors of shape [1]/[B]; they are read on the host (this is a test oracle). Norm weights None:
    no RMSNorm (inputs already normed)."""
    B, n, HD = q_lin.shape
    _, C, H, D = k_cache.shape
    ring_size = C if ring_size is None else ring_size

    def rms(x, w):
        if w is None:
            return x
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * w

    def per_sample(value, b):
        if isinstance(value, torch.Tensor):
            value = value.reshape(-1)
            return int(value[b if value.numel() > 1 else 0])
        return int(value)

    q = rms(q_lin, norm_q_weight).reshape(B, n, H, D)
    k = rms(k_lin, norm_k_weight).reshape(B, n, H, D)
    f, hg, wg = grid_sizes
    c = D // 2
    freqs = _rope_freqs(D, max_frames).to(q_lin.device).split([c - 2 * (c // 3), c // 3, c // 3], dim=1)

    def rope(x, sf):
        x_c = torch.view_as_complex(x.to(torch.float64).reshape(n, H, -1, 2))
        freqs_i = torch.cat([
            freqs[0][sf:sf + f].view(f, 1, 1, -1).expand(f, hg, wg, -1),
            freqs[1][:hg].view(1, hg, 1, -1).expand(f, hg, wg, -1),
            freqs[2][:wg].view(1, 1, wg, -1).expand(f, hg, wg, -1),
        ], dim=-1).reshape(n, 1, -1)
        return torch.view_as_real(x_c * freqs_i).flatten(2).type_as(x)

    q_out = torch.empty_like(q)
    v4 = v.view(B, n, H, D) if v.is_contiguous() else v.reshape(B, n, H, D)
    for b in range(B):
        sf = per_sample(start_frame, b)
        q_out[b] = rope(q[b], sf)
        k_b = rope(k[b], sf)
        rows = torch.arange(per_sample(row_lo, b), n, device=q_lin.device)
        logical = per_sample(dst_start, b) + rows
        # Of the rows that land in the ring, the last ring_size (a write in row order leaves those).
        keep = (logical < ring_lo) | (rows >= n - ring_size)
        rows, logical = rows[keep], logical[keep]
        ring_slots = ring_lo + torch.remainder(logical - ring_lo + per_sample(0 if shift is None else shift, b), ring_size)
        slots = torch.where(logical < ring_lo, logical, ring_slots)
        k_cache[b, slots] = k_b[rows]
        v_cache[b, slots] = v4[b, rows]
    return q_out


def rope_kv_append_bytes(batch: int, n: int, heads: int, head_dim: int, rows_written: int | None = None) -> float:
    """Fewest bytes one call must move (bf16): read q_lin, and k_lin and v for the rows written; write
    q and those k, v cache rows. rows_written defaults to all n."""
    rows_written = n if rows_written is None else rows_written
    row = heads * head_dim * 2.0
    return batch * row * (2 * n + 4 * rows_written)
