"""CUDA-graph plumbing that runs without a GPU: the device-side start index gives the same result as
the int, caches are reused in place across videos, and graphs are refused clearly off CUDA.
(Graph capture itself is tested on the GPU: tests/gpu/test_graphs.py.)"""
import pytest
import torch

from longlive_triton import patch_model
from longlive_triton.device_index import DeviceIndex
from longlive_triton.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.reference import build_model, get_preset


def _inputs(frames: int):
    p = get_preset("tiny")
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(1, frames, 16, p.latent_height, p.latent_width, generator=gen).to(torch.bfloat16)
    prompt = torch.randn(1, p.text_len, p.text_dim, generator=gen).to(torch.bfloat16)
    return noise, prompt


def _patched(backend: str = "sdpa"):
    model = build_model("tiny", dtype=torch.bfloat16, seed=3)
    report = patch_model(model, {"window_attention": True, "fused_glue": True, "attention_backend": backend})
    assert any(n.startswith("cuda_graphs: off (the model is on cpu") for n in report.notes), report.notes
    return model


def _generate(pipe, noise, prompt):
    torch.manual_seed(0)
    return pipe.generate(noise, prompt)


def test_the_kernels_read_the_device_start_index():
    """With the Triton backend nothing on the host needs the start: the int a DeviceIndex carries is
    set wrong on purpose, so only the device tensor can give the right latents."""
    noise, prompt = _inputs(6)
    plain = _generate(BlockPipeline(_patched("triton")), noise, prompt)
    model = _patched("triton")
    forward = model.forward

    def with_device_start(*args, current_start=0, **kwargs):
        start = torch.full((1,), current_start, dtype=torch.int64)
        return forward(*args, current_start=DeviceIndex(0, start), **kwargs)

    model.forward = with_device_start
    assert torch.equal(_generate(BlockPipeline(model), noise, prompt), plain)


def test_a_second_video_reuses_the_caches_in_place():
    noise, prompt = _inputs(6)
    pipe = BlockPipeline(_patched())
    first = _generate(pipe, noise, prompt)
    pointers = [c["k"].data_ptr() for c in pipe.caches.kv] + [c["k"].data_ptr() for c in pipe.caches.crossattn]
    second = _generate(pipe, noise, prompt)
    assert torch.equal(first, second)
    assert pointers == [c["k"].data_ptr() for c in pipe.caches.kv] + [c["k"].data_ptr() for c in pipe.caches.crossattn]


def test_graphs_off_cuda_are_refused_clearly():
    noise, prompt = _inputs(3)
    pipe = BlockPipeline(_patched(), PipelineConfig(cuda_graphs=True))
    with pytest.raises(ValueError, match="CUDA graphs need the generator on a CUDA device"):
        next(pipe.iter_blocks(noise, prompt))


def test_graphs_need_the_patched_attention():
    model = build_model("tiny", dtype=torch.bfloat16, seed=3)
    patch_model(model, {"window_attention": False, "cuda_graphs": False})
    noise, prompt = _inputs(3)
    with pytest.raises(ValueError, match="every self-attention layer patched"):
        next(BlockPipeline(model, PipelineConfig(cuda_graphs=True)).iter_blocks(noise, prompt))


def test_wrong_noise_device_or_dtype_is_refused():
    noise, prompt = _inputs(3)
    pipe = BlockPipeline(_patched())
    with pytest.raises(TypeError, match="noise is torch.float32"):
        next(pipe.iter_blocks(noise.float(), prompt))


def test_device_index_needs_a_long_scalar_tensor():
    with pytest.raises(TypeError, match="int64 tensor of one element"):
        DeviceIndex(3, torch.zeros(2, dtype=torch.int64))
    i = DeviceIndex(7, torch.full((1,), 7))
    assert i == 7 and i // 2 == 3 and int(i.tensor) == 7


def test_a_batch_of_two_matches_the_unpatched_reference():
    p = get_preset("tiny")
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 6, 16, p.latent_height, p.latent_width, generator=gen).to(torch.bfloat16)
    prompt = torch.randn(2, p.text_len, p.text_dim, generator=gen).to(torch.bfloat16)
    want = _generate(BlockPipeline(build_model("tiny", dtype=torch.bfloat16, seed=3)), noise, prompt)
    got = _generate(BlockPipeline(_patched()), noise, prompt)
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel <= 1e-2, rel
    assert not torch.equal(got[0], got[1])


# -- the graph runner's decisions, without a GPU -------------------------------------------------
def _cpu_runner(model, max_graphs: int = 16):
    """A GraphedGenerator whose CUDA parts are skipped: its __init__ (streams, memory pool) is not run,
    its device is the CPU and its warm-up runs on the current thread. It plans and runs eager calls."""
    from collections import OrderedDict

    from longlive_triton.graphs import GraphedGenerator, GraphStats

    runner = GraphedGenerator.__new__(GraphedGenerator)
    runner.generator, runner.layers = model, [b.self_attn for b in model.blocks]
    runner.enabled, runner.stats, runner.device, runner.max_graphs = True, GraphStats(), torch.device("cpu"), max_graphs
    runner.graphs, runner._seen = OrderedDict(), OrderedDict()
    runner._eager = type(model).forward.__get__(model)
    runner._on_capture_stream = lambda fn: fn()
    return runner


def _call_kwargs(pipe, noise, prompt, start_frame=0, **extra):
    b, f = noise.shape[:2]
    pipe.frame_seqlen = 8
    pipe.init_caches(b, f, noise.dtype, noise.device)
    for cache in pipe.caches.crossattn:  # a filled cross-attention cache: the call a graph can serve
        cache["is_init"] = True
    t = torch.full((b, 3), 1000.0)
    return dict(t=t, context=prompt, seq_len=32760, kv_cache=pipe.caches.kv, crossattn_cache=pipe.caches.crossattn,
                current_start=start_frame * 8, **extra)


def test_the_runner_takes_wans_list_context():
    """A list of [L, text_dim] prompt embeddings (Wan's form) is planned like the tensor LongLive's
    wrapper passes (no "must be tensors" fallback) and gives the same output."""
    noise, prompt = _inputs(3)
    model = _patched()
    x = noise.permute(0, 2, 1, 3, 4)
    with torch.no_grad():
        runner = _cpu_runner(model)
        got = runner(x, **_call_kwargs(BlockPipeline(model), noise, [prompt[0, :10]]))
        assert runner.stats.eager_reasons == {"first call of its kind (warm-up)": 1}
        padded = torch.cat([prompt[:, :10], torch.zeros_like(prompt[:, 10:])], dim=1)
        want = model(x, **_call_kwargs(BlockPipeline(model), noise, padded))
    assert torch.equal(got, want)


def test_stack_context_pads_like_the_stock_model():
    from longlive_triton.graphs import stack_context

    a, b = torch.randn(5, 4), torch.randn(7, 4)
    out = stack_context([a, b], 9)
    assert out.shape == (2, 9, 4) and torch.equal(out[0, :5], a) and torch.equal(out[1, :7], b)
    assert not out[0, 5:].any() and not out[1, 7:].any()
    with pytest.raises(ValueError, match="more than text_len 6"):
        stack_context([a, b], 6)
    with pytest.raises(ValueError, match=r"context\[1\]"):
        stack_context([a, b.double()], 9)
    with pytest.raises(TypeError, match="2-D"):
        stack_context([a[None]], 9)


def test_the_runner_forgets_old_warm_up_keys():
    """Keys seen once are remembered up to a bound (4 per graph held), oldest first."""
    noise, prompt = _inputs(3)
    model = _patched()
    runner = _cpu_runner(model, max_graphs=1)
    x = noise.permute(0, 2, 1, 3, 4)
    with torch.no_grad():
        for i in range(5):  # seq_len is part of the key (the stock model only asserts on it)
            runner(x, **dict(_call_kwargs(BlockPipeline(model), noise, prompt), seq_len=10**6 + i))
    assert len(runner._seen) == 4 and [k[7] for k in runner._seen] == [10**6 + i for i in range(1, 5)]


def test_a_failed_capture_restores_the_cache_bookkeeping(monkeypatch):
    """The capture runs the forward's Python, which moves the host-side window bookkeeping; when the
    capture fails, the caches are put back as they were all the same."""
    import contextlib

    noise, prompt = _inputs(3)
    model = _patched()
    runner = _cpu_runner(model)

    @contextlib.contextmanager
    def failing_capture(graph, pool=None, stream=None):
        yield
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    runner._stream = type("Stream", (), {"wait_stream": lambda self, other: None})()
    runner._pool, runner._start = None, torch.zeros(1, dtype=torch.int64)
    kwargs = _call_kwargs(BlockPipeline(model), noise, prompt)
    before = [dict(c) for c in kwargs["kv_cache"]]
    with torch.no_grad(), pytest.raises(RuntimeError, match="capturing the generator's forward in a CUDA graph failed"):
        runner._capture(("key",), noise.permute(0, 2, 1, 3, 4), kwargs, 0)
    assert [dict(c) for c in kwargs["kv_cache"]] == before


def test_the_capture_safe_time_embedding_serves_only_the_runner():
    """The stock module's sinusoidal_embedding_1d is swapped for a dispatcher: ours inside a graph
    runner's calls, the stock one elsewhere; restored once the last runner is gone."""
    import types

    from longlive_triton import graphs

    def stock(dim, position):
        return "stock"

    module = types.ModuleType("fake_causal_model")
    module.sinusoidal_embedding_1d = stock
    graphs._swap_time_embedding(module)
    graphs._swap_time_embedding(module)                  # a second runner on the same class
    position = torch.tensor([1000.0, 937.5])
    assert module.sinusoidal_embedding_1d(8, position) == "stock"
    token = graphs._IN_RUNNER.set(True)
    try:
        assert torch.equal(module.sinusoidal_embedding_1d(8, position), graphs.sinusoidal_embedding_1d(8, position))
    finally:
        graphs._IN_RUNNER.reset(token)
    graphs._restore_time_embedding(module)
    assert module.sinusoidal_embedding_1d is not stock   # the other runner still needs it
    graphs._restore_time_embedding(module)
    assert module.sinusoidal_embedding_1d is stock


def test_uninstall_graphs_restores_the_forward_and_the_time_embedding():
    """What install_graphs does (on CUDA), undone: the instance forward, the runner attribute and the
    module's time embedding."""
    import sys

    from longlive_triton import graphs

    model = _patched()
    module = sys.modules[type(model).__module__]
    stock = module.sinusoidal_embedding_1d
    runner = _cpu_runner(model)
    setattr(model, graphs._RUNNER, runner)  # install_graphs' steps, minus the CUDA runner's construction
    model.forward = runner
    graphs._swap_time_embedding(module)
    assert graphs.graph_runner(model) is runner and module.sinusoidal_embedding_1d is not stock
    assert graphs.uninstall_graphs(model)
    assert graphs.graph_runner(model) is None and "forward" not in model.__dict__
    assert module.sinusoidal_embedding_1d is stock
    assert not graphs.uninstall_graphs(model)
