"""CPU tests of `longlive-bench`: the e2e run on the tiny preset, the kernel runner's bookkeeping, tables."""
import json
import math

import pytest
import torch

from longlive_triton.bench import kernels, registry
from longlive_triton.bench.cli import main
from longlive_triton.bench.registry import KernelCase
from longlive_triton.bench.results import format_table, quantiles


def test_e2e_tiny_writes_json(tmp_path, capsys):
    out, log = tmp_path / "e2e.json", tmp_path / "log.jsonl"
    rc = main(["e2e", "--preset-model", "tiny", "--blocks", "4", "--warmup-blocks", "2", "--dtype", "fp32",
               "--configs", "exact", "--json", str(out), "--append", str(log)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert json.loads(log.read_text().splitlines()[-1]) == record
    assert record["kind"] == "e2e" and record["settings"]["video_frames_per_block"] == 12
    assert set(record["env"]) == {"gpu", "torch", "triton", "git", "date_utc"}
    stock, exact = record["rows"]
    assert stock["config"] == "stock" and stock["status"] == "ok"
    assert len(stock["block_ms"]) == 4 and stock["median_ms"] > 0 and stock["fps"] > 0
    assert exact["config"] == "exact" and exact["status"] == "ok"
    assert math.isfinite(exact["rel_l2"]) and math.isfinite(exact["cosine"])
    if exact["patch"]["applied"] == 0:  # nothing swapped: the same math on the same inputs, bit for bit
        assert exact["rel_l2"] == 0.0
    # fp32 leaves every layer stock: two identical models, so no speed-up is printed, and we say why.
    assert exact["speedup"] is None and "nothing was patched" in exact["speedup_note"]
    printed = capsys.readouterr().out
    assert "patch report" in printed and "ms/block" in printed
    assert "not steady state" in printed  # 2 warm-up blocks: the window is not full yet, and we say so


def test_e2e_config_overrides_and_prompt_switch(tmp_path):
    out = tmp_path / "e2e.json"
    rc = main(["e2e", "--preset-model", "tiny", "--blocks", "4", "--warmup-blocks", "1", "--dtype", "fp32",
               "--configs", "exact,cuda_graphs=false,fused_glue=false", "--switch-block", "2", "--json", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    row = record["rows"][1]
    assert row["config"] == "exact,cuda_graphs=false,fused_glue=false" and row["status"] == "ok"
    assert row["switch_block_ms"] == row["block_ms"][2]
    assert row["switch_extra_ms"] == pytest.approx(row["block_ms"][2] - row["median_ms"])
    assert record["settings"]["switch_block"] == 2


def test_e2e_presets_use_their_window_and_report_drift_against_exact(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    rc = main(["e2e", "--preset-model", "tiny", "--blocks", "5", "--warmup-blocks", "4", "--dtype", "fp32",
               "--configs", "exact", "window9", "exact,token_merge_ratio=0.5", "--json", str(out)])
    assert rc == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    merged = "exact,token_merge_ratio=0.5"
    assert {n: r["local_attn_size"] for n, r in rows.items()} == {"stock": 12, "exact": 12, "window9": 9, merged: 12}
    w9, tome = rows["window9"]["drift_vs_exact"], rows[merged]["drift_vs_exact"]
    assert len(w9["rel_l2"]) == len(w9["cosine"]) == 5
    # Frames 0..8 fit either window: identical; block 3 is the first generated with a rolled 9-frame window.
    assert w9["rel_l2"][:3] == [0.0] * 3 and all(0 < e < 0.5 for e in w9["rel_l2"][3:])
    assert all(e > 0 for e in tome["rel_l2"]) and all(0.9 < c < 1 for c in tome["cosine"])
    assert rows["exact"]["drift_vs_exact"]["rel_l2_all"] == 0.0
    assert rows[merged]["drift_vs_stock"]["rel_l2_all"] == pytest.approx(rows[merged]["rel_l2"])
    assert "drift of the latents against the exact row" in capsys.readouterr().out


def test_drift_per_block():
    from longlive_triton.bench.measure import drift_per_block

    ref = torch.randn(1, 6, 4, 2, 2, dtype=torch.float64) + 0.5
    out = ref.clone()
    out[:, 3:] *= -1                                  # second block flipped
    d = drift_per_block(out, ref, 3)
    assert d["rel_l2"] == [0.0, pytest.approx(2.0)] and d["cosine"] == [pytest.approx(1.0), pytest.approx(-1.0)]


def test_e2e_on_a_cpu_prints_no_speedup(tmp_path, capsys, monkeypatch):
    """bf16 on a CPU: the patched row runs Triton's interpreter (a time, not a speed figure); without
    the interpreter nothing is patched. Neither prints a speed-up; the progress bar counts the blocks."""
    from longlive_triton.bench import measure

    bars = []

    class Bar:
        def __init__(self, total, desc):
            self.n, self.total = 0, total
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self):
            self.n += 1

    monkeypatch.setattr(measure, "block_bar", Bar)
    out = tmp_path / "e2e.json"
    assert main(["e2e", "--preset-model", "tiny", "--blocks", "2", "--warmup-blocks", "1", "--configs",
                 "exact", "--json", str(out)]) == 0
    stock, exact = json.loads(out.read_text())["rows"]
    assert exact["patch"]["applied"] > 0 and exact["speedup"] is None and stock["speedup"] is None
    assert exact["rel_l2"] <= 1e-2, exact["rel_l2"]  # the bf16 kernels ran and match the stock math
    printed = capsys.readouterr().out
    assert "Triton's interpreter: its time is no speed figure" in printed and "x\n" not in printed
    assert [(b.n, b.total) for b in bars] == [(2, 2), (2, 2)]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels cannot run: every patch skips
    assert main(["e2e", "--preset-model", "tiny", "--blocks", "2", "--warmup-blocks", "1", "--configs",
                 "exact", "--json", str(out)]) == 0
    exact = json.loads(out.read_text())["rows"][1]
    assert exact["patch"]["applied"] == 0 and exact["speedup"] is None
    assert "nothing was patched (the kernels need a CUDA device" in capsys.readouterr().out


def test_e2e_configs_none_is_the_stock_row_only(tmp_path):
    out = tmp_path / "e2e.json"
    assert main(["e2e", "--preset-model", "tiny", "--blocks", "2", "--warmup-blocks", "1", "--dtype", "fp32",
                 "--configs", "none", "--json", str(out)]) == 0
    assert [r["config"] for r in json.loads(out.read_text())["rows"]] == ["stock"]


@pytest.mark.parametrize("argv, message", [
    (["--frames-per-block", "0"], "--frames-per-block must be >= 1"),
    (["--blocks", "0"], "--blocks must be >= 1"),
    (["--configs", "exact,no_such_key=1"], "unknown patch config keys ['no_such_key']; known keys: ["),
    (["--context", "list"], "--context list need --model stock"),
    (["--model", "stock", "--cache-frames", "2"], "--cache-frames takes latent frame counts >= one block (3)"),
    (["--model", "stock", "--switch-every", "0"], "--switch-every must be >= 1"),
    (["--model", "stock", "--switch-block", "5"], "--model stock takes --switch-every"),
] + ([] if torch.cuda.is_available() else [(["--profile"], "--profile needs a CUDA GPU")]))
def test_e2e_checks_arguments_before_any_work(argv, message, capsys, monkeypatch):
    from longlive_triton.bench import e2e_stock, e2e_vae, measure

    for module in (measure, e2e_stock, e2e_vae):
        monkeypatch.setattr(module, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    assert main(["e2e", "--preset-model", "tiny"] + argv) == 2
    assert message in capsys.readouterr().err


def test_e2e_refuses_bad_arguments(capsys):
    assert main(["e2e", "--preset-model", "tiny", "--configs", "exact,no_such_key=1"]) == 2
    assert main(["e2e", "--preset-model", "tiny", "--configs", "exact,cuda_graphs"]) == 2
    assert main(["e2e", "--preset-model", "tiny", "--blocks", "6", "--switch-block", "5"]) == 2
    assert "switch-block" in capsys.readouterr().err
    assert main(["e2e", "--preset-model", "tiny", "--configs", "no-such-preset"]) == 2
    assert main(["e2e", "--preset-model", "tiny", "--blocks", "4"]) == 2  # the window fills at block 4
    assert "no timed block" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_kernels_needs_cuda(capsys):
    assert main(["kernels"]) == 2
    assert "kernels needs a CUDA GPU" in capsys.readouterr().err


def test_every_case_module_is_found_and_a_broken_one_raises(tmp_path, monkeypatch):
    found = kernels.case_modules()
    assert "longlive_triton.bench.kernels_attention" in found and "longlive_triton.bench.kernels_fp8" in found
    assert all(name.startswith("longlive_triton.bench.kernels_") for name in found) and len(found) == 9
    (tmp_path / "broken_cases_for_test.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        kernels.load_case_modules(["broken_cases_for_test"])


def test_run_case_rates_speedups_and_failures():
    def broken():
        raise RuntimeError("no kernel for this shape")

    case = KernelCase(name="fake", shape="n4", baseline="torch", flops=2e9, bytes=4e6, ceiling="tflops",
                      providers={"torch": lambda: (lambda: 2.0), "ours": lambda: (lambda: 1.0), "bad": broken})
    # A stub timer: each provider's call returns its own "ms", so the arithmetic is checked exactly.
    rows = kernels.run_case(case, {"tflops": 4.0, "bandwidth_gbs": 1000.0}, lambda fn: (fn(), fn() * 0.9, fn() * 1.1))
    by = {r["provider"]: r for r in rows}
    assert by["ours"]["tflops"] == pytest.approx(2.0) and by["ours"]["gbs"] == pytest.approx(4.0)
    assert by["ours"]["pct_ceiling"] == pytest.approx(50.0)
    assert by["ours"]["speedup"] == pytest.approx(2.0) and by["torch"]["speedup"] == pytest.approx(1.0)
    assert by["bad"]["status"] == "failed" and "no kernel for this shape" in by["bad"]["error"]
    text = kernels.family_table("fake", rows)
    assert "FAILED" in text and "2.00x" in text and "RuntimeError" in text


def test_family_that_cannot_build_is_a_failed_row():
    def build():
        raise ValueError("bad shapes")

    rows = kernels.family_rows("fake", build, {"tflops": 1.0, "bandwidth_gbs": 1.0}, lambda fn: (1.0, 1.0, 1.0))
    assert rows == [{"family": "fake", "status": "failed", "error": "ValueError: bad shapes"}]


def test_registry_refuses_a_duplicate_family(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", {})
    registry.register("dup")(lambda: [])
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("dup")(lambda: [])
    assert list(registry.families()) == ["dup"]


def test_format_table_aligns_columns():
    text = format_table("title", ["name", "ms"], [["a", "1.5"], ["longer", "12.25"]])
    lines = text.splitlines()
    assert lines[0] == "title" and set(lines[2]) == {"-"}
    assert lines[3] == "a         1.5" and lines[4] == "longer  12.25"
    assert quantiles([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((3.0, 1.8, 4.2))


def test_kernels_run_path_with_stub_gpu(tmp_path, monkeypatch, capsys):
    # Everything but the GPU itself: case discovery, --only, tables, JSON and the exit code.
    case = KernelCase(name="fake", shape="n4", baseline="torch", bytes=4e6,
                      providers={"torch": lambda: (lambda: 2.0), "ours": lambda: (lambda: 1.0)})
    monkeypatch.setattr(kernels.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "environment", lambda: {"gpu": "stub"})
    monkeypatch.setattr(kernels, "families", lambda: {"fake": lambda: [case], "other": lambda: []})
    monkeypatch.setattr(kernels, "do_bench_timer", lambda warmup, rep, timing: lambda fn: (fn(), fn(), fn()))
    monkeypatch.setattr(kernels, "measure_ceilings", lambda timer: {"tflops": 1.0, "bandwidth_gbs": 8.0,
                                                                    "copy_bytes": 1, "matmul_size": 1})
    assert main(["kernels", "--only", "nope"]) == 2
    out = tmp_path / "k.json"
    assert main(["kernels", "--only", "fake", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["kind"] == "kernels" and [r["provider"] for r in record["rows"]] == ["torch", "ours"]
    assert record["rows"][1]["pct_ceiling"] == pytest.approx(50.0)  # 4 GB/s of a measured 8
    assert "fake" in capsys.readouterr().out


def test_e2e_vae_tiny_writes_generator_and_vae_times(tmp_path, capsys):
    """`e2e --vae` on the CPU: the tiny generator and tiny VAE in one loop, unpatched and patched."""
    out = tmp_path / "e2e_vae.json"
    rc = main(["e2e", "--vae", "--preset-model", "tiny", "--blocks", "3", "--warmup-blocks", "1", "--dtype",
               "fp32", "--configs", "exact", "--vae-options", "cuda_graphs=false", "--json", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["kind"] == "e2e_vae" and record["settings"]["vae_options"]["cuda_graphs"] is False
    stock, exact = record["rows"]
    assert (stock["config"], stock["vae"], exact["config"], exact["vae"]) == ("stock", "reference", "exact", "patched")
    for r in (stock, exact):
        assert r["status"] == "ok" and len(r["block_ms"]) == len(r["vae_block_ms"]) == 3
        assert all(v > 0 for v in r["vae_block_ms"]) and r["ttff_ms"] == r["block_ms"][0]
        assert r["generator_block_ms"][1] == pytest.approx(r["block_ms"][1] - r["vae_block_ms"][1])
        assert r["ms_per_video_frame"] == pytest.approx(r["total_ms"] / 12) and r["first_block_cold_ms"] > 0
    assert stock["rel_l2_pixels_last"] == 0.0
    # in fp32 the exact preset and the patched VAE are the stock math up to summation order
    assert exact["rel_l2_pixels_first"] <= 1e-5 and exact["rel_l2_pixels_last"] <= 1e-5
    assert "generator + VAE decode in one loop" in capsys.readouterr().out
    assert main(["e2e", "--vae", "--preset-model", "tiny", "--vae-options", "frames_per_call=0"]) == 2
