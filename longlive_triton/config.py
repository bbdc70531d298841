"""Patch configuration: a validated dataclass, and YAML presets from configs/ that load into it.

The dataclass defaults are the `exact` preset (the stock math, faster). A preset YAML names the keys
it changes; `base: <preset name or .yaml path>` starts it from another preset (fastest is `base: fp8`
plus a 9-frame window), and a base may have a base of its own.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml


class PatchConfigError(ValueError, TypeError):
    """A config key with a value it does not take (a ValueError and a TypeError, for callers of either)."""


@dataclass(frozen=True)
class Between:
    """Declares a number's range next to its field: [low, high], or [low, high) with high_open."""

    low: float
    high: float = math.inf
    high_open: bool = False

    def holds(self, value) -> bool:
        # Written so NaN fails: every comparison with it is False.
        return self.low <= value and (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        return f"in [{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def _describe(hint) -> str:
    """What a field of type `hint` takes, in words (for the error message)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return f"{' and '.join(str(a) for a in args[1:])} ({_describe(args[0])})"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list, each item {_describe(args[0])}"
        return f"a list of {len(args)} items: " + ", ".join(_describe(a) for a in args)
    return {bool: "a bool", int: "an int", float: "a number", str: "a str"}[hint]


class _Mismatch(Exception):
    """A value that does not fit a field's declared type (turned into a PatchConfigError naming the key)."""


_SCALARS = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _convert(hint, value):
    """`value` as the field of type `hint` holds it (a YAML list becomes a tuple), or _Mismatch."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        value = _convert(args[0], value)
        if not all(check.holds(value) for check in args[1:]):
            raise _Mismatch
        return value
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            raise _Mismatch
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            if arm is type(None):
                if value is None:
                    return value
                continue
            try:
                return _convert(arm, value)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise _Mismatch
        return tuple(_convert(h, v) for h, v in zip(items, value))
    # bool is an int in Python: only a bool field takes True/False.
    if not isinstance(value, _SCALARS[hint]) or (hint is not bool and isinstance(value, bool)):
        raise _Mismatch
    return value


def _check_fields(config) -> None:
    """Every field of a frozen config dataclass against its declared type (Literal choices, Between
    ranges, tuples from YAML lists); the error names the key and what it takes."""
    for name, hint in typing.get_type_hints(type(config), include_extras=True).items():
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(getattr(config, name), hint):
                raise PatchConfigError(f"{name} must be a {hint.__name__}, got {getattr(config, name)!r}")
            continue
        value = getattr(config, name)
        try:
            object.__setattr__(config, name, _convert(hint, value))  # frozen: set once, converted
        except _Mismatch:
            raise PatchConfigError(f"{name} must be {_describe(hint)}, got {value!r}") from None


AttentionBackend = Literal["sdpa", "triton"]   # cuDNN through SDPA, or our Triton window kernel
KVCacheDtype = Literal["bf16", "fp8"]
DEFAULT_FP8_EXCLUDE = ("text_embedding.*", "time_embedding.*", "time_projection.*", "head.*",
                       "blocks.*.self_attn.o", "blocks.*.cross_attn.q", "blocks.*.cross_attn.o")


@dataclass(frozen=True)
class KernelTuning:
    """The kernels' launch knobs: each changes how fast a kernel runs, not what the user chose.
    In YAML and dicts they are flat keys beside the choices (`attention_split: 2`), or under `tuning:`."""

    # Our Triton attention (attention_backend "triton"): split-KV shares per query tile (finer waves
    # on the GPU) and TMA loads of K/V tiles (compute capability >= 9).
    attention_split: Annotated[int, Between(1, 8)] = 1
    attention_tma: bool = False
    # Hopper paths of the FP8 GEMM, each switchable without touching the kernel: the persistent
    # kernel with TMA-descriptor loads (else pointer loads, one program per tile), Triton's loop
    # flattening in it, and Triton's warp specialisation in it.
    fp8_gemm_tma: bool = True
    fp8_gemm_flatten: bool = True
    fp8_gemm_warp_specialize: bool = False

    def __post_init__(self):
        _check_fields(self)


@dataclass(frozen=True)
class PatchConfig:
    """What patch_model does: the user's choices, and the kernels' tuning knobs apart (`tuning`).
    Unknown keys, wrong types and bad values are refused on construction."""

    name: str = "custom"  # the preset's name
    # Fold unmerged peft LoRA adapters into their base Linear weights (fp32 math) before patching.
    merge_lora: bool = True
    # Self-attention on the fused RoPE/KV-append kernel over a ring-buffered cache, attending with
    # our Triton window kernel ("triton") or cuDNN through SDPA ("sdpa").
    window_attention: bool = True
    attention_backend: AttentionBackend = "sdpa"
    # The self-attention KV cache in bf16, or in e4m3 (half the memory and the bytes attention
    # reads; q, k and v in e4m3 so both attention dots run on the FP8 tensor cores; needs
    # window_attention with the "triton" backend). Layout and scales: kernels/fp8_kv_cache.py.
    kv_cache_dtype: KVCacheDtype = "bf16"
    # Each layer's LayerNorms, adaLN modulation and gated residual adds as four fused passes, and
    # the cross-attention's query RMSNorm as one.
    fused_glue: bool = True
    # Capture each distinct generator forward in a CUDA graph and replay it (longlive_triton/runtime/graphs.py).
    # Needs window_attention and a model on CUDA; elsewhere it is left off and the report says why.
    cuda_graphs: bool = True
    # Speed levers that change the output (off in `exact`). The KV window in latent frames, sink
    # included (None: keep the model's; must hold the sink and one block, checked by patch_model).
    local_attn_size: Annotated[int, Between(1)] | None = None
    # Token merging before each block's FFN: the fraction of every latent frame's tokens merged into
    # a destination grid of one token per stride cell (0: off); the FFN runs on the rest.
    token_merge_ratio: Annotated[float, Between(0, 1, high_open=True)] = 0.0
    token_merge_stride: tuple[Annotated[int, Between(1)], Annotated[int, Between(1)]] = (2, 2)  # rows, columns
    # Linear layers as W8A8 FP8 GEMMs (patches/fp8_linear.py): e4m3 weights with one scale per
    # output channel, quantized once at patch time (after the LoRA merge), e4m3 activations with one
    # scale per token, handed over already quantized by the block's adaln where fused_glue is on.
    # Needs FP8 tensor cores (compute capability >= 8.9); elsewhere the layers stay bf16 and the
    # report says why.
    fp8_linear: bool = False
    # Linear layers kept bf16 under fp8_linear: fnmatch patterns over their paths in the generator.
    # The default keeps the conditioning and output layers (a handful of tokens each), and the
    # layers whose input no fused producer quantizes (the o projections, the cross-attention query):
    # each would pay a separate quantization pass over its 1536-wide input for a 1536 x 1536 GEMM.
    fp8_exclude: tuple[str, ...] = DEFAULT_FP8_EXCLUDE
    # The FFN's hidden activation: True: the up GEMM's epilogue (bias, GELU) writes it in FP8 with
    # one scale per token and 128 columns, and the down GEMM applies them per K-tile; False: the up
    # GEMM writes bf16, a Triton pass quantizes it per token, then the down GEMM.
    fp8_ffn_fused: bool = True
    tuning: KernelTuning = field(default_factory=KernelTuning)

    def __post_init__(self):
        _check_fields(self)
        if self.kv_cache_dtype == "fp8" and not (self.window_attention and self.attention_backend == "triton"):
            raise PatchConfigError("kv_cache_dtype 'fp8' needs window_attention: true and attention_backend: "
                                   "'triton' (cuDNN's SDPA cannot read the fp8 cache)")

    @classmethod
    def keys(cls) -> list[str]:
        """The keys a preset file or dict may name (the tuning knobs flat among them, or under `tuning`)."""
        choices = [f.name for f in dataclasses.fields(cls) if f.name != "tuning"]
        return sorted(choices + [f.name for f in dataclasses.fields(KernelTuning)] + ["tuning"])

    def to_dict(self) -> dict:
        """Every key with its value, flat (the tuning knobs beside the choices): what from_dict takes back."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tuning"}
        return {**data, **dataclasses.asdict(self.tuning)}

    @classmethod
    def from_dict(cls, data: dict) -> "PatchConfig":
        if not isinstance(data, dict):
            raise TypeError(f"a patch config must be a mapping, got {type(data).__name__}")
        data = _flat(data)
        unknown = sorted(set(data) - set(cls.keys()))
        if unknown:
            raise ValueError(f"unknown patch config keys {unknown}; known keys: {cls.keys()}")
        knobs = {f.name for f in dataclasses.fields(KernelTuning)}
        tuning = KernelTuning(**{k: v for k, v in data.items() if k in knobs})
        return cls(**{k: v for k, v in data.items() if k not in knobs}, tuning=tuning)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PatchConfig":
        path = Path(path)
        data = _yaml_keys(path, ())
        data.setdefault("name", path.stem)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise type(e)(f"patch config file {path}: {e}") from None


def _flat(data: dict) -> dict:
    """`data` with a `tuning:` mapping (or KernelTuning) spread into flat keys."""
    tuning = data.get("tuning")
    if tuning is None:
        return dict(data)
    if isinstance(tuning, KernelTuning):
        tuning = dataclasses.asdict(tuning)
    if not isinstance(tuning, dict):
        raise PatchConfigError(f"tuning must be a mapping of kernel knobs, got {tuning!r}")
    twice = sorted(set(tuning) & set(data))
    if twice:
        raise ValueError(f"patch config keys {twice} are given both flat and under tuning")
    return {**{k: v for k, v in data.items() if k != "tuning"}, **tuning}


def _yaml_keys(path: Path, chain: tuple[Path, ...]) -> dict:
    """A preset file's keys over those of its `base` (recursively); `name` is the file's own."""
    if not path.is_file():
        raise FileNotFoundError(f"patch config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"patch config file {path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TypeError(f"patch config file {path} holds a {type(data).__name__}; it must be a mapping of "
                        f"config keys (e.g. `window_attention: true`)")
    base = data.pop("base", None)
    if base is None:
        return _flat(data)
    if not isinstance(base, str):
        raise TypeError(f"patch config file {path}: base must be a preset name or a YAML path, got {base!r}")
    base_path = _preset_path(base, relative_to=path.parent)
    if base_path.resolve() in chain + (path.resolve(),):
        raise ValueError(f"patch config file {path}: base {base!r} leads back to itself")
    merged = {k: v for k, v in _yaml_keys(base_path, chain + (path.resolve(),)).items() if k != "name"}
    return {**merged, **_flat(data)}  # flat: a file's tuning keys win over its base's one by one


def _preset_path(name: str, relative_to: Path | None = None) -> Path:
    """The YAML file of a preset name (configs/), or a path (relative to relative_to, if given)."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        return relative_to / path if relative_to is not None and not path.is_absolute() else path
    if name not in preset_names():
        raise ValueError(f"unknown patch preset {name!r}; presets: {preset_names()}")
    return Path(str(resources.files("longlive_triton.configs") / f"{name}.yaml"))


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("longlive_triton.configs").iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> PatchConfig:
    """A named preset from configs/ (e.g. "exact"), or a path to a YAML file."""
    return PatchConfig.from_yaml(_preset_path(name))


def as_config(config: PatchConfig | str | dict | None) -> PatchConfig:
    if config is None:
        return load_preset("exact")
    if isinstance(config, PatchConfig):
        return config
    if isinstance(config, str):
        return load_preset(config)
    if isinstance(config, dict):
        return PatchConfig.from_dict(config)
    raise TypeError(f"config must be a PatchConfig, a preset name, a YAML path or a dict; got {type(config).__name__}")
