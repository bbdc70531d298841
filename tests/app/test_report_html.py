"""The HTML time-budget report (bench/report_html.py): charts from e2e documents of every shape, in a browser."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from longlive_triton.bench.cli import main
from longlive_triton.bench.report_html import render

KINDS = {"self-attention": 150.0, "cross-attention": 5.0, "GEMMs": 78.0, "cache update": 4.5, "glue": 28.0,
         "idle": 6.0}


def _profiled_doc() -> dict:
    """An e2e --profile document as bench/e2e.py writes it (breakdown_from_trace's dicts), plus a VAE time."""
    rows = []
    for i, config in enumerate(["stock", "exact", "fastest"]):
        as_run = {k: v * (1 - 0.2 * i) for k, v in KINDS.items()}
        as_run.update(busy=sum(as_run.values()) - as_run["idle"], span=sum(as_run.values()), kernels=9000)
        rows.append({"config": config, "status": "ok", "median_ms": 400.0 - 80 * i, "vae_ms": 142.0,
                     "block_ms": [900.0 - 50 * b - 60 * i for b in range(8)],
                     "vae_block_ms": [150.0 - b for b in range(8)],
                     "breakdown": {"eager_annotated": dict(as_run, idle=40.0), "as_run": as_run, "graphs": True},
                     "drift_vs_stock": {"rel_l2": [0.0065 * i + 0.001 * b for b in range(8)], "rel_l2_all": 0.01}})
    rows.append({"config": "tome", "status": "failed", "error": "RuntimeError: <bad> & broken"})
    return {"kind": "e2e", "env": {"gpu": "NVIDIA H200", "torch": "2.11"},
            "settings": {"preset_model": "longlive-1.3b", "steady_start": 4, "switch_block": 6,
                         "configs": ["exact", "fastest", "tome"]}, "rows": rows}


def _svg(page: str, chart: str) -> ET.Element:
    start = page.index(f"<svg class='chart' data-chart='{chart}'")
    return ET.fromstring(page[start:page.index("</svg>", start) + len("</svg>")])


def test_stacked_bars_lines_and_marks_follow_the_numbers():
    page = render(_profiled_doc())
    split = _svg(page, "split")
    bars = {}
    for rect in split.iter("rect"):
        assert rect.get("class") == "segment"
        bars.setdefault(rect.get("y"), []).append((rect.get("data-kind"), float(rect.get("width")),
                                                   float(rect.get("data-ms"))))
    assert len(bars) == 6  # 3 rows x (eager annotated, as run)
    segments = [(w, ms) for segs in bars.values() for _, w, ms in segs]
    scale = segments[0][0] / segments[0][1]
    assert all(w == pytest.approx(ms * scale, abs=0.01) for w, ms in segments)  # one ms axis for every bar
    kinds = [k for k, _, _ in next(iter(bars.values()))]
    assert kinds == list(KINDS) + ["VAE"]  # busy, span and kernels are not segments
    exact_as_run = [segs for segs in bars.values() if segs[0][2] == pytest.approx(150.0 * 0.8)][1]
    assert dict((k, ms) for k, _, ms in exact_as_run)["VAE"] == 142.0

    blocks = _svg(page, "block_ms")
    paths = [p for p in blocks.iter("path") if p.get("class") == "series"]
    assert [p.get("data-series") for p in paths] == ["stock", "exact", "fastest"]  # the failed row has no line
    assert all(p.get("d").count("L") == 7 for p in paths)  # 8 blocks
    shade = next(r for r in blocks.iter("rect") if r.get("class") == "window-filling")
    switch = next(line for line in blocks.iter("line") if line.get("class") == "switch-mark")
    xs = [float(c.get("cx")) for c in blocks.iter("circle")][:8]
    assert float(shade.get("width")) == pytest.approx((xs[3] + xs[4]) / 2 - xs[0])  # blocks 0..3 filling
    assert float(switch.get("x1")) == pytest.approx(xs[6])
    # Lower times sit lower... higher on the screen: y grows downwards.
    ys = [float(c.get("cy")) for c in blocks.iter("circle")][:8]
    assert ys == sorted(ys)

    assert _svg(page, "vae_block_ms") is not None
    drift = _svg(page, "drift_vs_stock")
    assert [p.get("data-series") for p in drift.iter("path")] == ["exact", "fastest"]  # not stock against itself
    assert "RuntimeError: &lt;bad&gt; &amp; broken" in page  # escaped, in the rows table
    assert "http" not in page.replace("http-equiv", "") and "<script" not in page  # self-contained


def test_other_document_shapes_render():
    """An `e2e --vae` document (generator and VAE per block, no profile) and a run without any split."""
    vae_doc = {"kind": "e2e_vae", "settings": {"warmup_blocks": 4, "local_attn_size": 12, "frames_per_block": 3},
               "rows": [{"config": "exact", "status": "ok", "generator_ms": 286.0, "vae_ms": 142.0,
                         "block_ms": [430.0] * 6, "generator_block_ms": [288.0] * 6, "vae_block_ms": [142.0] * 6}]}
    page = render(vae_doc)
    split = _svg(page, "split")
    assert [(r.get("data-kind"), r.get("data-ms")) for r in split.iter("rect")] == [("generator", "286.000"),
                                                                                   ("VAE", "142.000")]
    for chart in ("block_ms", "generator_block_ms", "vae_block_ms"):
        assert _svg(page, chart).find("path") is not None
    shade = next(r for r in _svg(page, "block_ms").iter("rect") if r.get("class") == "window-filling")
    assert float(shade.get("width")) > 0  # 12 / 3 = 4 blocks filling, from the settings
    bare = render({"rows": [{"config": "stock", "status": "ok", "median_ms": 3.0}]})
    assert "No split of the block in this run" in bare and "No per-block times" in bare
    with pytest.raises(ValueError, match="not an e2e document"):
        render({"rows": "nope"})


def test_e2e_html_and_report_command(tmp_path, capsys):
    html = tmp_path / "report.html"
    rc = main(["e2e", "--preset-model", "tiny", "--blocks", "6", "--warmup-blocks", "4", "--dtype", "fp32",
               "--configs", "exact", "--switch-block", "4", "--html", str(html)])
    assert rc == 0
    doc = json.loads((tmp_path / "report.json").read_text())  # the JSON beside the page
    page = html.read_text()
    assert [p.get("data-series") for p in _svg(page, "block_ms").iter("path")] == ["stock", "exact"]
    assert _svg(page, "block_ms").find(".//line[@class='switch-mark']") is not None
    assert f"{doc['rows'][1]['median_ms']:.4g}" in page

    again = tmp_path / "again.html"
    assert main(["report", str(tmp_path / "report.json"), "--html", str(again)]) == 0
    assert again.read_text() == page
    assert main(["report", str(tmp_path / "missing.json"), "--html", str(again)]) == 2
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["report", str(tmp_path / "bad.json"), "--html", str(again)]) == 2
    assert "bad.json" in capsys.readouterr().err


@pytest.mark.browser
def test_report_renders_in_chromium(browser, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render(_profiled_doc()))
    browser.get(page.as_uri())
    sizes = browser.execute_script("""
        const box = (q) => [...document.querySelectorAll(q)].map(e => e.getBBox());
        return {segments: box("svg[data-chart=split] rect.segment").filter(b => b.width > 0 && b.height > 0).length,
                lines: box("svg[data-chart=block_ms] path.series").filter(b => b.width > 0).length,
                drift: box("svg[data-chart=drift_vs_stock] path.series").length,
                marks: box("line.switch-mark").length, shade: box("rect.window-filling")[0].width,
                width: document.querySelector("svg[data-chart=split]").getBoundingClientRect().width};""")
    assert sizes == {"segments": 42, "lines": 3, "drift": 2, "marks": 3, "shade": pytest.approx(sizes["shade"]),
                     "width": 760}
    assert sizes["shade"] > 100
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000
