"""bench/vae.py's pieces that run without a GPU: FLOP counting, the tables, the CLI's refusal."""
import json

import torch

from longlive_triton.bench import vae as bench_vae
from longlive_triton.bench.cli import build_parser, main
from longlive_triton.models.wan21_vae import build_vae_decoder


def test_block_flops_counts_the_convolutions():
    vae = build_vae_decoder("tiny", seed=0)
    z = torch.randn(1, 16, 3, 2, 3)
    flops = bench_vae.block_flops(vae, z)
    # lower bound: the 6 full-resolution 3x3x3 convolutions of the last stage (8 -> 8 channels) alone
    last_stage = 6 * 2 * 8 * 8 * 27 * (3 * 4) * 16 * 24
    assert flops > last_stage
    assert bench_vae.block_flops(vae, torch.randn(1, 16, 3, 4, 6)) > 3.5 * flops  # 4x the positions


def test_tables():
    rows = [{"provider": "reference", "status": "ok", "median_ms": 200.0, "p20_ms": 199.0, "p80_ms": 201.0,
             "ms_per_video_frame": 200 / 12, "tflops": 200.0, "peak_mem_bytes": 2 ** 31, "rel_l2": 0.0,
             "speedup": 1.0},
            {"provider": "patched", "status": "ok", "median_ms": 100.0, "p20_ms": 99.0, "p80_ms": 101.0,
             "ms_per_video_frame": 100 / 12, "tflops": 400.0, "peak_mem_bytes": 2 ** 31, "rel_l2": 3e-3,
             "speedup": 2.0, "stream": {"calls": 12, "allocations": 70, "graphs": {"eager": 2, "captures": 1,
                                                                                  "replays": 9}}},
            {"provider": "stock WanVAE_", "status": "failed", "error": "ValueError: x"}]
    text = bench_vae.table(rows)
    assert "patched" in text and "2.00x" in text and "FAILED" in text and "ValueError: x" in text
    assert text.splitlines()[4].split()[-1] == "9"  # the patched row's graph replays
    text, totals = bench_vae.total_table([{"config": "stock", "generator_ms": 400.0},
                                          {"config": "exact", "generator_ms": 260.0}], rows, 12)
    assert [t["vae"] for t in totals] == ["reference", "patched"]
    assert totals[1]["total_ms"] == 360.0 and totals[1]["ms_per_video_frame"] == 30.0
    assert "360.0" in text


def test_cli_parses_and_refuses_without_gpu():
    args = build_parser().parse_args(["vae", "--latent-hw", "30", "52", "--generator", "exact"])
    assert args.latent_hw == [30, 52] and args.generator == ["exact"]
    if not torch.cuda.is_available():
        assert main(["vae"]) == 2


def test_variants():
    specs = bench_vae.default_variants()
    assert specs[-1] == "all-off" and "cuda_graphs=false" in specs and "frames_per_call=3" in specs
    assert "cudnn_benchmark=true" in specs and "triton_conv=true" in specs and len(specs) == 7
    assert bench_vae.variant_options("defaults") == {}
    assert bench_vae.variant_options("all-off")["frames_per_call"] == 1
    assert bench_vae.variant_options("frames_per_call=2,cuda_graphs=false") == {"frames_per_call": 2,
                                                                                "cuda_graphs": False}
    for bad in ("frames_per_call", "nonsense=1", "frames_per_call=0"):
        try:
            bench_vae.variant_options(bad)
        except (ValueError, TypeError):
            continue
        raise AssertionError(f"{bad!r} was accepted")
    args = build_parser().parse_args(["vae", "--variants", "all-off", "fused_bias=false"])
    assert args.variants == ["all-off", "fused_bias=false"] and args.warmup == 4


def test_summary_tables_and_default_verdicts(tmp_path, capsys):
    from longlive_triton.bench import vae_summary

    def row(name, ms):
        return {"provider": name, "status": "ok", "median_ms": ms, "speedup": 200 / ms, "rel_l2": 1e-2,
                "stream": None}
    bench = {"kind": "vae", "settings": {"frames_per_block": 3, "latent_hw": [60, 104], "dtype": "bf16",
                                         "default_options": {}},
             "rows": [row("reference", 200.0), row("patched", 100.0), row("patched, cuda_graphs=false", 110.0),
                      row("patched, frames_per_call=1", 90.0), row("patched, fused_bias=false", 100.5),
                      row("patched, all-off", 140.0), {"provider": "stock WanVAE_", "status": "failed", "error": "x"}]}
    parity = {"patched_vs_unpatched_bf16_frames_per_call=1": {"patched_bf16_vs_fp32": 0.02, "bound": 0.011,
                                                             "ok": False},
              "graphed_vs_eager_3_frames_per_call": {"blocks_equal": [True, True]}}
    e2e = {"kind": "e2e_vae", "rows": [{"config": "stock", "status": "ok", "vae": "reference", "generator_ms": 400.0,
                                        "vae_ms": 250.0, "total_ms": 650.0, "ms_per_video_frame": 650 / 12,
                                        "ttff_ms": 700.0, "speedup": 1.0, "rel_l2_pixels_last": 0.0}]}
    paths = []
    for name, data in (("vae.json", bench), ("parity.json", parity), ("e2e.json", e2e)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(data))
    assert vae_summary.main([str(p) for p in paths] + [str(tmp_path / "absent.json")]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("patched, ")}
    assert "slower: keep the default" in lines["cuda_graphs=false"]
    assert "switch the default to frames_per_call=1 (but bf16 parity failed)" in lines["frames_per_call=1"]
    assert "no difference" in lines["fused_bias=false"] and lines["all-off"].rstrip().endswith("-")  # no verdict
    assert "FAIL" in out and "absent.json is missing" in out and "650.0" in out and "FAILED" in out
