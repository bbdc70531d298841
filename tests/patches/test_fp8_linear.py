"""The fp8 patches: FP8Linear equals the FP8 GEMM on the quantized weight and stays close to the bf16
Linear; the fp8 preset generates close to the unpatched model, with the fused producers really used
(adaln -> q|k|v and FFN up in FP8, FFN up -> FFN down in FP8); the exclusion rule; LoRA merged
before quantization; unsupported devices left bf16 with the reason."""
import pytest
import torch
import torch.nn as nn

from longlive_triton import PatchConfig, load_preset, patch_model
from longlive_triton.kernels.adaln import adaln_ref
from longlive_triton.kernels.fp8_gemm import fp8_gemm_ref, fp8_linear
from longlive_triton.kernels.fp8_quant import (Fp8Activation, quantize_groupwise_ref, quantize_rowwise,
                                               quantize_rowwise_ref, quantize_weight_per_channel)
from longlive_triton.numerics import cosine, rel_l2
from longlive_triton.patches import fp8_linear as fp8_patch
from longlive_triton.patches.fp8_linear import FP8FeedForward, FP8Linear, Fp8Weight
from longlive_triton.patches.window_self_attention import WindowSelfAttention
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.models import build_model, get_preset

from .._numerics import assert_as_close_as_same_precision


class LoraLinear(nn.Module):
    """What patch_model recognises as a peft LoRA layer: base + scaling * B(A(x))."""

    def __init__(self, base: nn.Linear, r: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        self.scaling = {"default": 1.0}
        with torch.no_grad():
            for mod in (self.lora_A["default"], self.lora_B["default"]):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.2)
        self.to(base.weight.device, base.weight.dtype)

# Latents of the fp8 preset against the unpatched bf16 model (tiny, 3 blocks): the fp8 rounding of
# weights and activations in every block; the bound for the 1.3B model is cosine >= 0.99.
MAX_REL_L2, MIN_COSINE = 0.03, 0.99  # measured in the interpreter: 8.3e-3, 0.99997


def _generate(model, device, blocks=3):
    p = get_preset("tiny")
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 3 * blocks, 16, p.latent_height, p.latent_width, generator=gen).to(device, torch.bfloat16)
    prompt = torch.randn(1, p.text_len, p.text_dim, generator=gen).to(device, torch.bfloat16)
    torch.manual_seed(0)
    return BlockPipeline(model, PipelineConfig()).generate(noise, prompt)


def _drift(got, want):
    return rel_l2(got, want), cosine(got, want)


def test_fp8_linear_module(device):
    gen = torch.Generator().manual_seed(1)
    linear = nn.Linear(64, 48).to(device, torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=gen) / 8)
    layer = FP8Linear.from_linear(linear, PatchConfig())
    w_q, w_s = quantize_weight_per_channel(linear.weight)
    assert torch.equal(layer.weight.float(), w_q.float()) and torch.equal(layer.weight_scale, w_s)
    x = torch.randn(2, 9, 64, generator=gen).to(device, torch.bfloat16)
    got = layer(x)
    assert got.shape == (2, 9, 48) and got.dtype == torch.bfloat16
    assert torch.equal(got, fp8_linear(x, w_q, w_s, linear.bias, **layer.options))
    # An already-quantized input gives the same result without quantizing again.
    assert torch.equal(layer(Fp8Activation(*quantize_rowwise(x))), got)
    want = linear(x).float()
    assert rel_l2(got, want) < 0.05
    with pytest.raises(TypeError, match="bf16 or an Fp8Activation"):
        layer(x.float())
    assert "per-channel scales" in repr(layer)


def _fp64_linear(x, layer, gelu=True):
    """An FP8Linear's math in fp64 on its dequantized weight (GELU after the up projection)."""
    y = x.double() @ (layer.weight.double() * layer.weight_scale.double()[:, None]).t() + layer.bias.double()
    return torch.nn.functional.gelu(y, approximate="tanh") if gelu else y


def test_fp8_feed_forward_matches_reference(device):
    gen = torch.Generator().manual_seed(2)
    ffn = nn.Sequential(nn.Linear(64, 256), nn.GELU(approximate="tanh"), nn.Linear(256, 64)).to(device, torch.bfloat16)
    x = torch.randn(1, 20, 64, generator=gen).to(device, torch.bfloat16)
    want = ffn(x).float()
    for fused in (True, False):
        new = FP8FeedForward.from_stock(ffn, PatchConfig(fp8_ffn_fused=fused))
        a = Fp8Activation(*quantize_rowwise(x))
        got = new(a)
        up, down = new[0], new[2]
        h = fp8_gemm_ref(a.q.view(20, 64), up.weight, a.scale.view(20), up.weight_scale, up.bias, gelu=True)
        # The hidden activation's own quantization is the one extra rounding against this reference.
        q_h, s_h = quantize_groupwise_ref(h) if fused else quantize_rowwise_ref(h.bfloat16())
        ref = fp8_gemm_ref(q_h, down.weight, s_h, down.weight_scale, down.bias)
        # Against the fp64 chain on the same FP8 operands with an unrounded hidden activation: at most
        # twice as far as this reference, which rounds where the module rounds (tests/_numerics.py).
        exact = _fp64_linear(_fp64_linear(a.dequantize().view(20, 64), up), down, gelu=False)
        assert_as_close_as_same_precision(got.view(20, 64), exact, ref.bfloat16(), terms=256,
                                          what=f"fused={fused}")
        assert rel_l2(got, want) < 0.08
        assert sorted(new.state_dict()) == ["0.bias", "0.weight", "0.weight_scale", "2.bias", "2.weight", "2.weight_scale"]


def test_fp8_feed_forward_adds_the_gated_residual(device):
    """forward(h, residual=x, gate=g, out=x): x + ffn(h) * g in place, bit for bit the adaln pass on
    the plain output, with the hidden activation in FP8 or in bf16."""
    gen = torch.Generator().manual_seed(3)
    ffn = nn.Sequential(nn.Linear(64, 256), nn.GELU(approximate="tanh"), nn.Linear(256, 64)).to(device, torch.bfloat16)
    x = torch.randn(1, 21, 64, generator=gen).to(device, torch.bfloat16)
    gate = torch.randn(1, 3, 1, 64, generator=gen).to(device, torch.bfloat16)
    a = Fp8Activation(*quantize_rowwise(torch.randn(1, 21, 64, generator=gen).to(device, torch.bfloat16)))
    for fused in (True, False):
        new = FP8FeedForward.from_stock(ffn, PatchConfig(fp8_ffn_fused=fused))
        want, _ = adaln_ref(x, y=new(a), gate=gate, norm=False)
        xr = x.clone()
        got = new(a, residual=xr, gate=gate, out=xr)
        assert got.data_ptr() == xr.data_ptr() and torch.equal(xr, want), fused


def test_fused_ffn_needs_hidden_multiple_of_128(device):
    ffn = nn.Sequential(nn.Linear(64, 96), nn.GELU(approximate="tanh"), nn.Linear(96, 64)).to(device, torch.bfloat16)
    with pytest.raises(fp8_patch.PatchSkip, match="multiple of 128"):
        FP8FeedForward.from_stock(ffn, PatchConfig())
    assert isinstance(FP8FeedForward.from_stock(ffn, PatchConfig(fp8_ffn_fused=False)), FP8FeedForward)


def test_fp8_preset_generates_close_to_reference(device, monkeypatch):
    want = _generate(build_model("tiny", dtype=torch.bfloat16, device=device, seed=4), device)
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=4)
    report = patch_model(model, "fp8")
    counts = report.counts()
    assert counts["fp8_ffn"]["applied"] == 2 and counts["fp8_qkv"]["applied"] == 2
    for block in model.blocks:
        assert isinstance(block.ffn, FP8FeedForward)
        assert isinstance(block.self_attn, WindowSelfAttention) and block.self_attn.accepts_fp8
        assert all(isinstance(getattr(block.self_attn, n), FP8Linear) for n in "qkv")
        assert type(block.self_attn.o) is nn.Linear        # excluded by the preset
    assert type(model.head.head) is nn.Linear

    # Record what each FP8 GEMM receives: the fused producers must hand over FP8, not bf16.
    seen = []
    call = Fp8Weight.__call__

    def spy(self, x, **kw):
        seen.append((self.weight.shape, type(x).__name__, getattr(x, "grouped", None), kw.get("out_fp8", False)))
        return call(self, x, **kw)

    monkeypatch.setattr(Fp8Weight, "__call__", spy)
    got = _generate(model, device)
    dim, ffn = 64, 128
    kinds = {(tuple(s), t, g, o) for s, t, g, o in seen}
    assert ((3 * dim, dim), "Fp8Activation", False, False) in kinds   # adaln -> q|k|v
    assert ((ffn, dim), "Fp8Activation", False, True) in kinds         # adaln -> FFN up -> FP8 out
    assert ((dim, ffn), "Fp8Activation", True, False) in kinds         # FFN up -> FFN down, group scales
    fed_bf16 = {s for s, t, _, _ in kinds if t == "Tensor"}
    assert fed_bf16 <= {(dim, dim)}                                    # only cross-attention k/v (the text)

    rel, cos = _drift(got, want)
    print(f"fp8 preset vs unpatched, tiny, 3 blocks: rel L2 {rel:.4g}, cosine {cos:.6f}")
    assert torch.isfinite(got.float()).all()
    assert rel <= MAX_REL_L2 and cos >= MIN_COSINE, (rel, cos)


def test_ffn_residual_in_epilogue_equals_separate_pass(device):
    """The block's gated residual in the FFN down GEMM's epilogue (fuses_residual) gives the latents
    of the separate adaln pass bit for bit: the same bf16 rounding points, the same GEMM tiles."""
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=4)
    patch_model(model, "fp8")
    assert all(block.ffn.fuses_residual for block in model.blocks)
    fused = _generate(model, device, blocks=1)
    for block in model.blocks:
        block.ffn.fuses_residual = False
    separate = _generate(model, device, blocks=1)
    assert torch.equal(fused, separate)


def test_exclusion_rule(device):
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=4)
    cfg = PatchConfig(fused_glue=True, window_attention=True, fp8_linear=True,
                      fp8_exclude=["blocks.1.ffn.2", "blocks.*.self_attn.k", "head.*"])
    report = patch_model(model, cfg)
    b0, b1 = model.blocks
    assert isinstance(b0.ffn, FP8FeedForward)
    # One excluded half of the FFN: the pair is not fused, the other half is a plain FP8 layer.
    assert type(b1.ffn) is nn.Sequential and isinstance(b1.ffn[0], FP8Linear) and type(b1.ffn[2]) is nn.Linear
    assert not b0.self_attn.accepts_fp8 and type(b0.self_attn.k) is nn.Linear
    assert isinstance(model.text_embedding[0], FP8Linear) and type(model.head.head) is nn.Linear
    assert isinstance(model.blocks[0].self_attn.o, FP8Linear)
    reasons = {(e.path, e.reason) for e in report.skipped}
    assert ("blocks.1.ffn", "kept bf16 by fp8_exclude pattern 'blocks.1.ffn.2'") in reasons
    assert ("blocks.0.self_attn", "kept bf16 by fp8_exclude pattern 'blocks.*.self_attn.k'") in reasons


def test_lora_is_merged_before_quantization(device):
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=4)
    model.blocks[1].ffn[0] = LoraLinear(model.blocks[1].ffn[0], seed=2)
    lora = model.blocks[1].ffn[0]
    a, b = lora.lora_A["default"].weight.float(), lora.lora_B["default"].weight.float()
    merged = (lora.base_layer.weight.float() + b @ a).to(torch.bfloat16)
    report = patch_model(model, "fp8")
    assert ("blocks.1.ffn.0", "merge_lora") in {(e.path, e.patch) for e in report.applied}
    up = model.blocks[1].ffn[0]
    assert isinstance(up, FP8Linear)
    w_q, w_s = quantize_weight_per_channel(merged)
    assert torch.equal(up.weight.float(), w_q.float()) and torch.equal(up.weight_scale, w_s)


def test_unsupported_gpu_leaves_layers_bf16(device, monkeypatch):
    monkeypatch.setattr(fp8_patch, "fp8_supported", lambda dev: False)
    monkeypatch.setattr(fp8_patch, "_capability", lambda dev: "a GPU of compute capability 8.0")
    model = build_model("tiny", dtype=torch.bfloat16, device=device, seed=4)
    report = patch_model(model, "fp8")
    assert not any(isinstance(m, (FP8Linear, FP8FeedForward)) for m in model.modules())
    assert not any(e.patch.startswith("fp8") for e in report.applied)
    reasons = {e.reason for e in report.skipped if e.patch.startswith("fp8") and "fp8_exclude" not in e.reason}
    assert reasons == {"FP8 tensor cores need compute capability >= 8.9 (Ada, Hopper); "
                       "this is a GPU of compute capability 8.0"}
    assert not any(block.self_attn.accepts_fp8 for block in model.blocks)


def test_fp8_config_keys():
    cfg = load_preset("fp8")
    assert cfg.fp8_linear and cfg.fused_glue and cfg.window_attention and isinstance(cfg.fp8_exclude, tuple)
    assert PatchConfig.from_dict({"fp8_exclude": ["a.*"]}).fp8_exclude == ("a.*",)
    with pytest.raises(TypeError, match="fp8_exclude"):
        PatchConfig(fp8_exclude="head.*")
    with pytest.raises(TypeError, match="fp8_gemm_tma"):
        PatchConfig.from_dict({"fp8_gemm_tma": "yes"})


@pytest.mark.gpu
@pytest.mark.slow
def test_fp8_preset_drift_at_real_size():
    """LongLive-1.3B shapes, random weights, 10 blocks (the window fills in 4, then rolls): fp8 against
    exact, cosine >= 0.99 per block."""
    device = torch.device("cuda")
    p = get_preset("longlive-1.3b")
    blocks = 10
    gen = torch.Generator(device=device).manual_seed(0)
    noise = torch.randn(1, 3 * blocks, 16, p.latent_height, p.latent_width, generator=gen, device=device)
    prompt = torch.randn(1, p.text_len, p.text_dim, generator=gen, device=device)
    outs = {}
    for name in ("exact", "fp8"):
        model = build_model("longlive-1.3b", dtype=torch.bfloat16, device=device, seed=4)
        patch_model(model, name)
        torch.manual_seed(0)
        outs[name] = BlockPipeline(model, PipelineConfig()).generate(noise.bfloat16(), prompt.bfloat16())
        del model
    per_block = [_drift(f, e) for f, e in zip(outs["fp8"].split(3, dim=1), outs["exact"].split(3, dim=1))]
    for i, (rel, cos) in enumerate(per_block):
        print(f"block {i}: rel L2 {rel:.4g}, cosine {cos:.6f}")
    assert all(cos >= 0.99 for _, cos in per_block), per_block
