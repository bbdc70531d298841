"""The parts of longlive_triton.distributed that need no second process: launch checks, shape rules,
refusals, and the sequence-parallel wrapper on a one-rank group (which must equal the plain model)."""
import pytest
import torch
import torch.distributed as dist

from longlive_triton import patch_model
from longlive_triton.distributed import DistributedError, init_distributed, sequence_parallel
from longlive_triton.distributed.sequence_parallel import check_sp_shapes
from longlive_triton.runtime.pipeline import BlockPipeline
from longlive_triton.models import build_model, get_preset

TINY = get_preset("tiny")


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()


@pytest.fixture
def one_rank_group(tmp_path, no_torchrun_env):
    ctx = init_distributed(backend="gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}",
                           timeout_s=10)
    yield ctx
    dist.destroy_process_group()


def test_world_size_other_than_needed_is_refused_before_any_rendezvous(no_torchrun_env, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(DistributedError, match="needs 2 ranks, but WORLD_SIZE says 3.*--nproc-per-node 2"):
        init_distributed(expected_world_size=2)
    assert not dist.is_initialized()


def test_missing_launcher_environment_names_torchrun(no_torchrun_env):
    with pytest.raises(DistributedError, match="torchrun --nproc-per-node 2"):
        init_distributed(expected_world_size=2)
    with pytest.raises(ValueError, match="timeout_s"):
        init_distributed(timeout_s=0)


def test_sp_shape_rules():
    check_sp_shapes(12, 1560, 2)
    check_sp_shapes(12, 1560, 4)
    check_sp_shapes(12, None, 3)
    with pytest.raises(ValueError, match="12 attention heads do not split over 8 ranks"):
        check_sp_shapes(12, 1560, 8)
    with pytest.raises(ValueError, match="9 tokens per latent frame do not split over 2 ranks"):
        check_sp_shapes(2, 9, 2)


def test_sequence_parallel_needs_a_process_group(no_torchrun_env):
    with pytest.raises(DistributedError, match="init_distributed"):
        sequence_parallel(build_model("tiny"))


def _inputs(frames: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, frames, 16, TINY.latent_height, TINY.latent_width, generator=g).to(dtype)
    prompts = [torch.randn(1, 10, TINY.text_dim, generator=g).to(dtype) for _ in range(2)]
    return noise, prompts


def test_one_rank_wrapper_equals_the_model(one_rank_group):
    noise, prompts = _inputs(9)
    model = build_model("tiny", seed=2)
    torch.manual_seed(1)
    want = BlockPipeline(model).generate(noise, prompts, [6])
    sp = sequence_parallel(model)
    assert sp.kv_cache_heads == model.num_heads and "rank 0 of 1" in repr(sp)
    torch.manual_seed(1)
    pipe = BlockPipeline(sp)
    got = pipe.generate(noise, prompts, [6])
    assert torch.equal(got, want)
    assert sp.local_attn_size == model.local_attn_size == 12   # the pipeline wrote it through the wrapper
    with pytest.raises(ValueError, match="already sequence-parallel"):
        sequence_parallel(model)


def test_only_the_current_call_moves(one_rank_group, monkeypatch):
    """Per layer: one all-to-all of q|k|v and one of the attention output, sized by the call's tokens,
    whatever the cache holds (the cache itself never moves)."""
    sp = sequence_parallel(build_model("tiny", seed=2))
    moved = []
    real = dist.all_to_all_single

    def counting(out, inp, *args, **kwargs):
        moved.append(inp.numel())
        return real(out, inp, *args, **kwargs)

    monkeypatch.setattr(dist, "all_to_all_single", counting)
    noise, prompts = _inputs(15)
    BlockPipeline(sp).generate(noise, prompts[0])     # 5 blocks: the 12-frame window fills and rolls
    tokens = 3 * TINY.frame_seqlen                    # one 3-frame block
    per_forward = [3 * tokens * TINY.dim, tokens * TINY.dim] * TINY.num_layers
    assert moved == per_forward * (5 * 5)             # 5 forwards per block, every one the same


def test_wrong_kv_cache_heads_are_refused(one_rank_group):
    sp = sequence_parallel(build_model("tiny", seed=2))
    pipe = BlockPipeline(sp)
    noise, prompts = _inputs(3)
    pipe.frame_seqlen = TINY.frame_seqlen
    caches = pipe.init_caches(1, 3, torch.float32, "cpu")
    caches.kv = [{**c, "k": c["k"][:, :, :1], "v": c["v"][:, :, :1]} for c in caches.kv]
    x = noise.permute(0, 2, 1, 3, 4)
    with pytest.raises(ValueError, match="the KV cache holds 1 heads.*keeps 2"):
        sp(x, t=torch.zeros(1, 3), context=prompts[0], kv_cache=caches.kv, crossattn_cache=caches.crossattn)


@pytest.mark.parametrize("config, match", [
    ({"window_attention": True, "attention_backend": "triton", "kv_cache_dtype": "fp8"}, "fp8 KV cache"),
    ({"token_merge_ratio": 0.5}, "token merging"),
])
def test_unsupported_patches_are_refused(one_rank_group, config, match):
    model = build_model("tiny", seed=2, dtype=torch.bfloat16)
    patch_model(model, config)
    with pytest.raises(ValueError, match=match):
        sequence_parallel(model)
    assert not any("Ulysses" in type(b.self_attn).__name__ for b in model.blocks)   # left untouched


def test_a_generator_without_the_split_forward_is_refused(one_rank_group):
    class Stockish(torch.nn.Module):
        """The stock class's structure without our reference's embed/run_blocks."""
        def __init__(self, ref):
            super().__init__()
            for name in ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head"):
                setattr(self, name, getattr(ref, name))

    with pytest.raises(ValueError, match="not our reference generator"):
        sequence_parallel(Stockish(build_model("tiny")))
