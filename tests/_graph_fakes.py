"""A CPU stand-in for CudaGraphBackend (patches/graph_cache.py), shared by the graph-cache users' tests.

It emulates what a CUDA graph does to the program's state. Capture runs the call's Python once and
keeps it; a real capture executes no kernel, so the device tensors the call uses (`state()`: tensors,
and the tensors held in dicts) get their contents back. Replay runs the call again on the graph's
static inputs, writing into the captured output, with the host-side entries of state()'s dicts as
they were at capture (what a real graph freezes) and put back after (a replay runs no Python). So
replayed outputs are real numbers, and everything the cache and its users decide runs as on the GPU.
The backend logs what it is asked (streams, captures, replays).
"""
from __future__ import annotations

import contextlib

import torch


class FakeStream:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other: "FakeStream") -> None:
        self.log.append(f"{self.name} waits for {other.name}")


def _tensors(state: list) -> list[torch.Tensor]:
    items = [v for item in state for v in (item.values() if isinstance(item, dict) else [item])]
    return [t for t in items if isinstance(t, torch.Tensor)]


def _restore(dicts: list[dict], saved: list[dict]) -> None:
    for d, before in zip(dicts, saved):
        d.clear()
        d.update(before)


class FakeGraph:
    def __init__(self, forward, out: torch.Tensor, host: list[dict], at_capture: list[dict], log: list):
        self.forward, self.out, self.log = forward, out, log
        self.host, self.at_capture = host, at_capture  # state()'s dicts, and their entries at capture
        self.replays = 0

    def replay(self) -> None:
        self.log.append("replay")
        now = [dict(d) for d in self.host]
        _restore(self.host, self.at_capture)
        try:
            self.out.copy_(self.forward())
        finally:
            _restore(self.host, now)
        self.replays += 1


class FakeBackend:
    """CudaGraphBackend's calls on the CPU (module docstring)."""

    device_type = "cpu"

    def __init__(self, fail_capture: bool = False):
        self.fail_capture = fail_capture
        self.log: list[str] = []
        self.stream = FakeStream("side", self.log)
        self.pool = "pool"
        self.current = FakeStream("main", self.log)
        self.graphs: list[FakeGraph] = []

    def current_stream(self) -> FakeStream:
        return self.current

    @contextlib.contextmanager
    def on_stream(self, stream: FakeStream):
        before, self.current = self.current, stream
        self.log.append(f"on {stream.name}")
        try:
            yield
        finally:
            self.current = before
            self.log.append(f"back on {before.name}")

    def capture(self, forward, state):
        self.log.append(f"capture on {self.stream.name} into {self.pool}")
        held = state()
        host = [d for d in held if isinstance(d, dict)]
        at_capture = [dict(d) for d in host]
        tensors = _tensors(held)
        contents = [t.clone() for t in tensors]
        # The static inputs are not filled yet: what the call computes here is garbage, as on the GPU.
        out = forward()
        for t, before in zip(tensors, contents):
            t.copy_(before)
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        graph = FakeGraph(forward, out, host, at_capture, self.log)
        self.graphs.append(graph)
        return graph, out
