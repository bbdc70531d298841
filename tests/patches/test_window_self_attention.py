"""The window self-attention patch: same latents as the unpatched reference through the block loop
(window filling, rolling, a prompt switch with and without a global sink), both backends."""
import dataclasses

import pytest
import torch

from longlive_triton import PatchConfig, load_preset, patch_model
from longlive_triton.config import KernelTuning
from longlive_triton.numerics import cosine, rel_l2
from longlive_triton.patches.window_self_attention import WindowSelfAttention
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.models import build_model, get_preset

ON_GPU = torch.cuda.is_available()
# Blocks of the 1.3B GPU runs: the window fills in 4, then rolls for 6 (drift settles within them).
BLOCKS_1P3B = 10


def _inputs(preset: str, frames: int, device, segments: int = 1):
    p = get_preset(preset)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(1, frames, 16, p.latent_height, p.latent_width, generator=gen).to(device, torch.bfloat16)
    prompts = [torch.randn(1, p.text_len, p.text_dim, generator=gen).to(device, torch.bfloat16) for _ in range(segments)]
    return noise, prompts


def _run(model, noise, prompts, switches, global_sink=True):
    torch.manual_seed(0)
    pipe = BlockPipeline(model, PipelineConfig(global_sink=global_sink))
    return pipe.generate(noise, prompts if len(prompts) > 1 else prompts[0], switches)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("global_sink", [True, False])
def test_patched_tiny_model_matches_reference(device, backend, global_sink):
    """21 latent frames of the tiny preset: the window fills, rolls three times, and a prompt switch
    at frame 12 re-caches the window; the patched latents stay within the bf16 bound."""
    noise, prompts = _inputs("tiny", 21, device, segments=2)
    ref = build_model("tiny", dtype=torch.bfloat16, device=device, seed=3)
    want = _run(ref, noise, prompts, [12], global_sink)
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=3)
    report = patch_model(model, PatchConfig(window_attention=True, attention_backend=backend))
    assert report.counts()["window_self_attention"] == {"applied": 2, "skipped": 0}
    assert f"(attention_backend: {backend})" in str(report)
    assert all(isinstance(b.self_attn, WindowSelfAttention) for b in model.blocks)
    got = _run(model, noise, prompts, [12], global_sink)
    assert torch.isfinite(got).all()
    assert rel_l2(got, want) <= 1e-2


def test_state_dict_keeps_stock_names_and_values(device):
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch_model(model, PatchConfig(window_attention=True))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_fp32_model_is_skipped_and_left_untouched():
    model = build_model("tiny", dtype=torch.float32, seed=3)
    originals = [b.self_attn for b in model.blocks]
    report = patch_model(model, PatchConfig(window_attention=True))
    assert [e.reason for e in report.skipped if e.patch == "window_self_attention"] == [
        "the kernels need bf16 weights; this layer is torch.float32"] * 2
    assert [b.self_attn for b in model.blocks] == originals


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_exact_preset_1p3b_matches_reference(backend, reference_1p3b_latents):
    """The exact-path acceptance: the exact preset (either attention backend) over 10 blocks at
    1.3B shapes, relative L2 of the latents <= 1e-2 against the unpatched reference."""
    noise, prompts, want = reference_1p3b_latents
    model = build_model("longlive-1.3b", dtype=torch.bfloat16, device="cuda", seed=0)
    report = patch_model(model, dataclasses.replace(load_preset("exact"), attention_backend=backend))
    assert not report.skipped
    got = _run(model, noise, prompts, [])
    per_block = [rel_l2(got[:, i:i + 3], want[:, i:i + 3]) for i in range(0, 3 * BLOCKS_1P3B, 3)]
    print(f"{backend}: per-block relative L2 {['%.2e' % e for e in per_block]}")
    assert rel_l2(got, want) <= 1e-2


def test_moving_the_model_after_patching_is_refused(device):
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=3)
    patch_model(model, PatchConfig(window_attention=True))
    model.float()
    noise, prompts = _inputs("tiny", 3, device)
    with pytest.raises(RuntimeError, match="call patch_model after moving the model"):
        _run(model, noise.float(), [p.float() for p in prompts], [])


# Max relative L2 of the tiny model's latents, FP8 cache (q, k, v in e4m3, both dots in FP8) against
# the unpatched bf16 reference over 7 blocks (window filling, rolling, a prompt switch). Measured in
# the interpreter: 4.8e-3 to 5.2e-3 per block (cosine 0.99999); the bound leaves about 2x.
FP8_DRIFT = 1.2e-2


def _fp8_layout_ok(cache: dict) -> bool:
    k8, v8, v_scale = cache["k"], cache["v"], cache["v_scale"]
    B, C, H, D = k8.shape
    return (k8.dtype == v8.dtype == torch.float8_e4m3fn and v8.shape == k8.shape and v8.stride(1) == 1
            and tuple(v_scale.shape) == (B, -(-C // 128), H) and v_scale.dtype == torch.float32)


def test_fp8_cache_tiny_model_stays_close(device):
    """The FP8 KV cache through the block loop (without a global sink the pipeline zeroes the e4m3
    caches at the switch): latents close to the bf16 reference, caches really in the FP8 layout."""
    global_sink = False
    noise, prompts = _inputs("tiny", 21, device, segments=2)
    ref = build_model("tiny", dtype=torch.bfloat16, device=device, seed=3)
    want = _run(ref, noise, prompts, [12], global_sink)
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=3)
    cfg = PatchConfig(window_attention=True, attention_backend="triton", kv_cache_dtype="fp8",
                      tuning=KernelTuning(attention_split=2))
    report = patch_model(model, cfg)
    assert report.counts()["window_self_attention"] == {"applied": 2, "skipped": 0}
    assert "both attention dots in FP8" in str(report)
    torch.manual_seed(0)
    pipe = BlockPipeline(model, PipelineConfig(global_sink=global_sink))
    got = pipe.generate(noise, prompts, [12])
    assert torch.isfinite(got).all()
    per_block = [(rel_l2(got[:, i:i + 3], want[:, i:i + 3]), cosine(got[:, i:i + 3], want[:, i:i + 3]))
                 for i in range(0, 21, 3)]
    print(f"fp8 cache, global_sink {global_sink}: per-block (rel L2, cos) "
          f"{[('%.2e' % e, '%.5f' % c) for e, c in per_block]}")
    assert rel_l2(got, want) <= FP8_DRIFT
    assert min(c for _, c in per_block) >= 0.99
    assert all(_fp8_layout_ok(cache) for cache in pipe.caches.kv)


def test_fp8_cache_swaps_in_the_quantized_content(device):
    """A dict that already holds bf16 keys and values (e.g. written before patching) is quantized,
    not dropped."""
    from longlive_triton.kernels.fp8_kv_cache import dequantize_fp8_cache

    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=3)
    patch_model(model, PatchConfig(window_attention=True, attention_backend="triton", kv_cache_dtype="fp8"))
    layer = model.blocks[0].self_attn
    H, D = layer.num_heads, layer.head_dim
    # Keys as the layer writes them: rows of RMS 1 over all heads, times its norm weight.
    k = torch.randn(1, 200, H, D, device=device)
    k = k * torch.rsqrt(k.pow(2).mean(dim=(2, 3), keepdim=True)) * layer.norm_k.weight.view(H, D).float()
    k, v = k.to(torch.bfloat16), torch.randn(1, 200, H, D, device=device).to(torch.bfloat16)
    cache = {"k": k, "v": v}
    layer._use_fp8_cache(cache)
    assert _fp8_layout_ok(cache)
    k_back, v_back = dequantize_fp8_cache(cache["k"], layer._k_scale, cache["v"], cache["v_scale"])
    for x, back in ((k, k_back), (v, v_back)):
        assert rel_l2(back, x) < 4e-2
    first = cache["k"]
    layer._use_fp8_cache(cache)
    assert cache["k"] is first


def test_fp8_cache_config_is_validated():
    with pytest.raises(ValueError, match="attention_backend: 'triton'"):
        PatchConfig(window_attention=True, attention_backend="sdpa", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="needs window_attention"):
        PatchConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        PatchConfig(kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="attention_split must be"):
        PatchConfig.from_dict({"attention_split": 0})
    with pytest.raises(ValueError, match="attention_split must be"):
        KernelTuning(attention_split=9)
    with pytest.raises(ValueError, match="unknown patch config keys"):
        PatchConfig.from_dict({"fp8_attention_dots": "both"})


@pytest.fixture(scope="module")
def reference_1p3b_latents():
    """The unpatched 1.3B reference's blocks, computed once for the exact and fp8 tests (read only)."""
    noise, prompts = _inputs("longlive-1.3b", 3 * BLOCKS_1P3B, "cuda")
    ref = build_model("longlive-1.3b", dtype=torch.bfloat16, device="cuda", seed=0)
    want = _run(ref, noise, prompts, [])
    del ref
    return noise, prompts, want



@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("split", [1, 2])
def test_fp8_cache_1p3b_drift(split, reference_1p3b_latents):
    """The FP8 KV cache at 1.3B shapes over 10 blocks against the unpatched reference (same random
    weights): prints per-block relative L2 and cosine; target cosine >= 0.99 on every block. Also
    checks the cache memory from the real allocation: e4m3 k and v (V^T rows padded to 16 slots)
    and one fp32 scale per 128 slots and head, against bf16 k and v."""
    noise, prompts, want = reference_1p3b_latents
    model = build_model("longlive-1.3b", dtype=torch.bfloat16, device="cuda", seed=0)
    cfg = dataclasses.replace(load_preset("exact"), attention_backend="triton", kv_cache_dtype="fp8",
                              tuning=KernelTuning(attention_split=split))
    report = patch_model(model, cfg)
    assert not report.skipped
    torch.manual_seed(0)
    pipe = BlockPipeline(model, PipelineConfig())
    got = pipe.generate(noise, prompts[0])
    per_block = [(rel_l2(got[:, i:i + 3], want[:, i:i + 3]), cosine(got[:, i:i + 3], want[:, i:i + 3]))
                 for i in range(0, 3 * BLOCKS_1P3B, 3)]
    print(f"fp8 cache, split {split}: per-block (rel L2, cos) {[('%.2e' % e, '%.5f' % c) for e, c in per_block]}")
    fp8_bytes = sum(c[n].untyped_storage().nbytes() for c in pipe.caches.kv for n in ("k", "v", "v_scale"))
    bf16_bytes = sum(c["k"].numel() * 2 * 2 for c in pipe.caches.kv)
    B, C, H, D = pipe.caches.kv[0]["k"].shape
    expected = (C * D + -(-C // 16) * 16 * D + -(-C // 128) * 4) / (2 * C * D * 2)
    print(f"KV cache: bf16 {bf16_bytes / 1e9:.3f} GB, fp8 {fp8_bytes / 1e9:.3f} GB ({fp8_bytes / bf16_bytes:.4f}x)")
    assert fp8_bytes / bf16_bytes == pytest.approx(expected, rel=1e-6)
    assert min(c for _, c in per_block) >= 0.99


def test_an_unsupported_head_dim_is_skipped_with_the_kernels_list(device):
    """Head dim 16 (4 heads of the tiny width): left stock, and the reason lists what the kernels take."""
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=3, num_heads=4)
    report = patch_model(model, PatchConfig(window_attention=True))
    assert {e.reason for e in report.skipped if e.patch == "window_self_attention"} == {
        "head dim 16 is not supported by the kernels (32, 64, 128)"}
