"""CUDA graphs for the fast VAE decoder: each steady-state decoder call captured once, then replayed.

A streaming decode calls the decoder with the same work again and again: one latent frame (the
stock loop) or one block of frames per call, through the same per-stream buffers (the time-padded
convolution inputs whose first frames are the causal cache, written in place). Once those buffers
stop being reallocated, a call is a fixed sequence of kernels on fixed addresses: about 150 launches
per latent frame, and the Python that issues them, become one graph replay.

`ChunkGraphs` (one per stream) keys a call by the input's shape, strides and dtype, the stream's
buffer generation (it grows whenever a buffer is reallocated: a graph holds the old addresses) and
a fingerprint of the weights (their addresses and versions, so a reloaded or moved decoder is not
replayed with stale pointers). A key's first call runs eagerly (cuDNN planning and Triton
compilation happen there, not under capture), on the capture stream; the next call with the same
shapes on the buffers as that call left them is captured and replayed, and every later one replays:
the input is copied into the graph's static input and a copy of the static output is returned (the
caller may keep it while the next call replays). With one latent frame per call, a stream's third
call is captured; with three (after a first call of one frame and one of two), its fourth.

The graph backend is injectable (`backend=`) so that the bookkeeping can be tested without a GPU:
the stand-in in tests/patches/test_vae_graphs.py emulates capture (nothing executes: the stream's
buffers are restored) and replay (the call runs again into the static output).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["ChunkGraphs", "ChunkGraphStats", "CudaGraphBackend", "cuda_backend"]

_BACKENDS: dict = {}


@dataclass
class ChunkGraphStats:
    eager: int = 0
    captures: int = 0
    replays: int = 0


class CudaGraphBackend:
    """Capture and replay with torch.cuda.CUDAGraph on a side stream, graphs sharing one memory pool."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def eager(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            out = fn()
        main.wait_stream(self.stream)
        return out

    def capture(self, fn: Callable[[], torch.Tensor], state: Callable[[], list[torch.Tensor]]):
        """(graph, static output); `state` is for stand-ins: a real capture executes nothing."""
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = fn()
        return graph, out


def cuda_backend(device: torch.device) -> CudaGraphBackend:
    """The one backend per device that every decoder stream shares: its side stream allocates the
    streams' buffers, so a finished stream's memory serves the next one, and its graph pool is reused
    once a finished stream's graphs are gone."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    if device not in _BACKENDS:
        _BACKENDS[device] = CudaGraphBackend(device)
    return _BACKENDS[device]


@dataclass
class _Captured:
    graph: object
    x: torch.Tensor
    out: torch.Tensor


class ChunkGraphs:
    """The graphs of one decoder stream (module docstring). `run(fn, x, ...)` stands for `fn(x)`."""

    def __init__(self, backend, max_graphs: int = 4):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.backend = backend
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.stable: set[tuple] = set()
        self.stats = ChunkGraphStats()

    def __deepcopy__(self, memo) -> "ChunkGraphs":
        """A copy of a stream starts without graphs: the captured ones use the original's buffers."""
        return ChunkGraphs(self.backend, self.max_graphs)

    def run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, generation: Callable[[], int],
            fingerprint: tuple, state: Callable[[], list[torch.Tensor]]) -> torch.Tensor:
        """fn(x), replayed from a graph once calls of this kind have stopped reallocating buffers.

        generation(): the stream's buffer generation now; fingerprint: the weights' addresses and
        versions; state(): the stream's buffers (used only by stand-in backends)."""
        key = (tuple(x.shape), x.stride(), x.dtype, generation(), fingerprint)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.stable:
                out = self.backend.eager(lambda: fn(x))
                self.stats.eager += 1
                # This call ran every kernel at these shapes on the buffers as they are now (reallocated
                # or not): the next call like it can be captured.
                self.stable.add(key[:3] + (generation(),) + key[4:])
                return out
            entry = self._capture(key, fn, x, generation, state)
        else:
            self.graphs.move_to_end(key)
        entry.x.copy_(x)
        entry.graph.replay()
        self.stats.replays += 1
        return entry.out.clone()

    def _capture(self, key, fn, x, generation, state) -> _Captured:
        static_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        try:
            graph, out = self.backend.capture(lambda: fn(static_x), state)
        except RuntimeError as e:
            raise RuntimeError(f"capturing a VAE decoder call in a CUDA graph failed ({e}); patch with "
                               "cuda_graphs=False to decode eagerly") from e
        if generation() != key[3]:
            raise RuntimeError("a VAE decoder buffer was reallocated during graph capture; the captured call "
                               "would replay on freed memory (patch with cuda_graphs=False)")
        entry = _Captured(graph, static_x, out)
        self.graphs[key] = entry
        self.stats.captures += 1
        while len(self.graphs) > self.max_graphs:
            old, _ = self.graphs.popitem(last=False)
            self.stable.discard(old)
        return entry
