"""The stock LongLive v1.0 generator: import it from a local checkout, build it, load weights.

    from longlive_triton.stock.longlive1 import load_stock_longlive, build_stock_model
    stock = load_stock_longlive("/path/to/LongLive")           # or env LONGLIVE_SRC
    model = build_stock_model(stock, "longlive-1.3b", device="cuda", dtype=torch.bfloat16,
                              state_dict=reference.state_dict())
    BlockPipeline(model, PipelineConfig()).generate(noise, prompt_embeds)

Nothing here runs when `longlive_triton` is imported, and no LongLive code is part of this package:
the source is read from the checkout at run time. The parity harness (`compare_with_stock`,
`lora_merge_figures`) is test code: `tests/stock_harness.py`.
The import needs none of LongLive's dependencies (T5, the VAE, CLIP, diffusers, einops,
flash-attn): stand-ins fill in only during the import, flash-attn's runs the SDPA call our reference
runs (parity needs one kernel), and on the CPU the stock CUDA assert is bypassed. Each stand-in and
why: docs/stock-standins.md.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["StockLongLive", "load_stock_longlive", "build_stock_model", "resolve_stock_src", "free_memory",
           "flash_attn_varlen_func", "STOCK_SRC_ENV"]

STOCK_SRC_ENV = "LONGLIVE_SRC"
# Files a LongLive v1.0 tree must have for the generator import to work.
_REQUIRED_FILES = ("wan/modules/causal_model.py", "wan/modules/model.py", "wan/modules/attention.py",
                   "utils/memory.py", "utils/debug_option.py")
# Text that marks the v1.0 cached path (the deferred cache commit and the switch re-cache flag).
_V1_MARKERS = ("def _apply_cache_updates", "sink_recache_after_switch")
_PACKAGES = ("wan", "wan.modules", "utils")

_LOADED: dict[Path, "StockLongLive"] = {}


class StockLongLive(types.SimpleNamespace):
    """What `load_stock_longlive` returns: the stock modules, the model class, and how they were loaded.

    Attributes: src (Path), causal_model, model, attention (the stock modules), CausalWanModel,
    standins (names replaced by stand-ins during the import), notes (what was changed, in words).
    """


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), deterministic=False,
                           **unused):
    """flash-attn's packed-sequence entry point for equal lengths, on torch SDPA.

    q [B*Lq, H, D], k and v [B*Lk, H, D] (B = len(cu_seqlens_q) - 1, every sequence Lq or Lk long, as
    the stock `flash_attention` packs them when it gets no lengths) -> [B*Lq, H, D]. The SDPA call is
    the one our reference's `attention()` makes: [B, H, L, D] transposed views of [B, L, H, D] tensors.
    """
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"stand-in flash_attn_varlen_func: window_size {window_size} is not supported")
    b = cu_seqlens_q.numel() - 1
    if b < 1 or cu_seqlens_k.numel() != b + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries, cu_seqlens_k {cu_seqlens_k.numel()}")
    lq, lk = int(max_seqlen_q), int(max_seqlen_k)
    if q.shape[0] != b * lq or k.shape[0] != b * lk or v.shape[0] != b * lk:
        raise ValueError("stand-in flash_attn_varlen_func handles equal sequence lengths only: got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)} for {b} sequences of {lq} / {lk}")
    out = F.scaled_dot_product_attention(
        q.view(b, lq, *q.shape[1:]).transpose(1, 2),
        k.view(b, lk, *k.shape[1:]).transpose(1, 2),
        v.view(b, lk, *v.shape[1:]).transpose(1, 2),
        dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).reshape(b * lq, *out.shape[1:2], out.shape[-1])


def _flash_attention_anywhere(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                              causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16,
                              version=None):
    """The stock `flash_attention` for CPU tensors: its casts and packing, then the stand-in kernel."""
    half_dtypes = (torch.float16, torch.bfloat16)
    if dtype not in half_dtypes:
        raise ValueError(f"flash_attention computes in fp16/bf16, got dtype={dtype}")
    if q_lens is not None or k_lens is not None:
        raise NotImplementedError("the CPU flash_attention stand-in supports no per-sample lengths "
                                  "(LongLive's cached inference passes none)")
    b, lq, lk, out_dtype = q.size(0), q.size(1), k.size(1), q.dtype

    def half(x):
        return x if x.dtype in half_dtypes else x.to(dtype)

    q, k, v = half(q.flatten(0, 1)), half(k.flatten(0, 1)), half(v.flatten(0, 1))
    q, k = q.to(v.dtype), k.to(v.dtype)
    if q_scale is not None:
        q = q * q_scale
    cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (b + 1) * lk, lk, dtype=torch.int32, device=k.device)
    x = flash_attn_varlen_func(q, k, v, cu_q, cu_k, lq, lk, dropout_p=dropout_p, softmax_scale=softmax_scale,
                               causal=causal, window_size=window_size,
                               deterministic=deterministic).unflatten(0, (b, lq))
    return x.type(out_dtype)


def _device_dispatch(stock_flash_attention):
    """Stock flash_attention on CUDA tensors, its CPU equivalent otherwise."""

    def flash_attention(q, k, v, *args, **kwargs):
        if q.device.type == "cuda":
            return stock_flash_attention(q, k, v, *args, **kwargs)
        return _flash_attention_anywhere(q, k, v, *args, **kwargs)

    flash_attention.__wrapped__ = stock_flash_attention
    flash_attention.__doc__ = "longlive_triton.stock.longlive1: " + (_device_dispatch.__doc__ or "")
    return flash_attention


def resolve_stock_src(src_dir: str | os.PathLike | None = None) -> Path:
    """The LongLive v1.0 checkout: `src_dir`, else $LONGLIVE_SRC; checked to hold the generator files."""
    if src_dir is None:
        src_dir = os.environ.get(STOCK_SRC_ENV)
        if not src_dir:
            raise FileNotFoundError(
                f"no LongLive source given: pass src_dir or set {STOCK_SRC_ENV} to a LongLive v1.0 checkout "
                "(tests/gpu/prepare_stock_src.sh makes one in .stock/LongLive)")
    src = Path(src_dir).expanduser().resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"LongLive source directory {src} does not exist or is not a directory")
    missing = [f for f in _REQUIRED_FILES if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{src} is not a LongLive v1.0 tree: missing {', '.join(missing)}")
    text = (src / "wan/modules/causal_model.py").read_text(encoding="utf-8", errors="replace")
    absent = [m for m in _V1_MARKERS if m not in text]
    if absent or "class CausalWanModel" not in text:
        raise ValueError(f"{src / 'wan/modules/causal_model.py'} is not LongLive v1.0's causal model "
                         f"(lacks {absent or ['class CausalWanModel']})")
    return src


def _module(name: str, *, path: Path | None = None, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    is_package = path is not None
    spec = importlib.machinery.ModuleSpec(name, None, is_package=is_package)
    if is_package:
        spec.submodule_search_locations = [str(path)]
        mod.__path__ = [str(path)]
        mod.__package__ = name
    else:
        mod.__package__ = name.rpartition(".")[0]
    mod.__spec__ = spec
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def _installed(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _standin_modules() -> tuple[dict[str, types.ModuleType], list[str]]:
    """Stand-ins for the third-party modules the stock generator imports but inference does not need."""
    mods: dict[str, types.ModuleType] = {}
    notes: list[str] = []
    if not _installed("diffusers"):
        class ConfigMixin:  # noqa: D401 - the stand-in of diffusers' config mixin: stores nothing
            """Stand-in for diffusers.configuration_utils.ConfigMixin (no config is recorded)."""

        def register_to_config(init):
            return init

        mods["diffusers"] = _module("diffusers", path=Path("/nonexistent/diffusers-standin"),
                                    __version__="0+longlive_triton.standin")
        mods["diffusers.configuration_utils"] = _module(
            "diffusers.configuration_utils", ConfigMixin=ConfigMixin, register_to_config=register_to_config)
        mods["diffusers.models"] = _module("diffusers.models", path=Path("/nonexistent/diffusers-standin/models"))
        mods["diffusers.models.modeling_utils"] = _module("diffusers.models.modeling_utils", ModelMixin=nn.Module)
        notes.append("diffusers is not installed: ModelMixin is nn.Module, ConfigMixin empty, "
                     "register_to_config the identity")
    if not _installed("einops"):
        def repeat(*args, **kwargs):
            raise NotImplementedError("einops stand-in from longlive_triton.stock.longlive1: install einops")

        mods["einops"] = _module("einops", repeat=repeat, __version__="0+longlive_triton.standin")
        notes.append("einops is not installed: a stand-in whose repeat() raises (used only by the GAN head)")
    mods["flash_attn"] = _module("flash_attn", flash_attn_varlen_func=flash_attn_varlen_func,
                                 __version__="0+longlive_triton.standin")
    return mods, notes


def _memory_stub() -> types.ModuleType:
    def get_cuda_free_memory_gb(device=None):
        if not torch.cuda.is_available():
            return 0.0
        free, _ = torch.cuda.mem_get_info(device)
        return free / 1024**3

    class DynamicSwapInstaller:
        @staticmethod
        def install_model(model, **kwargs):
            raise NotImplementedError("utils.memory stub (no CUDA at import): DynamicSwapInstaller is unavailable")

        @staticmethod
        def uninstall_model(model):
            raise NotImplementedError("utils.memory stub (no CUDA at import): DynamicSwapInstaller is unavailable")

    def log_gpu_memory(*args, **kwargs):
        return None

    def move_model_to_device_with_memory_preservation(model, target_device, preserved_memory_gb=0):
        model.to(device=target_device)

    cpu = torch.device("cpu")
    gpu = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else cpu
    return _module("utils.memory", cpu=cpu, gpu=gpu, gpu_complete_modules=[],
                   get_cuda_free_memory_gb=get_cuda_free_memory_gb, DynamicSwapInstaller=DynamicSwapInstaller,
                   log_gpu_memory=log_gpu_memory,
                   move_model_to_device_with_memory_preservation=move_model_to_device_with_memory_preservation)


def _check_package_slots(src: Path) -> None:
    """Refuse when `wan` or `utils` already names some other package in this process."""
    for name in _PACKAGES:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        paths = [Path(p).resolve() for p in getattr(mod, "__path__", [])]
        expected = (src / name.replace(".", "/")).resolve()
        if paths != [expected]:
            where = getattr(mod, "__file__", None) or paths
            raise ImportError(f"cannot import the stock LongLive code from {src}: module {name!r} is already "
                              f"imported from {where}; run in a process that has not imported it")


def load_stock_longlive(src_dir: str | os.PathLike | None = None) -> StockLongLive:
    """Import `wan.modules.causal_model` from a LongLive v1.0 checkout (`src_dir` or $LONGLIVE_SRC).

    Returns a `StockLongLive` namespace (see there). Loading twice from the same tree returns the
    same namespace; a second tree in the same process is refused (the module names would clash).
    """
    src = resolve_stock_src(src_dir)
    if src in _LOADED:
        return _LOADED[src]
    if _LOADED:
        raise ImportError(f"the stock LongLive code is already loaded from {next(iter(_LOADED))}; "
                          f"one process can hold one tree, not also {src}")
    _check_package_slots(src)

    notes: list[str] = []
    try:  # transformers (through peft) probes flash_attn.__spec__: let it do so before any stand-in
        importlib.import_module("peft")
    except ImportError:
        pass

    for name in _PACKAGES:
        if name not in sys.modules:
            sys.modules[name] = _module(name, path=src / name.replace(".", "/"))
    sys.modules["wan"].modules = sys.modules["wan.modules"]
    notes.append("wan, wan.modules and utils are bare packages: their __init__ files are not run")

    try:
        importlib.import_module("utils.memory")
    except Exception as exc:  # noqa: BLE001 - CPU-only torch fails in torch.cuda.current_device()
        sys.modules.pop("utils.memory", None)
        sys.modules["utils.memory"] = _memory_stub()
        sys.modules["utils"].memory = sys.modules["utils.memory"]
        notes.append(f"utils.memory failed to import ({type(exc).__name__}: {exc}); a stub stands in")

    standins, standin_notes = _standin_modules()
    notes += standin_notes
    saved = {name: sys.modules[name] for name in standins if name in sys.modules}
    sys.modules.update(standins)
    try:
        causal_model = importlib.import_module("wan.modules.causal_model")
    except BaseException:
        for name in ("wan.modules.causal_model", "wan.modules.model", "wan.modules.attention"):
            sys.modules.pop(name, None)
        raise
    finally:
        for name in standins:
            if sys.modules.get(name) is standins[name]:
                del sys.modules[name]
        sys.modules.update(saved)

    attention = sys.modules["wan.modules.attention"]
    model = sys.modules["wan.modules.model"]
    # One attention kernel for both generators: the SDPA stand-in, whatever flash-attn is installed.
    attention.flash_attn = standins["flash_attn"]
    attention.FLASH_ATTN_2_AVAILABLE = True
    attention.FLASH_ATTN_3_AVAILABLE = False
    notes.append("wan.modules.attention uses the SDPA flash_attn stand-in (FA3 off)")
    dispatch = _device_dispatch(attention.flash_attention)
    attention.flash_attention = dispatch
    model.flash_attention = dispatch
    notes.append("wan.modules.attention.flash_attention and wan.modules.model.flash_attention call the stock "
                 "function on CUDA tensors and its CPU equivalent on CPU tensors")

    ns = StockLongLive(src=src, causal_model=causal_model, model=model, attention=attention,
                       CausalWanModel=causal_model.CausalWanModel, standins=sorted(standins), notes=notes)
    _LOADED[src] = ns
    return ns


def _stock_freqs(stock: StockLongLive, dim: int, num_heads: int) -> torch.Tensor:
    """The stock constructor's RoPE table, computed on the CPU with the stock rope_params (as LongLive does)."""
    d = dim // num_heads
    rope_params = stock.causal_model.rope_params
    with torch.device("cpu"):
        return torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)),
                          rope_params(1024, 2 * (d // 6))], dim=1)


def build_stock_model(stock: StockLongLive | str | os.PathLike | None = None, model_kwargs: dict | str = "longlive-1.3b",
                      *, device="cpu", dtype: torch.dtype = torch.float32, state_dict: dict | None = None,
                      num_frame_per_block: int | None = None) -> nn.Module:
    """The stock `CausalWanModel` with explicit arguments, on `device` in `dtype`, eval mode, no grad.

    stock: a `load_stock_longlive` namespace, or a source path for it (None: $LONGLIVE_SRC).
    model_kwargs: constructor arguments, or a preset name of `longlive_triton.models.longlive1.presets`.
    state_dict: weights to load with strict=True (e.g. our reference's `state_dict()`). With weights
    the model is built on the meta device and materialised on `device` (no 1.4e9-draw init), and its
    RoPE table is recomputed on the CPU with the stock `rope_params`, as the stock constructor does
    when LongLive builds the model. Without weights the stock init runs on the CPU (note: it zeroes
    head.head.weight, so the model predicts zeros) and the model is moved to `device`.
    num_frame_per_block: set on the model as LongLive's pipeline does (None: the preset's, else 3).
    """
    if not isinstance(stock, StockLongLive):
        stock = load_stock_longlive(stock)
    preset_blocks = 3
    if isinstance(model_kwargs, str):
        from longlive_triton.models.longlive1.presets import get_preset
        preset = get_preset(model_kwargs)
        preset_blocks = preset.num_frame_per_block
        model_kwargs = preset.model_kwargs()
    kwargs = dict(model_kwargs)
    cls = stock.CausalWanModel
    if state_dict is None:
        with torch.device("cpu"):
            model = cls(**kwargs)
        model = model.to(device=device, dtype=dtype)
    else:
        with torch.device("meta"):
            model = cls(**kwargs)
        model = model.to_empty(device=device).to(dtype=dtype)
        model.freqs = _stock_freqs(stock, kwargs.get("dim", 2048), kwargs.get("num_heads", 16))
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            raise RuntimeError(f"the given weights do not fit the stock CausalWanModel({kwargs}): {exc}") from exc
    model.num_frame_per_block = preset_blocks if num_frame_per_block is None else num_frame_per_block
    return model.eval().requires_grad_(False)


def free_memory(device) -> None:
    """Give back what the dropped models held: a garbage-collector pass, and on CUDA the cached blocks."""
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
