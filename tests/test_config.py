"""PatchConfig: the user's choices apart from the kernels' tuning knobs, each checked against its
declared type; the preset files load to the same effective values as before the split."""
import dataclasses

import pytest

from longlive_triton.config import KernelTuning, PatchConfig, PatchConfigError, load_preset, preset_names

# Every preset's effective values, captured from the flat PatchConfig before the tuning knobs moved
# into KernelTuning (commit e698fc6), in the flat form of PatchConfig.to_dict().
EXACT = {
    "name": "exact", "merge_lora": True, "window_attention": True, "attention_backend": "sdpa",
    "kv_cache_dtype": "bf16", "attention_split": 1, "attention_tma": False, "fused_glue": True, "cuda_graphs": True,
    "local_attn_size": None, "token_merge_ratio": 0.0, "token_merge_stride": (2, 2), "fp8_linear": False,
    "fp8_exclude": ("text_embedding.*", "time_embedding.*", "time_projection.*", "head.*", "blocks.*.self_attn.o",
                    "blocks.*.cross_attn.q", "blocks.*.cross_attn.o"),
    "fp8_ffn_fused": True, "fp8_gemm_tma": True, "fp8_gemm_flatten": True, "fp8_gemm_warp_specialize": False,
}
FP8 = {**EXACT, "name": "fp8", "attention_backend": "triton", "kv_cache_dtype": "fp8", "attention_tma": True,
       "fp8_linear": True}
PINNED = {
    "exact": EXACT,
    "fp8": FP8,
    "fastest": {**FP8, "name": "fastest", "local_attn_size": 9},
    "window9": {**EXACT, "name": "window9", "local_attn_size": 9},
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_every_preset_loads_to_its_values_from_before_the_split(name):
    assert load_preset(name).to_dict() == PINNED[name]


def test_the_pinned_presets_are_all_of_them_and_the_defaults_are_exact():
    assert preset_names() == sorted(PINNED)
    assert PatchConfig().to_dict() == {**EXACT, "name": "custom"}
    assert dataclasses.replace(PatchConfig(), name="exact") == load_preset("exact")


def test_choices_and_tuning_knobs_are_apart():
    knobs = {f.name for f in dataclasses.fields(KernelTuning)}
    assert knobs == {"attention_split", "attention_tma", "fp8_gemm_tma", "fp8_gemm_flatten", "fp8_gemm_warp_specialize"}
    choices = {f.name for f in dataclasses.fields(PatchConfig)} - {"tuning"}
    assert not choices & knobs and {"name", "local_attn_size", "fp8_linear", "kv_cache_dtype", "cuda_graphs",
                                    "merge_lora"} <= choices
    fp8 = load_preset("fp8")
    assert fp8.tuning == KernelTuning(attention_tma=True) and fp8.kv_cache_dtype == "fp8"


def test_flat_and_nested_tuning_keys_load_alike(tmp_path):
    flat = PatchConfig.from_dict({"attention_split": 2, "fp8_gemm_flatten": False})
    nested = PatchConfig.from_dict({"tuning": {"attention_split": 2, "fp8_gemm_flatten": False}})
    assert flat == nested == PatchConfig(tuning=KernelTuning(attention_split=2, fp8_gemm_flatten=False))
    assert PatchConfig.from_dict(flat.to_dict()) == flat
    # A file's tuning keys win over its base's one by one, flat or nested on either side.
    (tmp_path / "base.yaml").write_text("base: fp8\ntuning:\n  attention_split: 4\n  fp8_gemm_tma: false\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nattention_split: 2\n")
    child = load_preset(str(tmp_path / "child.yaml"))
    assert child.tuning == KernelTuning(attention_split=2, attention_tma=True, fp8_gemm_tma=False)
    with pytest.raises(ValueError, match=r"\['attention_split'\] are given both flat and under tuning"):
        PatchConfig.from_dict({"attention_split": 2, "tuning": {"attention_split": 3}})
    with pytest.raises(ValueError, match=r"unknown patch config keys \['split'\]"):
        PatchConfig.from_dict({"tuning": {"split": 2}})
    with pytest.raises(TypeError, match="tuning must be a mapping"):
        PatchConfig.from_dict({"tuning": 2})


@pytest.mark.parametrize("key, value, allowed", [
    ("attention_backend", "flash", "one of 'sdpa', 'triton'"),
    ("kv_cache_dtype", "int8", "one of 'bf16', 'fp8'"),
    ("merge_lora", "yes", "a bool"),
    ("local_attn_size", 0, "in [1, inf] (an int) or None"),
    ("token_merge_ratio", 1.0, "in [0, 1) (a number)"),
    ("token_merge_stride", [2, 2, 2], "a list of 2 items"),
    ("fp8_exclude", "head.*", "a list, each item a str"),
    ("attention_split", 9, "in [1, 8] (an int)"),
    ("fp8_gemm_tma", 1, "a bool"),
])
def test_a_bad_value_names_the_key_and_what_it_takes(key, value, allowed):
    with pytest.raises(PatchConfigError) as info:
        PatchConfig.from_dict({key: value})
    assert str(info.value).startswith(f"{key} must be {allowed}") and repr(value) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)  # callers catch either


def test_yaml_lists_become_tuples():
    config = PatchConfig.from_dict({"token_merge_stride": [1, 3], "fp8_exclude": ["head.*"]})
    assert config.token_merge_stride == (1, 3) and config.fp8_exclude == ("head.*",)
    hash(config)  # frozen and hashable, tuning included
