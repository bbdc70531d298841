"""CUDA graphs for the fast VAE decoder: each steady-state decoder call captured once, then replayed.

`ChunkGraphs` (one per decoder stream) keys a call by the input's shape, strides and dtype, the
stream's buffer generation (bumped whenever a buffer is reallocated) and the weights' addresses and
versions, and runs it through the one graph cache (patches/graph_cache.py): the first call of a key
eagerly, the next captured and replayed, later ones replayed, each returning its own copy of the
output. With one latent frame per call a stream's third call is captured; with three, its fourth.
A capture that reallocates a buffer is refused. `cuda_backend(device)`: the side stream and memory
pool every decoder stream on that device shares. Why these keys: docs/graph-keys.md.
"""
from __future__ import annotations

from typing import Callable

import torch

from .graph_cache import CudaGraphBackend, GraphCache, GraphStats

__all__ = ["ChunkGraphs", "cuda_backend"]

_BACKENDS: dict = {}


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


class ChunkGraphs:
    """The graphs of one decoder stream (module docstring). `run(fn, x, ...)` stands for `fn(x)`."""

    def __init__(self, backend, max_graphs: int = 4):
        self.cache = GraphCache(backend, max_graphs, what="a VAE decoder call",
                                fix="patch with cuda_graphs=False to decode eagerly")

    @property
    def stats(self) -> GraphStats:
        return self.cache.stats

    def __deepcopy__(self, memo) -> "ChunkGraphs":
        """A copy of a stream starts without graphs: the captured ones use the original's buffers."""
        return ChunkGraphs(self.cache.backend, self.cache.max_graphs)

    def run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, generation: Callable[[], int],
            fingerprint: tuple, state: Callable[[], list[torch.Tensor]]) -> torch.Tensor:
        """fn(x), replayed from a graph once calls of this kind have stopped reallocating buffers.

        generation(): the stream's buffer generation now; fingerprint: the weights' addresses and
        versions; state(): the stream's buffers (used only by stand-in backends)."""
        def key() -> tuple:
            return tuple(x.shape), x.stride(), x.dtype, generation(), fingerprint

        return self.cache.run(key(), (x,), warm_up=lambda: fn(x), capture=fn, state=state, key_after=key)
