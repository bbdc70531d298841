"""What the importers of both stock LongLive generators share: finding the checkout, telling the two
families apart, registering its folders as bare packages, stand-ins for the dependencies inference does
not need, and one attention kernel for both sides of a parity run.

    src = resolve_src(None, "longlive2")          # $LONGLIVE_SRC, checked to be a LongLive 2.0 tree

`LONGLIVE_SRC` may point at either tree. The family is told apart by its files: a LongLive 2.0 checkout
(branch main, Wan2.2-TI2V-5B) has `wan_5b/modules/causal_model.py`, a v1.0 checkout (Wan2.1-T2V-1.3B)
`wan/modules/causal_model.py`. Asking one importer for the other family's tree is a clear error.

Both trees have a top-level `utils` package. One process can hold one tree of each family: while a
tree's modules are imported its own `utils` is the registered one; if the other family's `utils` was
registered before, it is put back after the import (the modules of each tree keep references to their
own). What a tree imports lazily at run time from `utils` must therefore be imported at load time (the
2.0 importer does so for its Triton kernels). Module names the two trees would both import are refused.
"""
from __future__ import annotations

import contextlib
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

__all__ = ["STOCK_SRC_ENV", "FAMILY_MARKERS", "FAMILY_NAMES", "detect_family", "resolve_src", "module",
           "installed", "diffusers_standins", "einops_standin", "flash_attn_varlen_func",
           "flash_attention_anywhere", "device_dispatch", "bare_packages", "check_package_slots"]

STOCK_SRC_ENV = "LONGLIVE_SRC"
# The file that tells a family's tree: the causal generator of each.
FAMILY_MARKERS = {"longlive1": "wan/modules/causal_model.py", "longlive2": "wan_5b/modules/causal_model.py"}
FAMILY_NAMES = {"longlive1": "LongLive v1.0", "longlive2": "LongLive 2.0"}
# Set on the bare packages this module registers: a registered package of another tree is ours to swap,
# any other module under the same name is someone else's and is refused.
_TREE_MARK = "__longlive_stock_tree__"


def detect_family(src: Path) -> str | None:
    """"longlive2" when `src` holds wan_5b/modules/causal_model.py, "longlive1" for wan/..., else None."""
    for family in ("longlive2", "longlive1"):
        if (src / FAMILY_MARKERS[family]).is_file():
            return family
    return None


def resolve_src(src_dir: str | os.PathLike | None, family: str, required: tuple[str, ...] = ()) -> Path:
    """The checkout of `family`: `src_dir`, else $LONGLIVE_SRC; checked to be that family's tree with `required`."""
    name = FAMILY_NAMES[family]
    if src_dir is None:
        src_dir = os.environ.get(STOCK_SRC_ENV)
        if not src_dir:
            raise FileNotFoundError(
                f"no LongLive source given: pass src_dir or set {STOCK_SRC_ENV} to a {name} checkout "
                "(tests/gpu/prepare_stock_src.sh makes one in .stock/)")
    src = Path(src_dir).expanduser().resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"LongLive source directory {src} does not exist or is not a directory")
    found = detect_family(src)
    if found is not None and found != family:
        raise ValueError(f"{src} is a {FAMILY_NAMES[found]} tree ({FAMILY_MARKERS[found]}), but the {name} "
                         f"importer was asked for it: use longlive_triton.stock.{found} or point at a {name} tree")
    missing = [f for f in (FAMILY_MARKERS[family], *required) if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{src} is not a {name} tree: missing {', '.join(missing)}")
    return src


def module(name: str, *, path: Path | None = None, **attrs) -> types.ModuleType:
    """A module object named `name` with `attrs`; a package searching `path` when one is given."""
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


def installed(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def diffusers_standins() -> dict[str, types.ModuleType]:
    """diffusers' model and config mixins as inference needs them: ModelMixin = nn.Module, no config kept."""
    class ConfigMixin:
        """Stand-in for diffusers.configuration_utils.ConfigMixin (no config is recorded)."""

    def register_to_config(init):
        return init

    return {
        "diffusers": module("diffusers", path=Path("/nonexistent/diffusers-standin"),
                            __version__="0+longlive_triton.standin"),
        "diffusers.configuration_utils": module("diffusers.configuration_utils", ConfigMixin=ConfigMixin,
                                                register_to_config=register_to_config),
        "diffusers.models": module("diffusers.models", path=Path("/nonexistent/diffusers-standin/models")),
        "diffusers.models.modeling_utils": module("diffusers.models.modeling_utils", ModelMixin=nn.Module),
    }


def einops_standin() -> types.ModuleType:
    """einops for code that imports it where inference never calls it: every function raises."""
    def refuse(*args, **kwargs):
        raise NotImplementedError("einops stand-in from longlive_triton.stock: install einops")

    return module("einops", repeat=refuse, rearrange=refuse, __version__="0+longlive_triton.standin")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), deterministic=False,
                           **unused):
    """flash-attn's packed-sequence entry point for equal lengths, on torch SDPA.

    q [B*Lq, H, D], k and v [B*Lk, H, D] (B = len(cu_seqlens_q) - 1, every sequence Lq or Lk long, as
    the stock `flash_attention` packs them when it gets no lengths) -> [B*Lq, H, D]. The SDPA call is
    the one our references' `attention()` makes: [B, H, L, D] transposed views of [B, L, H, D] tensors.
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


def flash_attention_anywhere(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                             causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16,
                             version=None):
    """The stock `flash_attention` (both families) for CPU tensors: its casts and packing, then the stand-in."""
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


def device_dispatch(stock_flash_attention, owner: str):
    """Stock flash_attention on CUDA tensors, its CPU equivalent (`flash_attention_anywhere`) otherwise."""

    def flash_attention(q, k, v, *args, **kwargs):
        if q.device.type == "cuda":
            return stock_flash_attention(q, k, v, *args, **kwargs)
        return flash_attention_anywhere(q, k, v, *args, **kwargs)

    flash_attention.__wrapped__ = stock_flash_attention
    flash_attention.__doc__ = f"{owner}: " + (device_dispatch.__doc__ or "")
    return flash_attention


def check_package_slots(src: Path, packages: tuple[str, ...]) -> None:
    """Refuse when one of `packages` already names a module that is neither this tree's nor another stock tree's."""
    for name in packages:
        mod = sys.modules.get(name)
        if mod is None or getattr(mod, _TREE_MARK, None) is not None:
            continue
        paths = [Path(p).resolve() for p in getattr(mod, "__path__", [])]
        if paths != [(src / name.replace(".", "/")).resolve()]:
            where = getattr(mod, "__file__", None) or paths
            raise ImportError(f"cannot import the stock LongLive code from {src}: module {name!r} is already "
                              f"imported from {where}; run in a process that has not imported it")


@contextlib.contextmanager
def bare_packages(src: Path, packages: tuple[str, ...]):
    """This tree's folders registered as bare packages (their `__init__` not run) for the import inside.

    A package of this tree registered before is reused. One of another stock tree (the other family's
    `utils`) is set aside for the import and put back afterwards; this tree's then stays reachable
    through its modules' references and through the submodules it imported.
    """
    check_package_slots(src, packages)
    set_aside: dict[str, types.ModuleType] = {}
    for name in packages:
        current = sys.modules.get(name)
        expected = str((src / name.replace(".", "/")).resolve())
        if current is not None and expected in (getattr(current, _TREE_MARK, None),
                                                *[str(Path(p).resolve()) for p in getattr(current, "__path__", [])]):
            continue
        if current is not None and getattr(current, _TREE_MARK, None) is not None:
            set_aside[name] = current
        sys.modules[name] = module(name, path=Path(expected), **{_TREE_MARK: expected})
    for name in packages:  # the parent's attribute, as a real import sets it
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    try:
        yield
    finally:
        sys.modules.update(set_aside)


@contextlib.contextmanager
def standins_during_import(standins: dict[str, types.ModuleType]):
    """`standins` in sys.modules for the import inside only; what they replaced is put back afterwards."""
    saved = {name: sys.modules[name] for name in standins if name in sys.modules}
    sys.modules.update(standins)
    try:
        yield
    finally:
        for name in standins:
            if sys.modules.get(name) is standins[name]:
                del sys.modules[name]
        sys.modules.update(saved)


def stock_rope_table(rope_params, dim: int, num_heads: int) -> torch.Tensor:
    """The stock constructor's RoPE table, computed on the CPU with the tree's own `rope_params` (as LongLive does)."""
    d = dim // num_heads
    with torch.device("cpu"):
        return torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)),
                          rope_params(1024, 2 * (d // 6))], dim=1)


def instantiate(cls: type[nn.Module], kwargs: dict, rope_params, *, device, dtype: torch.dtype,
                state_dict: dict | None) -> nn.Module:
    """A stock `CausalWanModel` (either family) cls(**kwargs) on `device` in `dtype`, eval mode, no grad.

    Without weights the stock init runs on the CPU and the model is moved to `device`. With weights it is
    built on the meta device, materialised on `device` (no init: billions of draws at real shapes), its RoPE
    table recomputed with the tree's `rope_params`, and the weights loaded with strict=True.
    """
    if state_dict is None:
        with torch.device("cpu"):
            model = cls(**kwargs)
        model = model.to(device=device, dtype=dtype)
    else:
        with torch.device("meta"):
            model = cls(**kwargs)
        model = model.to_empty(device=device).to(dtype=dtype)
        model.freqs = stock_rope_table(rope_params, kwargs.get("dim", 2048), kwargs.get("num_heads", 16))
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            raise RuntimeError(f"the given weights do not fit the stock CausalWanModel({kwargs}): {exc}") from exc
    return model.eval().requires_grad_(False)
