"""patch_model: recognition, the report, idempotence, configs, test-local patch lists, LoRA merging."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from longlive_triton import PatchConfig, PatchReport, load_preset, patch_model
from longlive_triton.config import as_config, preset_names
from longlive_triton.patches.base import Patch, PatchSkip
from longlive_triton.patches.registry import PATCHES
from longlive_triton.runtime.pipeline import BlockPipeline
from longlive_triton.models import CausalWanSelfAttention, build_model, get_preset

TINY = get_preset("tiny")


def inputs(seed: int = 0, frames: int = 6):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, frames, 16, TINY.latent_height, TINY.latent_width, generator=g)
    return noise, torch.randn(1, 10, TINY.text_dim, generator=g)


def generate(model, seed: int = 0):
    noise, prompt = inputs()
    torch.manual_seed(seed)
    return BlockPipeline(model).generate(noise, prompt)


# ----------------------------------------------------------------------------------------------
# the report, idempotence, refusal
# ----------------------------------------------------------------------------------------------
def test_patch_with_an_empty_patch_list_reports_nothing():
    model = build_model("tiny")
    before = generate(model)
    report = patch_model(model, patches=[])
    assert isinstance(report, PatchReport)
    assert report.config.name == "exact"
    assert report.applied == [] and report.skipped == []
    assert report.notes == ["cuda_graphs: off (the model is on cpu; graphs need CUDA)"]
    assert "no module patched" in str(report)
    assert "exact" in str(report)
    assert torch.equal(generate(model), before)


def test_default_patch_list_is_the_registry(monkeypatch):
    """patches=None applies the model family's registered list (whatever it holds: replaced here by a local one)."""
    import dataclasses

    import longlive_triton.patch as patch_mod
    from longlive_triton.patches.families import LONGLIVE1, family_of

    local = [Patch("registered", matches=lambda m: isinstance(m, CausalWanSelfAttention), enabled=lambda c: True,
                   replace=lambda m, c: m)]
    assert family_of(build_model("tiny")) is LONGLIVE1 and LONGLIVE1.patches is PATCHES
    monkeypatch.setattr(patch_mod, "family_of", lambda g: dataclasses.replace(LONGLIVE1, patches=local))
    report = patch_model(build_model("tiny"))
    assert [(e.path, e.patch) for e in report.applied] == [(f"blocks.{i}.self_attn", "registered")
                                                           for i in range(TINY.num_layers)]
    assert all(isinstance(p, Patch) for p in PATCHES)  # the real registry holds Patch objects only


def test_patching_twice_is_a_noop_with_a_note():
    model = build_model("tiny")
    calls = []
    patch = Patch("count", matches=lambda m: isinstance(m, CausalWanSelfAttention), enabled=lambda c: True,
                  replace=lambda m, c: (calls.append(m), m)[1])
    first = patch_model(model, patches=[patch])
    assert len(first.applied) == TINY.num_layers
    second = patch_model(model, patches=[patch])
    assert len(calls) == TINY.num_layers                    # nothing replaced the second time
    assert second.applied == [] and second.skipped == []
    assert len(second.notes) == 1 and "already patched" in second.notes[0] and "exact" in second.notes[0]
    assert "already patched" in str(second)


@pytest.mark.parametrize("bad", [nn.Linear(4, 4), nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Module()])
def test_non_longlive_module_raises_type_error(bad):
    with pytest.raises(TypeError, match="LongLive CausalWanModel"):
        patch_model(bad)


def test_generator_found_under_a_wrapper():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

    model = build_model("tiny")
    patch = Patch("swap", matches=lambda m: isinstance(m, CausalWanSelfAttention), enabled=lambda c: True,
                  replace=lambda m, c: m)
    report = patch_model(Wrapper(model), patches=[patch])
    assert [e.path for e in report.applied] == [f"blocks.{i}.self_attn" for i in range(TINY.num_layers)]


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def test_exact_preset():
    assert "exact" in preset_names()
    cfg = load_preset("exact")
    assert isinstance(cfg, PatchConfig) and cfg.name == "exact" and cfg.merge_lora is True
    assert as_config(None) == cfg and as_config("exact") == cfg
    assert as_config(cfg) is cfg
    with pytest.raises(ValueError, match="unknown patch preset"):
        load_preset("no-such-preset")


def test_config_validation():
    with pytest.raises(ValueError, match="unknown patch config keys"):
        PatchConfig.from_dict({"merge_lora": True, "bogus": 1})
    with pytest.raises(ValueError, match="bogus"):
        patch_model(build_model("tiny"), {"bogus": 1})
    with pytest.raises(TypeError, match="merge_lora"):
        PatchConfig(merge_lora="yes")
    with pytest.raises(TypeError, match="merge_lora"):
        PatchConfig.from_dict({"merge_lora": 1})
    with pytest.raises(TypeError, match="name"):
        PatchConfig(name=3)
    with pytest.raises(TypeError, match="mapping"):
        PatchConfig.from_dict([("merge_lora", True)])
    with pytest.raises(TypeError, match="config"):
        as_config(42)
    assert PatchConfig.from_dict({"merge_lora": False}) == PatchConfig(merge_lora=False)


def test_config_from_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("merge_lora: false\n")
    cfg = load_preset(str(path))
    assert cfg == PatchConfig(name="mine", merge_lora=False)
    assert PatchConfig.from_yaml(path) == cfg
    report = patch_model(build_model("tiny"), str(path), patches=[])
    assert report.config == cfg
    named = tmp_path / "other.yml"
    named.write_text("name: given\n")
    assert load_preset(str(named)).name == "given"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_preset(str(empty)) == PatchConfig(name="empty")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_lora: true\nturbo: 3\n")
    with pytest.raises(ValueError, match="turbo"):
        load_preset(str(bad))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("merge_lora: 'yes'\n")
    with pytest.raises(TypeError):
        load_preset(str(wrong))
    with pytest.raises(FileNotFoundError):
        load_preset(str(tmp_path / "missing.yaml"))


def test_presets_compose_through_base(tmp_path):
    """The defaults are `exact`; fastest is fp8 with a 9-frame window; a file's own keys win over
    its base's, its name is its own, and a base may be a path relative to the file."""
    assert dataclasses.replace(PatchConfig(), name="exact") == load_preset("exact")
    assert load_preset("fastest") == dataclasses.replace(load_preset("fp8"), name="fastest", local_attn_size=9)
    assert load_preset("window9") == dataclasses.replace(load_preset("exact"), name="window9", local_attn_size=9)
    (tmp_path / "mine.yaml").write_text("base: fastest\nlocal_attn_size: 6\nfp8_exclude: []\n")
    (tmp_path / "child.yaml").write_text("base: mine.yaml\nattention_split: 2\n")
    child = load_preset(str(tmp_path / "child.yaml"))
    assert child == dataclasses.replace(load_preset("fastest"), name="child", local_attn_size=6, fp8_exclude=(),
                                        tuning=dataclasses.replace(load_preset("fastest").tuning, attention_split=2))
    (tmp_path / "loop_a.yaml").write_text("base: loop_b.yaml\n")
    (tmp_path / "loop_b.yaml").write_text("base: loop_a.yaml\n")
    with pytest.raises(ValueError, match="leads back to itself"):
        load_preset(str(tmp_path / "loop_a.yaml"))
    (tmp_path / "unknown.yaml").write_text("base: turbo\n")
    with pytest.raises(ValueError, match="unknown patch preset 'turbo'"):
        load_preset(str(tmp_path / "unknown.yaml"))
    (tmp_path / "number.yaml").write_text("base: 3\n")
    with pytest.raises(TypeError, match="base must be a preset name"):
        load_preset(str(tmp_path / "number.yaml"))
    (tmp_path / "orphan.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(FileNotFoundError, match="gone.yaml"):
        load_preset(str(tmp_path / "orphan.yaml"))


# ----------------------------------------------------------------------------------------------
# a test-local patch list
# ----------------------------------------------------------------------------------------------
class MySelfAttention(CausalWanSelfAttention):
    """A replacement with the stock math: built from the stock module's weights."""

    @classmethod
    def from_stock(cls, m: CausalWanSelfAttention) -> "MySelfAttention":
        new = cls(m.dim, m.num_heads, m.local_attn_size, m.sink_size, m.qk_norm, m.eps)
        new.load_state_dict(m.state_dict())
        new.max_attention_size = m.max_attention_size
        return new.to(m.q.weight.dtype)


def test_local_patch_list_swaps_and_skips():
    model = build_model("tiny")
    before = generate(model)
    skip_target = model.blocks[1].self_attn

    def replace(m, cfg):
        if m is skip_target:
            raise PatchSkip("layer 1 stays stock for this test")
        return MySelfAttention.from_stock(m)

    patches = [
        Patch("my_self_attn", matches=lambda m: type(m) is CausalWanSelfAttention, enabled=lambda c: c.merge_lora,
              replace=replace),
        Patch("disabled", matches=lambda m: True, enabled=lambda c: False,
              replace=lambda m, c: pytest.fail("a disabled patch must not run")),
    ]
    report = patch_model(model, patches=patches)
    assert [(e.path, e.patch) for e in report.applied] == [("blocks.0.self_attn", "my_self_attn")]
    assert [(e.path, e.patch, e.reason) for e in report.skipped] == [
        ("blocks.1.self_attn", "my_self_attn", "layer 1 stays stock for this test")]
    assert report.counts() == {"my_self_attn": {"applied": 1, "skipped": 1}}
    text = str(report)
    assert "my_self_attn: 1 applied, 1 skipped" in text and "layer 1 stays stock" in text
    assert "no module patched" not in text
    assert type(model.blocks[0].self_attn) is MySelfAttention
    assert model.blocks[1].self_attn is skip_target
    # the model still runs, and the same math gives the same latents
    assert torch.equal(generate(model), before)


def test_patch_disabled_by_config():
    model = build_model("tiny")
    patch = Patch("p", matches=lambda m: type(m) is CausalWanSelfAttention, enabled=lambda c: c.merge_lora,
                  replace=lambda m, c: MySelfAttention.from_stock(m))
    report = patch_model(model, {"merge_lora": False}, patches=[patch])
    assert report.applied == [] and "no module patched" in str(report)
    assert all(type(b.self_attn) is CausalWanSelfAttention for b in model.blocks)


def test_replacements_are_not_revisited():
    """Targets are collected before swapping: a patch matching its own output runs once per module."""
    model = build_model("tiny")
    seen = []
    patch = Patch("again", matches=lambda m: isinstance(m, CausalWanSelfAttention), enabled=lambda c: True,
                  replace=lambda m, c: (seen.append(type(m)), MySelfAttention.from_stock(m))[1])
    report = patch_model(model, patches=[patch])
    assert seen == [CausalWanSelfAttention] * TINY.num_layers
    assert len(report.applied) == TINY.num_layers


def test_a_patch_that_changes_the_math_changes_the_output():
    """Guard for the equality above: the pipeline really runs the swapped module."""
    class Scaled(MySelfAttention):
        def forward(self, *a, **kw):
            y, info = super().forward(*a, **kw)
            return 2 * y, info

    model = build_model("tiny")
    before = generate(model)
    patch = Patch("scaled", matches=lambda m: type(m) is CausalWanSelfAttention, enabled=lambda c: True,
                  replace=lambda m, c: Scaled.from_stock(m))
    patch_model(model, patches=[patch])
    assert not torch.allclose(generate(model), before)


# ----------------------------------------------------------------------------------------------
# peft-style LoRA layers
# ----------------------------------------------------------------------------------------------
class FakeLoraLinear(nn.Module):
    """The attributes of peft.tuners.lora.layer.Linear that matter: base + sum_a s_a * B_a(A_a(x))."""

    def __init__(self, base: nn.Linear, r: int = 4, scaling: float = 0.5, seed: int = 0, extra_inactive: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        self.scaling = {"default": scaling}
        if extra_inactive:  # an adapter that is loaded but not active must not be merged
            self.lora_A["other"] = nn.Linear(base.in_features, r, bias=False)
            self.lora_B["other"] = nn.Linear(r, base.out_features, bias=False)
            self.scaling["other"] = 3.0
        with torch.no_grad():
            for mod in (*self.lora_A.values(), *self.lora_B.values()):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.2)
        self.active_adapters = ["default"]
        self.merged_adapters: list[str] = []
        self.to(base.weight.dtype)

    def forward(self, x):
        y = self.base_layer(x)
        for name in self.active_adapters:
            y = y + self.scaling[name] * self.lora_B[name](self.lora_A[name](x))
        return y


def insert_lora(model, dtype=torch.float32):
    blk0, blk1 = model.blocks[0], model.blocks[1]
    blk0.self_attn.q = FakeLoraLinear(blk0.self_attn.q, seed=1)
    blk1.ffn[0] = FakeLoraLinear(blk1.ffn[0], scaling=1.0, seed=2)
    blk1.cross_attn.v = FakeLoraLinear(blk1.cross_attn.v, scaling=2.0, seed=3, extra_inactive=False)
    return ["blocks.0.self_attn.q", "blocks.1.cross_attn.v", "blocks.1.ffn.0"]


def test_lora_merge():
    model = build_model("tiny")
    paths = insert_lora(model)
    layers = {p: model.get_submodule(p) for p in paths}
    g = torch.Generator().manual_seed(7)
    xs = {p: torch.randn(3, 5, layers[p].base_layer.in_features, generator=g) for p in paths}
    with torch.no_grad():
        want = {p: layers[p](xs[p]) for p in paths}
        lora_free = {p: layers[p].base_layer(xs[p]) for p in paths}
    before = generate(model)

    report = patch_model(model, patches=[])
    assert sorted((e.path, e.patch) for e in report.applied) == [(p, "merge_lora") for p in paths]
    assert report.skipped == []
    assert "merge_lora: 3 applied, 0 skipped" in str(report)
    for p in paths:
        merged = model.get_submodule(p)
        assert type(merged) is nn.Linear
        assert merged is layers[p].base_layer  # the stock name now holds a plain Linear
        with torch.no_grad():
            got = merged(xs[p])
        torch.testing.assert_close(got, want[p], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, lora_free[p], rtol=1e-3, atol=1e-3)  # the adapter did count
    assert not any(isinstance(m, FakeLoraLinear) for m in model.modules())
    # the whole model: same latents up to fp32 rounding (amplified a little by bf16 attention)
    after = generate(model)
    torch.testing.assert_close(after, before, rtol=1e-2, atol=3e-3)
    assert (after - before).abs().mean() < 1e-4


def test_lora_merge_weight_formula_bf16():
    base = nn.Linear(64, 32).to(torch.bfloat16)
    w0 = base.weight.detach().clone()
    layer = FakeLoraLinear(base, scaling=0.5, seed=4)
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    expected = (w0.float() + 0.5 * (b @ a)).to(torch.bfloat16)

    model = build_model("tiny", dtype=torch.bfloat16)
    model.blocks[0].ffn[2] = FakeLoraLinear(nn.Linear(128, 64).to(torch.bfloat16), seed=5)
    model.blocks[1].self_attn.o = layer
    report = patch_model(model, patches=[])
    assert {e.path for e in report.applied} == {"blocks.0.ffn.2", "blocks.1.self_attn.o"}
    assert model.blocks[1].self_attn.o.weight.dtype == torch.bfloat16
    assert torch.equal(model.blocks[1].self_attn.o.weight, expected)


def test_lora_merge_skips_a_misshapen_adapter_and_says_why():
    model = build_model("tiny")
    layer = FakeLoraLinear(model.blocks[0].self_attn.q, extra_inactive=False)
    layer.lora_B["default"] = nn.Linear(4, 65, bias=False)
    model.blocks[0].self_attn.q = layer
    w = layer.base_layer.weight.detach().clone()
    report = patch_model(model, patches=[])
    assert [(e.path, e.patch) for e in report.skipped] == [("blocks.0.self_attn.q", "merge_lora")]
    assert "B [65, 4] do not fit a weight of shape [64, 64]" in report.skipped[0].reason
    assert model.blocks[0].self_attn.q is layer and torch.equal(layer.base_layer.weight, w)


def test_merge_lora_false_leaves_adapters_with_a_note():
    model = build_model("tiny")
    paths = insert_lora(model)
    report = patch_model(model, {"merge_lora": False}, patches=[])
    assert report.applied == [] and report.skipped == []
    assert "3 unmerged LoRA layers" in report.notes[0] and "merge_lora" in report.notes[0]
    assert report.notes[1:] == ["cuda_graphs: off (the model is on cpu; graphs need CUDA)"]
    assert all(isinstance(model.get_submodule(p), FakeLoraLinear) for p in paths)


def test_already_merged_adapters_are_skipped_with_reason():
    model = build_model("tiny")
    paths = insert_lora(model)
    layer = model.get_submodule(paths[0])
    layer.merged_adapters = ["default"]
    w = layer.base_layer.weight.detach().clone()
    report = patch_model(model, patches=[])
    assert [(e.path, e.patch) for e in report.skipped] == [(paths[0], "merge_lora")]
    assert "already merged" in report.skipped[0].reason
    assert model.get_submodule(paths[0]) is layer and torch.equal(layer.base_layer.weight, w)
    assert sorted(e.path for e in report.applied) == paths[1:]


def test_yaml_files_that_are_not_a_mapping_name_the_file(tmp_path):
    listed = tmp_path / "listed.yaml"
    listed.write_text("- window_attention\n- fused_glue\n")
    with pytest.raises(TypeError, match=f"patch config file {listed} holds a list"):
        load_preset(str(listed))
    broken = tmp_path / "broken.yaml"
    broken.write_text("window_attention: [true\n")
    with pytest.raises(ValueError, match=f"patch config file {broken} is not valid YAML"):
        load_preset(str(broken))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("turbo: 3\n")
    with pytest.raises(ValueError, match=f"patch config file {unknown}: unknown patch config keys"):
        load_preset(str(unknown))


def test_patching_again_with_other_settings_is_refused():
    model = build_model("tiny", dtype=torch.bfloat16)
    patch_model(model, "exact")
    with pytest.raises(ValueError, match="already patched with config 'exact'; patching it again with 'fp8'"):
        patch_model(model, "fp8")
    assert "already patched" in str(patch_model(model, dict(load_preset("exact").__dict__, name="again")))


def test_a_patched_model_refuses_to_run_after_float():
    """.float() cannot reach the copies the patched layers made (fused q|k|v, fp8 weights): the call
    is refused up front instead of failing inside a kernel launcher."""
    model = build_model("tiny", dtype=torch.bfloat16)
    patch_model(model, {"window_attention": True, "fused_glue": True, "cuda_graphs": False})
    model.float()
    x = torch.zeros(1, 16, 3, TINY.latent_height, TINY.latent_width)
    with pytest.raises(RuntimeError, match="patched for torch.bfloat16 on cpu but its weights are now torch.float32"):
        model(x, t=torch.zeros(1, 3), context=torch.zeros(1, TINY.text_len, TINY.text_dim), seq_len=32760,
              kv_cache=[], crossattn_cache=[], current_start=0)


def test_fp8_weights_survive_dtype_casts():
    """model.to(torch.bfloat16) (LongLive's pipeline.to) or .float() after an fp8 patch keep the e4m3
    weights e4m3 (a floating-point buffer would be cast with everything else)."""
    from longlive_triton.patches.fp8_linear import FP8Linear

    model = build_model("tiny", dtype=torch.bfloat16)
    patch_model(model, {"fp8_linear": True, "cuda_graphs": False})
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert layers
    before = [(m.weight.clone(), m.weight_scale.clone()) for m in layers]
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.float(), lambda m: m.half()):
        cast(model)
        for m, (weight, scale) in zip(layers, before):
            assert m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32
            assert torch.equal(m.weight.view(torch.uint8), weight.view(torch.uint8))
            assert torch.equal(m.weight_scale, scale)
