"""warmup() on the GPU: after it, a LongLive run (window filling, steady blocks, a prompt switch that
re-caches the full window) tunes nothing more, and its report names the autotune cache file.

The model has the 1.3B layer shapes with 2 of its 30 layers: the kernels meet the same shapes."""
import pytest
import torch

from longlive_triton import patch_model, warmup
from longlive_triton.kernels import fp8_gemm, window_attention
from longlive_triton.models import build_model, get_preset
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig

pytestmark = pytest.mark.gpu
TUNERS = {"fp8_gemm": fp8_gemm._fp8_gemm_tuned, "fp8_gemm_tma": fp8_gemm._fp8_gemm_tma_tuned,
          "window_attention": window_attention._window_attn_fwd_tuned}


def _tuned() -> dict[str, set]:
    return {name: set(tuner.cache) for name, tuner in TUNERS.items()}


@pytest.mark.parametrize("preset", ["fp8", "fastest"])
def test_after_warmup_a_run_tunes_nothing(preset):
    p = get_preset("longlive-1.3b")
    model = build_model("longlive-1.3b", dtype=torch.bfloat16, device="cuda", seed=0, num_layers=2)
    patch_model(model, preset)
    report = warmup(model, local_attn_size=12)
    assert report.blocks == 6 and report.recache_frames == [6, 12], str(report)
    assert report.autotune_cache and "autotune-" in report.autotune_cache
    tuned = _tuned()
    assert tuned["window_attention"] and (tuned["fp8_gemm"] or tuned["fp8_gemm_tma"]), tuned
    gen = torch.Generator("cuda").manual_seed(1)
    noise = torch.randn(1, 24, 16, p.latent_height, p.latent_width, generator=gen, device="cuda").to(torch.bfloat16)
    prompts = [torch.randn(1, p.text_len, p.text_dim, generator=gen, device="cuda").to(torch.bfloat16)
               for _ in range(2)]
    # LongLive's settings: a 12-frame cache; the switch at block 5 re-caches the full window.
    BlockPipeline(model, PipelineConfig(local_attn_size=12)).generate(noise, prompts, [15])
    assert _tuned() == tuned, "the run tuned shapes the warm-up did not meet"
