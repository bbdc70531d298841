"""Patch configuration: a validated dataclass, and YAML presets from configs/ that load into it.

The dataclass defaults are the `exact` preset (the stock math, faster). A preset YAML names the keys
it changes; `base: <preset name or .yaml path>` starts it from another preset (fastest is `base: fp8`
plus a 9-frame window), and a base may have a base of its own.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml


@dataclass(frozen=True)
class PatchConfig:
    """What patch_model does. Unknown keys, wrong types and bad values are refused on construction."""

    name: str = "custom"
    # Fold unmerged peft LoRA adapters into their base Linear weights (fp32 math) before patching.
    merge_lora: bool = True
    # Self-attention on the fused RoPE/KV-append kernel over a ring-buffered cache, attending with
    # our Triton window kernel ("triton") or cuDNN through SDPA ("sdpa").
    window_attention: bool = True
    attention_backend: str = "sdpa"
    # The self-attention KV cache in bf16, or in e4m3 (half the memory and the bytes attention
    # reads; q, k and v in e4m3 so both attention dots run on the FP8 tensor cores; needs
    # window_attention with the "triton" backend). Layout and scales: kernels/fp8_kv_cache.py.
    kv_cache_dtype: str = "bf16"
    # Launch options of our Triton attention (attention_backend "triton"): split-KV shares per
    # query tile (finer waves on the GPU) and TMA loads of K/V tiles (compute capability >= 9).
    attention_split: int = 1
    attention_tma: bool = False
    # Each layer's LayerNorms, adaLN modulation and gated residual adds as four fused passes, and
    # the cross-attention's query RMSNorm as one.
    fused_glue: bool = True
    # Capture each distinct generator forward in a CUDA graph and replay it (longlive_triton/runtime/graphs.py).
    # Needs window_attention and a model on CUDA; elsewhere it is left off and the report says why.
    cuda_graphs: bool = True
    # Speed levers that change the output (off in `exact`). The KV window in latent frames, sink
    # included (None: keep the model's; must hold the sink and one block, checked by patch_model).
    local_attn_size: int | None = None
    # Token merging before each block's FFN: the fraction of every latent frame's tokens merged into
    # a destination grid of one token per stride cell (0: off); the FFN runs on the rest.
    token_merge_ratio: float = 0.0
    token_merge_stride: tuple[int, int] = (2, 2)
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
    fp8_exclude: tuple = ("text_embedding.*", "time_embedding.*", "time_projection.*", "head.*",
                          "blocks.*.self_attn.o", "blocks.*.cross_attn.q", "blocks.*.cross_attn.o")
    # The FFN's hidden activation: True: the up GEMM's epilogue (bias, GELU) writes it in FP8 with
    # one scale per token and 128 columns, and the down GEMM applies them per K-tile; False: the up
    # GEMM writes bf16, a Triton pass quantizes it per token, then the down GEMM.
    fp8_ffn_fused: bool = True
    # Hopper paths of the FP8 GEMM, each switchable without touching the kernel: the persistent
    # kernel with TMA-descriptor loads (else pointer loads, one program per tile), Triton's loop
    # flattening in it, and Triton's warp specialisation in it.
    fp8_gemm_tma: bool = True
    fp8_gemm_flatten: bool = True
    fp8_gemm_warp_specialize: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"str": str, "bool": bool, "int": int, "float": (int, float)}.get(str(f.type))
            if expected is not None and not isinstance(value, expected):
                raise TypeError(f"PatchConfig.{f.name} must be {f.type}, got {type(value).__name__} {value!r}")
        exclude = self.fp8_exclude
        if isinstance(exclude, str) or not isinstance(exclude, (list, tuple)) \
                or not all(isinstance(p, str) for p in exclude):
            raise TypeError(f"PatchConfig.fp8_exclude must be a list of path patterns (str), got {exclude!r}")
        object.__setattr__(self, "fp8_exclude", tuple(exclude))  # frozen: hashable, comparable
        if self.attention_backend not in ("sdpa", "triton"):
            raise ValueError(f"attention_backend must be 'sdpa' or 'triton', got {self.attention_backend!r}")
        window = self.local_attn_size
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"local_attn_size must be None (keep the model's) or a positive number of latent "
                             f"frames, got {window!r}")
        ratio = self.token_merge_ratio
        if not 0.0 <= ratio < 1.0:  # also refuses NaN
            raise ValueError(f"token_merge_ratio must be in [0, 1) (the fraction of each frame's tokens merged "
                             f"before the FFN; 0 is off), got {ratio!r}")
        stride = self.token_merge_stride
        if (not isinstance(stride, (tuple, list)) or len(stride) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in stride)):
            raise ValueError(f"token_merge_stride must be two positive ints [rows, columns] of the latent token "
                             f"grid, got {stride!r}")
        object.__setattr__(self, "token_merge_stride", tuple(stride))  # YAML gives a list
        if self.kv_cache_dtype not in ("bf16", "fp8"):
            raise ValueError(f"kv_cache_dtype must be 'bf16' or 'fp8', got {self.kv_cache_dtype!r}")
        if isinstance(self.attention_split, bool) or not 1 <= self.attention_split <= 8:
            raise ValueError(f"attention_split must be an int in [1, 8], got {self.attention_split!r}")
        if self.kv_cache_dtype == "fp8" and not (self.window_attention and self.attention_backend == "triton"):
            raise ValueError("kv_cache_dtype 'fp8' needs window_attention: true and attention_backend: 'triton' "
                             "(cuDNN's SDPA cannot read the fp8 cache)")

    @classmethod
    def from_dict(cls, data: dict) -> "PatchConfig":
        if not isinstance(data, dict):
            raise TypeError(f"a patch config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown patch config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PatchConfig":
        path = Path(path)
        data = _yaml_keys(path, ())
        data.setdefault("name", path.stem)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise type(e)(f"patch config file {path}: {e}") from None


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
        return data
    if not isinstance(base, str):
        raise TypeError(f"patch config file {path}: base must be a preset name or a YAML path, got {base!r}")
    base_path = _preset_path(base, relative_to=path.parent)
    if base_path.resolve() in chain + (path.resolve(),):
        raise ValueError(f"patch config file {path}: base {base!r} leads back to itself")
    merged = {k: v for k, v in _yaml_keys(base_path, chain + (path.resolve(),)).items() if k != "name"}
    return {**merged, **data}


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
