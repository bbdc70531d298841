"""Sweep of window-attention variants at LongLive-1.3B's shapes, against cuDNN in the same run.

    python -m longlive_triton.bench.attention_sweep [--only bf16 fp8 cudnn] [--json PATH]

Each variant (a set of kernel flags) is tried with a few tile configs; the table shows its best
config, ms, TFLOP/s, speed-up over cuDNN bf16 SDPA at the same shape, and the relative L2 error
against fp32 attention. This is the measurement behind the choices in kernels/window_attention*.py.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from longlive_triton.kernels.fp8_kv_cache import quantize_k_ref, quantize_rows_ref, quantize_v_groups_ref
from longlive_triton.kernels.window_attention import window_attention, window_attention_fp8
from longlive_triton.numerics import rel_l2

HEADS, D = 12, 128
CONFIGS = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3)]


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def _flops(lq, lkv):
    return 4.0 * HEADS * lq * lkv * D


def _inputs(lq, lkv, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, lq, HEADS, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, lkv, HEADS, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(1, lkv, HEADS, D, device="cuda", generator=g).bfloat16()
    return q, k, v


def _reference(q, k, v):
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                              v.float().transpose(1, 2)).transpose(1, 2)


SHAPES = {"q4680 kv18720": (4680, 18720), "q4608 kv18688": (4608, 18688), "q4680 kv14040": (4680, 14040),
          "q4224 kv18720": (4224, 18720)}


def _sdpa_rows(row) -> None:
    """cuDNN and FlashAttention-2 through SDPA at every shape: the references of the sweep."""
    for name, (lq, lkv) in SHAPES.items():
        q, k, v = _inputs(lq, lkv)
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            def call():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            ms = _bench(call)
            row(kind="sdpa", backend=backend.name, shape=name, ms=ms, tflops=_flops(lq, lkv) / ms / 1e9)


def _print_summary(rows: list[dict]) -> None:
    print("\n| variant | best config (BM, BN, warps, stages) | ms | vs cuDNN | rel L2 |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "best":
            print(f"| {r['label']} | {r.get('config', '')} | {r['ms']:.4f} | {r['vs_cudnn']:.3f}x "
                  f"| {r.get('rel_l2', float('nan')):.2e} |")
    for r in rows:
        if r["kind"] == "sdpa":
            print(f"| sdpa {r['backend']} {r['shape']} | | {r['ms']:.4f} | {r['tflops']:.0f} TFLOP/s | |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=["cudnn", "bf16", "fp8"])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []

    def row(**r):
        rows.append(r)
        print(json.dumps(r), flush=True)

    if "cudnn" in args.only:
        _sdpa_rows(row)

    lq, lkv = SHAPES["q4680 kv18720"]
    q, k, v = _inputs(lq, lkv)
    ref = _reference(q, k, v)
    idx = [torch.tensor([x], device="cuda") for x in (4680, 4680, lkv)]

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    base = _bench(cudnn)
    row(kind="baseline", shape="q4680 kv18720", ms=base)

    def err(out):
        return rel_l2(out, ref)

    def sweep(label, make, configs=CONFIGS):
        best = None
        for cfg in configs:
            config = dict(BLOCK_M=cfg[0], BLOCK_N=cfg[1], num_warps=cfg[2], num_stages=cfg[3])
            try:
                fn = make(config)
                out = fn()
                torch.cuda.synchronize()
                ms = _bench(fn)
            except Exception as e:  # a config that does not compile or fit: recorded, not fatal
                row(kind="variant", label=label, config=cfg, error=f"{type(e).__name__}: {str(e)[:160]}")
                continue
            e = err(out)
            row(kind="variant", label=label, config=cfg, ms=ms, tflops=_flops(lq, lkv) / ms / 1e9,
                vs_cudnn=base / ms, rel_l2=e)
            if best is None or ms < best[1]:
                best = (cfg, ms, e)
        if best:
            row(kind="best", label=label, config=best[0], ms=best[1], vs_cudnn=base / best[1], rel_l2=best[2])

    if "bf16" in args.only:
        out = torch.empty_like(q)
        for tma in (True, False):
            for split in (1, 2):
                sweep(f"bf16 tma={tma} split={split}",
                      lambda c, tma=tma, split=split: (lambda: window_attention(q, k, v, *idx, out=out, use_tma=tma,
                                                                               split=split, config=c)))

    if "fp8" in args.only:
        out = torch.empty_like(q)
        k_scale = (k.float().abs().amax(dim=(0, 1, 3)) / 448.0).contiguous()
        ops = (*quantize_rows_ref(q), quantize_k_ref(k, k_scale), k_scale, *quantize_v_groups_ref(v))
        fp8_configs = [(128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 2), (64, 128, 4, 3)]
        for tma in (True, False):
            for split in (1, 2):
                sweep(f"fp8 (ours) tma={tma} split={split}",
                      lambda c, o=dict(use_tma=tma, split=split): (
                          lambda: window_attention_fp8(*ops, *idx, out=out, config=c, **o)), fp8_configs)

    _print_summary(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
