"""Compact tables of a device run's VAE results, for the end of a log (tests/gpu/run_device.sh):

    python3 -m longlive_triton.bench.vae_summary vae.json vae_parity.json e2e_vae.json

Each file is optional and recognised by its content: `longlive-bench vae --json` (kind "vae"), the
figures tests/gpu/test_vae_gpu.py writes to $VAE_OUT, and `longlive-bench e2e --vae --json` (kind
"e2e_vae"). For every option of VAEDecoderOptions the first table also says what the run implies for
its default: the `patched` row (all defaults) against the row with that one option switched, same
run; a difference within 1% of the block time is called no difference.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .results import fmt, format_table

NOISE = 0.01  # relative difference in ms per block below which two variants count as equal


def _ok_rows(record: dict) -> dict[str, dict]:
    return {r["provider"]: r for r in record["rows"] if r.get("status") == "ok"}


def vae_table(record: dict, parity: dict | None) -> str:
    rows = _ok_rows(record)
    defaults = rows.get("patched")
    body = []
    for r in record["rows"]:
        if r.get("status") != "ok":
            body.append([r["provider"], "FAILED", "", "", "", "", r.get("error", "")[:60]])
            continue
        verdict = ""
        spec = r["provider"].removeprefix("patched, ")
        if defaults is not None and r["provider"].startswith("patched, ") and spec != "all-off" and "," not in spec:
            delta = (r["median_ms"] - defaults["median_ms"]) / defaults["median_ms"]
            parity_ok = None if parity is None else parity.get(f"patched_vs_unpatched_bf16_{spec}", {}).get("ok")
            if abs(delta) <= NOISE:
                verdict = "no difference: keep the default"
            elif delta < 0:
                verdict = f"faster: switch the default to {spec}" + ("" if parity_ok is not False else
                                                                      " (but bf16 parity failed)")
            else:
                verdict = "slower: keep the default"
        graphs = ((r.get("stream") or {}).get("graphs") or {}).get("replays")
        body.append([r["provider"], fmt(r["median_ms"], ".1f"), f"{r['speedup']:.2f}x",
                     "" if defaults is None else f"{r['median_ms'] / defaults['median_ms']:.3f}",
                     fmt(r["rel_l2"], ".2e"), "-" if graphs is None else str(graphs), verdict])
    headers = ["VAE provider", "ms/block", "vs reference", "vs patched", "rel L2", "replays", "default"]
    s = record["settings"]
    title = (f"VAE decode per block ({s['frames_per_block']} latent frames, {8 * s['latent_hw'][0]}x"
             f"{8 * s['latent_hw'][1]}, {s['dtype']}), defaults {s.get('default_options')}")
    return format_table(title, headers, body)


def parity_table(parity: dict) -> str:
    body = []
    for key, f in sorted(parity.items()):
        if not isinstance(f, dict):
            continue
        figure = next((f[k] for k in ("patched_bf16_vs_fp32", "patched_stream_bf16_vs_fp32", "rel_l2",
                                      "rel_l2_patched_stream", "rel_l2_whole") if k in f), None)
        ok = f.get("ok", f.get("bit_exact", all(f.get("blocks_equal", [True]))))
        body.append([key, fmt(figure, ".3e") if isinstance(figure, float) else "-", fmt(f.get("bound"), ".3e"),
                     "ok" if ok else "FAIL"])
    return format_table("VAE parity (tests/gpu/test_vae_gpu.py)", ["test", "figure", "bound", ""], body)


def e2e_table(record: dict) -> str:
    body = []
    for r in record["rows"]:
        if r.get("status") != "ok":
            body.append([r["config"], "FAILED"] + [""] * 7)
            continue
        body.append([r["config"], r["vae"], fmt(r["generator_ms"], ".1f"), fmt(r["vae_ms"], ".1f"),
                     fmt(r["total_ms"], ".1f"), fmt(r["ms_per_video_frame"], ".2f"), fmt(r["ttff_ms"], ".1f"),
                     f"{r['speedup']:.2f}x", fmt(r.get("rel_l2_pixels_last"), ".2e")])
    headers = ["generator", "VAE", "gen ms", "VAE ms", "total ms/block", "ms/frame", "TTFF ms", "speed-up",
               "rel L2 pixels"]
    return format_table("end to end, generator + VAE per block (e2e --vae)", headers, body, labels=2)


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    records = {p: json.loads(p.read_text()) for p in paths if p.is_file() and p.stat().st_size}
    bench = next((r for r in records.values() if r.get("kind") == "vae"), None)
    e2e = next((r for r in records.values() if r.get("kind") == "e2e_vae"), None)
    parity = next((r for r in records.values() if "kind" not in r), None)
    for p in paths:
        if p not in records:
            print(f"vae_summary: {p} is missing or empty")
    if bench is not None:
        print(vae_table(bench, parity))
    if parity is not None:
        print(parity_table(parity))
    if e2e is not None:
        print(e2e_table(e2e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
