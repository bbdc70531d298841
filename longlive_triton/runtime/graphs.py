"""CUDA-graph capture of the patched generator's forward: one graph per distinct call, replayed after.

    from longlive_triton import patch_model
    patch_model(model)                      # on CUDA, installs a GraphedGenerator (cuda_graphs: true)
    ...LongLive's own loop, or BlockPipeline, calls the model exactly as before...

What is captured: one whole generator forward (30 layers: GEMMs, the cache plan, RoPE + cache
append, attention, glue, the head), the unit LongLive's loop calls 5 times per block (4 denoising
steps and the cache pass). The five calls of a block differ only in their inputs (latents, timestep)
and in device-side cache state, so in steady state one graph serves all of them and every later
block: the runner copies the inputs into the graph's static buffers, writes `current_start` into a
device scalar the patched layers read (a `DeviceIndex`), replays, and returns a copy of the output.
Between replays the host only does the scheduler's few small ops, so it stays ahead of the GPU.

Graphs are keyed by everything a replay would otherwise get wrong: input shapes, strides and dtypes,
the addresses of every cache tensor, and the attention window each layer reads. With the cuDNN
backend that window's length is a host-side shape, so the first blocks of a stream (while the KV
window fills: 4 blocks at LongLive's settings) each get their own graph, and the full window one
graph for the rest of the stream; with the Triton backend the window is read on the device and every
block shares one graph. A block's first step reads its latents as a strided slice of the noise and
the later calls contiguous tensors, so each of those is two graphs (same kernels, other strides):
about 10 graphs while the window fills, 2 in steady state. All graphs share one memory pool (they
never run concurrently), so a graph costs little beyond its static inputs and output.

A key's first call runs eagerly on the capture stream (Triton autotuning and cuDNN planning happen
there, not during capture); its second call is captured and replayed; every later call replays.
Calls that cannot be replayed run eagerly, each counted by its reason in `stats`: a cross-attention
cache being (re)filled after a prompt switch, a window that is not one range of the cache (a gathered
copy; the ring is as long as the window, so a full window never is: kernels/kv_cache_plan.py), grad
mode, non-tensor x, t or context, positional arguments or no caches (not LongLive's cached call), a
kv_cache with another number of layers, and every call while `enabled` is off.
The text context may be one [B, L, text_dim] tensor (LongLive's wrapper) or Wan's list of B
[L, text_dim] tensors: the list is zero-padded to text_len and stacked, as the stock model does.

What the host keeps and what the device reads. A replay runs the captured kernels with the arguments
they had at capture and runs no Python, so two things the forward computes on the host need care:
- `current_start`, the first new token's index, a Python int in LongLive's calls. The runner passes
  a `DeviceIndex` (device_index.py): an int that also carries a one-element int64 tensor, the
  runner's own, refilled with the call's value before each replay. Host code (the stock arithmetic,
  the window copy below) sees the int; the patched layers hand the tensor to their kernels (the
  cache plan reads the start on the device), so a replay follows the call, not the capture.
- the host-side window copy: each patched self-attention layer mirrors its cache pointers (global
  end, local end, ring shift) on the host, in its cache dict, by the stock rules the device runs
  (`WindowSelfAttention.host_window`, no device read). It gives the window each call attends: the
  cuDNN path slices the cache with it (a shape, frozen in a graph) and the runner keys graphs on it
  (`attention_windows`). Capture runs the forward's Python once, which moves the copy on: the runner
  puts the cache dicts back afterwards, also when the capture fails. A replay runs no Python: the
  runner moves the copy on itself after each replay, as the call would have.

The torch.cuda calls (graphs, streams, the memory pool) come from a `CudaGraphBackend`; tests hand
the runner a CPU stand-in (tests/test_graph_runner.py) to run everything but the capture itself.
"""
from __future__ import annotations

import contextvars
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from longlive_triton.runtime.device_index import DeviceIndex
from longlive_triton.models.longlive1.model import sinusoidal_embedding_1d

__all__ = ["GraphedGenerator", "CudaGraphBackend", "install_graphs", "uninstall_graphs", "graph_runner",
           "attention_windows"]

_RUNNER = "_longlive_triton_graphs"
# Keys seen once (their eager warm-up ran) but not captured yet: at most this many per graph held.
_SEEN_PER_GRAPH = 4


class CudaGraphBackend:
    """The torch.cuda calls a GraphedGenerator makes, in one place so that a test can stand in for them."""

    device_type = "cuda"

    def pool_handle(self):
        return torch.cuda.graph_pool_handle()

    def new_stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.Stream(device)

    def current_stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.current_stream(device)

    def on_stream(self, stream: torch.cuda.Stream):
        return torch.cuda.stream(stream)

    def new_graph(self) -> torch.cuda.CUDAGraph:
        return torch.cuda.CUDAGraph()

    def capture(self, graph: torch.cuda.CUDAGraph, forward, *, pool, stream: torch.cuda.Stream):
        """Record forward() into graph and return its output, which every replay rewrites in place."""
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            return forward()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    out: torch.Tensor


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


class GraphedGenerator:
    """Stands in for a patched CausalWanModel's forward; see the module docstring."""

    def __init__(self, generator: nn.Module, max_graphs: int = 16, backend: CudaGraphBackend | None = None,
                 rules=None):
        layers = [getattr(block, "self_attn", None) for block in generator.blocks]
        # WindowSelfAttention by what the runner uses (importing it here would close an import cycle).
        if not all(callable(getattr(layer, "host_window", None)) for layer in layers):
            raise ValueError("CUDA graphs need every self-attention layer patched (window_attention: true): the stock "
                             "layer reads its cache pointers with .item(), which a graph cannot replay")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.generator = generator
        # The model family's cache rules (patches/cache_rules*.py): whether its cross-attention reads the
        # cross-attention cache, and what else a graph key needs. None: LongLive v1.0's.
        self.rules = rules
        self.layers = layers
        self.max_graphs = max_graphs
        self.enabled = True
        self.stats = GraphStats()
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self._eager = type(generator).forward.__get__(generator)
        self.backend = backend if backend is not None else CudaGraphBackend()
        device = next(generator.parameters()).device
        if device.type != self.backend.device_type:
            raise ValueError(f"CUDA graphs need the generator on a {self.backend.device_type.upper()} device; "
                             f"it is on {device}")
        self.device = device
        self._pool = self.backend.pool_handle()
        self._stream = self.backend.new_stream(device)
        self._start = torch.zeros(1, dtype=torch.int64, device=device)
        # (batch, frames per call) a BlockPipeline captured with; it refuses another (see pipeline.py).
        self.pipeline_shape: tuple[int, int] | None = None

    # -- bookkeeping --------------------------------------------------------------------------
    def release(self) -> None:
        """Drop every graph (and the pool's memory once nothing else holds it)."""
        self.graphs.clear()
        self._seen.clear()
        self.pipeline_shape = None

    @staticmethod
    def _addresses(kv_cache, crossattn_cache) -> tuple:
        ptrs = []
        for cache in kv_cache:
            for name in ("k", "v", "global_end_index", "local_end_index", "ring_shift"):
                t = cache.get(name)
                ptrs.append(t.data_ptr() if isinstance(t, torch.Tensor) else None)
        for cache in crossattn_cache:
            ptrs += [cache["k"].data_ptr(), cache["v"].data_ptr()]
        return tuple(ptrs)

    # -- the call -----------------------------------------------------------------------------
    def _plan(self, x, args, kwargs) -> tuple[str | None, tuple | None, tuple | None]:
        """(why this call runs eagerly or None, its graph key, its (current_start, new tokens, tokens per
        frame, sink_recache)); refuses inputs on another device or in another dtype. Touches no GPU."""
        kv_cache, crossattn_cache = kwargs.get("kv_cache"), kwargs.get("crossattn_cache")
        t, context = kwargs.get("t"), kwargs.get("context")
        for name, v in (("x", x), ("t", t), ("context", context)):
            if isinstance(v, torch.Tensor) and v.device != self.device:
                raise ValueError(f"{name} is on {v.device}, but this graphed generator runs on {self.device}")
        dtype = self.generator.patch_embedding.weight.dtype
        if isinstance(x, torch.Tensor) and x.dtype != dtype:
            raise TypeError(f"x is {x.dtype}, but the generator's weights are {dtype}")
        reason = None
        if not self.enabled:
            reason = "disabled"
        elif args or kv_cache is None or crossattn_cache is None:
            reason = "not the KV-cached inference call"
        elif not all(isinstance(v, torch.Tensor) for v in (x, t, context)):
            reason = "x, t and context must be tensors"
        elif torch.is_grad_enabled():
            reason = "grad mode"
        elif getattr(self.rules, "crossattn_cache_used", True) and not all(c.get("is_init", False)
                                                                          for c in crossattn_cache):
            reason = "cross-attention cache being filled"
        elif len(kv_cache) != len(self.layers):
            reason = "kv_cache has a different number of layers"
        if reason is not None:
            return reason, None, None

        pt = self.generator.patch_size
        frame_seqlen = (x.shape[3] // pt[1]) * (x.shape[4] // pt[2])
        call = (int(kwargs.get("current_start", 0)), (x.shape[2] // pt[0]) * frame_seqlen, frame_seqlen,
                bool(kwargs.get("sink_recache_after_switch", False)))
        windows = attention_windows(self.layers, kv_cache, *call, commit=False)
        if windows is None:
            return "window not one range of the cache (gathered keys)", None, None
        key = (tuple(x.shape), x.stride(), x.dtype, tuple(t.shape), t.dtype, tuple(context.shape), context.dtype,
               kwargs.get("seq_len"), kwargs.get("cache_start"), call[3], windows,
               self._addresses(kv_cache, crossattn_cache),
               self.rules.graph_key(self.generator, kv_cache) if self.rules is not None else ())
        return None, key, call

    def __call__(self, x, *args, **kwargs):
        # LongLive 2.0's deferred cache commit (LLV2_DEFER_KV_UPDATES): the forward commits the patched
        # layers' pointers itself, in the graph too, and hands back no update for the wrapper to apply.
        if kwargs.pop("defer_cache_updates", False):
            return self(x, *args, **kwargs), []
        if isinstance(kwargs.get("context"), (list, tuple)):
            kwargs["context"] = stack_context(kwargs["context"], self.generator.text_len)
        reason, key, call = self._plan(x, args, kwargs)
        if reason is not None:
            self.stats.note_eager(reason)
            return self._run_eager(x, *args, **kwargs)
        graph = self.graphs.get(key)
        if graph is None and key not in self._seen:
            self._seen[key] = None
            while len(self._seen) > _SEEN_PER_GRAPH * self.max_graphs:
                self._seen.popitem(last=False)
            self.stats.note_eager("first call of its kind (warm-up)")
            return self._on_capture_stream(lambda: self._run_eager(x, **kwargs))
        if graph is None:
            graph = self._capture(key, x, kwargs, call[0])
        else:
            self.graphs.move_to_end(key)
        graph.x.copy_(x)
        graph.t.copy_(kwargs["t"])
        graph.context.copy_(kwargs["context"])
        self._start.fill_(call[0])
        graph.graph.replay()
        self.stats.replays += 1
        # The replay ran no Python: the host-side window copy moves on here (module docstring).
        attention_windows(self.layers, kwargs["kv_cache"], *call, commit=True)
        return graph.out.clone()

    def _run_eager(self, *args, **kwargs):
        """The patched forward itself (with the capture-safe time embedding, see install_graphs)."""
        token = _IN_RUNNER.set(True)
        try:
            return self._eager(*args, **kwargs)
        finally:
            _IN_RUNNER.reset(token)

    def _on_capture_stream(self, fn):
        main = self.backend.current_stream(self.device)
        self._stream.wait_stream(main)
        with self.backend.on_stream(self._stream):
            out = fn()
        main.wait_stream(self._stream)
        return out

    def _capture(self, key, x, kwargs, current_start: int) -> _Graph:
        static_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static_t = torch.empty_like(kwargs["t"])
        static_ctx = torch.empty_like(kwargs["context"])
        call = dict(kwargs, t=static_t, context=static_ctx, current_start=DeviceIndex(current_start, self._start))
        # Capturing runs the forward's Python, which moves the host-side window copy: put it back after.
        saved = [dict(cache) for cache in kwargs["kv_cache"]]
        graph = self.backend.new_graph()
        self._stream.wait_stream(self.backend.current_stream(self.device))
        try:
            out = self.backend.capture(graph, partial(self._run_eager, static_x, **call), pool=self._pool,
                                       stream=self._stream)
        except RuntimeError as e:
            raise RuntimeError(f"capturing the generator's forward in a CUDA graph failed ({e}); run with "
                               "cuda_graphs: false (patch config) or PipelineConfig(cuda_graphs=False)") from e
        finally:
            restore_caches(kwargs["kv_cache"], saved)
        entry = _Graph(graph, static_x, static_t, static_ctx, out)
        self.graphs[key] = entry
        self.stats.captures += 1
        while len(self.graphs) > self.max_graphs:
            old_key, _ = self.graphs.popitem(last=False)
            self._seen.pop(old_key, None)
            self.stats.evicted += 1
        return entry


def install_graphs(generator: nn.Module, max_graphs: int = 16, backend: CudaGraphBackend | None = None,
                   rules=None) -> GraphedGenerator:
    """Route the generator's calls through a GraphedGenerator (idempotent); returns it. rules: the model
    family's cache rules (patches/cache_rules*.py), None for LongLive v1.0's."""
    runner = getattr(generator, _RUNNER, None)
    if runner is None:
        runner = GraphedGenerator(generator, max_graphs, backend, rules)
        _swap_time_embedding(sys.modules.get(type(generator).__module__))
        setattr(generator, _RUNNER, runner)
        # An instance attribute: nn.Module.__call__ finds it before the class's forward.
        generator.forward = runner
    return runner


def uninstall_graphs(generator: nn.Module) -> bool:
    """Undo install_graphs: the generator's own forward again, its graphs freed, and the stock
    module's time embedding restored once no runner needs it. Returns whether one was installed."""
    runner = getattr(generator, _RUNNER, None)
    if runner is None:
        return False
    runner.release()
    delattr(generator, _RUNNER)
    if generator.__dict__.get("forward") is runner:
        del generator.forward
    _restore_time_embedding(sys.modules.get(type(generator).__module__))
    return True


def stack_context(context, text_len: int) -> torch.Tensor:
    """Wan's list of [L_i, text_dim] prompt embeddings as one [B, text_len, text_dim] tensor, zero-padded
    as the stock model pads each before its text embedding (so the two forms give the same output)."""
    if not context or not all(isinstance(u, torch.Tensor) and u.dim() == 2 for u in context):
        raise TypeError("a list context must hold 2-D [L, text_dim] tensors, one per sample")
    first = context[0]
    for i, u in enumerate(context):
        if u.shape[1] != first.shape[1] or u.dtype != first.dtype or u.device != first.device:
            raise ValueError(f"context[{i}] is {tuple(u.shape)} {u.dtype} on {u.device}; context[0] is "
                             f"{tuple(first.shape)} {first.dtype} on {first.device}")
        if u.shape[0] > text_len:
            raise ValueError(f"context[{i}] has {u.shape[0]} tokens, more than text_len {text_len}")
    out = first.new_zeros(len(context), text_len, first.shape[1])
    for i, u in enumerate(context):
        out[i, :u.shape[0]] = u
    return out


def attention_windows(layers, kv_cache, current_start: int, num_new: int, frame_seqlen: int, sink_recache: bool,
                      *, commit: bool) -> tuple | None:
    """Each layer's part of a graph key for one call: the window length for cuDNN layers (cuDNN reads
    slots [0, sink + length): the length is a shape), None for Triton ones (they read the window on the
    device). None when a cuDNN layer's window is not one range of the cache: it gathers its keys, so
    the call runs eagerly. With commit, the layers' host-side bookkeeping moves on as the call does."""
    key = []
    for layer, cache in zip(layers, kv_cache):
        args = layer.plan_args(cache, current_start, num_new, frame_seqlen, sink_recache)
        window = layer.host_window(cache, args, commit=commit)
        if layer.backend != "sdpa":
            key.append(None)
        elif layer.reads_in_place(window, args):
            key.append(window[2])
        else:
            return None
    return tuple(key)


def restore_caches(kv_cache, saved) -> None:
    """Put each cache dict back as it was (its entries, not its tensors' contents)."""
    for cache, before in zip(kv_cache, saved):
        cache.clear()
        cache.update(before)


# Set while a graph runner runs its generator: the swapped time embedding serves only those calls.
_IN_RUNNER: contextvars.ContextVar[bool] = contextvars.ContextVar("longlive_triton_in_graph_runner", default=False)
_SWAPPED = "_longlive_triton_stock"  # the dispatcher's attribute holding the stock function
_TIME_EMBEDDING = "sinusoidal_embedding_1d"


def _swap_time_embedding(module) -> None:
    """The stock forward builds its timestep embedding from a CPU arange copied to the GPU, which a
    capture refuses. Its module's function becomes a dispatcher: ours (the same float64 values, made
    on the GPU) inside a graph runner's calls, the stock one everywhere else; counted per runner."""
    stock = getattr(module, _TIME_EMBEDDING, None)
    if not callable(stock):
        return
    if hasattr(stock, _SWAPPED):
        stock.users += 1
        return

    def dispatch(dim, position):
        return (sinusoidal_embedding_1d if _IN_RUNNER.get() else stock)(dim, position)

    setattr(dispatch, _SWAPPED, stock)
    dispatch.users = 1
    dispatch.__doc__ = f"longlive_triton.runtime.graphs: {_swap_time_embedding.__doc__}"
    setattr(module, _TIME_EMBEDDING, dispatch)


def _restore_time_embedding(module) -> None:
    dispatch = getattr(module, _TIME_EMBEDDING, None)
    if not hasattr(dispatch, _SWAPPED):
        return
    dispatch.users -= 1
    if dispatch.users == 0:
        setattr(module, _TIME_EMBEDDING, getattr(dispatch, _SWAPPED))


def graph_runner(model: nn.Module) -> GraphedGenerator | None:
    """The GraphedGenerator installed on model's generator (through a peft wrapper), if any."""
    for m in model.modules():
        runner = getattr(m, _RUNNER, None)
        if runner is not None:
            return runner
    return None
