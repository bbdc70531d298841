"""The one CUDA-graph cache: calls by key, warmed up, captured, replayed, evicted; every eager call counted.

    cache = GraphCache(CudaGraphBackend(device), max_graphs=16, what="the generator's forward", fix="...")
    out = cache.run(key, (x, t), warm_up=lambda: f(x, t), capture=f, state=lambda: caches)

A key's first call runs `warm_up()` eagerly on the backend's side stream; its second is captured
there as `capture(*static_inputs)` and replayed; later calls copy their inputs into the static ones
and replay. Each call returns a copy of the graph's output. At most `max_graphs` graphs are held
(least recently used evicted) and 4 warmed-up keys per graph. `stats` counts eager calls by reason,
captures, replays and evictions. Users: the generator runner (longlive_triton/runtime/graphs.py)
and the VAE chunk graphs (patches/vae_graphs.py); the keys and what they copy are theirs.
It lives in patches/ because both import it and imports point down (kernels <- patches <-
longlive_triton): the VAE patch may not import the runtime, and kernels know no modules.
Keys, warm-up, memory pools, stand-in backends: docs/graph-keys.md.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

__all__ = ["GraphCache", "GraphStats", "CudaGraphBackend", "WARM_UP"]

WARM_UP = "first call of its kind (warm-up)"
# Keys seen once (their warm-up ran) but not captured yet: at most this many per graph held.
_SEEN_PER_GRAPH = 4


class CudaGraphBackend:
    """The torch.cuda calls of a GraphCache, in one place so that CPU tests can stand in for them: a side
    stream for warm-ups and captures, and one memory pool that the graphs of every cache using this
    backend share (they must never replay concurrently)."""

    device_type = "cuda"

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def on_stream(self, stream: torch.cuda.Stream):
        return torch.cuda.stream(stream)

    def capture(self, forward: Callable[[], torch.Tensor], state: Callable[[], list]):
        """(graph, forward's output, which every replay rewrites in place). A real capture executes no
        kernel and needs no `state`; a stand-in that runs forward puts back what state() holds."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = forward()
        return graph, out


@dataclass
class GraphStats:
    eager: int = 0
    captures: int = 0
    replays: int = 0
    evicted: int = 0
    eager_reasons: dict[str, int] = field(default_factory=dict)

    def note_eager(self, reason: str) -> None:
        self.eager += 1
        self.eager_reasons[reason] = self.eager_reasons.get(reason, 0) + 1


@dataclass
class _Graph:
    graph: object
    inputs: tuple[torch.Tensor, ...]
    out: torch.Tensor


def _static_like(x: torch.Tensor) -> torch.Tensor:
    """The tensor a graph reads in x's place: x's own strides, so the graph runs the kernels its warm-up
    ran; an expanded x (elements sharing memory) cannot be written in place and gets a dense layout."""
    if any(s == 0 and n > 1 for n, s in zip(x.shape, x.stride())):
        return torch.empty_like(x)
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


class GraphCache:
    """Graphs by key (module docstring). `what` names the call and `fix` says how to do without graphs,
    both for the errors."""

    def __init__(self, backend, max_graphs: int, *, what: str, fix: str):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.backend = backend
        self.max_graphs = max_graphs
        self.what, self.fix = what, fix
        self.graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self.seen: OrderedDict[Hashable, None] = OrderedDict()  # warmed up, not captured
        self.stats = GraphStats()

    def clear(self) -> None:
        """Drop every graph and warmed-up key (the pool's memory goes once nothing else holds it)."""
        self.graphs.clear()
        self.seen.clear()

    def run(self, key: Hashable, inputs: Sequence[torch.Tensor], *, warm_up: Callable[[], torch.Tensor],
            capture: Callable[..., torch.Tensor], state: Callable[[], list],
            before_replay: Callable[[], None] | None = None,
            key_after: Callable[[], Hashable] | None = None) -> torch.Tensor:
        """The call's output, from a graph once its key has been warmed up.

        warm_up(): the call itself; capture(*static_inputs): the same call reading the static inputs;
        state(): what the call uses besides its inputs (for stand-in backends); before_replay(): what
        the call's Python does on the host that a replay (which runs none) must still do; key_after():
        the key as the call leaves it, for calls that may reallocate what their key names: a warm-up
        warms that key, and a capture that moves it is refused (its graph would hold freed memory)."""
        entry = self.graphs.get(key)
        if entry is None and key not in self.seen:
            self.stats.note_eager(WARM_UP)
            out = self._warm_up(warm_up)
            self._remember(key if key_after is None else key_after())
            return out
        if entry is None:
            entry = self._capture(key, inputs, capture, state, key_after)
        else:
            self.graphs.move_to_end(key)
        for static, x in zip(entry.inputs, inputs):
            static.copy_(x)
        if before_replay is not None:
            before_replay()
        entry.graph.replay()
        self.stats.replays += 1
        return entry.out.clone()

    def _warm_up(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """fn() on the side stream, where capture happens: Triton autotuning, cuDNN planning and the
        allocations a capture would otherwise make are done there first."""
        main, side = self.backend.current_stream(), self.backend.stream
        side.wait_stream(main)
        with self.backend.on_stream(side):
            out = fn()
        main.wait_stream(side)
        return out

    def _remember(self, key: Hashable) -> None:
        self.seen[key] = None
        while len(self.seen) > _SEEN_PER_GRAPH * self.max_graphs:
            self.seen.popitem(last=False)

    def _capture(self, key, inputs, capture, state, key_after) -> _Graph:
        static = tuple(_static_like(x) for x in inputs)
        self.backend.stream.wait_stream(self.backend.current_stream())
        try:
            graph, out = self.backend.capture(lambda: capture(*static), state)
        except RuntimeError as e:
            raise RuntimeError(f"capturing {self.what} in a CUDA graph failed ({e}); {self.fix}") from e
        if key_after is not None and key_after() != key:
            raise RuntimeError(f"a buffer of {self.what} was reallocated during graph capture; the captured call "
                               f"would replay on freed memory ({self.fix})")
        entry = _Graph(graph, static, out)
        self.graphs[key] = entry
        self.stats.captures += 1
        while len(self.graphs) > self.max_graphs:
            old, _ = self.graphs.popitem(last=False)
            self.seen.pop(old, None)
            self.stats.evicted += 1
        return entry
