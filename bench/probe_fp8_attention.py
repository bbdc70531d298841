"""Probe: which Hopper overlaps Triton 3.6 lets the FP8 window attention reach (issue 22, item 2).

A minimal FP8 attention forward with our FP8 cache layout (q8 [B, Lq, H, D] with one scale per row,
k8 [B, C, H, D] with one scale per head, v8 tokens-contiguous [B, H, D, C] with one scale per
128-slot group; all of [0, C) attended, C a multiple of 128) in three schedules, timed beside our
kernel (`window_attention_fp8`, TMA, split 2) and cuDNN's bf16 SDPA at LongLive's shape:
- `base`: the tile body of kernels/window_attention.py (S = Q.K^T; softmax; P.V into a fresh
  accumulator added in fp32), TMA loads;
- `prefetch`: S of tile j+1 is issued before the softmax of tile j (FlashAttention-3's intra-
  warpgroup pipelining written by hand): the wgmma can run while the MUFU and FMA units work;
- `ws`: the key loop as `tl.range(..., warp_specialize=True)` (Triton's automatic warp
  specialisation: a producer warp for the TMA loads, consumers for the math).
Each prints ms, TFLOP/s, the rate ratio to cuDNN (the probes attend the whole 128-slot tiles
of the window only) and the cosine against the fp32 reference, or the
compile error. One call of about a minute on an H100:

    python -m longlive_triton.bench.probe_fp8_attention [--lkv 18720 14040]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from ..kernels.fp8_kv_cache import quantize_k_ref, quantize_rows_ref, quantize_v_groups_ref
from ..kernels.window_attention import window_attention_flops, window_attention_fp8, window_attention_fp8_ref
from longlive_triton.numerics import cosine

HEADS, HEAD_DIM, LQ = 12, 128, 4680
MODES = {"base": 0, "prefetch": 1, "ws": 2}


@triton.jit
def _softmax_pv(acc, l_i, m_i, s, a_row, v, vs):
    log_vs = tl.math.log2(vs)
    m_new = tl.maximum(m_i, tl.max(s, 1) * a_row + log_vs)
    p = tl.math.exp2(s * a_row[:, None] - (m_new - (log_vs + 8.807354922057604))[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1) * (1.0 / vs)
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)
    return acc, l_i, m_new


@triton.jit
def _probe_attn(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, o_ptr, Lq, C, H, qk_scale, stride_vd,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Lq
    q = tl.load(q_ptr + offs_m[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :], mask=m_ok[:, None],
                other=0.0)
    a_row = qk_scale * tl.load(qs_ptr + offs_m * H + h, mask=m_ok, other=0.0) * tl.load(ks_ptr + h)
    k_desc = tl.make_tensor_descriptor(k_ptr, shape=[C, H * HEAD_DIM], strides=[H * HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(v_ptr, shape=[H * HEAD_DIM, C], strides=[stride_vd, 1],
                                       block_shape=[HEAD_DIM, BLOCK_N])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if MODE == 1:
        s = tl.dot(q, tl.trans(k_desc.load([0, h * HEAD_DIM])))
        for n0 in range(0, C - BLOCK_N, BLOCK_N):
            s_next = tl.dot(q, tl.trans(k_desc.load([n0 + BLOCK_N, h * HEAD_DIM])))
            v = tl.trans(v_desc.load([h * HEAD_DIM, n0]))
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, a_row, v, tl.load(vs_ptr + (n0 // BLOCK_N) * H + h))
            s = s_next
        n0 = C - BLOCK_N
        v = tl.trans(v_desc.load([h * HEAD_DIM, n0]))
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, a_row, v, tl.load(vs_ptr + (n0 // BLOCK_N) * H + h))
    else:
        for n0 in tl.range(0, C, BLOCK_N, warp_specialize=MODE == 2):
            s = tl.dot(q, tl.trans(k_desc.load([n0, h * HEAD_DIM])))
            v = tl.trans(v_desc.load([h * HEAD_DIM, n0]))
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, a_row, v, tl.load(vs_ptr + (n0 // BLOCK_N) * H + h))
    out = acc / l_i[:, None]
    tl.store(o_ptr + offs_m[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :], out.to(tl.bfloat16),
             mask=m_ok[:, None])


def probe_attn(q8, q_scale, k8, k_scale, v8, v_scale, out, mode: str, block_m: int, num_warps: int, num_stages: int):
    """B = 1 only; v8 the cache's [1, C, H, D] view of a tokens-contiguous [1, H, D, C'] buffer."""
    Lq, C = q8.shape[1], k8.shape[1] // 128 * 128  # whole tiles only: the probe has no masked tile
    grid = (triton.cdiv(Lq, block_m), HEADS)
    _probe_attn[grid](q8, q_scale, k8, k_scale, v8, v_scale, out, Lq, C, HEADS, HEAD_DIM ** -0.5 * 1.4426950408889634,
                      v8.stride(3),
                      HEAD_DIM=HEAD_DIM, BLOCK_M=block_m, BLOCK_N=128, MODE=MODES[mode], num_warps=num_warps,
                      num_stages=num_stages)
    return out


def _operands(lkv: int):
    q = torch.randn(1, LQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, lkv, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k_scale = (k.float().abs().amax(dim=(0, 1, 3)) / 448.0).contiguous()
    q8, q_scale = quantize_rows_ref(q)
    v8, v_scale = quantize_v_groups_ref(v)
    return (q, k, v), (q8, q_scale, quantize_k_ref(k, k_scale), k_scale, v8, v_scale)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lkv", type=int, nargs="+", default=[18720, 14040])
    args = ap.parse_args(argv)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    print("GPU", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    rows = []
    for lkv in args.lkv:
        torch.manual_seed(0)
        (q, k, v), ops = _operands(lkv)
        flops = window_attention_flops(1, LQ, lkv, HEADS, HEAD_DIM)
        ref = window_attention_fp8_ref(*ops, 0, 0, lkv)
        # The probe kernels attend the whole 128-slot tiles only: their own reference and flops.
        lkv_al = lkv // 128 * 128
        ref_al = window_attention_fp8_ref(*ops, 0, 0, lkv_al)
        flops_al = window_attention_flops(1, LQ, lkv_al, HEADS, HEAD_DIM)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        ms_cudnn = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt),
                                           warmup=100, rep=400, return_mode="median")
        rows.append((lkv, "cudnn bf16", ms_cudnn, flops / ms_cudnn / 1e9, 1.0, float("nan")))
        out = torch.empty(1, LQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        rng = [torch.tensor([x], dtype=torch.int64, device="cuda") for x in (lkv, lkv, lkv)]
        ours = lambda: window_attention_fp8(*ops, *rng, out=out, use_tma=True, split=2)  # noqa: E731
        ours()
        ms = triton.testing.do_bench(ours, warmup=100, rep=400, return_mode="median")
        rows.append((lkv, "ours tma split2", ms, flops / ms / 1e9, ms_cudnn / ms, cosine(out.float(), ref)))
        for mode in MODES:
            for bm, warps, stages in ((64, 4, 3), (128, 8, 3), (128, 8, 2)):
                label = f"{mode} {bm}x128 w{warps} s{stages}"
                try:
                    call = lambda: probe_attn(*ops, out, mode, bm,  # noqa: E731
                                              warps, stages)
                    out.fill_(float("nan"))
                    call()
                    torch.cuda.synchronize()
                    cos = cosine(out.float(), ref_al)
                    ms = triton.testing.do_bench(call, warmup=100, rep=400, return_mode="median")
                    # x cuDNN as a rate ratio: the probe does lkv_al / lkv of the work.
                    rows.append((lkv, label, ms, flops_al / ms / 1e9, flops_al / ms / (flops / ms_cudnn), cos))
                    print(*rows[-1])
                except Exception as e:  # a schedule Triton cannot compile is a finding, not a crash
                    rows.append((lkv, label, float("nan"), float("nan"), float("nan"), float("nan")))
                    print(f"{label} at kv {lkv}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    print(f"{'kv':>6} {'variant':<24} {'ms':>8} {'TFLOP/s':>8} {'x cuDNN':>8} {'cosine':>9}")
    for lkv, label, ms, tf, ratio, cos in rows:
        print(f"{lkv:>6} {label:<24} {ms:8.3f} {tf:8.0f} {ratio:8.3f} {cos:9.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
