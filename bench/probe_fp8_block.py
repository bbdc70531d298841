"""Probe: the fp8 block's GEMM epilogues at LongLive-1.3B shapes, fused against the passes they replace.

    python -m longlive_triton.bench.probe_fp8_block            # about 30 s on an H100 (fixed tiles)
    python -m longlive_triton.bench.probe_fp8_block --autotune  # the tiles the model autotunes to (slower)

One steady block's layer at M = 4680 tokens (3 frames), in one run on one card:
- FFN up, 1536 -> 8960, bias + GELU: FP8 out with 128-column group scales from the epilogue (what
  fp8_ffn_fused runs) against bf16 out + the per-token quantization pass (fp8_ffn_fused: false), and
  the bare GEMM (bias, bf16 out) as the epilogue's floor;
- FFN down, 8960 -> 1536, group-scaled A: the gated residual `x + y * gate` in the epilogue, in place
  (what the FP8 FFN runs now) against bf16 y + the separate adaln residual pass (what it ran before);
- o projection, 1536 -> 1536: the bf16 Linear + the adaln pass (residual, gate, LN3) that the fp8
  preset runs, against an FP8 o projection with the residual in its epilogue (its input quantized by
  a separate pass: nothing upstream writes the attention output in FP8) + the LN3-only adaln;
- the FFN up's FP8 group scales against an fp32 reference: the largest relative difference, which
  Hopper's fp8 wgmma accumulation makes > 1e-4 (why test_real_size_ffn_fused failed; the test now
  checks the epilogue against the same GEMM's bf16 output), with the default accumulation and with
  precise_acc (an fp32 add per 128-wide K-tile; timed above). Under 2^-8, one bf16 rounding, the
  accumulation is as close to fp32 as the stock's own bf16 GEMM output is.
Every variant runs the same fixed tiles (unless --autotune), so the rows differ only by their epilogue.
"""
from __future__ import annotations

import argparse
import time

import torch
import triton

from ..kernels.adaln import adaln
from ..kernels.fp8_gemm import fp8_gemm, fp8_gemm_flops, fp8_gemm_ref
from ..kernels.fp8_quant import quantize_groupwise_ref, quantize_rowwise, quantize_weight_per_channel
from .results import environment, format_table

TOKENS, FRAMES, DIM, FFN = 4680, 3, 1536, 8960
# One tile shape for every variant: 128 x 128 is the only tile an FP8-output (group-scaled) GEMM can use.
CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}
# A steady block: 30 layers, 4 denoising forwards + 1 cache pass.
LAYER_CALLS_PER_BLOCK = 30 * 5


def _weights(n: int, k: int, gen: torch.Generator, device):
    w = torch.randn(n, k, generator=gen, device=device) / k ** 0.5
    b = (torch.randn(n, generator=gen, device=device) * 0.1).bfloat16()
    return (*quantize_weight_per_channel(w), b, w.bfloat16())


def _time(fn) -> tuple[float, float, float]:
    """(median, p20, p80) ms of fn on the GPU, after one untimed call (compiles, autotunes)."""
    fn()
    torch.cuda.synchronize()
    return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))


def probe(device, tokens: int = TOKENS, dim: int = DIM, ffn: int = FFN, opts: dict | None = None, timer=_time):
    """(table rows, FFN down saving in ms per layer call, max relative FFN-up scale difference).
    Shapes and the timer are parameters so the CPU test runs it small in the interpreter."""
    opts = {"config": CONFIG} if opts is None else opts
    gen = torch.Generator(device=device).manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(1, tokens, dim, generator=gen, **bf)                 # the residual stream
    gate = torch.randn(1, FRAMES, 6, dim, generator=gen, **bf)[:, :, 2:3]  # a stock modulation chunk
    ln_w, ln_b = torch.randn(dim, generator=gen, **bf), torch.randn(dim, generator=gen, **bf)
    h = torch.randn(tokens, dim, generator=gen, **bf)                    # an FFN input / attention output
    a, sa = quantize_rowwise(h)
    w1, s1, b1, _ = _weights(ffn, dim, gen, device)
    w2, s2, b2, _ = _weights(dim, ffn, gen, device)
    wo, so, bo, wo_bf16 = _weights(dim, dim, gen, device)
    hid = fp8_gemm(a, w1, sa, s1, b1, gelu=True, out_fp8=True, **opts)  # the FFN down's real input
    y_up = torch.empty(tokens, ffn, **bf)
    y = torch.empty(tokens, dim, **bf)
    x2 = x.view(tokens, dim)

    def up_fused():
        fp8_gemm(a, w1, sa, s1, b1, gelu=True, out_fp8=True, out=hid.q, out_scale=hid.scale, **opts)

    def up_precise():
        fp8_gemm(a, w1, sa, s1, b1, gelu=True, out_fp8=True, out=hid.q, out_scale=hid.scale, precise_acc=True,
                 **opts)

    def up_unfused():
        fp8_gemm(a, w1, sa, s1, b1, gelu=True, out=y_up, **opts)
        quantize_rowwise(y_up)

    def up_bare():
        fp8_gemm(a, w1, sa, s1, b1, out=y_up, **opts)

    def down_fused():
        fp8_gemm(hid.q, w2, hid.scale, s2, b2, residual=x2, gate=gate, out=x2, **opts)

    def down_separate():
        fp8_gemm(hid.q, w2, hid.scale, s2, b2, out=y, **opts)
        adaln(x, y=y.view(1, tokens, dim), gate=gate, norm=False, out_x=x)

    def o_bf16_adaln():
        yo = torch.nn.functional.linear(h, wo_bf16, bo)
        adaln(x, y=yo.view(1, tokens, dim), gate=gate, weight=ln_w, bias=ln_b, out_x=x)

    def o_fp8_fused():
        q, s = quantize_rowwise(h)
        fp8_gemm(q, wo, s, so, bo, residual=x2, gate=gate, out=x2, **opts)
        adaln(x, weight=ln_w, bias=ln_b)

    cases = [
        ("FFN up", dim, ffn, [("bias+GELU -> FP8 (fused, current)", up_fused),
                              ("  the same, precise_acc (fp32 add per K-tile)", up_precise),
                              ("bias+GELU -> bf16 + quantize pass", up_unfused),
                              ("bias -> bf16 (bare GEMM)", up_bare)]),
        ("FFN down", ffn, dim, [("-> bf16 + adaln residual pass (before)", down_separate),
                                ("+ gated residual in epilogue (new)", down_fused)]),
        ("o proj", dim, dim, [("bf16 Linear + adaln residual+LN3 (current)", o_bf16_adaln),
                              ("quantize + FP8 w/ residual + adaln LN3", o_fp8_fused)]),
    ]
    rows, med = [], {}
    for name, k, n, variants in cases:
        for label, fn in variants:
            m, lo, hi = timer(fn)
            med[fn.__name__] = m
            first = med[variants[0][1].__name__]
            rows.append([f"{name} {k}->{n}", label, f"{m * 1e3:.1f}", f"{lo * 1e3:.1f}-{hi * 1e3:.1f}",
                         f"{fp8_gemm_flops(tokens, n, k) / m / 1e9:.0f}", f"{first / m:.2f}x"])
    saved = med["down_separate"] - med["down_fused"]

    # The diagnosis of test_real_size_ffn_fused: FP8 group scales against fp32 accumulation.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        want = fp8_gemm_ref(a, w1, sa, s1, b1, gelu=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    _, s_ref = quantize_groupwise_ref(want)
    rel = {}
    for fn in (up_fused, up_precise):
        fn()
        rel[fn.__name__] = (hid.scale - s_ref).abs() / s_ref
    return rows, saved, rel


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--autotune", action="store_true", help="let each GEMM autotune instead of fixed tiles")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this probe needs a CUDA GPU (FP8 tensor cores: compute capability >= 8.9)")
    began = time.time()
    rows, saved, rel = probe(torch.device("cuda"), opts={} if args.autotune else None)
    env = environment()
    tiles = "autotuned" if args.autotune else f"tiles {CONFIG}"
    title = (f"fp8 block epilogues, M={TOKENS} ({FRAMES} frames), {tiles}"
             f"\n{env['gpu']}, torch {env['torch']}, triton {env['triton']}, git {env['git']}")
    print(format_table(title, ["GEMM", "variant", "us", "p20-p80", "GEMM TFLOP/s", "vs first row"], rows, labels=2))
    print(f"FFN down residual fusion saves {saved * 1e3:.1f} us per layer call, "
          f"{saved * LAYER_CALLS_PER_BLOCK:.2f} ms per block ({LAYER_CALLS_PER_BLOCK} layer calls)")
    for name, r in rel.items():
        print(f"FFN up FP8 group scales vs fp32 reference ({name}): max relative difference {r.max().item():.3g} "
              f"({int((r > 1e-4).sum())} of {r.numel()} beyond 1e-4; one bf16 rounding is 2^-8 = {2 ** -8:.3g})")
    print(f"probe took {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
