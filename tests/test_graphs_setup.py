"""CUDA-graph plumbing that runs without a GPU: the device-side start index gives the same result as
the int, caches are reused in place across videos, graphs are refused clearly off CUDA, Wan's list
context is padded as the stock model pads it, and the capture-safe time embedding serves only the
runner. (The runner's decisions, with a CPU stand-in for its graphs: tests/test_graph_runner.py; the
capture itself, on the GPU: tests/gpu/test_graphs.py.)"""
import pytest
import torch

from longlive_triton import patch_model
from longlive_triton.runtime.device_index import DeviceIndex
from longlive_triton.numerics import rel_l2
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.models import build_model, get_preset


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
    rel = rel_l2(got, want)
    assert rel <= 1e-2, rel
    assert not torch.equal(got[0], got[1])


def test_stack_context_pads_like_the_stock_model():
    from longlive_triton.runtime.graphs import stack_context

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


def test_the_capture_safe_time_embedding_serves_only_the_runner():
    """The stock module's sinusoidal_embedding_1d is swapped for a dispatcher: ours inside a graph
    runner's calls, the stock one elsewhere; restored once the last runner is gone."""
    import types

    from longlive_triton.runtime import graphs

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
