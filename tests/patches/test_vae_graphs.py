"""CUDA-graph bookkeeping of the fast VAE decoder (patches/vae_graphs.py), on the CPU.

The stand-in backend (tests/_graph_fakes.py) emulates what a CUDA graph does to the program's state:
capturing executes nothing (the stream's buffers are restored after the Python ran), replaying runs
the captured call again on the static input and writes the static output. With it, the runner's
decisions (warm up, capture, replay, re-warm after a reallocation or a weight change), the
static-input copy and the output copies are checked against eager decoding. That the kernels themselves capture and replay
bit-exactly is tests/gpu/test_vae_gpu.py's job.
"""
from __future__ import annotations

import copy

import pytest
import torch

from longlive_triton import patch_vae
from longlive_triton.patches.vae_graphs import ChunkGraphs
from longlive_triton.models.wan21_vae import build_vae_decoder
from longlive_triton.runtime.vae_stream import StreamingVAEDecoder

from .._graph_fakes import FakeBackend


class _Accumulator:
    """A stateful toy call: out = x + cache, cache <- x; a buffer that grows with the input's length."""

    def __init__(self):
        self.generation = 0
        self.cache = None

    def __call__(self, x):
        if self.cache is None or self.cache.shape != x.shape:
            self.cache = torch.zeros_like(x)
            self.generation += 1
        out = x + self.cache
        self.cache.copy_(x)
        return out


def _run(graphs, acc, x, fingerprint=()):
    return graphs.run(acc, x, generation=lambda: acc.generation, fingerprint=fingerprint,
                      state=lambda: [acc.cache] if acc.cache is not None else [])


def test_warm_up_capture_replay_and_static_copies():
    backend, acc, twin = FakeBackend(), _Accumulator(), _Accumulator()
    graphs = ChunkGraphs(backend)
    xs = [torch.full((3,), float(i + 1)) for i in range(5)]
    outs = [_run(graphs, acc, x) for x in xs]
    want = [twin(x) for x in xs]
    # call 0 allocates and runs eagerly, call 1 is captured and replayed, calls 2-4 replay
    assert (graphs.stats.eager, graphs.stats.captures, graphs.stats.replays) == (1, 1, 4)
    assert len(backend.graphs) == 1 and backend.graphs[0].replays == 4
    for got, w in zip(outs, want):  # each output is its own copy: later replays did not overwrite it
        assert torch.equal(got, w)
    assert torch.equal(acc.cache, twin.cache)


def test_reallocation_and_weight_change_start_a_new_key():
    backend, acc, twin = FakeBackend(), _Accumulator(), _Accumulator()
    graphs = ChunkGraphs(backend)
    calls = [(torch.ones(2), ()), (torch.ones(2) * 2, ()), (torch.ones(4), ()), (torch.ones(4) * 3, ()),
             (torch.ones(4) * 4, ()), (torch.ones(4) * 5, ("new weights",)), (torch.ones(4) * 6, ("new weights",))]
    for x, fp in calls:
        assert torch.equal(_run(graphs, acc, x, fp), twin(x))
    # length 2: eager, capture; length 4 (a new buffer): eager, capture, replay; new weights: eager, capture
    assert (graphs.stats.eager, graphs.stats.captures) == (3, 3)
    assert graphs.stats.replays == 4


def test_eviction_and_capture_that_reallocates_is_refused():
    acc = _Accumulator()
    graphs = ChunkGraphs(FakeBackend(), max_graphs=1)
    for n in (2, 2, 3, 3):  # the second key's capture evicts the first
        _run(graphs, acc, torch.ones(n))
    assert len(graphs.cache.graphs) == 1 and graphs.stats.captures == 2

    class Grows(_Accumulator):
        def __call__(self, x):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2:  # under capture
                self.generation += 1
            return super().__call__(x)

    grows = Grows()
    graphs = ChunkGraphs(FakeBackend())
    _run(graphs, grows, torch.ones(2))
    with pytest.raises(RuntimeError, match="reallocated during graph capture"):
        _run(graphs, grows, torch.ones(2))
    with pytest.raises(ValueError, match="max_graphs"):
        ChunkGraphs(FakeBackend(), max_graphs=0)


def test_graphed_decoder_equals_eager_decoder():
    """The patched tiny decoder, streamed in blocks of 3 with graphs (stand-in backend) and without:
    the same pixels block by block, also after the weights change in place between blocks."""
    ref = build_vae_decoder("tiny", seed=5)
    eager, graphed = copy.deepcopy(ref), copy.deepcopy(ref)
    patch_vae(eager, {"cuda_graphs": False, "frames_per_call": 3})
    patch_vae(graphed, {"cuda_graphs": True, "frames_per_call": 3})
    backend = FakeBackend()
    graphed.decoder.graph_backend = backend
    z = torch.randn(1, 16, 15, 2, 3, generator=torch.Generator().manual_seed(6))
    de, dg = StreamingVAEDecoder(eager), StreamingVAEDecoder(graphed)
    for i in range(0, 12, 3):
        assert torch.equal(dg.decode_block(z[:, :, i:i + 3]), de.decode_block(z[:, :, i:i + 3])), f"block {i // 3}"
    stats = dg._cache.slots[0].graphs.stats
    # calls: frame 0 (no graph), frames 1-2 and the first 3-frame call eager, the second captured and
    # replayed, the third replayed
    assert (stats.eager, stats.captures, stats.replays) == (2, 1, 2)
    with torch.no_grad():
        for vae in (eager, graphed):
            vae.decoder.upsamples[3].resample[1].weight.mul_(0.5)  # a sub-pixel source weight, in place
    assert torch.equal(dg.decode_block(z[:, :, 12:15]), de.decode_block(z[:, :, 12:15]))
    assert stats.eager == 3  # the new weights are a new key: warmed up again, not replayed stale


def test_a_copied_stream_starts_without_graphs():
    acc = _Accumulator()
    graphs = ChunkGraphs(FakeBackend(), max_graphs=3)
    for _ in range(3):
        _run(graphs, acc, torch.ones(2))
    twin = copy.deepcopy(graphs)
    assert graphs.cache.graphs and not twin.cache.graphs and not twin.cache.seen
    assert twin.cache.backend is graphs.cache.backend and twin.cache.max_graphs == 3
