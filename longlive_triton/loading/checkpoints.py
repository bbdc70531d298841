"""Strict loaders for the checkpoints LongLive-1.3B inference reads.

Three formats, applied in the stock order by `load_longlive`:

1. **Wan2.1 base** (`load_wan_base`): `diffusion_pytorch_model.safetensors`, or shards listed in
   `diffusion_pytorch_model.safetensors.index.json`; bare Wan names, fp32 on disk.
2. **LongLive generator** (`load_longlive_generator`): a torch pickle dict whose `generator`
   (`generator_ema` with `use_ema`; `model` as a fallback, as `inference.py` accepts) is the
   WanDiffusionWrapper state dict: keys are `model.` + the bare name, and FSDP may have inserted
   `_fsdp_wrapped_module.` anywhere. Both are stripped.
3. **LongLive LoRA** (`merge_lora`): a torch pickle `{"generator_lora", "critic_lora", "step"}` (or
   the raw adapter dict) with `base_model.model.<linear path>.lora_{A,B}[.default].weight`; merged
   into the Linear weights as W += scale * B @ A, computed in fp32 (`lora.py`, shared with patch_model).

Every load goes through one strict check (`load_state_dict_strict`): missing keys, unexpected keys,
shape mismatches and non-floating tensors are all collected and raised together as one
`CheckpointError` *before* any parameter is written, so a bad file never leaves a half-loaded model
and no parameter ever silently keeps its initial value (the stock init zeroes the head, so a missed key would silently blank the output).
Tensors are read one at a time (safetensors lazily, pickles memory-mapped) and copied into the
model's own parameters, cast to their dtype and device, so no second full copy of the model is built.

Paths may be local files, local directories, or Hugging Face repo ids, which are resolved from the
local Hugging Face cache only (checkpoint_files.py); nothing here touches the network.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longlive_triton.loading.files import (LONGLIVE_BASE_FILENAMES, LONGLIVE_LORA_FILENAMES, WAN_BASE_FILENAME,
                               WAN_BASE_INDEX_FILENAME, resolve_first)
from longlive_triton.loading.lora import merge_lora_weight

__all__ = [
    "CheckpointError", "LoadResult", "LoraMergeResult", "LongLiveLoadResult", "load_state_dict_strict",
    "load_wan_base", "load_longlive_generator", "merge_lora", "load_longlive",
]

_FSDP_INFIX = "_fsdp_wrapped_module."
_WRAPPER_PREFIX = "model."
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint does not match the model (keys, shapes, dtypes, or its own structure)."""


@dataclass(frozen=True)
class LoadResult:
    """What a state-dict load did: the file read, the entry used inside it, tensors copied."""
    path: Path
    num_tensors: int
    entry: str | None = None  # key of the pickle dict that held the state dict, if any


@dataclass(frozen=True)
class LoraMergeResult:
    """What `merge_lora` did: the Linear paths merged (bare names), the adapter rank and scale."""
    layers: tuple[str, ...]
    rank: int
    scale: float
    path: Path | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class LongLiveLoadResult:
    """What `load_longlive` did, one entry per stage (None where that stage was not asked for)."""
    base: LoadResult | None
    generator: LoadResult | None
    lora: LoraMergeResult | None


# ----------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# Tensor sources: key -> (shape, dtype) metadata without reading, and one tensor at a time
# ----------------------------------------------------------------------------------------------

_SAFETENSORS_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                      "F8_E8M0", "F4"}


@dataclass(frozen=True)
class _Meta:
    shape: tuple[int, ...] | None  # None: not a tensor
    is_float: bool
    dtype: str


class _Source:
    """Checkpoint tensors under their model names, read lazily."""

    def __init__(self, meta: dict[str, _Meta], get: Callable[[str], torch.Tensor]):
        self.meta = meta
        self.get = get


def _tensor_meta(v: Any) -> _Meta:
    if isinstance(v, torch.Tensor):
        return _Meta(tuple(v.shape), v.is_floating_point(), str(v.dtype).removeprefix("torch."))
    return _Meta(None, False, type(v).__name__)


def _mapping_source(sd: Mapping[str, Any], rename: Callable[[str], str] = lambda k: k) -> _Source:
    names: dict[str, str] = {}
    dups: dict[str, list[str]] = {}
    for k in sd:
        new = rename(k)
        if new in names:
            dups.setdefault(new, [names[new]]).append(k)
        names[new] = k
    if dups:
        raise CheckpointError("checkpoint keys collide after stripping prefixes: "
                              + _fmt_list(f"{v} -> {k!r}" for k, v in dups.items()))
    return _Source({new: _tensor_meta(sd[old]) for new, old in names.items()}, lambda k: sd[names[k]])


def _safetensors_source(files: dict[str, Path], key_to_file: dict[str, str] | None) -> tuple[_Source, list]:
    """`files`: shard name -> path. `key_to_file`: the index's weight map (None: one file, all its keys)."""
    from safetensors import safe_open

    handles = {}
    try:
        for name, path in files.items():
            try:
                handles[name] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - safetensors' own error type names no path
                raise CheckpointError(f"{str(path)!r} is not a readable safetensors file (truncated, or another "
                                      f"format?): {e}") from e
            handles[name].__enter__()
    except Exception:
        for h in handles.values():
            h.__exit__(None, None, None)
        raise
    if key_to_file is None:
        (only,) = files
        key_to_file = {k: only for k in handles[only].keys()}
    meta, missing_in_shard = {}, []
    shard_keys = {name: set(h.keys()) for name, h in handles.items()}
    for key, shard in key_to_file.items():
        h = handles[shard]
        if key not in shard_keys[shard]:
            missing_in_shard.append(f"{key!r} (in {shard})")
            continue
        sl = h.get_slice(key)
        dt = sl.get_dtype()
        meta[key] = _Meta(tuple(sl.get_shape()), dt in _SAFETENSORS_FLOAT, dt)
    if missing_in_shard:
        for h in handles.values():
            h.__exit__(None, None, None)
        raise CheckpointError("safetensors index lists keys that their shard does not hold: "
                              + _fmt_list(missing_in_shard))
    return _Source(meta, lambda k: handles[key_to_file[k]].get_tensor(k)), list(handles.values())


def _torch_load(path: Path) -> Any:
    """`torch.load` with weights_only=True, memory-mapped where the file format allows; a file that is
    not a readable torch.save checkpoint is a CheckpointError naming it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) pickles cannot be mmapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch reports a text file as "KeyError: 101", with no path
        raise CheckpointError(f"{str(path)!r} is not a readable PyTorch checkpoint (a torch.save file; truncated, "
                              f"or another format?): {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------
# The strict loader
# ----------------------------------------------------------------------------------------------

def _fmt_list(items: Iterable[str], limit: int = _MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _check_materialized(model: nn.Module) -> None:
    meta = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if meta:
        raise ValueError(f"model has {len(meta)} tensors on the meta device ({_fmt_list(meta)}); "
                         f"materialize it (e.g. model.to_empty(device=...)) before loading")


def _refuse_patched(model: nn.Module) -> None:
    from longlive_triton.patch import patched_config

    config = patched_config(model)
    if config is not None:
        raise ValueError(f"this model is already patched by longlive_triton (config {config.name!r}): load "
                         "checkpoints and LoRA before patch_model (the patched layers hold fused and quantized "
                         "copies of the weights made at patch time)")


def _load_source(model: nn.Module, src: _Source, what: str) -> int:
    """Validate `src` against the model's state dict, then copy every tensor in. Returns the count."""
    _refuse_patched(model)
    _check_materialized(model)
    targets = model.state_dict(keep_vars=True)  # the live Parameters / persistent buffers
    missing = [k for k in targets if k not in src.meta]
    unexpected = [k for k in src.meta if k not in targets]
    bad_dtype, bad_shape = [], []
    for k, m in src.meta.items():
        if k not in targets:
            continue
        if m.shape is None or not m.is_float:
            bad_dtype.append(f"{k!r}: {m.dtype} (expected a floating-point tensor)")
        elif m.shape != tuple(targets[k].shape):
            bad_shape.append(f"{k!r}: checkpoint {list(m.shape)} vs model {list(targets[k].shape)}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_fmt_list(map(repr, missing))}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_fmt_list(map(repr, unexpected))}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatch(es): {_fmt_list(bad_shape)}")
    if bad_dtype:
        problems.append(f"{len(bad_dtype)} non-floating tensor(s): {_fmt_list(bad_dtype)}")
    if problems:
        raise CheckpointError(f"{what} does not match {type(model).__name__} ({len(targets)} keys); "
                              f"nothing was loaded:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(src.get(k))
    return len(targets)


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Any], *,
                           rename: Callable[[str], str] | None = None, what: str = "checkpoint") -> int:
    """Copy `state_dict` into `model`'s parameters (and persistent buffers), strictly.

    `rename`, if given, maps each checkpoint key to a model key first (two keys mapping to one is an
    error). All problems (missing keys, unexpected keys, shape mismatches, non-tensor or non-floating
    values) are gathered and raised as a single `CheckpointError` before any parameter is written;
    long lists are truncated with a count. Values are copied with `copy_` under `torch.no_grad()`,
    cast to each parameter's dtype and device, so the model keeps its own storage. `what` names the
    source in error messages. Returns the number of tensors copied.
    """
    return _load_source(model, _mapping_source(state_dict, rename or (lambda k: k)), what)


# ----------------------------------------------------------------------------------------------
# Wan2.1 base (safetensors)
# ----------------------------------------------------------------------------------------------

def load_wan_base(model: nn.Module, path: str | Path, *, cache_dir: str | Path | None = None) -> LoadResult:
    """Load Wan2.1-T2V base weights (bare Wan names, fp32 on disk) into `model`, strictly.

    `path` is `diffusion_pytorch_model.safetensors` itself, a sharded checkpoint's
    `diffusion_pytorch_model.safetensors.index.json`, a directory holding either (the single file is
    preferred), or a repo id such as ``"Wan-AI/Wan2.1-T2V-1.3B"`` resolved from the local Hugging Face
    cache (`cache_dir`). Tensors are read lazily one at a time and cast to the model's dtype and device.
    Raises FileNotFoundError when nothing is found and CheckpointError when the weights do not match.
    """
    file = resolve_first(path, (WAN_BASE_FILENAME, WAN_BASE_INDEX_FILENAME), cache_dir=cache_dir)
    if file.name.endswith(".json"):
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{str(file)!r} is not a safetensors index (no 'weight_map'): {e}") from e
        shards = {name: file.parent / name for name in sorted(set(weight_map.values()))}
        absent = [str(p) for p in shards.values() if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"safetensors index {str(file)!r} names shard(s) that are not there: "
                                    f"{_fmt_list(absent)}")
        src, handles = _safetensors_source(shards, dict(weight_map))
    else:
        src, handles = _safetensors_source({file.name: file}, None)
    try:
        n = _load_source(model, src, f"Wan base checkpoint {str(file)!r}")
    finally:
        for h in handles:
            h.__exit__(None, None, None)
    return LoadResult(file, n)


# ----------------------------------------------------------------------------------------------
# LongLive generator (.pt)
# ----------------------------------------------------------------------------------------------

def _generator_key(k: str) -> str:
    k = k.replace(_FSDP_INFIX, "")
    return k[len(_WRAPPER_PREFIX):] if k.startswith(_WRAPPER_PREFIX) else k


def _is_flat_state_dict(d: Mapping) -> bool:
    return len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def load_longlive_generator(model: nn.Module, path: str | Path, *, use_ema: bool = False,
                            cache_dir: str | Path | None = None) -> LoadResult:
    """Load a LongLive generator checkpoint (e.g. `longlive_base.pt`) into a bare `CausalWanModel`.

    The file is a torch pickle dict, loaded with `weights_only=True` (memory-mapped when possible).
    The state dict is its `generator` entry, or `generator_ema` when `use_ema` (an error if absent);
    when neither is present, its `model` entry (as LongLive's `inference.py` accepts); a file that is
    itself a flat state dict is also accepted (not with `use_ema`). Keys are WanDiffusionWrapper names:
    every `_fsdp_wrapped_module.` is removed and a leading `model.` stripped, giving the bare names.
    `path` is the file, a directory holding `longlive_base.pt` or `models/longlive_base.pt`, or a repo
    id resolved from the local Hugging Face cache. Strict (see `load_state_dict_strict`).
    """
    file = resolve_first(path, LONGLIVE_BASE_FILENAMES, cache_dir=cache_dir)
    ckpt = _torch_load(file)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{str(file)!r} holds a {type(ckpt).__name__}, not a dict")
    if use_ema:
        if "generator_ema" not in ckpt:
            raise CheckpointError(f"use_ema=True but {str(file)!r} has no 'generator_ema' entry "
                                  f"(top-level keys: {_fmt_list(map(repr, ckpt))})")
        entry = "generator_ema"
    elif "generator" in ckpt:
        entry = "generator"
    elif "model" in ckpt and isinstance(ckpt["model"], Mapping):
        entry = "model"
    elif _is_flat_state_dict(ckpt):
        entry = None
    else:
        raise CheckpointError(f"{str(file)!r} has none of 'generator', 'generator_ema' or 'model' and is not "
                              f"a flat state dict (top-level keys: {_fmt_list(map(repr, ckpt))})")
    sd = ckpt if entry is None else ckpt[entry]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"entry {entry!r} of {str(file)!r} is a {type(sd).__name__}, not a state dict")
    where = f"LongLive generator {str(file)!r}" + ("" if entry is None else f" [{entry!r}]")
    n = _load_source(model, _mapping_source(sd, _generator_key), where)
    return LoadResult(file, n, entry)


# ----------------------------------------------------------------------------------------------
# LoRA merge
# ----------------------------------------------------------------------------------------------

def _lora_state_dict(path_or_state_dict, cache_dir) -> tuple[Mapping[str, Any], Path | None]:
    if isinstance(path_or_state_dict, Mapping):
        ckpt, file = path_or_state_dict, None
    else:
        file = resolve_first(path_or_state_dict, LONGLIVE_LORA_FILENAMES, cache_dir=cache_dir)
        ckpt = _torch_load(file)
        if not isinstance(ckpt, Mapping):
            raise CheckpointError(f"{str(file)!r} holds a {type(ckpt).__name__}, not a dict")
    if "generator_lora" in ckpt:
        sd = ckpt["generator_lora"]
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"'generator_lora' is a {type(sd).__name__}, not a state dict")
        return sd, file
    return ckpt, file


def merge_lora(model: nn.Module, path_or_state_dict: str | Path | Mapping[str, Any], *, scale: float = 1.0,
               cache_dir: str | Path | None = None) -> LoraMergeResult:
    """Merge a LongLive LoRA adapter into `model`'s Linear weights: W += scale * (B @ A).

    `path_or_state_dict` is a `lora.pt` path (or a directory / cached repo holding `lora.pt` or
    `models/lora.pt`), or an already-loaded dict. Of a `{"generator_lora", "critic_lora", "step"}`
    dict only `generator_lora` is used; any other dict is taken as the adapter state dict itself.
    Keys are `base_model.model.<linear path>.lora_A.weight` / `.lora_B.weight`, optionally with the
    adapter name (`.lora_A.default.weight`); the `base_model.model.` prefix and any
    `_fsdp_wrapped_module.` are stripped to find the Linear by its bare name. LongLive's adapters have
    scaling lora_alpha / r = 1.0, hence `scale=1.0`.

    Everything is validated before any weight changes: every A has its B (and vice versa), each key
    parses, each target exists and is an `nn.Linear`, A is [r, in_features] and B [out_features, r],
    r is the same for every layer, tensors are floating point. Problems are reported together in one
    `CheckpointError` naming the keys. The product is computed in fp32 on the weight's device and cast
    back to the weight's dtype. Returns a `LoraMergeResult` (layers merged, rank, scale).
    """
    _refuse_patched(model)
    sd, file = _lora_state_dict(path_or_state_dict, cache_dir)
    if len(sd) == 0:
        raise CheckpointError("LoRA state dict is empty")
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    rejected: set[str] = set()  # layers with an already-reported bad tensor: no pairing complaint too
    problems: list[str] = []
    for key, t in sd.items():
        m = _LORA_KEY.match(str(key))
        if m is None:
            problems.append(f"{key!r}: not a '<path>.lora_A/B[.adapter].weight' key")
            continue
        bare = m["path"].replace(_FSDP_INFIX, "")
        bare = bare[len(_PEFT_PREFIX):] if bare.startswith(_PEFT_PREFIX) else bare
        slot = pairs.setdefault(bare, {})
        if m["ab"] in slot:
            problems.append(f"{key!r}: duplicate lora_{m['ab']} for {bare!r} (also {slot[m['ab']][0]!r})")
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            what = f"{t.dtype} [{', '.join(map(str, t.shape))}]" if isinstance(t, torch.Tensor) else type(t).__name__
            problems.append(f"{key!r}: {what} (expected a 2-D floating-point tensor)")
            rejected.add(bare)
            continue
        slot[m["ab"]] = (str(key), t)

    modules = dict(model.named_modules())
    ranks: dict[int, list[str]] = {}
    for bare, slot in pairs.items():
        if bare in rejected:
            continue
        if set(slot) != {"A", "B"}:
            (have, _), = slot.values()
            problems.append(f"{have!r}: no matching {'lora_B' if 'A' in slot else 'lora_A'} weight")
            continue
        (ka, a), (kb, b) = slot["A"], slot["B"]
        lin = modules.get(bare)
        if lin is None:
            problems.append(f"{ka!r}: target module {bare!r} does not exist in the model")
            continue
        if not isinstance(lin, nn.Linear):
            problems.append(f"{ka!r}: target {bare!r} is a {type(lin).__name__}, not an nn.Linear")
            continue
        if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features or a.shape[0] != b.shape[1]:
            problems.append(f"{ka!r} {list(a.shape)} / {kb!r} {list(b.shape)}: expected [r, {lin.in_features}] "
                            f"/ [{lin.out_features}, r] for {bare!r}")
            continue
        ranks.setdefault(a.shape[0], []).append(ka)
    if len(ranks) > 1:
        problems.append("inconsistent LoRA rank: " + "; ".join(
            f"r={r} for {len(ks)} layer(s) e.g. {ks[0]!r}" for r, ks in sorted(ranks.items())))
    if problems:
        where = "LoRA" + ("" if file is None else f" {str(file)!r}")
        raise CheckpointError(f"{where} cannot be merged ({len(problems)} problem(s)); nothing was merged:\n  "
                              + "\n  ".join(problems[:_MAX_LISTED])
                              + (f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""))
    _check_materialized(model)
    layers = []
    for bare, slot in pairs.items():
        merge_lora_weight(modules[bare].weight, [(slot["A"][1], slot["B"][1], scale)])
        layers.append(bare)
    return LoraMergeResult(tuple(layers), next(iter(ranks)), float(scale), file)


# ----------------------------------------------------------------------------------------------
# All together
# ----------------------------------------------------------------------------------------------

def load_longlive(model: nn.Module, *, base: str | Path | None = None, generator: str | Path | None = None,
                  lora: str | Path | Mapping[str, Any] | None = None, use_ema: bool = False,
                  lora_scale: float = 1.0, cache_dir: str | Path | None = None) -> LongLiveLoadResult:
    """Apply the given checkpoints in LongLive's stock order: Wan base, then generator, then LoRA merge.

    Each argument is optional (at least one is needed) and takes what its loader takes:
    `base` -> `load_wan_base`, `generator` -> `load_longlive_generator` (with `use_ema`),
    `lora` -> `merge_lora` (with `scale=lora_scale`). The generator fully overwrites the base, as in
    the stock pipeline, so the base is only useful on its own. Cast the model to bf16 after this if the
    stock numerics are wanted (as LongLive: a fp32 merge before the bf16 cast matches up to rounding).
    """
    if base is None and generator is None and lora is None:
        raise ValueError("load_longlive needs at least one of base=, generator=, lora=")
    r_base = load_wan_base(model, base, cache_dir=cache_dir) if base is not None else None
    r_gen = (load_longlive_generator(model, generator, use_ema=use_ema, cache_dir=cache_dir)
             if generator is not None else None)
    r_lora = merge_lora(model, lora, scale=lora_scale, cache_dir=cache_dir) if lora is not None else None
    return LongLiveLoadResult(r_base, r_gen, r_lora)
