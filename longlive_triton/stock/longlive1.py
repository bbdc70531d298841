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
why: docs/stock-standins.md. What this shares with the LongLive 2.0 importer (`longlive2.py`): `source.py`.
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn

from longlive_triton.stock.source import (STOCK_SRC_ENV, bare_packages, check_package_slots, device_dispatch,
                                          diffusers_standins, einops_standin, flash_attn_varlen_func, installed, instantiate,
                                          resolve_src, standins_during_import)
from longlive_triton.stock.source import flash_attention_anywhere as _flash_attention_anywhere  # noqa: F401 - tests use the name
from longlive_triton.stock.source import module as _module

__all__ = ["StockLongLive", "load_stock_longlive", "build_stock_model", "resolve_stock_src", "free_memory",
           "flash_attn_varlen_func", "STOCK_SRC_ENV"]

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


def resolve_stock_src(src_dir: str | os.PathLike | None = None) -> Path:
    """The LongLive v1.0 checkout: `src_dir`, else $LONGLIVE_SRC; checked to hold the generator files."""
    src = resolve_src(src_dir, "longlive1", _REQUIRED_FILES)
    text = (src / "wan/modules/causal_model.py").read_text(encoding="utf-8", errors="replace")
    absent = [m for m in _V1_MARKERS if m not in text]
    if absent or "class CausalWanModel" not in text:
        raise ValueError(f"{src / 'wan/modules/causal_model.py'} is not LongLive v1.0's causal model "
                         f"(lacks {absent or ['class CausalWanModel']})")
    return src


def _check_package_slots(src: Path) -> None:
    """Refuse when `wan` or `utils` already names some other package in this process."""
    check_package_slots(src, _PACKAGES)


def _standin_modules() -> tuple[dict[str, types.ModuleType], list[str]]:
    """Stand-ins for the third-party modules the stock generator imports but inference does not need."""
    mods: dict[str, types.ModuleType] = {}
    notes: list[str] = []
    if not installed("diffusers"):
        mods.update(diffusers_standins())
        notes.append("diffusers is not installed: ModelMixin is nn.Module, ConfigMixin empty, "
                     "register_to_config the identity")
    if not installed("einops"):
        mods["einops"] = einops_standin()
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


def load_stock_longlive(src_dir: str | os.PathLike | None = None) -> StockLongLive:
    """Import `wan.modules.causal_model` from a LongLive v1.0 checkout (`src_dir` or $LONGLIVE_SRC).

    Returns a `StockLongLive` namespace (see there). Loading twice from the same tree returns the
    same namespace; a second tree in the same process is refused (the module names would clash).
    """
    src = resolve_stock_src(src_dir)
    if src in _LOADED:
        return _LOADED[src]
    if _LOADED:
        raise ImportError(f"the stock LongLive v1.0 code is already loaded from {next(iter(_LOADED))}; "
                          f"one process can hold one v1.0 tree, not also {src}")
    notes: list[str] = []
    try:  # transformers (through peft) probes flash_attn.__spec__: let it do so before any stand-in
        importlib.import_module("peft")
    except ImportError:
        pass
    notes.append("wan, wan.modules and utils are bare packages: their __init__ files are not run")
    standins, standin_notes = _standin_modules()
    with bare_packages(src, _PACKAGES):
        try:
            importlib.import_module("utils.memory")
        except Exception as exc:  # noqa: BLE001 - CPU-only torch fails in torch.cuda.current_device()
            sys.modules.pop("utils.memory", None)
            sys.modules["utils.memory"] = _memory_stub()
            sys.modules["utils"].memory = sys.modules["utils.memory"]
            notes.append(f"utils.memory failed to import ({type(exc).__name__}: {exc}); a stub stands in")
        notes += standin_notes
        with standins_during_import(standins):
            try:
                causal_model = importlib.import_module("wan.modules.causal_model")
            except BaseException:
                for name in ("wan.modules.causal_model", "wan.modules.model", "wan.modules.attention"):
                    sys.modules.pop(name, None)
                raise

    attention = sys.modules["wan.modules.attention"]
    model = sys.modules["wan.modules.model"]
    # One attention kernel for both generators: the SDPA stand-in, whatever flash-attn is installed.
    attention.flash_attn = standins["flash_attn"]
    attention.FLASH_ATTN_2_AVAILABLE = True
    attention.FLASH_ATTN_3_AVAILABLE = False
    notes.append("wan.modules.attention uses the SDPA flash_attn stand-in (FA3 off)")
    dispatch = device_dispatch(attention.flash_attention, "longlive_triton.stock.longlive1")
    attention.flash_attention = dispatch
    model.flash_attention = dispatch
    notes.append("wan.modules.attention.flash_attention and wan.modules.model.flash_attention call the stock "
                 "function on CUDA tensors and its CPU equivalent on CPU tensors")

    ns = StockLongLive(src=src, causal_model=causal_model, model=model, attention=attention,
                       CausalWanModel=causal_model.CausalWanModel, standins=sorted(standins), notes=notes)
    _LOADED[src] = ns
    return ns


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
    model = instantiate(stock.CausalWanModel, dict(model_kwargs), stock.causal_model.rope_params, device=device,
                        dtype=dtype, state_dict=state_dict)
    model.num_frame_per_block = preset_blocks if num_frame_per_block is None else num_frame_per_block
    return model


def free_memory(device) -> None:
    """Give back what the dropped models held: a garbage-collector pass, and on CUDA the cached blocks."""
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
