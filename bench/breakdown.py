"""Where one block's GPU time goes, by kind of work: self-attention, cross-attention, GEMMs, glue,
cache update, and the time the GPU sat idle.

`profile_block(run, model, annotate=True)` runs one block under the torch profiler (kineto) and
reads its trace: every GPU kernel is classified by its name and by the module it was launched from
(forward hooks open a `record_function` range per self-attention, cross-attention and FFN module
while annotating). Idle is the block's span minus the union of kernel intervals.

A replayed CUDA graph launches its kernels without passing through any module, so the split by
module needs an eager block (annotate=True, graphs off); the idle share that matters is that of the
block as it really runs (annotate=False, graphs as configured). `bench/e2e.py --profile` takes one
of each.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile, record_function

KINDS = ("self-attention", "cross-attention", "GEMMs", "cache update", "glue", "idle")
_GEMM = re.compile(r"gemm|cutlass|nvjet|xmma|sm90_|sm80_|cublas|_fp8_gemm|splitk|wgmma", re.I)
_ATTENTION = re.compile(r"fmha|flash|attention|attn|cudnn", re.I)
_CACHE = re.compile(r"kv_cache_plan|rope_kv_append|kv_quant_append", re.I)
_SCOPES = {"self_attn": "ll/self-attention", "cross_attn": "ll/cross-attention", "ffn": "ll/ffn"}


def classify(kernel: str, scope: str | None) -> str:
    """The kind of work of one kernel, given the module scope it was launched from (or None)."""
    if _CACHE.search(kernel):
        return "cache update"
    if _GEMM.search(kernel) and not _ATTENTION.search(kernel):
        return "GEMMs"
    if _ATTENTION.search(kernel):
        if scope == "ll/cross-attention":
            return "cross-attention"
        if scope == "ll/self-attention":
            return "self-attention"
        # A replayed graph has no scope: attention over 512 text keys is cross-attention, but the
        # kernel name cannot tell; the caller reads the split from an annotated eager block.
        return "self-attention"
    return "glue"


@contextmanager
def annotate_modules(model: nn.Module):
    """record_function ranges around every self-attention, cross-attention and FFN module."""
    handles = []

    def hooks(label: str):
        ranges = []

        def pre(module, args, kwargs=None):
            r = record_function(label)
            r.__enter__()
            ranges.append(r)

        def post(module, args, output, kwargs=None):
            ranges.pop().__exit__(None, None, None)

        return pre, post

    for name, module in model.named_modules():
        label = _SCOPES.get(name.rsplit(".", 1)[-1])
        if label is not None and "." in name:
            pre, post = hooks(label)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


def breakdown_from_trace(trace: dict, span_ms: float | None = None) -> dict:
    """{kind: ms} (plus "busy", "span" and "kernels") from a kineto chrome trace of one block."""
    events = trace.get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        raise ValueError("the trace holds no GPU kernels: was the block run on CUDA under the profiler?")
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    scopes = sorted(((e["ts"], e["ts"] + e["dur"], e["name"], e.get("tid")) for e in events
                     if e.get("cat") == "user_annotation" and e.get("name", "").startswith("ll/")),
                    key=lambda s: (s[0], -s[1]))
    out = {kind: 0.0 for kind in KINDS}
    for k in kernels:
        launch = launches.get(k.get("args", {}).get("correlation"))
        scope = None
        if launch is not None:
            # The innermost annotation of the launching thread that encloses the launch.
            for a, b, name, tid in scopes:
                if a <= launch["ts"] <= b and tid == launch.get("tid"):
                    scope = name
        out[classify(k["name"], scope)] += k["dur"] / 1e3
    busy = _union_ms([(k["ts"], k["ts"] + k["dur"]) for k in kernels])
    first = min(k["ts"] for k in kernels)
    last = max(k["ts"] + k["dur"] for k in kernels)
    span = (last - first) / 1e3 if span_ms is None else span_ms
    out["idle"] = max(0.0, span - busy)
    out.update(busy=busy, span=span, kernels=len(kernels))
    return out


def profile_block(run: Callable[[], None], model: nn.Module | None = None) -> dict:
    """Run one block (`run()`) under the profiler; with `model`, annotate its modules first."""
    if not torch.cuda.is_available():
        raise RuntimeError("the block breakdown profiles CUDA kernels: it needs a GPU")
    torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        ctx = annotate_modules(model) if model is not None else _null()
        with ctx, profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    return breakdown_from_trace(trace)


@contextmanager
def _null():
    yield


def format_breakdown(title: str, parts: dict) -> str:
    span = parts["span"]
    rows = [f"{title}: {span:.1f} ms span, {parts['kernels']} kernels"]
    for kind in KINDS:
        rows.append(f"  {kind:<16} {parts[kind]:8.2f} ms  {100 * parts[kind] / span:5.1f}%")
    return "\n".join(rows)
