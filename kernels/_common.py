"""Helpers shared by the kernels: bf16 rounding and a bf16 dot that the compiler and the interpreter
both honour, the launchers' checks (`check_kernel_device`, the one tensor checker `check_tensor`,
`index_arg`), the row kernels' launch rule, the scratch allocator of device-side TMA descriptors, and
`autotune`, Triton's autotuner with its choices kept on disk across processes (`AutotuneCache`)."""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner


# Head dims the attention-side kernels (RoPE + KV append, window attention) are built for.
SUPPORTED_HEAD_DIMS = (32, 64, 128)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_kernel_device(what: str, device: torch.device) -> None:
    """A launcher's first check: its tensors must be where a Triton kernel can run (else Triton
    fails deep inside with "0 active drivers")."""
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{what} needs CUDA tensors (or Triton's CPU interpreter: TRITON_INTERPRET=1, set before "
                         f"triton is imported); its inputs are on {device}")


def check_tensor(name: str, t, *, dtype: torch.dtype | tuple[torch.dtype, ...],
                 shape: tuple[int | str, ...] | None = None, device: torch.device | None = None,
                 layout: Literal["last_dim", "contiguous", "channels_last_3d", "any"] = "last_dim") -> None:
    """A launcher's check of one tensor argument; the error names the argument and what is wrong.

    dtype: the dtype, or a tuple of the dtypes allowed. shape: one entry per dim, an int (that size)
    or a name (any size; the message shows the name), e.g. (B, "L", C). device: where the kernel's
    other inputs are (None: not checked). layout: "last_dim" (the last dim contiguous, other dims
    any stride: the kernels take row strides), "contiguous", "channels_last_3d" (a [B, C, T, H, W]
    video addressed as ((t * H + h) * W + w) * C + c from its batch start), or "any". Strides of
    size-1 dims do not count: torch may report any, and no kernel steps along them.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if shape is not None:
        want = "[" + ", ".join(map(str, shape)) + "]"
        if t.dim() != len(shape):
            raise ValueError(f"{name} must be {len(shape)}-D {want}, got shape {list(t.shape)}")
        if any(isinstance(size, int) and n != size for n, size in zip(t.shape, shape)):
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, but the kernel's other inputs are on {device}")
    if layout == "last_dim":
        if t.dim() and t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    elif layout == "contiguous":
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    elif layout == "channels_last_3d":
        _check_channels_last_3d(name, t)
    elif layout != "any":
        raise ValueError(f"unknown layout {layout!r}")


def _check_channels_last_3d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 5:
        raise ValueError(f"{name} must be 5-D [B, C, T, H, W] to be channels-last 3-D, got shape {list(t.shape)}")
    _, c, frames, h, w = t.shape
    want = {"C": (c, 1), "W": (w, c), "H": (h, w * c), "T": (frames, h * w * c)}
    got = {"C": t.stride(1), "W": t.stride(4), "H": t.stride(3), "T": t.stride(2)}
    bad = [k for k, (size, stride) in want.items() if size > 1 and got[k] != stride]
    if bad:
        raise ValueError(f"{name} must be channels-last 3-D (strides C=1, W=C, H=W*C, T=H*W*C); dims {bad} of "
                         f"shape {list(t.shape)} have strides {t.stride()} "
                         "(use .contiguous(memory_format=torch.channels_last_3d))")


def tma_supported(device: torch.device) -> bool:
    """Device-side TMA descriptors: Hopper (compute capability >= 9) or Triton's interpreter."""
    if interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_scratch(size: int, alignment: int, stream):
    # The descriptors' scratch (128 bytes each) from torch's caching allocator: cheap, and legal
    # inside a CUDA graph capture. On the current device, which launch_on makes the tensors' one.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    return torch.empty(size, dtype=torch.int8, device=device)


def use_tma_allocator() -> None:
    """Install the scratch allocator Triton asks for device-side TMA descriptors, once per thread
    context (Triton keeps it in a context variable): launches after the first only read it back."""
    try:
        from triton.runtime import _allocation  # where triton.set_allocator keeps it
        current = _allocation._allocator.get()
    except (ImportError, AttributeError):  # another layout: set it, as every launch used to
        current = None
    if current is not _tma_scratch:
        triton.set_allocator(_tma_scratch)


def launch_on(device: torch.device):
    """The context to launch a kernel in: Triton launches on the current CUDA device, which may not
    be the tensors' (a model on cuda:1), and TMA scratch is allocated there too."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def row_warps(block_c: int) -> int:
    """Warps of a row kernel (norms, adaLN, quantizers: one program holds whole rows of block_c)."""
    return 4 if block_c <= 2048 else (8 if block_c <= 8192 else 16)


def rows_per_program(block_c: int) -> int:
    """Rows a row kernel takes per program. On the GPU one: measured 1.6x faster than 4 rows on 8
    warps at 4680 x 1536. The interpreter pays a fixed cost per program and works on whole arrays,
    so there a program takes as many rows as 8192 elements hold (the same arithmetic per row)."""
    return max(1, 8192 // block_c) if interpreting() else 1


@triton.jit
def round_bf16(x):
    """Round fp32 to the nearest bf16 (ties to even), kept in fp32.

    Integer arithmetic on purpose: on the GPU a cast pair (to bf16 and back) may be folded away,
    after which a multiply and an add fuse into one FMA that rounds once where torch rounds twice
    (seen on the H200 with triton 3.6); and the CPU interpreter truncates such casts. Kernels that
    reproduce the stock bf16 rounding points use this; hot loops that only need a cast use
    `cast_bf16`."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, acc, INTERPRET: tl.constexpr):
    """tl.dot; in the interpreter, whose bf16 dot is wrong, bf16 operands are upcast to fp32 first
    (exact, and the fp32 products are exact, as on the tensor cores). Other dtypes pass as they are."""
    if INTERPRET and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def cast_bf16(x, INTERPRET: tl.constexpr):
    """fp32 -> bf16, rounding to nearest even: the plain cast on the GPU, by hand in the interpreter."""
    if INTERPRET:
        return round_bf16(x).to(tl.bfloat16)
    else:
        return x.to(tl.bfloat16)


def index_arg(name: str, value, *, batch: int, lo: int, hi: int, device: torch.device, where: str = "") -> torch.Tensor:
    """A launcher's index argument as a device tensor the kernel reads (so the host never waits).

    A Python int is range-checked here and becomes a one-element int32 tensor by a device fill (no
    copy, no sync, capturable); a tensor must be int32/int64 of shape [1] or [batch] on `device`,
    contiguous (the kernel steps 0 or 1 element per sample).
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int tensor or an int, got bool")
    if isinstance(value, int):
        if not lo <= value <= hi:
            raise ValueError(f"{name}={value} is outside {where}[{lo}, {hi}]")
        return torch.full((1,), value, dtype=torch.int32, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int tensor or an int, got {type(value).__name__}")
    check_tensor(name, value, dtype=(torch.int32, torch.int64), device=device)
    if value.dim() != 1 or value.numel() not in (1, batch):
        raise ValueError(f"{name} must have shape [1] or [B={batch}], got {list(value.shape)}")
    return value


# --- autotuning that persists across processes ------------------------------------------------------

AUTOTUNE_CACHE_ENV = "LONGLIVE_TRITON_CACHE_DIR"
_CACHE_FORMAT = 1


def autotune_cache_dir() -> Path:
    """Where tuned configs are kept: $LONGLIVE_TRITON_CACHE_DIR, else the user's cache directory
    ($XDG_CACHE_HOME or ~/.cache) / longlive-triton. Deleting it only costs one search per shape."""
    if os.environ.get(AUTOTUNE_CACHE_ENV):
        return Path(os.environ[AUTOTUNE_CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "longlive-triton"


class AutotuneCache:
    """The best config per kernel and tuning key for one GPU model and one Triton version, in one JSON
    file: `autotune-<gpu>-triton<version>.json` in `autotune_cache_dir()`.

    A kernel is named with a hash of its source (and what it calls), so an edited kernel is tuned
    again; a key is Triton's tuning key (the values of the autotune `key` arguments and the dtypes of
    the tensor arguments). A file that cannot be read is ignored with a warning and rewritten by the
    next search. Writes merge with what another process may have written since, then replace the file
    atomically."""

    def __init__(self, gpu: str, triton_version: str = triton.__version__, directory: Path | None = None):
        self.gpu = gpu
        self.triton_version = triton_version
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-") or "gpu"
        self.path = (directory or autotune_cache_dir()) / f"autotune-{slug}-triton{triton_version}.json"
        self._entries: dict[str, dict[str, dict]] | None = None

    @staticmethod
    def kernel_name(fn) -> str:
        """`name-hash` of a @triton.jit function: its source and dependencies (Triton's cache_key; in
        the interpreter, which tunes nothing, the function's own source)."""
        while not hasattr(fn, "cache_key") and not inspect.isfunction(fn):
            fn = fn.fn
        source = fn.cache_key if hasattr(fn, "cache_key") else inspect.getsource(fn)
        return f"{fn.__name__}-{hashlib.sha256(source.encode()).hexdigest()[:16]}"

    @staticmethod
    def key_text(key: tuple) -> str:
        return json.dumps([str(k) for k in key])

    def _read(self) -> dict[str, dict[str, dict]]:
        try:
            text = self.path.read_text()
        except (FileNotFoundError, NotADirectoryError):  # nothing stored yet
            return {}
        except OSError as e:
            warnings.warn(f"autotune cache {self.path} cannot be read ({e}); tuning again")
            return {}
        try:
            doc = json.loads(text)
            entries = doc["entries"]
            if doc.get("format") != _CACHE_FORMAT or not isinstance(entries, dict) or not all(
                    isinstance(v, dict) and all(isinstance(c, dict) for c in v.values()) for v in entries.values()):
                raise ValueError("not this cache's format")
        except (ValueError, KeyError, TypeError) as e:
            warnings.warn(f"autotune cache {self.path} is not a valid cache file ({e}); it is ignored and will be "
                          "rewritten (delete it to silence this)")
            return {}
        return entries

    def get(self, kernel: str, key: tuple) -> dict | None:
        """The stored config (Triton's `Config.all_kwargs()`) of `kernel` at `key`, or None."""
        if self._entries is None:
            self._entries = self._read()
        return self._entries.get(kernel, {}).get(self.key_text(key))

    def put(self, kernel: str, key: tuple, config: dict) -> None:
        """Store a config; a directory that cannot be written costs only the persistence (a warning)."""
        entries = self._read()  # what other processes wrote since this one read the file
        entries.setdefault(kernel, {})[self.key_text(key)] = config
        self._entries = entries
        doc = {"format": _CACHE_FORMAT, "gpu": self.gpu, "triton": self.triton_version, "entries": entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:
            warnings.warn(f"autotune cache {self.path} cannot be written ({e}); the tuning is kept in this process only")


_CACHES: dict[tuple, AutotuneCache] = {}


def current_autotune_cache() -> AutotuneCache:
    """The cache of the current CUDA device's GPU model (launches run under launch_on(device))."""
    gpu = torch.cuda.get_device_name(torch.cuda.current_device())
    where = (gpu, triton.__version__, autotune_cache_dir())
    if where not in _CACHES:
        _CACHES[where] = AutotuneCache(gpu, directory=where[2])
    return _CACHES[where]


class PersistentAutotuner(Autotuner):
    """Triton's Autotuner whose disk cache is `AutotuneCache`: keyed by the GPU's name (an H100 and an
    H200 share Triton's own key, their compute capability, not their best tiles), the Triton version,
    the kernel's source and the tuning key. Triton hands every search to `check_disk_cache` when
    cache_results is on; here it is on except in the interpreter, which does not tune."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache_results = not interpreting()

    def check_disk_cache(self, tuning_key, configs, bench_fn) -> bool:
        """Set self.cache[tuning_key] from the file (True) or by benchmarking `configs` (False)."""
        store = current_autotune_cache()
        kernel = AutotuneCache.kernel_name(self.fn)
        stored = store.get(kernel, tuning_key)
        # A stored config counts only if it is still one of the candidates (the config list may change).
        match = next((c for c in configs if json.loads(json.dumps(c.all_kwargs())) == stored), None)
        if match is not None:
            self.cache[tuning_key] = match
            self.configs_timings = {}
            return True
        bench_fn()
        store.put(kernel, tuning_key, self.cache[tuning_key].all_kwargs())
        return False


def autotune(configs, key, prune_configs_by=None, **kwargs):
    """triton.autotune with its choices kept across processes (PersistentAutotuner): a second process
    (or the next step of a GPU session) starts at the tuned speed without searching."""
    def decorator(fn):
        return PersistentAutotuner(fn, fn.arg_names, configs, key, reset_to_zero=None, restore_value=None,
                                   prune_configs_by=prune_configs_by, **kwargs)
    return decorator


def check_bhld(name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> None:
    """A [B, L, H, D] operand of the attention-side kernels (v8 may be tokens-contiguous)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, L, H, D], got shape {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if t.stride(-1) != 1 and t.shape[-1] > 1 and not (name == "v8" and (t.stride(1) == 1 or t.shape[1] == 1)):
        raise ValueError(f"{name} must be contiguous in its last (head) dim, got strides {t.stride()}")
