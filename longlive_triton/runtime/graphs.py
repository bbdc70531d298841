"""CUDA-graph capture of the patched generator's forward: one graph per distinct call, replayed after.

    from longlive_triton import patch_model
    patch_model(model)                      # on CUDA, installs a GraphedGenerator (cuda_graphs: true)
    ...LongLive's own loop, or BlockPipeline, calls the model exactly as before...

`GraphedGenerator` stands in for the generator's forward (30 layers and the head, the unit LongLive
calls 5 times per block) and runs it through the graph cache (patches/graph_cache.py), keyed by the
input shapes, strides and dtypes, the cache tensors' addresses and each layer's attention window
(`attention_windows`). A replay copies x, t and context into the graph's static inputs, writes
`current_start` into a device scalar (a `DeviceIndex`), moves the host-side window copy on as the
call would have, and returns a copy of the output. Calls run eagerly instead, counted by reason in
`stats`: the text cache being (re)filled, a window gathered from the cache, grad mode, non-tensor or
positional arguments, no caches, another number of layers, `enabled` off. Refused: x, t or context
on another device, or x in another dtype than the weights. The context is a [B, L, text_dim] tensor
or Wan's list of [L, text_dim] tensors (zero-padded to text_len and stacked, as the stock model does).
Why these keys, how many graphs a stream makes, what the host keeps: docs/graph-keys.md.
"""
from __future__ import annotations

import contextvars
import sys
from functools import partial

import torch
import torch.nn as nn

from longlive_triton.models.longlive1.model import sinusoidal_embedding_1d
from longlive_triton.patches.graph_cache import CudaGraphBackend, GraphCache, GraphStats
from longlive_triton.runtime.device_index import DeviceIndex

__all__ = ["GraphedGenerator", "CudaGraphBackend", "GraphStats", "install_graphs", "uninstall_graphs",
           "graph_runner", "attention_windows"]

_RUNNER = "_longlive_triton_graphs"


class GraphedGenerator:
    """Stands in for a patched CausalWanModel's forward; see the module docstring."""

    def __init__(self, generator: nn.Module, max_graphs: int = 16, backend: CudaGraphBackend | None = None,
                 rules=None):
        layers = [getattr(block, "self_attn", None) for block in generator.blocks]
        # WindowSelfAttention by what the runner uses (importing it here would close an import cycle).
        if not all(callable(getattr(layer, "host_window", None)) for layer in layers):
            raise ValueError("CUDA graphs need every self-attention layer patched (window_attention: true): the stock "
                             "layer reads its cache pointers with .item(), which a graph cannot replay")
        device = next(generator.parameters()).device
        device_type = CudaGraphBackend.device_type if backend is None else backend.device_type
        if device.type != device_type:
            raise ValueError(f"CUDA graphs need the generator on a {device_type.upper()} device; it is on {device}")
        self.generator = generator
        # The model family's cache rules (patches/cache_rules*.py): whether its cross-attention reads the
        # cross-attention cache, and what else a graph key needs. None: LongLive v1.0's.
        self.rules = rules
        self.layers = layers
        self.enabled = True
        # A stream and memory pool of its own: the VAE's graphs may replay while the generator's do.
        self.cache = GraphCache(backend if backend is not None else CudaGraphBackend(device), max_graphs,
                                what="the generator's forward",
                                fix="run with cuda_graphs: false (patch config) or PipelineConfig(cuda_graphs=False)")
        self._eager = type(generator).forward.__get__(generator)
        self.device = device
        self._start = torch.zeros(1, dtype=torch.int64, device=device)
        # (batch, frames per call) a BlockPipeline captured with; it refuses another (see pipeline.py).
        self.pipeline_shape: tuple[int, int] | None = None

    @property
    def stats(self) -> GraphStats:
        return self.cache.stats

    @property
    def graphs(self) -> dict:
        return self.cache.graphs

    # -- bookkeeping --------------------------------------------------------------------------
    def release(self) -> None:
        """Drop every graph (and the pool's memory once nothing else holds it)."""
        self.cache.clear()
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
        # cache_only (patches/fused_block.py): the last layer of a cache pass stops after its K/V append;
        # the family's cache rules add what they key on (LongLive 2.0: the shot's RoPE offset, the sinks).
        key = (tuple(x.shape), x.stride(), x.dtype, tuple(t.shape), t.dtype, tuple(context.shape), context.dtype,
               kwargs.get("seq_len"), kwargs.get("cache_start"), call[3], windows,
               self._addresses(kv_cache, crossattn_cache),
               bool(getattr(self.generator.blocks[-1], "cache_only", False)),
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
        kv_cache = kwargs["kv_cache"]

        def before_replay() -> None:
            self._start.fill_(call[0])
            # The replay runs no Python: the host-side window copy moves on here (module docstring).
            attention_windows(self.layers, kv_cache, *call, commit=True)

        return self.cache.run(key, (x, kwargs["t"], kwargs["context"]), warm_up=lambda: self._run_eager(x, **kwargs),
                              capture=partial(self._captured_forward, kwargs, call[0]), state=lambda: kv_cache,
                              before_replay=before_replay)

    def _run_eager(self, *args, **kwargs):
        """The patched forward itself (with the capture-safe time embedding, see install_graphs)."""
        token = _IN_RUNNER.set(True)
        try:
            return self._eager(*args, **kwargs)
        finally:
            _IN_RUNNER.reset(token)

    def _captured_forward(self, kwargs, current_start: int, x, t, context):
        """The forward a graph records: the static inputs, and `current_start` read from the device."""
        # Capturing runs the forward's Python, which moves the host-side window copy: put it back after.
        saved = [dict(cache) for cache in kwargs["kv_cache"]]
        try:
            return self._run_eager(x, **dict(kwargs, t=t, context=context,
                                             current_start=DeviceIndex(current_start, self._start)))
        finally:
            restore_caches(kwargs["kv_cache"], saved)


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
