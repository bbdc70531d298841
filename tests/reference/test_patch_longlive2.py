"""patch_model on LongLive 2.0's own CausalWanModel, driven by LongLive 2.0's own inference pipeline.

CPU (Triton's interpreter), tiny dims, bf16 (the kernels serve bf16 only). The stock pipeline runs
unchanged, scene cuts included: at each cut its shot sink is pinned and its RoPE offset steps on.
What is compared, against the unpatched stock model under the same pipeline:
- after every generator call, every layer's cache pointers and pinned start (exactly);
- layer by layer, each self-attention's output with its input taken from the stock run (teacher
  forcing: the caches then hold the same keys up to rounding, so a missing shot offset or an
  untracked pin stands out against one layer's rounding, which the whole-model figure would hide);
- the generated latents, block by block.
The stock source comes from $LONGLIVE_SRC2 (or $LONGLIVE_SRC when it is a LongLive 2.0 tree); without it
these tests skip.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from longlive_triton import patch_model
from longlive_triton.numerics import cosine, rel_l2

CUT = "The scene transitions. "
# One layer's self-attention, same precision: our q/k RoPE runs in fp32 where the stock runs float64,
# both rounded to bf16, so a few elements of q and k differ by one bf16 step (2^-8 relative); the
# attention output moves by at most that much.
LAYER_BOUND = 2.0 ** -8
# With a peft LoRA the stock model rounds the base and adapter outputs apart (and their sum), the patched
# one the merged weight once: up to three bf16 roundings of each projection instead of one.
LORA_LAYER_BOUND = 4 * 2.0 ** -8
# The latents after every block (bf16 rounding differences carried through the cache, 4 steps).
LATENT_BOUND = 1e-2


@pytest.fixture(scope="module")
def stock2():
    from longlive_triton.stock.longlive2 import load_stock_longlive2

    from ..stock_harness2 import stock2_src
    src = stock2_src()
    if src is None:
        pytest.skip("no LongLive 2.0 checkout (branch main of NVlabs/LongLive): set LONGLIVE_SRC2 (or LONGLIVE_SRC) "
                    "to one, e.g. .stock/LongLive2 (tests/gpu/prepare_stock_src.sh MIRROR main)")
    return load_stock_longlive2(src)


def _preset(**changes):
    from longlive_triton.models.longlive2.presets import get_preset
    # tiny2 with 2-frame blocks, an 8-frame window and a 2-frame sink: the cache fills in 4 blocks and a
    # pinned block floats two blocks before it reaches the global sink, in few blocks.
    return dataclasses.replace(get_preset("tiny2"), num_frame_per_block=2, local_attn_size=8, sink_size=2,
                               sampling_steps=2, **changes)


def _model(stock2, cfg, seed=0, device="cpu"):
    from longlive_triton.stock.longlive2 import build_stock_model2
    torch.manual_seed(seed)
    model = build_stock_model2(stock2, cfg.model_kwargs(), dtype=torch.float32)
    nn.init.normal_(model.head.head.weight, std=0.02)  # the stock init zeroes it: outputs would be 0
    return model.to(device, torch.bfloat16)


def _prompts(blocks: int, cuts: tuple[int, ...], text_len: int, text_dim: int, device="cpu"):
    names = [(CUT if i in cuts else "") + f"shot {sum(c <= i for c in cuts)}" for i in range(blocks)]
    g = torch.Generator().manual_seed(1)
    return [names], {n: torch.randn(text_len, text_dim, generator=g).to(device, torch.bfloat16) for n in set(names)}


def _noise(cfg, blocks: int, seed: int, device="cpu"):
    return torch.randn(1, blocks * cfg.num_frame_per_block, cfg.in_dim, cfg.latent_height, cfg.latent_width,
                       generator=torch.Generator().manual_seed(seed)).to(device, torch.bfloat16)


def _run(stock2, model, cfg, prompts, table, noise, record=None, clean_recache=False):
    """LongLive 2.0's pipeline over `model`: (latents, per-call pointers). record None: store each
    self-attention's input and output; else feed each the recorded input and append its output."""
    from longlive_triton.stock.longlive2 import stock_pipeline
    store = {} if record is None else record
    calls, hooks = [0], []
    blocks = model.base_model.model.blocks if hasattr(model, "base_model") else model.blocks
    for i, block in enumerate(blocks):
        def pre(mod, args, kwargs, i=i):
            if record is None:   # (the fp8 preset hands its self-attention an FP8 activation: not recorded)
                store[calls[0], i] = [args[0].clone() if isinstance(args[0], torch.Tensor) else None]
                return None
            return (store[calls[0], i][0],) + args[1:], kwargs

        def post(mod, args, kwargs, out, i=i):
            store[calls[0], i].append(out[0].float().clone())
        hooks += [block.self_attn.register_forward_pre_hook(pre, with_kwargs=True),
                  block.self_attn.register_forward_hook(post, with_kwargs=True)]
    pipe = stock_pipeline(stock2, model, cfg, prompts=table)
    pipe.shot_clean_recache = clean_recache
    pointers = []

    def after_call(mod, args, kwargs, out):
        calls[0] += 1
        pointers.append([tuple(int(c[k].item()) for k in ("global_end_index", "local_end_index", "pinned_start",
                                                          "pinned_len")) for c in pipe.kv_cache_pos])
    hooks.append(pipe.generator.register_forward_hook(after_call, with_kwargs=True))
    try:
        with torch.inference_mode():   # as LongLive 2.0's inference.py runs it
            latents = pipe.inference(noise, prompts, return_latents=True)
    finally:
        for h in hooks:
            h.remove()
    return latents.float(), pointers, store


def _check_parity(stock2, cfg, blocks, cuts, *, clean_recache=False, wrap=None, device="cpu", config="exact",
                  bound=LAYER_BOUND):
    prompts, table = _prompts(blocks, cuts, cfg.text_len, cfg.text_dim, device)
    noise = _noise(cfg, blocks, 2, device)
    model = _model(stock2, cfg, device=device)
    patched = copy.deepcopy(model)
    if wrap is not None:
        model, patched = wrap(model), wrap(patched)
    report = patch_model(patched, config)
    assert report.family == "LongLive 2.0", str(report)
    counts = {name: c["applied"] for name, c in report.counts().items() if name != "merge_lora"}
    layers = cfg.num_layers
    assert counts == {"fused_block": layers, "window_self_attention": layers, "fused_cross_attention": layers,
                      "fused_head": 1}
    want, want_ptr, record = _run(stock2, model, cfg, prompts, table, noise, clean_recache=clean_recache)
    _, got_ptr, _ = _run(stock2, patched, cfg, prompts, table, noise, record=record, clean_recache=clean_recache)
    assert got_ptr == want_ptr
    worst = max((rel_l2(out[2], out[1]), key) for key, out in record.items())
    assert worst[0] <= bound, f"self-attention of layer {worst[1][1]} at call {worst[1][0]}: {worst[0]}"
    return model, patched, prompts, table, noise, want_ptr


def _pins(pointers) -> set[int]:
    return {layer[2] for call in pointers for layer in call}


@pytest.mark.parametrize("defer", [False, True], ids=["model_commits", "LLV2_DEFER_KV_UPDATES"])
def test_layer_parity_across_scene_cuts(stock2, monkeypatch, defer):
    """Cuts at block 1 (pinned straight onto the global sink), 4 (a pin that floats two evictions
    before it sticks, replacing the first) and 6 (a third shot before that); offset 8 frames a shot."""
    if defer:
        monkeypatch.setenv("LLV2_DEFER_KV_UPDATES", "1")
    pointers = _check_parity(stock2, _preset(), 8, (1, 4, 6))[-1]
    fs = _preset().frame_seqlen
    # Cut 1 pins onto the global sink (2 frames); cut 4 pins at frame 6, which the next call's eviction
    # moves to 4 (pointers are read after each call) and the one after onto the sink.
    assert _pins(pointers) == {-1, 2 * fs, 4 * fs}


def test_layer_parity_consecutive_cuts_with_clean_recache(stock2):
    """Cuts at blocks 3 and 4, the cache emptied back to the global sink before each cut's cache pass
    (shot_clean_recache), and a 3-frame shot offset."""
    cfg = _preset(multi_shot_rope_offset=3.0)
    pointers = _check_parity(stock2, cfg, 7, (3, 4), clean_recache=True)[-1]
    assert _pins(pointers) == {-1, 2 * cfg.frame_seqlen}   # the emptied cache pins each cut at the global sink


def test_latents_follow_the_stock_model(stock2):
    """Free running (no teacher forcing): the latents of every block, cuts at blocks 2 and 3."""
    cfg = _preset()
    prompts, table = _prompts(6, (2, 3), cfg.text_len, cfg.text_dim)
    noise = _noise(cfg, 6, 3)
    model = _model(stock2, cfg, seed=5)
    want, want_ptr, _ = _run(stock2, model, cfg, prompts, table, noise)
    patch_model(model, "exact")
    got, got_ptr, _ = _run(stock2, model, cfg, prompts, table, noise)
    assert got_ptr == want_ptr
    f = cfg.num_frame_per_block
    for block in range(6):
        assert rel_l2(got[:, block * f:(block + 1) * f], want[:, block * f:(block + 1) * f]) <= LATENT_BOUND, block


@pytest.mark.gpu
def test_5b_shapes_with_a_scene_cut(stock2, device):
    """LongLive 2.0 at its real widths and frame (1280x704: 880 tokens, 8-frame blocks, 32-frame window),
    two layers: 8 blocks, a cut at block 5 (its pin floats two evictions, then joins the global sink: the
    ring is unrolled with a shift of one block, in the FP8 cache too). Layer by layer without graphs
    (teacher forcing swaps tensors a graph would not see), then the latents free running with the
    presets as they are (CUDA graphs on): exact within bf16 drift, fp8 by its cosine."""
    from longlive_triton.models.longlive2.presets import get_preset
    from longlive_triton.runtime.graphs import graph_runner
    if device.type != "cuda":
        pytest.skip("needs a GPU")
    cfg = dataclasses.replace(get_preset("longlive2-5b"), num_layers=2)
    _check_parity(stock2, cfg, 8, (5,), device=device, config={"cuda_graphs": False})
    prompts, table = _prompts(8, (5,), cfg.text_len, cfg.text_dim, device)
    noise = _noise(cfg, 8, 4, device)
    want, want_ptr, _ = _run(stock2, _model(stock2, cfg, seed=6, device=device), cfg, prompts, table, noise)
    f = cfg.num_frame_per_block
    for preset in ("exact", "fp8"):
        model = _model(stock2, cfg, seed=6, device=device)
        patch_model(model, preset)
        got, got_ptr, _ = _run(stock2, model, cfg, prompts, table, noise)
        assert got_ptr == want_ptr, preset
        assert graph_runner(model).stats.replays > 0, preset
        for block in range(8):
            got_b, want_b = got[:, block * f:(block + 1) * f], want[:, block * f:(block + 1) * f]
            if preset == "exact":
                assert rel_l2(got_b, want_b) <= LATENT_BOUND, (preset, block)
            else:
                assert cosine(got_b, want_b) >= 0.99, (preset, block)


def test_our_reference_is_patched_as_longlive2(stock2):
    """Our LongLive 2.0 reference (longlive_triton/models/longlive2) is recognised as 2.0 and patched to match
    itself unpatched under LongLive 2.0's pipeline."""
    from longlive_triton.models.longlive2.model import CausalWanModel
    cfg = _preset()
    torch.manual_seed(7)
    model = CausalWanModel(**cfg.model_kwargs())
    nn.init.normal_(model.head.head.weight, std=0.02)
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    prompts, table = _prompts(5, (3,), cfg.text_len, cfg.text_dim)
    noise = _noise(cfg, 5, 8)
    want, want_ptr, _ = _run(stock2, model, cfg, prompts, table, noise)
    report = patch_model(model, "exact")
    assert report.family == "LongLive 2.0" and not report.skipped, str(report)
    got, got_ptr, _ = _run(stock2, model, cfg, prompts, table, noise)
    assert got_ptr == want_ptr
    assert rel_l2(got, want) <= LATENT_BOUND


def test_graph_keys_follow_the_shot(stock2):
    """The CUDA-graph runner (on the CPU stand-in of tests/test_graph_runner.py) keys LongLive 2.0's graphs on
    the shot's RoPE offset and each layer's effective sink, launch arguments a replay would keep: after a
    cut new graphs are made, and the run equals the eager patched one."""
    from longlive_triton.patches import cache_rules2
    from longlive_triton.runtime.graphs import install_graphs

    from ..test_graph_runner import FakeBackend
    cfg = _preset()
    prompts, table = _prompts(7, (3,), cfg.text_len, cfg.text_dim)
    noise = _noise(cfg, 7, 9)
    eager = _model(stock2, cfg, seed=3)
    graphed = copy.deepcopy(eager)
    patch_model(eager, {"cuda_graphs": False})
    patch_model(graphed, {"cuda_graphs": False})
    runner = install_graphs(graphed, max_graphs=64, backend=FakeBackend(), rules=cache_rules2)
    want, want_ptr, _ = _run(stock2, eager, cfg, prompts, table, noise)
    got, got_ptr, _ = _run(stock2, graphed, cfg, prompts, table, noise)
    assert got_ptr == want_ptr and torch.equal(got, want)
    assert runner.stats.replays > 0 and "cross-attention cache being filled" not in runner.stats.eager_reasons
    shots = {key[-1][:2] for key in runner.graphs}
    fs, sink = cfg.frame_seqlen, cfg.sink_size * cfg.frame_seqlen
    # Before the cut: offset 0, the global sink; after: offset 8, the pin floating, then joined to the sink.
    assert shots == {(0, (sink,) * 2), (8, (sink,) * 2), (8, (sink + 2 * fs,) * 2)}, shots


class _PeftLike(nn.Module):
    """peft's nesting: PeftModel -> LoraModel (.base_model) -> the generator (.model), as LongLive 2.0
    unwraps it (`_dit_model`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = model

    def forward(self, *args, **kwargs):
        return self.base_model.model(*args, **kwargs)


def _with_lora(model):
    from ..test_patch import FakeLoraLinear
    for i, block in enumerate(model.blocks):
        for name in ("q", "k", "v", "o"):
            setattr(block.self_attn, name, FakeLoraLinear(getattr(block.self_attn, name), seed=4 * i + len(name)))
    return _PeftLike(model)


def test_peft_wrapped_model(stock2):
    """The pipeline's generator.model is peft's wrapper; the LoRA is merged, then the layers patched."""
    _check_parity(stock2, _preset(), 5, (2,), wrap=_with_lora, bound=LORA_LAYER_BOUND)


def test_the_layer_check_sees_a_missing_shot_offset(stock2, monkeypatch):
    """The check above against a patched model that drops the shot RoPE offset (v1.0's RoPE after a cut)."""
    from longlive_triton.patches.window_self_attention2 import WindowSelfAttention2
    attend = WindowSelfAttention2._attend
    monkeypatch.setattr(WindowSelfAttention2, "_attend", lambda self, *a, frame_offset=0, **k: attend(self, *a, **k))
    with pytest.raises(AssertionError, match="self-attention of layer"):
        _check_parity(stock2, _preset(), 3, (1,))


# ----------------------------------------------------------------------------------------------
# What is not served: refused at patch time (the model untouched) or at the first call, by name.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attr, value, match", [("t_scale", 0.5, "t_scale"), ("use_relative_rope", True, "relative"),
                                                ("rope_method", "ntk", "method"), ("original_seq_len", 21, "original"),
                                                ("kv_quant_config", object(), "NVFP4")])
def test_refused_at_patch_time(stock2, attr, value, match):
    model = _model(stock2, _preset())
    setattr(model, attr, value)
    blocks = list(model.blocks)
    with pytest.raises(ValueError, match=match):
        patch_model(model, "exact")
    assert list(model.blocks) == blocks and all(type(b).__name__ == "CausalWanAttentionBlock" for b in blocks)


def test_refused_window_preset_and_compiled_model(stock2):
    model = _model(stock2, _preset())
    with pytest.raises(ValueError, match="local_attn_size"):
        patch_model(model, {"local_attn_size": 6})
    with pytest.raises(ValueError, match="token_merge_ratio"):
        patch_model(model, {"token_merge_ratio": 0.5})
    with pytest.raises(TypeError, match="compile"):
        patch_model(torch.compile(model), "exact")
    assert type(model.blocks[0]).__name__ == "CausalWanAttentionBlock"


def _one_call(stock2, model, cfg, **settings):
    from longlive_triton.stock.longlive2 import prepare_inference, stock_forward, stock_pipeline
    pipe = stock_pipeline(stock2, model, cfg, prompts={"a": torch.zeros(cfg.text_len, cfg.text_dim)})
    prepare_inference(pipe, dtype=torch.bfloat16)
    for name, value in settings.items():
        setattr(pipe._dit_model, name, value)
    f = cfg.num_frame_per_block
    latents = torch.randn(1, f, cfg.in_dim, cfg.latent_height, cfg.latent_width).to(torch.bfloat16)
    with torch.no_grad():
        return pipe, stock_forward(pipe, latents, torch.zeros(1, cfg.text_len, cfg.text_dim, dtype=torch.bfloat16),
                                   500.0, 0)


@pytest.mark.parametrize("settings, match", [
    (dict(use_relative_rope=True), "use_relative_rope"), (dict(t_scale=2.0), "t_scale"),
    (dict(rope_method="yarn"), "method"), (dict(rope_temporal_offset=0.5), "temporal_offset"),
    (dict(rope_temporal_offset=torch.tensor([8.0, 16.0])), "per-sample or per-frame"),
], ids=["relative_rope", "t_scale", "method", "fractional_offset", "per_frame_offset"])
def test_refused_at_the_first_call(stock2, settings, match):
    """LongLive 2.0's pipeline sets these on the model when inference starts, after patching."""
    cfg = _preset()
    model = _model(stock2, cfg)
    patch_model(model, "exact")
    with pytest.raises(ValueError, match=match):
        _one_call(stock2, model, cfg, **settings)


def test_refused_cache_forms(stock2):
    """An NVFP4 cache dict, and an attention budget below the cache (2.0's pipeline sets both equal)."""
    from longlive_triton.stock.longlive2 import stock_forward
    cfg = _preset()
    model = _model(stock2, cfg)
    patch_model(model, "exact")
    pipe, _ = _one_call(stock2, model, cfg)   # served: the settings its pipeline makes
    zeros = torch.zeros(1, cfg.text_len, cfg.text_dim, dtype=torch.bfloat16)
    latents = torch.zeros(1, cfg.num_frame_per_block, cfg.in_dim, cfg.latent_height, cfg.latent_width,
                          dtype=torch.bfloat16)
    for block in model.blocks:
        block.self_attn.max_attention_size = 6 * cfg.frame_seqlen
    with torch.no_grad(), pytest.raises(ValueError, match="budget"):
        stock_forward(pipe, latents, zeros, 500.0, cfg.num_frame_per_block)
    pipe.kv_cache_pos[0]["quantized"] = True
    with torch.no_grad(), pytest.raises(ValueError, match="NVFP4"):
        stock_forward(pipe, latents, zeros, 500.0, cfg.num_frame_per_block)


def test_unserved_linear_layers_stay_stock_with_the_reason(stock2):
    """Linear layers that are not nn.Linear (NVFP4's TransformerEngine / FourOverSix layers) leave their
    self-attention stock, and the report says why; the block around it still runs 2.0's call."""
    class OtherLinear(nn.Linear):
        pass
    cfg = _preset()
    model = _model(stock2, cfg)
    q = model.blocks[0].self_attn.q
    other = OtherLinear(q.in_features, q.out_features).to(torch.bfloat16)
    other.load_state_dict(q.state_dict())
    model.blocks[0].self_attn.q = other
    report = patch_model(model, "exact")
    assert any(e.path == "blocks.0.self_attn" and "OtherLinear" in e.reason for e in report.skipped), str(report)
    _, (flow, _) = _one_call(stock2, model, cfg)
    assert torch.isfinite(flow.float()).all()


def test_compiling_the_patched_model_is_refused_at_its_first_call(stock2, monkeypatch):
    """LongLive 2.0 compiles the model's call lazily (its SafeCompiledCallable falls back to eager on an error)."""
    cfg = _preset()
    model = _model(stock2, cfg)
    patch_model(model, "exact")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="torch.compile"):
        _one_call(stock2, model, cfg)


def test_patch_vae_leaves_the_wan22_vae_with_the_reason(stock2, monkeypatch):
    """The Wan2.2 VAE (z_dim 48, Up_ResidualBlock + DupUp3D) is not served: its decoder stays, the report says so."""
    import importlib.util
    import sys
    import types

    from longlive_triton import patch_vae
    if importlib.util.find_spec("einops") is None:   # imported by the VAE module, used only in its forward
        monkeypatch.setitem(sys.modules, "einops", types.SimpleNamespace(rearrange=None))
    spec = importlib.util.spec_from_file_location("_llv2_vae2_2", stock2.src / "wan_5b/modules/vae2_2.py")
    vae2_2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vae2_2)
    vae = vae2_2.WanVAE_(dim=16, dec_dim=32, z_dim=8, num_res_blocks=1).to(torch.bfloat16)
    decoder = vae.decoder
    report = patch_vae(vae)
    assert vae.decoder is decoder and not report.applied
    assert len(report.skipped) == 1 and "Wan2.2" in report.skipped[0].reason, str(report)
