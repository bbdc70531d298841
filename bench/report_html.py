"""The time-budget report: an e2e JSON document (`longlive-bench e2e --json`) as one self-contained HTML page.

    longlive-bench e2e --configs exact fastest --profile --switch-block 10 --html report.html
    longlive-bench report e2e.json --html report.html       # any saved run, old ones included

Charts are inline SVG written here (no script, no network). The renderer reads what the document
holds rather than a fixed schema, so rows from other e2e modes render too:

- the split of a block, one stacked bar per row and profile: every number of each dict under a
  row's `breakdown` (`--profile`: self-attention, cross-attention, GEMMs, cache update, glue, idle),
  plus the row's `vae_ms` as VAE when it has one; a row with `generator_ms` and `vae_ms` and no
  profile (`--vae`) gets a generator/VAE bar;
- per-block times: one line chart per list field ending in `block_ms` (`block_ms`,
  `generator_block_ms`, `vae_block_ms`, ...), one line per row, the blocks before the KV window is
  full shaded and the prompt-switch block marked;
- drift per block: one line chart per `drift_vs_<ref>` dict (its `rel_l2` list);
- a table of every scalar field of every row, and the run's settings and environment.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

__all__ = ["render", "render_file", "load_records"]

_META_KEYS = {"busy", "span", "kernels"}
_KIND_COLORS = {"self-attention": "#4e79a7", "cross-attention": "#76b7b2", "GEMMs": "#f28e2b",
                "cache update": "#59a14f", "glue": "#edc948", "idle": "#bab0ac", "VAE": "#b07aa1",
                "generator": "#4e79a7"}
_SERIES_COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7",
                  "#9c755f", "#bab0ac"]
_EXTRA_COLORS = ["#8cd17d", "#d37295", "#fabfd2", "#a0cbe8", "#ffbe7d"]
_W, _LEFT, _RIGHT, _TOP, _BOTTOM = 760, 64, 180, 16, 40


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [i * step for i in range(first, last + 1)]


def _kind_color(kind: str, extra: dict) -> str:
    if kind in _KIND_COLORS:
        return _KIND_COLORS[kind]
    return extra.setdefault(kind, _EXTRA_COLORS[len(extra) % len(_EXTRA_COLORS)])


# -- the split of a block -----------------------------------------------------------------------------

def block_splits(row: dict) -> list[tuple[str, list[tuple[str, float]]]]:
    """(bar label, [(kind, ms), ...]) for each split this row holds."""
    bars = []
    for name, parts in (row.get("breakdown") or {}).items():
        if not isinstance(parts, dict):
            continue
        segments = [(k, float(v)) for k, v in parts.items() if k not in _META_KEYS and _num(v)]
        if _num(row.get("vae_ms")):
            segments.append(("VAE", float(row["vae_ms"])))
        if segments:
            bars.append((f"{row.get('config', '?')} ({name.replace('_', ' ')})", segments))
    if not bars and _num(row.get("generator_ms")) and _num(row.get("vae_ms")):
        bars.append((str(row.get("config", "?")), [("generator", float(row["generator_ms"])),
                                                   ("VAE", float(row["vae_ms"]))]))
    return bars


def split_chart(rows: list[dict]) -> str:
    bars = [bar for row in rows if row.get("status", "ok") == "ok" for bar in block_splits(row)]
    if not bars:
        return ("<p class='note'>No split of the block in this run: <code>--profile</code> (on a GPU) splits it by "
                "kind of work, <code>--vae</code> adds the VAE.</p>")
    extra: dict = {}
    ticks = _ticks(0, max(sum(ms for _, ms in segs) for _, segs in bars))
    total = ticks[-1]
    bar_h, gap = 22, 10
    left = 250
    height = _TOP + len(bars) * (bar_h + gap) + _BOTTOM
    scale = (_W - left - 90) / total
    out = [f"<svg class='chart' data-chart='split' width='{_W}' height='{height}' role='img' "
           f"aria-label='split of a block by kind of work'>"]
    for x in ticks:
        px = left + x * scale
        out.append(f"<line class='grid' x1='{px:.1f}' x2='{px:.1f}' y1='{_TOP}' y2='{height - _BOTTOM}'/>"
                   f"<text class='tick' x='{px:.1f}' y='{height - _BOTTOM + 14}' text-anchor='middle'>{_fmt(x)}</text>")
    out.append(f"<text class='axis' x='{left + (_W - left - 90) / 2:.0f}' y='{height - 6}' text-anchor='middle'>"
               f"ms per block</text>")
    for i, (label, segs) in enumerate(bars):
        y = _TOP + i * (bar_h + gap)
        out.append(f"<text class='bar-label' x='{left - 8}' y='{y + bar_h * 0.7:.1f}' text-anchor='end'>"
                   f"{_esc(label)}</text>")
        x = float(left)
        for kind, ms in segs:
            w = ms * scale
            out.append(f"<rect class='segment' data-kind='{_esc(kind)}' data-ms='{ms:.3f}' x='{x:.2f}' y='{y}' "
                       f"width='{w:.2f}' height='{bar_h}' fill='{_kind_color(kind, extra)}'>"
                       f"<title>{_esc(label)}: {_esc(kind)} {ms:.2f} ms</title></rect>")
            x += w
        out.append(f"<text class='bar-total' x='{x + 6:.1f}' y='{y + bar_h * 0.7:.1f}'>"
                   f"{sum(ms for _, ms in segs):.1f} ms</text>")
    out.append("</svg>")
    kinds = list(dict.fromkeys(kind for _, segs in bars for kind, _ in segs))
    legend = "".join(f"<span class='key'><i style='background:{_kind_color(k, extra)}'></i>{_esc(k)}</span>"
                     for k in kinds)
    return "".join(out) + f"<div class='legend'>{legend}</div>"


# -- line charts ----------------------------------------------------------------------------------------

def line_chart(name: str, series: dict[str, list[float]], y_label: str, *, colors: dict[str, str],
               shade_until: int | None = None, marks: tuple[tuple[int, str], ...] = ()) -> str:
    """One line per series over the block index (colors[label]); blocks < shade_until shaded; (block, label) marks."""
    n = max(len(v) for v in series.values())
    values = [y for v in series.values() for y in v if _num(y)]
    lo, hi = min(0.0, min(values)), max(values)
    yt = _ticks(lo, hi)
    lo, hi = min(yt[0], lo), max(yt[-1], hi)
    height = 260
    pw, ph = _W - _LEFT - _RIGHT, height - _TOP - _BOTTOM

    def px(i: float) -> float:
        return _LEFT + (i / max(n - 1, 1)) * pw

    def py(y: float) -> float:
        return _TOP + ph - (y - lo) / ((hi - lo) or 1.0) * ph

    out = [f"<svg class='chart' data-chart='{_esc(name)}' width='{_W}' height='{height}' role='img' "
           f"aria-label='{_esc(name)} per block'>"]
    if shade_until:
        w = px(min(shade_until, n - 1) - 0.5) - px(0) if shade_until < n else pw
        out.append(f"<rect class='window-filling' x='{_LEFT}' y='{_TOP}' width='{max(w, 0):.1f}' height='{ph}'>"
                   f"<title>blocks 0..{shade_until - 1}: the KV window is filling</title></rect>"
                   f"<text class='shade-label' x='{_LEFT + 4}' y='{_TOP + 12}'>window filling</text>")
    for y in yt:
        out.append(f"<line class='grid' x1='{_LEFT}' x2='{_LEFT + pw}' y1='{py(y):.1f}' y2='{py(y):.1f}'/>"
                   f"<text class='tick' x='{_LEFT - 6}' y='{py(y) + 4:.1f}' text-anchor='end'>{_fmt(y)}</text>")
    for i in range(n):
        if n <= 24 or i % math.ceil(n / 24) == 0:
            out.append(f"<text class='tick' x='{px(i):.1f}' y='{_TOP + ph + 14}' text-anchor='middle'>{i}</text>")
    out.append(f"<text class='axis' x='{_LEFT + pw / 2:.0f}' y='{height - 6}' text-anchor='middle'>block</text>"
               f"<text class='axis' transform='translate(14 {_TOP + ph / 2:.0f}) rotate(-90)' "
               f"text-anchor='middle'>{_esc(y_label)}</text>")
    for block, label in marks:
        if 0 <= block < n:
            out.append(f"<line class='switch-mark' x1='{px(block):.1f}' x2='{px(block):.1f}' y1='{_TOP}' "
                       f"y2='{_TOP + ph}'/><text class='mark-label' x='{px(block) + 4:.1f}' y='{_TOP + 24}'>"
                       f"{_esc(label)}</text>")
    for k, (label, ys) in enumerate(series.items()):
        color = colors[label]
        points = [(px(i), py(y)) for i, y in enumerate(ys) if _num(y)]
        d = " ".join(f"{'M' if j == 0 else 'L'}{x:.1f},{y:.1f}" for j, (x, y) in enumerate(points))
        out.append(f"<path class='series' data-series='{_esc(label)}' d='{d}' stroke='{color}'/>")
        out += [f"<circle class='point' cx='{x:.1f}' cy='{y:.1f}' r='2.5' fill='{color}'/>" for x, y in points]
        out.append(f"<text class='series-label' x='{_LEFT + pw + 10}' y='{_TOP + 14 + 16 * k}' fill='{color}'>"
                   f"{_esc(label)}</text>")
    out.append("</svg>")
    return "".join(out)


def row_colors(rows: list[dict]) -> dict[str, str]:
    """One color per row (config), the same in every chart."""
    names = list(dict.fromkeys(str(r.get("config", "?")) for r in rows))
    return {name: _SERIES_COLORS[i % len(_SERIES_COLORS)] for i, name in enumerate(names)}


def block_time_charts(rows: list[dict], settings: dict) -> str:
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    fields = list(dict.fromkeys(k for r in ok for k, v in r.items()
                                if k.endswith("block_ms") and isinstance(v, list) and any(_num(x) for x in v)))
    steady = settings.get("steady_start")
    if steady is None and _num(settings.get("local_attn_size")) and _num(settings.get("frames_per_block")):
        steady = math.ceil(settings["local_attn_size"] / settings["frames_per_block"])
    switch = settings.get("switch_block")
    marks = ((switch, "prompt switch"),) if isinstance(switch, int) else ()
    parts = []
    for field in fields:
        series = {str(r.get("config", "?")): r[field] for r in ok if isinstance(r.get(field), list)}
        parts.append(f"<h3>{_esc(field)}</h3>" + line_chart(field, series, "ms", colors=row_colors(rows),
                                                                 shade_until=steady, marks=marks))
    return "".join(parts) or "<p class='note'>No per-block times in this document.</p>"


def drift_charts(rows: list[dict], settings: dict) -> str:
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    refs = list(dict.fromkeys(k for r in ok for k, v in r.items() if k.startswith("drift_vs_") and isinstance(v, dict)))
    switch = settings.get("switch_block")
    marks = ((switch, "prompt switch"),) if isinstance(switch, int) else ()
    parts = []
    for ref in refs:
        series = {str(r.get("config", "?")): r[ref]["rel_l2"] for r in ok
                  if isinstance(r.get(ref), dict) and isinstance(r[ref].get("rel_l2"), list)
                  and r.get("config") != ref.removeprefix("drift_vs_")}
        if series:
            parts.append(f"<h3>relative L2 of each block's latents against the {_esc(ref.removeprefix('drift_vs_'))} "
                         f"row</h3>" + line_chart(ref, series, "relative L2", colors=row_colors(rows), marks=marks))
    return "".join(parts) or "<p class='note'>No per-block drift in this document.</p>"


# -- tables and the page --------------------------------------------------------------------------------

def _table(header: list[str], body: list[list], cls: str) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(c))}</td>" for c in r) + "</tr>" for r in body)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def rows_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items()
                              if v is None or isinstance(v, (str, int, float, bool))))
    body = [["" if r.get(k) is None else r.get(k) for k in keys] for r in rows]
    return f"<div class='scroll'>{_table(keys, body, 'rows')}</div>"


def render(record: dict) -> str:
    """The HTML page of one e2e document (a dict with `rows`, and usually `settings` and `env`)."""
    rows, settings, env = record.get("rows") or [], record.get("settings") or {}, record.get("env") or {}
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("not an e2e document: 'rows' must be a list of objects")
    kind = record.get("kind", "e2e")
    flat = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in settings.items()}
    where = env.get("gpu") or settings.get("device", "?")
    title = f"longlive-bench {kind}: {settings.get('preset_model', '')} on {where}"
    body = [f"<h1>{_esc(title)}</h1>",
            f"<p class='env'>{_esc(', '.join(f'{k} {v}' for k, v in env.items() if v is not None))}</p>",
            "<h2>Where a block's time goes</h2>", split_chart(rows),
            "<h2>Time per block</h2>", block_time_charts(rows, settings),
            "<h2>Drift per block</h2>", drift_charts(rows, settings),
            "<h2>Rows</h2>", rows_table(rows),
            "<h2>Settings</h2>", _table(["setting", "value"], [[k, v] for k, v in flat.items()], "settings")]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1000px; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 17px; margin-top: 28px; }} h3 {{ font-size: 14px; margin: 14px 0 4px; }}
.env, .note {{ color: #555; }}
svg.chart {{ display: block; font-size: 11px; }}
.grid {{ stroke: #e4e4e4; }} .tick, .axis {{ fill: #555; }}
.series {{ fill: none; stroke-width: 2; }}
.window-filling {{ fill: #f2f2f2; }} .shade-label {{ fill: #888; }}
.switch-mark {{ stroke: #d62728; stroke-dasharray: 4 3; stroke-width: 1.5; }} .mark-label {{ fill: #d62728; }}
.legend {{ margin: 4px 0 0 250px; }} .key {{ margin-right: 14px; white-space: nowrap; }}
.key i {{ display: inline-block; width: 11px; height: 11px; margin-right: 4px; vertical-align: -1px; }}
.scroll {{ overflow-x: auto; }}
table {{ border-collapse: collapse; font-size: 12px; margin-top: 6px; }}
td, th {{ border: 1px solid #ddd; padding: 3px 6px; text-align: left; }} th {{ background: #f6f6f6; }}
</style></head>
<body>
{''.join(body)}
</body></html>
"""


def load_records(path: str | Path) -> list[dict]:
    """The documents of a file: one JSON document (--json), or one per line (an --append log)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
        return [doc] if isinstance(doc, dict) else list(doc)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def render_file(json_path: str | Path, html_path: str | Path) -> Path:
    """Render the last document of `json_path` (the newest run of a log) to `html_path`."""
    records = load_records(json_path)
    if not records:
        raise ValueError(f"{json_path}: no e2e document in it")
    out = Path(html_path)
    out.write_text(render(records[-1]), encoding="utf-8")
    return out
