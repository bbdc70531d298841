"""Benchmark case for the fused q/k RMSNorm + causal RoPE + KV append against the stock torch code.

One steady-state block of LongLive-1.3B: n = 4680 new tokens (grid 3 x 30 x 52), 12 heads x 128,
a 18720-slot cache, the new rows written at slots [14040, 18720) at absolute frame 12. "stock" is
what each stock self-attention layer does: WanRMSNorm on q and k, float64 complex RoPE on both,
a clone of the whole K and V cache, and slice writes into the clones.
"""
from __future__ import annotations

import torch

from longlive_triton.models.longlive1.model import WanRMSNorm, causal_rope_apply, rope_freqs

from ..kernels.rope_kv_append import rope_kv_append, rope_kv_append_bytes, rope_tables
from .registry import KernelCase, register

HEADS, HEAD_DIM = 12, 128
GRID = (3, 30, 52)
N = GRID[0] * GRID[1] * GRID[2]
CACHE, DST, START_FRAME = 18720, 14040, 12
EPS = 1e-6


def _inputs():
    hd = HEADS * HEAD_DIM
    q_lin, k_lin, v = (torch.randn(1, N, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    wq, wk = (torch.randn(hd, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k_cache, v_cache = (torch.randn(1, CACHE, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return q_lin, k_lin, v, wq, wk, k_cache, v_cache


def _ours():
    q_lin, k_lin, v, wq, wk, k_cache, v_cache = _inputs()
    cos, sin = rope_tables(HEAD_DIM, device="cuda")
    index = [torch.tensor([x], dtype=torch.int64, device="cuda") for x in (START_FRAME, DST, 0)]
    out = torch.empty(1, N, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return lambda: rope_kv_append(q_lin, k_lin, v, wq, wk, cos, sin, k_cache, v_cache, GRID, *index, eps=EPS, out=out)


def _stock():
    q_lin, k_lin, v, wq, wk, k_cache, v_cache = _inputs()
    norm_q, norm_k = (WanRMSNorm(HEADS * HEAD_DIM, eps=EPS).to("cuda", torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        norm_q.weight.copy_(wq)
        norm_k.weight.copy_(wk)
    freqs = rope_freqs(HEAD_DIM).to("cuda")  # the stock moves its complex128 table on first use
    grid_sizes = torch.tensor([GRID], dtype=torch.long)  # a CPU tensor in the stock model

    @torch.no_grad()
    def call():
        shape = (1, N, HEADS, HEAD_DIM)
        q = norm_q(q_lin).view(shape)
        k = norm_k(k_lin).view(shape)
        vv = v.view(shape)
        roped_q = causal_rope_apply(q, grid_sizes, freqs, start_frame=START_FRAME).type_as(vv)
        roped_k = causal_rope_apply(k, grid_sizes, freqs, start_frame=START_FRAME).type_as(vv)
        temp_k, temp_v = k_cache.clone(), v_cache.clone()
        temp_k[:, DST:DST + N] = roped_k
        temp_v[:, DST:DST + N] = vv
        return roped_q, temp_k, temp_v
    return call


@register("rope_kv_append")
def cases() -> list[KernelCase]:
    return [KernelCase(
        name="rope_kv_append",
        shape=f"n{N} cache{CACHE} H{HEADS} D{HEAD_DIM}",
        providers={"ours": _ours, "stock": _stock},
        baseline="stock",
        bytes=rope_kv_append_bytes(1, N, HEADS, HEAD_DIM),
        ceiling="bandwidth",
        extra={"grid": list(GRID), "dst_start": DST, "start_frame": START_FRAME},
    )]
