"""The LongLive 2.0 reference without the stock source (runs on CI): presets and shapes, the multi-shot cache
rules (global sink, pinned shot sink, its position under eviction), the shot RoPE offset, the update records,
the multi-shot cross-attention, the refusals, the family dispatch, and the importer's family checks.

Parity with the stock 2.0 code itself is tests/reference/test_stock_parity2_cpu.py (needs a checkout).
The driver below follows LongLive 2.0's block loop (pipeline/causal_diffusion_inference.py): denoising
calls at a per-frame timestep, a cache pass at t=0, and at a scene cut the shot offset from the cut block
on and the block pinned after its cache pass.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from longlive_triton.models import build_model, get_preset
from longlive_triton.models.longlive2.model import (CausalWanModel, MultiShotT2VCrossAttention, causal_rope_apply,
                                                    temporal_freqs)

CFG = get_preset("tiny2")
FS = CFG.frame_seqlen            # tokens per latent frame
BLOCK = CFG.num_frame_per_block  # latent frames per block


def new_caches(model, batch: int = 1) -> tuple[list[dict], list[dict]]:
    """KV and cross-attention caches as LongLive 2.0's `_initialize_kv_cache` builds them (unquantized)."""
    size = CFG.local_attn_size * FS
    shape = [batch, size, model.num_heads, model.dim // model.num_heads]
    kv = [{"k": torch.zeros(shape), "v": torch.zeros(shape), "quantized": False,
           "global_end_index": torch.tensor([0]), "local_end_index": torch.tensor([0]),
           "pinned_start": torch.tensor([-1]), "pinned_len": torch.tensor([0])} for _ in model.blocks]
    cross = [{"is_init": False} for _ in model.blocks]
    return kv, cross


def configure(model, multi_shot_sink: bool = True) -> None:
    """What the pipeline sets before its block loop: window budget, sink, global sink."""
    for m in model.modules():
        if hasattr(m, "max_attention_size"):
            m.max_attention_size = CFG.local_attn_size * FS
        if hasattr(m, "sink_size"):
            m.sink_size = CFG.sink_size
        m.global_sink_size = CFG.sink_size if multi_shot_sink else 0


def drive(model, blocks: int, cuts=(), *, seed: int = 0, steps=(900.0, 500.0), trace=None,
          shot_offset: float = CFG.multi_shot_rope_offset):
    """LongLive 2.0's block loop (Euler steps); returns the latents [1, frames, C, H, W] and the caches."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn([1, CFG.text_len, CFG.text_dim], generator=gen)
    kv, cross = new_caches(model)
    model.rope_temporal_offset = 0.0
    out, shot = [], 0
    for block in range(blocks):
        if block in cuts:
            shot += 1
            model.rope_temporal_offset = shot * shot_offset
        start = block * BLOCK * FS
        x = torch.randn([1, CFG.in_dim, BLOCK, CFG.latent_height, CFG.latent_width], generator=gen)
        sigmas = [*(s / 1000 for s in steps), 0.0]
        for i, t in enumerate(steps):
            flow = model(x, t=torch.full([1, BLOCK], t), context=text, kv_cache=kv, crossattn_cache=cross,
                         current_start=start, cache_start=start)
            x = x + (sigmas[i + 1] - sigmas[i]) * flow
        model(x, t=torch.zeros([1, BLOCK]), context=text, kv_cache=kv, crossattn_cache=cross,
              current_start=start, cache_start=start)
        if block in cuts:
            local_end = int(kv[0]["local_end_index"])
            for cache in kv:
                cache["pinned_start"].fill_(local_end - BLOCK * FS)
                cache["pinned_len"].fill_(min(CFG.sink_size, BLOCK) * FS)
        if trace is not None:
            trace.append((int(kv[0]["local_end_index"]), int(kv[0]["pinned_start"]), kv[0]["k"].clone()))
        out.append(x)
    return torch.cat(out, dim=2).transpose(1, 2), kv


@pytest.fixture(scope="module")
def model():
    m = build_model("tiny2", seed=0)
    configure(m)
    return m


def test_presets():
    big = get_preset("longlive2-5b")
    assert big.family == "longlive2" and get_preset("tiny").family == "longlive1"
    assert (big.dim, big.num_heads, big.head_dim, big.ffn_dim, big.num_layers) == (3072, 24, 128, 14336, 30)
    assert (big.in_dim, big.out_dim, big.model_kwargs()["patch_size"]) == (48, 48, (1, 2, 2))
    assert big.frame_seqlen == 880 and big.num_frame_per_block * big.frame_seqlen == 7040
    assert big.local_attn_size * big.frame_seqlen == 28160 and big.sink_size == 8
    assert big.multi_shot_sink and big.multi_shot_rope_offset == 8
    assert (CFG.num_frame_per_block, CFG.local_attn_size, CFG.sink_size, CFG.in_dim) == (8, 32, 8, 48)
    with torch.device("meta"):
        m = CausalWanModel(**big.model_kwargs())
    assert 4.9e9 < sum(p.numel() for p in m.parameters()) < 5.1e9  # Wan2.2-TI2V-5B
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("longlive2-14b")


def test_build_model_dispatches_by_family():
    from longlive_triton.models.longlive1.model import CausalWanModel as V1
    assert isinstance(build_model("tiny2"), CausalWanModel) and isinstance(build_model("tiny"), V1)
    with pytest.raises(ValueError, match="unknown model arguments"):
        build_model("tiny2", window=3)


def test_forward_shapes_and_indices(model):
    kv, cross = new_caches(model)
    x = torch.randn([1, CFG.in_dim, BLOCK, CFG.latent_height, CFG.latent_width])
    out = model(x, t=torch.full([1, BLOCK], 500.0), context=torch.randn([1, 5, CFG.text_dim]), kv_cache=kv,
                crossattn_cache=cross, current_start=0)
    assert out.shape == (1, CFG.out_dim, BLOCK, CFG.latent_height, CFG.latent_width) and torch.isfinite(out).all()
    assert [int(kv[0][k]) for k in ("global_end_index", "local_end_index")] == [BLOCK * FS, BLOCK * FS]
    assert not cross[0]["is_init"]  # 2.0's cross-attention neither reads nor fills its cache


def test_global_sink_and_pinned_shot_sink_under_eviction(model):
    """Cut at block 3: the chunk at frames 24..32 is pinned; eviction (from block 4) moves it left with the rolled
    tokens (to 16, then 8 frames), where it joins the global sink and stays. Its keys go with it unchanged, and
    the global sink (frames 0..8) never moves."""
    trace = []
    drive(model, 8, cuts=(3,), trace=trace)
    ends = [t[0] for t in trace]
    pins = [t[1] // FS for t in trace]
    assert ends == [n * BLOCK * FS for n in (1, 2, 3, 4, 4, 4, 4, 4)]
    assert pins == [-1, -1, -1, 24, 16, 8, 8, 8]
    pinned_keys = trace[3][2][:, 24 * FS:32 * FS]
    for k, frames in ((trace[4][2], 16), (trace[5][2], 8), (trace[7][2], 8)):
        assert torch.equal(k[:, frames * FS:(frames + 8) * FS], pinned_keys)
    for t in trace[1:]:
        assert torch.equal(t[2][:, :8 * FS], trace[0][2][:, :8 * FS])


def test_a_second_cut_repins_and_the_old_shot_sink_is_evicted(model):
    trace = []
    drive(model, 8, cuts=(1, 5), trace=trace)
    pins = [t[1] // FS for t in trace]
    # cut 1 pins frames 8..16, right behind the global sink: kept, never shifted; cut 5 pins the newest block
    # (frames 24..32 of the cache), which then floats left with eviction.
    assert pins == [-1, 8, 8, 8, 8, 24, 16, 8]
    shot1 = trace[1][2][:, 8 * FS:16 * FS]
    assert torch.equal(trace[4][2][:, 8 * FS:16 * FS], shot1)   # protected while pinned
    assert not torch.equal(trace[6][2][:, 8 * FS:16 * FS], shot1)  # evicted once the pin moved on


def test_without_multi_shot_sink_the_cut_changes_nothing_but_the_offset(model):
    """sink_size alone (global sink 0, nothing pinned) keeps max(global, sink) = the first 8 frames."""
    plain = build_model("tiny2", seed=0)
    configure(plain, multi_shot_sink=False)
    trace = []
    drive(plain, 6, trace=trace)
    assert [t[1] for t in trace] == [-1] * 6
    assert all(torch.equal(t[2][:, :8 * FS], trace[0][2][:, :8 * FS]) for t in trace)


def test_shot_offset_moves_the_temporal_position():
    table = build_model("tiny2").freqs
    d = CFG.head_dim // 2
    temporal = table[:, :d - 2 * (d // 3)]
    assert torch.equal(temporal_freqs(temporal, 8, 16, 0.0, "cpu"), temporal[16:24])
    shifted = temporal_freqs(temporal, 8, 16, 8.0, "cpu")
    assert shifted.dtype == torch.complex128
    torch.testing.assert_close(shifted, temporal[24:32], rtol=0, atol=1e-12)  # fp64 polar vs the table
    x = torch.randn([1, BLOCK * FS, CFG.num_heads, CFG.head_dim], dtype=torch.float64)
    grid = (BLOCK, CFG.latent_height // 2, CFG.latent_width // 2)
    torch.testing.assert_close(causal_rope_apply(x, grid, table, 0, 8.0), causal_rope_apply(x, grid, table, 8),
                               rtol=0, atol=1e-12)


def test_shot_offset_changes_the_output_from_the_cut_block_on(model):
    with_offset, _ = drive(model, 4, cuts=(2,))
    without, _ = drive(model, 4, cuts=(2,), shot_offset=0.0)
    cut = 2 * BLOCK
    assert torch.equal(with_offset[:, :cut], without[:, :cut])
    assert not torch.allclose(with_offset[:, cut:cut + BLOCK], without[:, cut:cut + BLOCK], rtol=0, atol=1e-4)


def test_deferred_update_records_give_the_same_cache(model):
    x = torch.randn([1, CFG.in_dim, BLOCK, CFG.latent_height, CFG.latent_width])
    text = torch.randn([1, CFG.text_len, CFG.text_dim])
    kv_a, cross = new_caches(model)
    kv_b, _ = new_caches(model)
    for block in range(6):  # through eviction
        start = block * BLOCK * FS
        out_a = model(x, t=torch.zeros([1, BLOCK]), context=text, kv_cache=kv_a, crossattn_cache=cross,
                      current_start=start)
        out_b, records = model(x, t=torch.zeros([1, BLOCK]), context=text, kv_cache=kv_b, crossattn_cache=cross,
                               current_start=start, defer_cache_updates=True)
        assert torch.equal(out_a, out_b) and len(records) == CFG.num_layers
        assert int(kv_b[0]["global_end_index"]) == start  # nothing applied yet
        model._apply_cache_updates(kv_b, records)
        for a, b in zip(kv_a, kv_b):
            assert all(torch.equal(a[k], b[k]) for k in ("k", "v", "global_end_index", "local_end_index"))
    assert records[0][1][2]["action"] == "roll_and_insert"


def test_cross_attention_chunks_attend_their_own_context():
    attn = MultiShotT2VCrossAttention(CFG.dim, CFG.num_heads).eval()
    x = torch.randn([2, 12, CFG.dim])
    ctx = torch.randn([4, 5, CFG.dim])  # 2 chunks per sample
    out = attn(x, ctx)
    for b in range(2):
        for j in range(2):
            part = attn(x[b:b + 1, 6 * j:6 * j + 6], ctx[2 * b + j:2 * b + j + 1])
            torch.testing.assert_close(out[b:b + 1, 6 * j:6 * j + 6], part, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        attn(x, torch.randn([3, 5, CFG.dim]))
    with pytest.raises(NotImplementedError, match="teacher forcing"):
        attn(x, ctx, is_teacher_forcing=True)
    with pytest.raises(NotImplementedError, match="context lengths"):
        attn(x, ctx, context_lens=torch.tensor([5, 5]))


@pytest.mark.parametrize("attr, value, match", [
    ("t_scale", 0.5, "t_scale"), ("use_relative_rope", True, "use_relative_rope"), ("rope_method", "ntk", "method"),
    ("original_seq_len", 1024, "original_seq_len"), ("rope_temporal_offset", torch.tensor([0.0, 8.0]), "number"),
])
def test_refuses_what_inference_does_not_use(attr, value, match):
    m = build_model("tiny2")
    setattr(m, attr, value)
    kv, cross = new_caches(m)
    x = torch.randn([1, CFG.in_dim, BLOCK, CFG.latent_height, CFG.latent_width])
    with pytest.raises(NotImplementedError, match=match):
        m(x, t=torch.zeros([1, BLOCK]), context=torch.randn([1, 4, CFG.text_dim]), kv_cache=kv, crossattn_cache=cross)


def test_refuses_other_calls(model):
    kv, cross = new_caches(model)
    x = torch.randn([1, CFG.in_dim, BLOCK, CFG.latent_height, CFG.latent_width])
    text = torch.randn([1, 4, CFG.text_dim])
    with pytest.raises(ValueError, match=r"\[B, F\]"):
        model(x, t=torch.zeros([1]), context=text, kv_cache=kv, crossattn_cache=cross)
    with pytest.raises(NotImplementedError, match="KV-cached"):
        model(x, t=torch.zeros([1, BLOCK]), context=text)
    with pytest.raises(NotImplementedError, match="image conditioning"):
        model(x, t=torch.zeros([1, BLOCK]), context=text, kv_cache=kv, crossattn_cache=cross, y=[x[0]])
    kv[0]["quantized"] = True
    with pytest.raises(NotImplementedError, match="NVFP4"):
        model(x, t=torch.zeros([1, BLOCK]), context=text, kv_cache=kv, crossattn_cache=cross)
    with pytest.raises(NotImplementedError, match="model_type"):
        CausalWanModel(model_type="i2v")


def _tree(root, files):
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("class CausalWanModel: pass\n")
    return root


def test_the_importers_tell_the_families_apart(tmp_path, monkeypatch):
    from longlive_triton.stock.longlive1 import resolve_stock_src
    from longlive_triton.stock.longlive2 import resolve_stock_src2
    from longlive_triton.stock.source import detect_family
    v2 = _tree(tmp_path / "v2", ["wan_5b/modules/causal_model.py"])
    v1 = _tree(tmp_path / "v1", ["wan/modules/causal_model.py"])
    assert (detect_family(v1), detect_family(v2), detect_family(tmp_path)) == ("longlive1", "longlive2", None)
    with pytest.raises(ValueError, match="is a LongLive 2.0 tree.*longlive2"):
        resolve_stock_src(v2)
    monkeypatch.setenv("LONGLIVE_SRC", str(v1))
    with pytest.raises(ValueError, match="is a LongLive v1.0 tree.*longlive1"):
        resolve_stock_src2()
    with pytest.raises(FileNotFoundError, match="not a LongLive 2.0 tree: missing .*pipeline/causal_diffusion_inference.py"):
        resolve_stock_src2(v2)
    monkeypatch.delenv("LONGLIVE_SRC")
    with pytest.raises(FileNotFoundError, match="LONGLIVE_SRC"):
        resolve_stock_src2()


def test_a_foreign_2_0_causal_model_is_refused(tmp_path):
    from longlive_triton.stock.longlive2 import _REQUIRED_FILES, resolve_stock_src2
    root = _tree(tmp_path, ["wan_5b/modules/causal_model.py", *_REQUIRED_FILES])
    with pytest.raises(ValueError, match="not LongLive 2.0's causal model"):
        resolve_stock_src2(root)


def test_importing_the_package_loads_no_stock_2_0_code():
    code = ("import sys, longlive_triton, longlive_triton.models; "
            "assert not {'wan_5b', 'pipeline', 'longlive_triton.stock.longlive2'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)



def test_flow_match_euler_standin():
    """The sampler stand-in (used where diffusers is absent) gives the stock UniPC timesteps and, fed the exact
    flow noise - x0, lands on x0."""
    import numpy as np

    from longlive_triton.stock.longlive2 import FlowMatchEuler
    sched = FlowMatchEuler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    sched.set_timesteps(4, device="cpu", shift=5.0)
    # The stock solver: sigma_max is its float32 table's first entry, 1 - 1/num_train_timesteps.
    table = 1.0 - np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    sigma_max = torch.from_numpy(table).to(torch.float32)[0].item()
    sigmas = np.linspace(sigma_max, 0, 5)[:-1]
    sigmas = 5.0 * sigmas / (1 + 4.0 * sigmas)
    assert sched.timesteps.tolist() == torch.from_numpy(sigmas * 1000).to(torch.int64).tolist()
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn([3, 5], generator=gen), torch.randn([3, 5], generator=gen)
    x = (1 - sched.sigmas[0]) * x0 + sched.sigmas[0] * noise
    for t in sched.timesteps:
        x = sched.step(noise - x0, t, x, return_dict=False)[0]
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)
