"""`longlive-bench e2e --model stock` on the CPU (tiny preset, Triton's interpreter): the stock
LongLive class unpatched and patched, Wan's list context, a 12-frame cache against one sized to the
window, prompt switches, and the per-block record. Needs LONGLIVE_SRC (a LongLive v1.0 checkout)."""
import json
import os
from pathlib import Path

import pytest

from longlive_triton.bench.cli import main

_SRC = os.environ.get("LONGLIVE_SRC", "")
pytestmark = pytest.mark.skipif(not _SRC or not Path(_SRC).is_dir(),
                                reason="LONGLIVE_SRC is not set to a LongLive v1.0 checkout")


def test_stock_bench_window9_in_a_12_frame_cache(tmp_path, capsys):
    out = tmp_path / "stock.json"
    # window9 without the fused glue: fewer kernels for the interpreter, the same window and cache logic.
    rc = main(["e2e", "--model", "stock", "--stock-src", _SRC, "--preset-model", "tiny", "--blocks", "4",
               "--warmup-blocks", "2", "--switch-every", "2", "--configs", "window9,fused_glue=false",
               "--context", "list", "--cache-frames", "12", "window", "--json", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["kind"] == "e2e-stock" and record["settings"]["context"] == "list"
    assert record["settings"]["switch_blocks"] == [2]
    rows = record["rows"]
    w9 = "window9,fused_glue=false"
    assert [(r["config"], r["cache_frames"]) for r in rows] == [("stock", 12), (w9, 12), (w9, 9)]
    fs = 8  # tiny: 8 tokens per latent frame
    assert [r["kv_cache_slots"] for r in rows] == [12 * fs, 12 * fs, 9 * fs]
    assert [r["window_frames"] for r in rows] == [None, 9, 9]
    for r in rows:
        assert r["status"] == "ok" and len(r["block_ms"]) == 4 and len(r["drift_rel_l2"]) == 4
        assert r["worst_block"] == 3 and r["mem_allocated"] is None and r["graphs"] is None  # CPU; block 2 switches
        assert list(r["switch_block_ms"]) == ["2"]
    assert rows[0]["drift_rel_l2"] == [0.0] * 4
    # window9 equals the stock model until its 9-frame window drops a frame (block 3), then drifts
    # from it; the cache size does not change what it computes.
    assert rows[1]["drift_rel_l2"][:3] == pytest.approx([0.0] * 3, abs=1e-2) and rows[1]["drift_rel_l2"][3] > 5e-3
    assert rows[1]["drift_rel_l2"] == pytest.approx(rows[2]["drift_rel_l2"], abs=1e-2)
    printed = capsys.readouterr().out
    assert "worst steady block ms" in printed and "a cache larger than the window against one sized to it" in printed


def test_stock_bench_needs_the_stock_source(tmp_path, capsys):
    assert main(["e2e", "--model", "stock", "--stock-src", str(tmp_path), "--preset-model", "tiny"]) == 2
    assert "is not a LongLive v1.0 tree" in capsys.readouterr().err


def test_stock_bench_cold_start_table_and_warmup(tmp_path, capsys):
    """--warmup-shapes warms each model before its first block (timed apart); the cold-start table gives
    the first block and every switch block against the steady median and the later switches."""
    out = tmp_path / "cold.json"
    rc = main(["e2e", "--model", "stock", "--stock-src", _SRC, "--preset-model", "tiny", "--blocks", "7",
               "--switch-every", "2", "--configs", "none", "--warmup-shapes", "--json", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["settings"]["warmup_shapes"] is True and record["settings"]["switch_blocks"] == [2, 4, 6]
    row = record["rows"][0]
    assert row["warmup_s"] > 0 and list(row["switch_block_ms"]) == ["2", "4", "6"]
    printed = capsys.readouterr().out
    assert "cold start: first block and prompt switches" in printed and "warm-up: 6 blocks" in printed
    line = next(ln for ln in printed.splitlines() if ln.startswith("stock") and " / " in ln)
    assert len(line.split(" / ")) == 3  # the three switch blocks, in order


def test_warmup_shapes_needs_the_stock_model(capsys):
    assert main(["e2e", "--warmup-shapes", "--preset-model", "tiny"]) == 2
    assert "--warmup-shapes need --model stock" in capsys.readouterr().err
