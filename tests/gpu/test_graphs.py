"""CUDA graphs at LongLive-1.3B shapes: graphed and eager patched paths agree over 8 blocks with a
prompt switch, and misuse of a captured model is refused clearly. GPU only.

The model has the 1.3B layer shapes (widths, heads, 4680-token blocks, the 12-frame window) but 4 of
its 30 layers: what a graph captures and replays is the same per layer, and 8 blocks cover the window
filling (blocks 0-3), rolling (from block 4) and the re-cache of a full window after a switch
(block 6). Each test builds its own model: a captured model carries state (its graphs) that would
make one test depend on another having run."""
import pytest
import torch

from longlive_triton import patch_model
from longlive_triton.runtime.graphs import graph_runner
from longlive_triton.numerics import rel_l2
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.models import build_model, get_preset

pytestmark = pytest.mark.gpu
BLOCKS, SWITCH_FRAME, LAYERS = 8, 18, 4


def _setup():
    preset = get_preset("longlive-1.3b")
    model = build_model("longlive-1.3b", dtype=torch.bfloat16, device="cuda", seed=0, num_layers=LAYERS)
    report = patch_model(model, "exact")
    assert any(n.startswith("cuda_graphs: on") for n in report.notes), report.notes
    gen = torch.Generator("cuda").manual_seed(1)
    noise = torch.randn(1, BLOCKS * 3, 16, preset.latent_height, preset.latent_width, generator=gen,
                        device="cuda").to(torch.bfloat16)
    prompts = [torch.randn(1, preset.text_len, preset.text_dim, generator=gen, device="cuda").to(torch.bfloat16)
               for _ in range(2)]
    return model, noise, prompts


def _generate(model, noise, prompts, graphs):
    torch.manual_seed(0)
    pipe = BlockPipeline(model, PipelineConfig(cuda_graphs=graphs))
    return pipe.generate(noise, prompts, [SWITCH_FRAME])


def test_graphed_equals_eager_with_a_prompt_switch():
    model, noise, prompts = _setup()
    eager = _generate(model, noise, prompts, graphs=False)
    runner = graph_runner(model)
    before = runner.stats.replays
    graphed = _generate(model, noise, prompts, graphs=None)
    again = _generate(model, noise, prompts, graphs=None)  # a second video reuses the caches and graphs
    stats = runner.stats
    print(f"graphs: {len(runner.graphs)} held, {stats.captures} captured, {stats.replays} replays, "
          f"eager calls {stats.eager_reasons}")
    rel, rel_again = rel_l2(graphed, eager), rel_l2(again, eager)
    print(f"graphed vs eager over {BLOCKS} blocks with a switch at frame {SWITCH_FRAME}: rel L2 {rel:.3e} "
          f"(bit-exact: {torch.equal(graphed, eager)}); second video {rel_again:.3e}")
    assert stats.replays - before >= 5 * BLOCKS, "most forwards must replay a graph"
    assert rel <= 1e-3 and rel_again <= 1e-3
    for start in range(0, BLOCKS * 3, 3):
        assert rel_l2(graphed[:, start:start + 3], eager[:, start:start + 3]) <= 1e-3, start


def test_misuse_of_a_captured_model_is_refused():
    model, noise, prompts = _setup()
    BlockPipeline(model).generate(noise[:, :9], prompts[0])  # 3 blocks: graphs captured
    assert graph_runner(model).graphs
    with pytest.raises(ValueError, match="captured for batch 1 with 3 latent frames per block"):
        next(BlockPipeline(model, PipelineConfig(num_frame_per_block=1)).iter_blocks(noise[:, :3], prompts[0]))
    with pytest.raises(ValueError, match="captured for batch 1"):
        next(BlockPipeline(model).iter_blocks(noise[:, :6].expand(2, -1, -1, -1, -1), prompts[0].expand(2, -1, -1)))
    # The runner itself (LongLive's own loop calls it directly) refuses inputs on another device or dtype.
    runner = graph_runner(model)
    caches = BlockPipeline(model).caches
    with pytest.raises(ValueError, match="x is on cpu"):
        runner(noise[:, :3].permute(0, 2, 1, 3, 4).cpu(), t=torch.zeros(1, 3), context=prompts[0].cpu(),
               kv_cache=caches.kv, crossattn_cache=caches.crossattn)
    with pytest.raises(TypeError, match="noise is torch.float32"):
        next(BlockPipeline(model).iter_blocks(noise[:, :6].float(), prompts[0]))
    with pytest.raises(ValueError, match="noise is on cpu"):
        next(BlockPipeline(model).iter_blocks(noise[:, :6].cpu(), prompts[0].cpu()))


@pytest.mark.parametrize("context_as_list", [False, True], ids=["tensor", "list"])
def test_window9_in_a_12_frame_cache_stays_in_the_graphs(context_as_list):
    """window9 under LongLive's settings (a 12-frame cache, re-cache and budget from its config), the
    context as a tensor or as Wan's list: after warm-up no call runs eagerly but the prompt switch's
    re-cache, and the graphed latents equal the eager ones. Tiny widths with one 64-wide head."""
    from longlive_triton import PatchConfig

    model = build_model("tiny", dtype=torch.bfloat16, device="cuda", seed=0, num_heads=1)
    patch_model(model, PatchConfig(window_attention=True, fused_glue=True, local_attn_size=9))
    preset = get_preset("tiny")
    gen = torch.Generator("cuda").manual_seed(1)
    noise = torch.randn(1, 48, 16, preset.latent_height, preset.latent_width, generator=gen, device="cuda").to(torch.bfloat16)
    prompts = [torch.randn(1, preset.text_len, preset.text_dim, generator=gen, device="cuda").to(torch.bfloat16)
               for _ in range(2)]

    def generate(graphs):
        torch.manual_seed(0)
        config = PipelineConfig(local_attn_size=12, context_as_list=context_as_list, cuda_graphs=graphs)
        return BlockPipeline(model, config).generate(noise, prompts, [27])

    eager = generate(False)
    runner = graph_runner(model)
    before = dict(runner.stats.eager_reasons)
    graphed = generate(None)
    reasons = {k: v - before.get(k, 0) for k, v in runner.stats.eager_reasons.items() if v - before.get(k, 0)}
    print(f"context {'list' if context_as_list else 'tensor'}: eager calls {reasons}, {runner.stats.replays} replays")
    assert set(reasons) <= {"first call of its kind (warm-up)", "cross-attention cache being filled"}, reasons
    # The first call of the video, the re-cache and the call after it fill the text cache.
    assert reasons.get("cross-attention cache being filled", 0) <= 3
    assert rel_l2(graphed, eager) <= 1e-3
