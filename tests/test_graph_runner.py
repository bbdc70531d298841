"""The CUDA-graph runner (longlive_triton/runtime/graphs.py) on the CPU, through a stand-in for torch.cuda.

`FakeBackend` (tests/_graph_fakes.py) takes CudaGraphBackend's place: its capture runs the forward
once and keeps it, and a replay runs it again on the graph's static buffers with the host-side
window copy the capture saw (what a real graph freezes; the runner hands the KV cache dicts over as
the call's state), writing into the captured output as a real replay does. So replayed latents are
real numbers, and everything the runner decides (keys, warm-up, capture, eviction, eager fallbacks,
the bookkeeping it moves) runs as on the GPU. The capture itself is tested on the GPU:
tests/gpu/test_graphs.py.
"""
import sys
from dataclasses import replace

import pytest
import torch

from longlive_triton import patch_model
from longlive_triton.runtime.graphs import GraphStats, attention_windows, graph_runner, install_graphs, uninstall_graphs
from longlive_triton.numerics import rel_l2
from longlive_triton.patches.fused_block import cache_only_last_layer
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.models import build_model, get_preset
from longlive_triton.patches.graph_cache import WARM_UP

from ._graph_fakes import FakeBackend

TINY = get_preset("tiny")  # 8 tokens per latent frame, 3-frame blocks and sink
FS = TINY.frame_seqlen


def _model(attention_backend: str = "sdpa", window: int = 6):
    """The tiny generator patched for graphs, its KV window `window` latent frames: by default the
    3-frame sink and a ring of one 3-frame block, full (one window, one key) from the second block on."""
    model = build_model("tiny", dtype=torch.bfloat16, seed=3)
    patch_model(model, {"window_attention": True, "attention_backend": attention_backend, "local_attn_size": window,
                        "cuda_graphs": False})
    return model


def _inputs(frames: int, prompts: int = 1):
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(1, frames, 16, TINY.latent_height, TINY.latent_width, generator=gen).to(torch.bfloat16)
    embeds = [torch.randn(1, TINY.text_len, TINY.text_dim, generator=gen).to(torch.bfloat16) for _ in range(prompts)]
    return noise, embeds


def _x(noise, start_frame: int = 0):
    """A block of noise as BlockPipeline hands its first step to the generator: a strided view."""
    return noise[:, start_frame:start_frame + 3].permute(0, 2, 1, 3, 4)


def _pipe(model) -> BlockPipeline:
    """A pipeline with fresh caches (as long as the model's window), the text cache filled with random
    keys and values (the call a graph can serve)."""
    pipe = BlockPipeline(model)
    pipe.frame_seqlen = FS
    pipe.init_caches(1, 9, torch.bfloat16, torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    for cache in pipe.caches.crossattn:
        for name in ("k", "v"):
            cache[name].copy_(torch.randn(cache[name].shape, generator=gen))
        cache["is_init"] = True
    return pipe


def _call(pipe, prompt, start_frame: int = 0, **extra) -> dict:
    """One generator call's keyword arguments as BlockPipeline makes them, on pipe's caches."""
    return {"t": torch.full((1, 3), 1000.0), "context": prompt, "seq_len": 32760, "kv_cache": pipe.caches.kv,
            "crossattn_cache": pipe.caches.crossattn, "current_start": start_frame * FS, **extra}


def _caches(pipe) -> list[dict]:
    """Each KV cache's contents, tensors as lists: the device state and the host-side window copy."""
    return [{name: v.tolist() if isinstance(v, torch.Tensor) else v for name, v in cache.items()}
            for cache in pipe.caches.kv]


@pytest.fixture(autouse=True)
def _no_grad():
    """LongLive generates without grad (a call in grad mode runs eagerly: one of the fallbacks)."""
    with torch.no_grad():
        yield


@pytest.fixture
def install():
    """install_graphs with a FakeBackend; every runner installed is uninstalled after the test (the
    time embedding it swaps lives in the reference model's module)."""
    models = []

    def install(model, max_graphs: int = 16, backend: FakeBackend | None = None):
        models.append(model)
        return install_graphs(model, max_graphs, backend if backend is not None else FakeBackend())

    yield install
    for model in models:
        uninstall_graphs(model)


# -- a whole stream ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stream():
    """Three blocks with a prompt switch before the second, in a 6-frame window (the sink and a ring of
    one block, full from the second block on): unpatched, patched eager (the runner disabled) and
    graphed."""
    noise, prompts = _inputs(9, prompts=2)
    config = PipelineConfig(local_attn_size=6)  # _model's window, for the unpatched model too

    def generate(model, config):
        torch.manual_seed(0)
        return BlockPipeline(model, config).generate(noise, prompts, [3])

    unpatched = generate(build_model("tiny", dtype=torch.bfloat16, seed=3), config)
    model, backend = _model(), FakeBackend()
    runner = install_graphs(model, backend=backend)
    try:
        eager = generate(model, replace(config, cuda_graphs=False))
        disabled = dict(runner.stats.eager_reasons)
        runner.stats.eager_reasons.clear()
        graphed = generate(model, config)
    finally:
        uninstall_graphs(model)
    return dict(unpatched=unpatched, eager=eager, graphed=graphed, disabled=disabled, stats=runner.stats,
                captured=len(backend.graphs), replays=backend.log.count("replay"))


def test_replayed_latents_equal_the_eager_ones(stream):
    assert torch.equal(stream["graphed"], stream["eager"])
    want, got = stream["unpatched"].float(), stream["graphed"].float()
    assert rel_l2(got, want) <= 1e-2
    assert stream["graphed"].abs().mean() > 0.1


def test_a_stream_captures_once_per_key_and_replays_the_rest(stream):
    """16 calls (3 blocks of 5, the re-cache): all eager with the runner disabled. Graphed: a block's
    strided first step, its contiguous later steps and its cache pass (the last layer stops after its
    K/V append) are three keys; the first two blocks read other windows (the cuDNN backend's key), the
    third the second's (the ring is full), so it replays the graphs captured there at another start.
    The calls filling the text cache run eagerly: the first, the re-cache and the call after it (the
    re-cache leaves it empty for the new prompt). Warm-ups: the later steps and the cache pass of
    blocks 0 and 1, block 2's first step; captures: blocks 0 and 1's later steps, block 2's cache pass."""
    stats = stream["stats"]
    assert stream["disabled"] == {"disabled": 16}
    assert stats.eager_reasons == {WARM_UP: 5, "cross-attention cache being filled": 3}
    assert (stats.captures, stats.replays, stats.evicted) == (3, 8, 0)
    assert stream["captured"] == stats.captures and stream["replays"] == stats.replays


# -- one call at a time -----------------------------------------------------------------------
def test_a_new_key_runs_eagerly_then_is_captured_then_replays(install):
    """Four blocks' first steps. Blocks 1-3 read the full ring, one window, so one key at three starts:
    its first call runs eagerly on the runner's stream, the second is captured there and replayed, the
    third replays. Block 0 is another key (another window, and its call creates the layers' ring-shift
    tensors, whose addresses every later key holds). Outputs and caches, the host-side window copy
    included, are those of eager calls."""
    backend = FakeBackend()
    runner = install(_model(), backend=backend)
    eager_model = _model()
    noise, (prompt,) = _inputs(12)
    graphed, eager = _pipe(runner.generator), _pipe(eager_model)
    warm_up = ["side waits for main", "on side", "back on main", "main waits for side"]
    capture = ["side waits for main", "capture on side into pool", "replay"]
    # Per block: warm-ups, captures and replays so far, and what the runner asked of the backend.
    expected = [(1, 0, 0, warm_up), (2, 0, 0, warm_up), (2, 1, 1, capture), (2, 1, 2, ["replay"])]
    for block, (warm_ups, captures, replays, log) in enumerate(expected):
        backend.log.clear()
        got = runner(_x(noise, 3 * block), **_call(graphed, prompt, 3 * block))
        assert runner.stats.eager_reasons == {WARM_UP: warm_ups}
        assert (runner.stats.captures, runner.stats.replays, backend.log) == (captures, replays, log)
        assert torch.equal(got, eager_model(_x(noise, 3 * block), **_call(eager, prompt, 3 * block)))
    assert _caches(graphed) == _caches(eager)


def test_keys_tell_apart_shapes_strides_caches_and_windows(install):
    noise, (prompt,) = _inputs(6)
    runner = install(_model())
    pipe = _pipe(runner.generator)

    def key(runner, x, pipe, start_frame=0):
        reason, key, _ = runner._plan(x, (), _call(pipe, prompt, start_frame))
        assert reason is None
        return key

    base = key(runner, _x(noise), pipe)
    assert key(runner, _x(noise), pipe) == base
    assert key(runner, _x(noise).contiguous(), pipe) != base                     # strides
    assert key(runner, noise.permute(0, 2, 1, 3, 4), pipe) != base               # shape
    assert key(runner, _x(noise), _pipe(runner.generator)) != base               # cache addresses
    assert key(runner, _x(noise), pipe, start_frame=3) != base                   # the window cuDNN reads
    with cache_only_last_layer(runner.generator) as applies:
        assert applies and key(runner, _x(noise), pipe) != base                  # a cache pass's last layer
    # The Triton backend reads the window on the device: one key whatever the fill.
    triton = install(_model("triton"))
    pipe = _pipe(triton.generator)
    assert key(triton, _x(noise), pipe, start_frame=3) == key(triton, _x(noise), pipe)


def test_more_keys_than_max_graphs_evict_the_oldest(install):
    """max_graphs 1: capturing a second key evicts the first, which is forgotten altogether: seen
    again, it warms up again."""
    noise, (prompt,) = _inputs(3)
    runner = install(_model(), max_graphs=1)
    pipe = _pipe(runner.generator)
    runner(_x(noise), **_call(pipe, prompt))  # creates the ring-shift tensors, whose addresses later keys hold
    # seq_len is part of the key (the stock model only checks the call against it).
    first, second = (_call(pipe, prompt, seq_len=10**6 + i) for i in range(2))
    for kwargs in (first, first, second, second):
        runner(_x(noise), **kwargs)
    assert list(runner.graphs) == [runner._plan(_x(noise), (), second)[1]]
    assert (runner.stats.captures, runner.stats.evicted, runner.stats.eager_reasons) == (2, 1, {WARM_UP: 3})
    runner(_x(noise), **first)
    assert (runner.stats.captures, runner.stats.eager_reasons) == (2, {WARM_UP: 4})


def test_the_runner_forgets_old_warm_up_keys(install):
    """Keys seen once are remembered up to a bound (4 per graph held), oldest first."""
    noise, (prompt,) = _inputs(3)
    runner = install(_model(), max_graphs=1)
    pipe = _pipe(runner.generator)
    calls = [_call(pipe, prompt, seq_len=10**6 + i) for i in range(5)]
    for kwargs in calls:
        runner(_x(noise), **kwargs)
    assert list(runner.cache.seen) == [runner._plan(_x(noise), (), kwargs)[1] for kwargs in calls[1:]]


def _x_as_a_list(runner, x, kwargs):
    return runner(list(x), **kwargs)  # Wan's list of [C, F, H, W] latents: the forward takes it, a graph cannot


def _positional_arguments(runner, x, kwargs):
    return runner(x, kwargs.pop("t"), kwargs.pop("context"), kwargs.pop("seq_len"), **kwargs)


def _text_cache_to_fill(runner, x, kwargs):
    for cache in kwargs["crossattn_cache"]:
        cache["is_init"] = False  # as after a prompt switch
    return runner(x, **kwargs)


def _another_layer_count(runner, x, kwargs):
    return runner(x, **dict(kwargs, kv_cache=kwargs["kv_cache"] + [dict(kwargs["kv_cache"][0])]))


def _grad_mode(runner, x, kwargs):
    with torch.enable_grad():
        return runner(x, **kwargs)


def _disabled(runner, x, kwargs):
    runner.enabled = False
    return runner(x, **kwargs)


_EAGER_REASONS = {
    _x_as_a_list: "x, t and context must be tensors",
    _positional_arguments: "not the KV-cached inference call",
    _text_cache_to_fill: "cross-attention cache being filled",
    _another_layer_count: "kv_cache has a different number of layers",
    _grad_mode: "grad mode",
    _disabled: "disabled",
}


@pytest.mark.parametrize("call", list(_EAGER_REASONS), ids=lambda call: call.__name__.strip("_"))
def test_each_eager_fallback_is_counted_by_its_reason(install, call):
    noise, (prompt,) = _inputs(3)
    runner = install(_model())
    out = call(runner, _x(noise), _call(_pipe(runner.generator), prompt))
    assert runner.stats.eager_reasons == {_EAGER_REASONS[call]: 1} and not runner.graphs and not runner.cache.seen
    assert out.shape == _x(noise).shape and torch.isfinite(out).all()


def test_a_window_gathered_from_the_cache_runs_eagerly(install):
    """A 7-frame window (a 4-frame ring): block 2 wraps the ring, and a recompute of block 1 after it
    (which LongLive never makes) attends a window that is not one range of the cache. Only the
    host-side window copy decides, so it is moved through blocks 0-2 without running them."""
    noise, (prompt,) = _inputs(6)
    runner = install(_model(window=7))
    pipe = _pipe(runner.generator)
    for start_frame in (0, 3, 6):
        attention_windows(runner.layers, pipe.caches.kv, start_frame * FS, 3 * FS, FS, False, commit=True)
    runner(_x(noise, 3), **_call(pipe, prompt, 3))
    assert runner.stats.eager_reasons == {"window not one range of the cache (gathered keys)": 1}


def test_a_failed_capture_restores_the_cache_bookkeeping(install):
    """The capture runs the forward's Python, which moves the host-side window copy on: when the
    capture fails, the cache dicts are put back all the same, and the error says what to do."""
    noise, (prompt,) = _inputs(9)
    runner = install(_model(), backend=FakeBackend(fail_capture=True))
    pipe = _pipe(runner.generator)
    for block in (0, 1):  # block 2's key (the full ring) warms up in block 1
        runner(_x(noise, 3 * block), **_call(pipe, prompt, 3 * block))
    before = [dict(cache) for cache in pipe.caches.kv]
    with pytest.raises(RuntimeError, match="capturing the generator's forward in a CUDA graph failed .* cuda_graphs"):
        runner(_x(noise, 6), **_call(pipe, prompt, 6))
    assert [dict(cache) for cache in pipe.caches.kv] == before
    assert not runner.graphs and runner.stats.captures == 0


def test_release_drops_the_graphs_and_the_warm_up_keys(install):
    noise, (prompt,) = _inputs(3)
    runner = install(_model())
    kwargs = _call(_pipe(runner.generator), prompt)
    for _ in range(3):  # creates the ring-shift tensors, warms its key up, captures it
        runner(_x(noise), **kwargs)
    runner.pipeline_shape = (1, 3)  # as BlockPipeline sets it
    assert runner.graphs and runner.cache.seen and runner.stats.captures == 1
    runner.release()
    assert (runner.graphs, runner.cache.seen, runner.pipeline_shape) == ({}, {}, None)
    runner(_x(noise), **kwargs)
    assert runner.stats.eager_reasons == {WARM_UP: 3} and runner.stats.captures == 1


def test_inputs_on_another_device_or_in_another_dtype_are_refused(install):
    noise, (prompt,) = _inputs(3)
    runner = install(_model())
    kwargs = _call(_pipe(runner.generator), prompt)
    with pytest.raises(ValueError, match="x is on meta, but this graphed generator runs on cpu"):
        runner(_x(noise).to("meta"), **kwargs)
    with pytest.raises(ValueError, match="context is on meta"):
        runner(_x(noise), **dict(kwargs, context=prompt.to("meta")))
    with pytest.raises(TypeError, match="x is torch.float32, but the generator's weights are torch.bfloat16"):
        runner(_x(noise).float(), **kwargs)
    assert runner.stats == GraphStats()


def test_the_runner_takes_wans_list_context(install):
    """A list of [L, text_dim] prompt embeddings (Wan's form) is planned like the tensor LongLive's
    wrapper passes (not the "must be tensors" fallback) and fills the text cache as the padded tensor."""
    noise, (prompt,) = _inputs(3)
    runner, eager_model = install(_model()), _model()
    graphed, eager = _pipe(runner.generator), _pipe(eager_model)
    for cache in graphed.caches.crossattn + eager.caches.crossattn:
        cache["is_init"] = False
    got = runner(_x(noise), **_call(graphed, [prompt[0, :10]]))
    assert runner.stats.eager_reasons == {"cross-attention cache being filled": 1}
    padded = torch.cat([prompt[:, :10], torch.zeros_like(prompt[:, 10:])], dim=1)
    assert torch.equal(got, eager_model(_x(noise), **_call(eager, padded)))


def test_install_graphs_routes_the_forward_and_uninstall_graphs_restores_it():
    """What install_graphs does, undone: the instance forward, the runner attribute and the module's
    time embedding."""
    model = _model()
    module = sys.modules[type(model).__module__]
    stock = module.sinusoidal_embedding_1d
    runner = install_graphs(model, backend=FakeBackend())
    assert install_graphs(model) is runner  # idempotent: the runner installed, its backend kept
    assert graph_runner(model) is runner and model.forward is runner and module.sinusoidal_embedding_1d is not stock
    assert uninstall_graphs(model)
    assert graph_runner(model) is None and "forward" not in model.__dict__ and module.sinusoidal_embedding_1d is stock
    assert not uninstall_graphs(model)
