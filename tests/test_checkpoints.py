"""Checkpoint loaders: every format round-trips exactly into the tiny reference model, every mismatch
is one CheckpointError naming the key (and leaves the model untouched), LoRA merges match the
unmerged base(x) + B(A(x)), and Hugging Face repo ids resolve from a local cache with no network."""
from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from longlive_triton.loading.files import resolve_checkpoint
from longlive_triton.loading.checkpoints import (
    CheckpointError, load_longlive, load_longlive_generator, load_state_dict_strict, load_wan_base, merge_lora,
)
from longlive_triton.models import build_model

LORA_RANK = 4


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def model() -> nn.Module:
    """The tiny reference model, fp32, seed 0 (the model being loaded into)."""
    return build_model("tiny", seed=0)


@pytest.fixture
def source_sd() -> dict[str, torch.Tensor]:
    """A different random fp32 state dict of the same shapes (what the checkpoints hold)."""
    return {k: v.clone() for k, v in build_model("tiny", seed=1).state_dict().items()}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing in these tests may open a connection."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def assert_params_equal(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def lora_targets(model: nn.Module) -> list[str]:
    """LongLive's targets: every nn.Linear inside a CausalWanAttentionBlock."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]


def make_lora(model: nn.Module, rank: int = LORA_RANK, seed: int = 2, adapter: str | None = None):
    """A PEFT-named LoRA state dict for every target, with non-zero A and B."""
    gen = torch.Generator().manual_seed(seed)
    infix = "" if adapter is None else f".{adapter}"
    sd = {}
    for name in lora_targets(model):
        lin = model.get_submodule(name)
        sd[f"base_model.model.{name}.lora_A{infix}.weight"] = torch.randn(rank, lin.in_features, generator=gen) * 0.1
        sd[f"base_model.model.{name}.lora_B{infix}.weight"] = torch.randn(lin.out_features, rank, generator=gen) * 0.1
    return sd


def fake_hf_cache(root, repo_id: str, files: dict[str, object], rev: str = "0123456789abcdef0123456789abcdef01234567"):
    """The hub cache layout: models--org--name/{refs/main, snapshots/<rev>/<file>}. Returns the snapshot dir."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    (repo_dir / "blobs").mkdir()
    for name, writer in files.items():
        target = snap / name
        target.parent.mkdir(parents=True, exist_ok=True)
        writer(target)
    return snap


# ------------------------------------------------------------------------------------------------
# Wan base (safetensors)
# ------------------------------------------------------------------------------------------------

def test_wan_base_file_and_dir_round_trip(tmp_path, model, source_sd):
    save_file(source_sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    r = load_wan_base(model, tmp_path / "diffusion_pytorch_model.safetensors")
    assert_params_equal(model, source_sd)
    assert r.num_tensors == len(source_sd)

    other = build_model("tiny", seed=3)
    load_wan_base(other, tmp_path)  # the directory holding the file
    assert_params_equal(other, source_sd)


def test_wan_base_casts_to_model_dtype(tmp_path, source_sd):
    save_file(source_sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    m = build_model("tiny", seed=0, dtype=torch.bfloat16)
    load_wan_base(m, tmp_path)
    for k, p in m.state_dict().items():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, source_sd[k].to(torch.bfloat16)), k


def test_wan_base_sharded(tmp_path, model, source_sd):
    keys = list(source_sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: source_sd[k] for k in ks}, str(tmp_path / name))
        weight_map.update({k: name for k in ks})
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    load_wan_base(model, tmp_path)
    assert_params_equal(model, source_sd)

    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="00002-of-00002"):
        load_wan_base(build_model("tiny"), tmp_path / "diffusion_pytorch_model.safetensors.index.json")


def test_wan_base_int_tensor_rejected(tmp_path, model, source_sd):
    source_sd["head.head.bias"] = torch.zeros_like(source_sd["head.head.bias"], dtype=torch.int32)
    save_file(source_sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"head\.head\.bias.*I32"):
        load_wan_base(model, tmp_path)
    assert_params_equal(model, before)


# ------------------------------------------------------------------------------------------------
# LongLive generator (.pt)
# ------------------------------------------------------------------------------------------------

def wrapped(sd):
    return {"model." + k: v for k, v in sd.items()}


def test_generator_round_trip_strips_model_prefix(tmp_path, model, source_sd):
    torch.save({"generator": wrapped(source_sd)}, tmp_path / "longlive_base.pt")
    r = load_longlive_generator(model, tmp_path / "longlive_base.pt")
    assert_params_equal(model, source_sd)
    assert r.entry == "generator"
    # a directory holding models/longlive_base.pt (the repo's layout)
    (tmp_path / "repo" / "models").mkdir(parents=True)
    torch.save({"generator": wrapped(source_sd)}, tmp_path / "repo" / "models" / "longlive_base.pt")
    other = build_model("tiny", seed=3)
    load_longlive_generator(other, tmp_path / "repo")
    assert_params_equal(other, source_sd)


def test_generator_strips_fsdp_anywhere(tmp_path, model, source_sd):
    def fsdp(k):
        parts = ("model." + k).split(".")
        # FSDP wraps the root and each block: prefix and infix both occur
        if parts[1] == "blocks":
            parts.insert(3, "_fsdp_wrapped_module")
        return "_fsdp_wrapped_module." + ".".join(parts)
    sd = {fsdp(k): v for k, v in source_sd.items()}
    assert any(".blocks.0._fsdp_wrapped_module.self_attn" in k for k in sd)
    torch.save({"generator_ema": sd}, tmp_path / "g.pt")
    load_longlive_generator(model, tmp_path / "g.pt", use_ema=True)
    assert_params_equal(model, source_sd)


def test_generator_entry_selection(tmp_path, source_sd):
    ema_sd = {k: v + 1.0 for k, v in source_sd.items()}
    torch.save({"generator": wrapped(source_sd), "generator_ema": wrapped(ema_sd), "step": 7}, tmp_path / "both.pt")
    m = build_model("tiny")
    assert load_longlive_generator(m, tmp_path / "both.pt").entry == "generator"
    assert_params_equal(m, source_sd)
    assert load_longlive_generator(m, tmp_path / "both.pt", use_ema=True).entry == "generator_ema"
    assert_params_equal(m, ema_sd)

    torch.save({"model": wrapped(source_sd)}, tmp_path / "model_key.pt")
    m = build_model("tiny")
    assert load_longlive_generator(m, tmp_path / "model_key.pt").entry == "model"
    assert_params_equal(m, source_sd)

    torch.save({"generator": wrapped(source_sd)}, tmp_path / "no_ema.pt")
    with pytest.raises(CheckpointError, match="generator_ema"):
        load_longlive_generator(m, tmp_path / "no_ema.pt", use_ema=True)
    torch.save({"optimizer": {}, "step": 1}, tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="'generator'"):
        load_longlive_generator(m, tmp_path / "none.pt")


def test_generator_prefix_collision(tmp_path, model, source_sd):
    sd = wrapped(source_sd)
    sd["head.head.bias"] = source_sd["head.head.bias"]  # bare and prefixed: same model key twice
    torch.save({"generator": sd}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match=r"collide.*head\.head\.bias"):
        load_longlive_generator(model, tmp_path / "g.pt")


# ------------------------------------------------------------------------------------------------
# the strict check: one error naming the key, nothing loaded
# ------------------------------------------------------------------------------------------------

def _missing(sd):
    del sd["blocks.1.ffn.2.weight"]
    return "blocks.1.ffn.2.weight", "missing"


def _unexpected(sd):
    sd["blocks.0.self_attn.q.lora_A.weight"] = torch.zeros(4, 64)
    return "blocks.0.self_attn.q.lora_A.weight", "unexpected"


def _shape(sd):
    sd["head.modulation"] = torch.zeros(1, 3, 64)
    return "head.modulation", "shape"


def _dtype(sd):
    sd["blocks.0.norm3.weight"] = torch.ones(64, dtype=torch.int64)
    return "blocks.0.norm3.weight", "non-floating"


@pytest.mark.parametrize("corrupt", [_missing, _unexpected, _shape, _dtype])
@pytest.mark.parametrize("fmt", ["safetensors", "pt", "dict"])
def test_strict_errors_name_the_key_and_load_nothing(tmp_path, model, source_sd, corrupt, fmt):
    key, kind = corrupt(source_sd)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as err:
        if fmt == "safetensors":
            save_file(source_sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
            load_wan_base(model, tmp_path)
        elif fmt == "pt":
            torch.save({"generator": wrapped(source_sd)}, tmp_path / "g.pt")
            load_longlive_generator(model, tmp_path / "g.pt")
        else:
            load_state_dict_strict(model, source_sd)
    msg = str(err.value)
    assert repr(key) in msg and kind in msg, msg
    assert isinstance(err.value, ValueError)
    assert_params_equal(model, before)  # never half-loaded


def test_strict_error_lists_everything_truncated(model, source_sd):
    sd = {k: v for i, (k, v) in enumerate(source_sd.items()) if i >= 30}  # 30 missing
    sd["extra.weight"] = torch.zeros(3)
    sd["head.head.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(model, sd)
    msg = str(err.value)
    assert "30 missing key(s)" in msg and "... and 20 more" in msg
    assert "'extra.weight'" in msg and "'head.head.weight'" in msg


def test_non_tensor_value_rejected(model, source_sd):
    source_sd["head.modulation"] = [1.0, 2.0]
    with pytest.raises(CheckpointError, match=r"'head\.modulation': list"):
        load_state_dict_strict(model, source_sd)


# ------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adapter", [None, "default"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_lora_merge_matches_unmerged(tmp_path, model, adapter, scale):
    lora = make_lora(model, adapter=adapter)
    base = build_model("tiny", seed=0)  # unmerged copy
    garbage_critic = {"base_model.model.nonexistent.lora_A.weight": torch.zeros(1)}
    torch.save({"generator_lora": lora, "critic_lora": garbage_critic, "step": 100}, tmp_path / "lora.pt")
    r = merge_lora(model, tmp_path / "lora.pt", scale=scale)
    targets = lora_targets(model)
    assert r.num_layers == len(targets) == 10 * 2 and r.rank == LORA_RANK and r.scale == scale
    assert set(r.layers) == set(targets)

    infix = "" if adapter is None else f".{adapter}"
    gen = torch.Generator().manual_seed(5)
    for name in targets:
        lin, ref = model.get_submodule(name), base.get_submodule(name)
        a = lora[f"base_model.model.{name}.lora_A{infix}.weight"]
        b = lora[f"base_model.model.{name}.lora_B{infix}.weight"]
        x = torch.randn(7, lin.in_features, generator=gen)
        want = ref(x) + scale * ((x @ a.T) @ b.T)
        torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-6)
    # nothing outside the targets moved
    for k, v in base.state_dict().items():
        if k.rsplit(".", 1)[0] not in targets:
            assert torch.equal(model.state_dict()[k], v), k


def test_lora_raw_dict_and_bf16_cast(model):
    lora = make_lora(model)
    m16 = build_model("tiny", seed=0, dtype=torch.bfloat16)
    w32 = {n: m16.get_submodule(n).weight.float().clone() for n in lora_targets(m16)}
    merge_lora(m16, lora)  # the raw adapter dict
    for n, w in w32.items():
        a, b = lora[f"base_model.model.{n}.lora_A.weight"], lora[f"base_model.model.{n}.lora_B.weight"]
        want = (w + b @ a).to(torch.bfloat16)  # fp32 merge, then one rounding
        assert torch.equal(m16.get_submodule(n).weight, want), n


def _drop_b(sd):
    del sd["base_model.model.blocks.1.ffn.0.lora_B.weight"]
    return r"'base_model\.model\.blocks\.1\.ffn\.0\.lora_A\.weight'.*no matching lora_B"


def _drop_a(sd):
    del sd["base_model.model.blocks.0.cross_attn.v.lora_A.weight"]
    return r"'base_model\.model\.blocks\.0\.cross_attn\.v\.lora_B\.weight'.*no matching lora_A"


def _bad_a_shape(sd):
    sd["base_model.model.blocks.0.self_attn.k.lora_A.weight"] = torch.zeros(LORA_RANK, 63)
    return r"self_attn\.k\.lora_A\.weight'.*\[4, 63\].*expected \[r, 64\]"


def _bad_b_shape(sd):
    sd["base_model.model.blocks.0.ffn.2.lora_B.weight"] = torch.zeros(65, LORA_RANK)
    return r"ffn\.2\.lora_B\.weight'.*\[65, 4\].*expected.*\[64, r\]"


def _rank_mismatch(sd):
    sd["base_model.model.blocks.1.self_attn.o.lora_A.weight"] = torch.zeros(2, 64)
    sd["base_model.model.blocks.1.self_attn.o.lora_B.weight"] = torch.zeros(64, 2)
    return r"inconsistent LoRA rank.*r=2.*blocks\.1\.self_attn\.o"


def _no_target(sd):
    sd["base_model.model.blocks.0.self_attn.z.lora_A.weight"] = torch.zeros(LORA_RANK, 64)
    sd["base_model.model.blocks.0.self_attn.z.lora_B.weight"] = torch.zeros(64, LORA_RANK)
    return r"blocks\.0\.self_attn\.z.*does not exist"


def _not_linear(sd):
    sd["base_model.model.blocks.0.norm3.lora_A.weight"] = torch.zeros(LORA_RANK, 64)
    sd["base_model.model.blocks.0.norm3.lora_B.weight"] = torch.zeros(64, LORA_RANK)
    return r"blocks\.0\.norm3.*not an nn\.Linear"


def _bad_key(sd):
    sd["base_model.model.blocks.0.self_attn.q.lora_magnitude_vector"] = torch.zeros(64)
    return r"lora_magnitude_vector'.*not a"


def _int_a(sd):
    k = "base_model.model.blocks.0.self_attn.q.lora_A.weight"
    sd[k] = sd[k].to(torch.int32)
    return r"self_attn\.q\.lora_A\.weight'.*int32.*floating"


@pytest.mark.parametrize("corrupt", [_drop_b, _drop_a, _bad_a_shape, _bad_b_shape, _rank_mismatch, _no_target,
                                     _not_linear, _bad_key, _int_a])
def test_lora_errors_are_clear_and_merge_nothing(model, corrupt):
    lora = make_lora(model)
    pattern = corrupt(lora)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=pattern):
        merge_lora(model, {"generator_lora": lora, "critic_lora": {}, "step": 1})
    assert_params_equal(model, before)


# ------------------------------------------------------------------------------------------------
# resolution: local paths, the Hugging Face cache, missing files
# ------------------------------------------------------------------------------------------------

def test_missing_files(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_wan_base(model, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_wan_base(model, tmp_path)  # an empty directory
    with pytest.raises(FileNotFoundError, match="longlive_base.pt"):
        load_longlive_generator(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="lora.pt"):
        merge_lora(model, tmp_path / "lora.pt")
    with pytest.raises(FileNotFoundError, match="x.pt"):
        resolve_checkpoint(tmp_path, "x.pt")


def test_resolve_local(tmp_path):
    f = tmp_path / "a.pt"
    f.write_bytes(b"")
    assert resolve_checkpoint(f) == f
    assert resolve_checkpoint(str(tmp_path)) == tmp_path
    assert resolve_checkpoint(tmp_path, "a.pt") == f


def test_hf_cache_resolution_offline(tmp_path, model, source_sd):
    cache = tmp_path / "hub"
    lora = make_lora(model)
    snap = fake_hf_cache(cache, "Efficient-Large-Model/LongLive-1.3B", {
        "models/longlive_base.pt": lambda p: torch.save({"generator": wrapped(source_sd)}, p),
        "models/lora.pt": lambda p: torch.save({"generator_lora": lora, "critic_lora": {}, "step": 1}, p),
    })
    wan_snap = fake_hf_cache(cache, "Wan-AI/Wan2.1-T2V-1.3B", {
        "diffusion_pytorch_model.safetensors": lambda p: save_file({k: v * 2 for k, v in source_sd.items()}, str(p)),
    })

    repo = "Efficient-Large-Model/LongLive-1.3B"
    assert resolve_checkpoint(repo, "models/longlive_base.pt", cache_dir=cache) == snap / "models/longlive_base.pt"
    assert resolve_checkpoint(repo, cache_dir=cache) == snap
    with pytest.raises(FileNotFoundError, match=r"'models/nothing.pt'.*Efficient-Large-Model/LongLive-1\.3B"):
        resolve_checkpoint(repo, "models/nothing.pt", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="org/absent"):
        resolve_checkpoint("org/absent", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="org/absent"):
        resolve_checkpoint("org/absent", "f.pt", cache_dir=cache)

    # the loaders take repo ids too
    m = build_model("tiny", seed=3)
    load_wan_base(m, "Wan-AI/Wan2.1-T2V-1.3B", cache_dir=cache)
    assert_params_equal(m, {k: v * 2 for k, v in source_sd.items()})
    assert resolve_checkpoint("Wan-AI/Wan2.1-T2V-1.3B", cache_dir=cache) == wan_snap
    load_longlive_generator(m, repo, cache_dir=cache)
    assert_params_equal(m, source_sd)
    r = merge_lora(m, repo, cache_dir=cache)
    assert r.path == snap / "models/lora.pt" and r.num_layers == len(lora) // 2


# ------------------------------------------------------------------------------------------------
# load_longlive: base, then generator, then LoRA
# ------------------------------------------------------------------------------------------------

def test_load_longlive_stock_order(tmp_path, model, source_sd):
    save_file({k: v * 3 for k, v in source_sd.items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    torch.save({"generator": wrapped(source_sd)}, tmp_path / "longlive_base.pt")
    lora = make_lora(model)
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 1}, tmp_path / "lora.pt")

    r = load_longlive(model, base=tmp_path, generator=tmp_path / "longlive_base.pt", lora=tmp_path / "lora.pt")
    assert r.base.num_tensors == r.generator.num_tensors == len(source_sd)
    assert r.lora.num_layers == len(lora_targets(model))
    want = dict(source_sd)  # the generator overwrote the base; the LoRA was merged on top of it
    for name in lora_targets(model):
        a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
        want[f"{name}.weight"] = source_sd[f"{name}.weight"] + b @ a
    got = model.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)

    only_base = build_model("tiny")
    r = load_longlive(only_base, base=tmp_path)
    assert r.generator is None and r.lora is None
    assert_params_equal(only_base, {k: v * 3 for k, v in source_sd.items()})
    with pytest.raises(ValueError, match="at least one"):
        load_longlive(model)


def test_hf_default_cache(tmp_path, monkeypatch, source_sd):
    """With no cache_dir the standard hub cache is used (here pointed at tmp_path), still offline."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snap = fake_hf_cache(tmp_path, "Wan-AI/Wan2.1-T2V-1.3B", {
        "diffusion_pytorch_model.safetensors": lambda p: save_file(source_sd, str(p))})
    assert resolve_checkpoint("Wan-AI/Wan2.1-T2V-1.3B") == snap
    m = build_model("tiny", seed=3)
    load_wan_base(m, "Wan-AI/Wan2.1-T2V-1.3B")
    assert_params_equal(m, source_sd)
    with pytest.raises(FileNotFoundError, match=f"org/absent.*{tmp_path}"):
        resolve_checkpoint("org/absent", "f.pt")


# ------------------------------------------------------------------------------------------------
# files that are not checkpoints, and loading into a patched model
# ------------------------------------------------------------------------------------------------

def test_a_text_file_as_a_checkpoint_names_the_path(tmp_path, model):
    text = tmp_path / "longlive_base.pt"
    text.write_text("not a checkpoint\n" * 8)
    with pytest.raises(CheckpointError, match=f"{str(text)!r} is not a readable PyTorch checkpoint"):
        load_longlive_generator(model, text)
    with pytest.raises(CheckpointError, match=f"{str(text)!r} is not a readable PyTorch checkpoint"):
        merge_lora(model, text)


def test_a_truncated_checkpoint_names_the_path(tmp_path, model, source_sd):
    full = tmp_path / "full.safetensors"
    save_file(source_sd, str(full))
    cut = tmp_path / "diffusion_pytorch_model.safetensors"
    cut.write_bytes(full.read_bytes()[:full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{str(cut)!r} is not a readable safetensors file"):
        load_wan_base(model, cut)
    pt = tmp_path / "gen.pt"
    torch.save({"generator": source_sd}, pt)
    pt.write_bytes(pt.read_bytes()[:pt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{str(pt)!r} is not a readable PyTorch checkpoint"):
        load_longlive_generator(model, pt)


def test_a_repo_id_not_in_the_cache_says_how_to_fetch_it(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download Efficient-Large-Model/LongLive-1.3B"):
        load_longlive(model, generator="Efficient-Large-Model/LongLive-1.3B", cache_dir=tmp_path)


@pytest.mark.parametrize("config", ["exact", "fp8"])
def test_loading_into_a_patched_model_is_refused(config, model, source_sd):
    from longlive_triton import patch_model

    patch_model(model, {"window_attention": False, "fused_glue": False, "cuda_graphs": False}
                if config == "exact" else {"fp8_linear": True, "cuda_graphs": False})
    with pytest.raises(ValueError, match="load checkpoints and LoRA before patch_model"):
        load_state_dict_strict(model, source_sd)
    with pytest.raises(ValueError, match="load checkpoints and LoRA before patch_model"):
        merge_lora(model, {"base_model.model.blocks.0.ffn.0.lora_A.weight": torch.zeros(4, 64)})
