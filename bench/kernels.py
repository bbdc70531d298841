"""`longlive-bench kernels`: time every provider of every registered kernel case the same way.

Case modules only register setups (bench/registry.py); this runner measures the GPU's ceilings in the
same run, times each provider with triton.testing.do_bench, and prints one table per family. A case
module is any `bench/kernels_<family>.py`: adding a benchmark is adding that one file.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Callable

import torch
import triton.testing

from .registry import KernelCase, families
from .results import environment, fmt, format_table, save

# A timer takes the zero-argument call and returns (median, p20, p80) in ms.
Timer = Callable[[Callable[[], object]], tuple[float, float, float]]


def case_modules() -> list[str]:
    """Every `kernels_<family>` module of this package, sorted."""
    package = __name__.rpartition(".")[0]
    return sorted(f"{package}.{m.name}" for m in pkgutil.iter_modules(sys.modules[package].__path__)
                  if m.name.startswith("kernels_"))


def load_case_modules(names: list[str] | None = None) -> None:
    """Import the case modules so they register their families; an error inside one surfaces."""
    for name in case_modules() if names is None else names:
        importlib.import_module(name)


def do_bench_timer(warmup_ms: float, rep_ms: float, timing: str = "graph") -> Timer:
    """Median and p20/p80 in ms. "graph" replays the call from a CUDA graph, so the figure is the
    GPU's time for the kernels alone (how the patched step runs once captured); "eager" launches
    from Python each time, so a launcher slower than its kernel shows up in the figure."""
    def timer(fn):
        if timing == "graph":
            fn()  # compile and autotune outside the capture
            return tuple(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
        return tuple(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
    return timer


def measure_ceilings(timer: Timer) -> dict:
    """What this GPU reaches now, measured rather than taken from a data sheet (the GPU is shared and noisy)."""
    n = 1 << 30  # 1 GiB each way: far past the L2 cache, so this is HBM bandwidth
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))[0]
    del src, dst
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    mm_ms = timer(lambda: a @ b)[0]
    return {"bandwidth_gbs": 2 * n / copy_ms / 1e6, "tflops": 2 * m ** 3 / mm_ms / 1e9,
            "copy_bytes": n, "matmul_size": m}


def _time_provider(setup, timer: Timer) -> tuple[float, float, float]:
    # A function of its own so the provider's inputs are freed before the next provider allocates its own.
    return timer(setup())


def run_case(case: KernelCase, ceilings: dict, timer: Timer) -> list[dict]:
    """One row per provider; a provider that raises becomes a failed row, the others still run."""
    kind = case.ceiling or ("tflops" if case.flops else "bandwidth" if case.bytes else None)
    if kind not in (None, "tflops", "bandwidth"):
        raise ValueError(f"case {case.name} {case.shape}: ceiling must be 'tflops' or 'bandwidth', got {kind!r}")
    rows = []
    for provider, setup in case.providers.items():
        row = {"family": case.name, "shape": case.shape, "provider": provider, "baseline": case.baseline,
               "ceiling": kind, "extra": case.extra}
        try:
            ms, p20, p80 = _time_provider(setup, timer)
        except Exception as e:  # noqa: BLE001 - a broken provider is a result to report, not a reason to stop
            row.update(status="failed", error=f"{type(e).__name__}: {e}")
            rows.append(row)
            continue
        tflops = case.flops / ms / 1e9 if case.flops else None
        gbs = case.bytes / ms / 1e6 if case.bytes else None
        achieved = {"tflops": (tflops, ceilings["tflops"]), "bandwidth": (gbs, ceilings["bandwidth_gbs"])}.get(kind)
        pct = 100 * achieved[0] / achieved[1] if achieved and achieved[0] is not None else None
        row.update(status="ok", ms=ms, p20_ms=p20, p80_ms=p80, tflops=tflops, gbs=gbs, pct_ceiling=pct)
        rows.append(row)
    base = next((r for r in rows if r["provider"] == case.baseline and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok":
            r["speedup"] = base["ms"] / r["ms"] if base else None
    return rows


def family_rows(name: str, build, ceilings: dict, timer: Timer) -> list[dict]:
    """Every case of one family; a family or case that cannot even be set up becomes a failed row."""
    def failed(e: Exception, **where) -> dict:
        return {"family": name, **where, "status": "failed", "error": f"{type(e).__name__}: {e}"}

    try:
        cases = build()
    except Exception as e:  # noqa: BLE001 - one broken family must not hide the others' results
        return [failed(e)]
    rows = []
    for case in cases:
        try:
            rows += run_case(case, ceilings, timer)
        except Exception as e:  # noqa: BLE001
            rows.append(failed(e, shape=case.shape))
    return rows


def family_table(name: str, rows: list[dict]) -> str:
    body, errors = [], []
    for r in rows:
        if r["status"] != "ok":
            body.append([r.get("shape", "-"), r.get("provider", "-"), "FAILED", "", "", "", "", ""])
            errors.append(f"  {r.get('shape', name)} / {r.get('provider', 'cases')}: {r['error']}")
            continue
        body.append([r["shape"], r["provider"], fmt(r["ms"], ".4f"), f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}",
                     fmt(r["tflops"], ".1f"), fmt(r["gbs"], ".0f"), fmt(r["pct_ceiling"], ".1f"),
                     fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else "")])
    baselines = sorted({r["baseline"] for r in rows if "baseline" in r})
    title = f"{name}  (speed-up vs {', '.join(baselines) or '-'})"
    table = format_table(title, ["shape", "provider", "ms", "p20-p80", "TFLOP/s", "GB/s", "% ceil", "speed-up"],
                         body, labels=2)
    return "\n".join([table] + errors)


def run(args) -> int:
    if not torch.cuda.is_available():
        print("kernels needs a CUDA GPU (none is visible here); `longlive-bench e2e` runs on the CPU", file=sys.stderr)
        return 2
    load_case_modules()
    registered = families()
    selected = args.only or list(registered)
    unknown = sorted(set(selected) - set(registered))
    if unknown:
        print(f"unknown kernel families {unknown}; registered: {sorted(registered)}", file=sys.stderr)
        return 2

    timer = do_bench_timer(args.warmup_ms, args.rep_ms, args.timing)
    # One 1 GiB copy or 8192^3 product has no launch overhead to hide, and graph replay of such a
    # copy measured a third below the eager figure: the ceilings are always timed eagerly.
    ceilings = measure_ceilings(do_bench_timer(args.warmup_ms, args.rep_ms, "eager"))
    print(f"ceilings measured now: copy {ceilings['bandwidth_gbs']:.0f} GB/s (read + write), "
          f"bf16 matmul {ceilings['matmul_size']}^3 {ceilings['tflops']:.0f} TFLOP/s")
    all_rows = []
    for name in selected:
        rows = family_rows(name, registered[name], ceilings, timer)
        print()
        print(family_table(name, rows))
        all_rows += rows

    record = {"kind": "kernels", "env": environment(),
              "settings": {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "timing": args.timing,
                           "only": args.only},
              "ceilings": ceilings, "rows": all_rows}
    save(record, args.json, args.append)
    return 1 if any(r["status"] != "ok" for r in all_rows) else 0
