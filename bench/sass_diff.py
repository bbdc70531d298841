"""Whether a change moved kernels' machine code, without a GPU.

Compiles every Triton kernel that a launcher in kernels/ launches for sm_90 (Triton's bundled ptxas)
from the working tree and from a git revision, and compares the SASS (nvdisasm; addresses,
encodings and comments stripped). Identical SASS means identical GPU behaviour, so a change that
only moves code needs no GPU run to show it; a difference means it does.

What gets compiled cannot drift from the launchers: each entry of LAUNCHES calls the working
tree's launcher once on CPU tensors at LongLive-1.3B's shapes (dim 1536, 12 heads x 128, FFN 8960,
4680 tokens; the VAE's 96-384 channels), with Triton's launch intercepted. The intercepted launch
binds its arguments as a launch on an sm_90 GPU would (types, constexprs, the divisibility-by-16
and equal-to-1 specialisations, num_warps / num_stages) and records them; those exact signatures
are compiled at both revisions. Autotuned kernels are launched with one fixed config of their
search space. Only the kernels' code is compared: a launcher change that picks other constexprs
is not seen (the recorded signatures come from the working tree).

    python -m longlive_triton.bench.sass_diff --rev main~3 [--only fp8_gemm window_attention]

Run with TRITON_INTERPRET unset (the interpreter replaces the kernels with Python ones). Works
with the Triton that imports (checked with 3.6.0 and 3.9.0); both revisions compile with it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
# What the intercepted launchers see of the GPU they pretend to run on: an H100/H200 (132 SMs).
_NUM_SMS = 132

# LongLive-1.3B: one block of 3 latent frames of 30 x 52 tokens.
DIM, HEADS, HEAD_DIM, FFN = 1536, 12, 128, 8960
FRAMES, GRID_HW = 3, (30, 52)
FRAME_TOKENS = GRID_HW[0] * GRID_HW[1]
TOKENS = FRAMES * FRAME_TOKENS  # 4680
# The KV cache: 12 frames, of which 3 are the sink; the rest a ring.
CACHE, SINK = 4 * TOKENS, TOKENS
RING = dict(ring_lo=SINK, ring_size=CACHE - SINK)
CPU = torch.device("cpu")


def _bf16(*shape):
    return torch.empty(shape, dtype=torch.bfloat16)


def _f32(*shape):
    return torch.empty(shape, dtype=torch.float32)


def _fp8(*shape):
    return torch.empty(shape, dtype=torch.float8_e4m3fn)


def _index(value: int = 0) -> torch.Tensor:
    # An int64 device index of one element, as the plan kernel's output slices are.
    return torch.full((1,), value, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# The launches: each calls working-tree launchers the way the patches do, at real shapes.

def _adaln(form: str):
    from ..kernels.adaln import adaln

    x, y = _bf16(1, TOKENS, DIM), _bf16(1, TOKENS, DIM)

    def per_frame():  # the stock [B, F, 1, C] chunk of the time embedding
        return _bf16(1, FRAMES, 1, DIM)

    kwargs = {  # the calls of patches/fused_block.py and fused_head.py
        "modulate": lambda: dict(shift=per_frame(), scale=per_frame()),
        "modulate fp8": lambda: dict(shift=per_frame(), scale=per_frame(), fp8=True),
        "residual affine": lambda: dict(y=y, gate=per_frame(), weight=_bf16(DIM), bias=_bf16(DIM)),
        "residual modulate fp8": lambda: dict(y=y, shift=per_frame(), scale=per_frame(), fp8=True),
        "residual gate": lambda: dict(y=y, gate=per_frame(), norm=False, out_x=x),
    }[form]()
    return lambda: adaln(x, **kwargs)


def _rms_norm():
    from ..kernels.rms_norm import rms_norm

    qkv = _bf16(1, TOKENS, 3 * DIM)  # the self-attention's q slice of its fused projection
    return lambda: rms_norm(qkv[..., :DIM], _bf16(DIM))


def _quantize(k: int):
    from ..kernels.fp8_quant import quantize_rowwise

    return lambda: quantize_rowwise(_bf16(TOKENS, k))


def _gemm(*, n: int, k: int, tma: bool, bias=True, gelu=False, out_fp8=False, grouped=False, block_n=128,
          stages=3):
    from ..kernels.fp8_gemm import fp8_gemm

    a_scale = _f32(TOKENS, k // 128) if grouped else _f32(TOKENS)
    config = dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=stages)
    return lambda: fp8_gemm(_fp8(TOKENS, k), _fp8(n, k), a_scale, _f32(n), _bf16(n) if bias else None, gelu=gelu,
                            out_fp8=out_fp8, use_tma=tma, config=config)


def _kv_cache_plan(*, device_start: bool):
    from ..kernels.kv_cache_plan import kv_cache_plan

    start = _index(TOKENS) if device_start else TOKENS
    return lambda: kv_cache_plan(_index(), _index(), _index(), current_start=start, num_new=TOKENS, capacity=CACHE,
                                 sink_tokens=SINK, budget=CACHE, frame_tokens=FRAME_TOKENS)


def _rope_kv_append(*, norm: bool):
    from ..kernels.rope_kv_append import rope_kv_append, rope_tables

    cos, sin = rope_tables(HEAD_DIM, device=CPU)
    w = (_bf16(DIM), _bf16(DIM)) if norm else (None, None)
    caches = (_bf16(1, CACHE, HEADS, HEAD_DIM), _bf16(1, CACHE, HEADS, HEAD_DIM))
    return lambda: rope_kv_append(_bf16(1, TOKENS, DIM), _bf16(1, TOKENS, DIM), _bf16(1, TOKENS, DIM), *w, cos, sin,
                                  *caches, (FRAMES, *GRID_HW), _index(), _index(), _index(), shift=_index(), **RING)


def _kv_quant_append():
    from ..kernels.fp8_kv_cache import fp8_kv_cache
    from ..kernels.kv_quant_append import kv_quant_append
    from ..kernels.rope_kv_append import rope_tables

    cos, sin = rope_tables(HEAD_DIM, device=CPU)
    k8, v8, v_scale = fp8_kv_cache(1, CACHE, HEADS, HEAD_DIM, CPU)
    return lambda: kv_quant_append(_bf16(1, TOKENS, DIM), _bf16(1, TOKENS, DIM), _bf16(1, TOKENS, DIM),
                                   _bf16(DIM), _bf16(DIM), cos, sin, k8, _f32(HEADS), v8, v_scale, (FRAMES, *GRID_HW),
                                   _index(), _index(), _index(), shift=_index(), **RING)


def _token_merge():
    from ..kernels.token_merge import token_merge

    return lambda: token_merge(_bf16(1, TOKENS, DIM), frames=FRAMES, grid=GRID_HW, ratio=0.5)


def _token_unmerge():
    from ..kernels.token_merge import token_unmerge

    return lambda: token_unmerge(_bf16(1, TOKENS // 2, DIM), torch.zeros(1, TOKENS, dtype=torch.int64))


# The decoder's stages for a 480 x 832 video, each (frames of one chunk, height, width): the latent
# frame, then each upsampling (the first two also in time).
LATENT, UP1, UP2, UP3 = (1, 60, 104), (2, 120, 208), (4, 240, 416), (4, 480, 832)


def _video(c: int, stage: tuple[int, int, int], dtype=torch.bfloat16, extra_frames: int = 0) -> torch.Tensor:
    t, h, w = stage
    return torch.empty((1, c, t + extra_frames, h, w), dtype=dtype).contiguous(memory_format=torch.channels_last_3d)


def _vae_norm(c: int, stage, *, silu=True, full=False):
    from ..kernels.vae_rms_norm_silu import vae_rms_norm_silu

    extra = dict(residual=_video(c, stage), sum_out=_video(c, stage)) if full else {}
    return lambda: vae_rms_norm_silu(_video(c, stage), _bf16(c), x_bias=_bf16(c), silu=silu, **extra)


def _vae_add(c: int, stage):
    from ..kernels.vae_rms_norm_silu import vae_add

    return lambda: vae_add(_video(c, stage), _bf16(c), _video(c, stage))


def _vae_conv(c_in: int, c_out: int, stage, *, fp32=False, bias=True):
    from ..kernels.vae_conv3d import CACHE_T, vae_conv3d

    dtype = torch.float32 if fp32 else torch.bfloat16
    x = _video(c_in, stage, dtype, extra_frames=CACHE_T)  # the time-padded input: cached frames in front
    tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if c_in % 64 == 0 else 32, num_warps=8, num_stages=3)
    weight = torch.empty(27 * c_in, c_out, dtype=dtype)
    return lambda: vae_conv3d(x, weight, torch.empty(c_out, dtype=dtype) if bias else None, tile=tile)


def _attention(*, fp8: bool, tma=False, split=1):
    from ..kernels.fp8_kv_cache import fp8_kv_cache
    from ..kernels.window_attention import window_attention, window_attention_fp8

    ranges = (_index(SINK), _index(SINK), _index(CACHE))
    options = dict(shift=_index(), use_tma=tma, split=split,
                   config=dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2), **RING)
    if fp8:
        k8, v8, v_scale = fp8_kv_cache(1, CACHE, HEADS, HEAD_DIM, CPU)
        return lambda: window_attention_fp8(_fp8(1, TOKENS, HEADS, HEAD_DIM), _f32(1, TOKENS, HEADS), k8, _f32(HEADS),
                                            v8, v_scale, *ranges, **options)
    q, k, v = _bf16(1, TOKENS, HEADS, HEAD_DIM), _bf16(1, CACHE, HEADS, HEAD_DIM), _bf16(1, CACHE, HEADS, HEAD_DIM)
    return lambda: window_attention(q, k, v, *ranges, **options)


@dataclass(frozen=True)
class Entry:
    make: Callable[[], Callable[[], object]]  # builds the inputs, returns the launcher call
    kernels: tuple[str, ...]  # "module.kernel" of each launch it makes, in order


LAUNCHES: dict[str, Entry] = {
    **{f"adaln {form}": Entry(lambda form=form: _adaln(form), ("adaln._adaln_kernel",))
       for form in ("modulate", "modulate fp8", "residual affine", "residual modulate fp8", "residual gate")},
    "rms_norm": Entry(_rms_norm, ("rms_norm._rms_norm_kernel",)),
    "quantize_rowwise 1536": Entry(lambda: _quantize(DIM), ("fp8_quant._quant_rowwise_kernel",)),
    "quantize_rowwise 8960": Entry(lambda: _quantize(FFN), ("fp8_quant._quant_rowwise_kernel",)),
    "fp8_gemm tma qkv": Entry(lambda: _gemm(n=3 * DIM, k=DIM, tma=True, block_n=256),
                              ("fp8_gemm._fp8_gemm_tma_kernel",)),
    "fp8_gemm tma ffn1 gelu fp8-out": Entry(lambda: _gemm(n=FFN, k=DIM, tma=True, gelu=True, out_fp8=True, stages=4),
                                            ("fp8_gemm._fp8_gemm_tma_kernel",)),
    "fp8_gemm tma ffn2 grouped-a": Entry(lambda: _gemm(n=DIM, k=FFN, tma=True, grouped=True, block_n=256),
                                         ("fp8_gemm._fp8_gemm_tma_kernel",)),
    "fp8_gemm ptr qkv": Entry(lambda: _gemm(n=3 * DIM, k=DIM, tma=False), ("fp8_gemm._fp8_gemm_kernel",)),
    "fp8_gemm ptr ffn1 gelu fp8-out": Entry(lambda: _gemm(n=FFN, k=DIM, tma=False, gelu=True, out_fp8=True),
                                            ("fp8_gemm._fp8_gemm_kernel",)),
    "fp8_gemm ptr ffn2 grouped-a": Entry(lambda: _gemm(n=DIM, k=FFN, tma=False, grouped=True),
                                         ("fp8_gemm._fp8_gemm_kernel",)),
    "kv_cache_plan": Entry(lambda: _kv_cache_plan(device_start=False), ("kv_cache_plan._kv_cache_plan_kernel",)),
    "kv_cache_plan device start": Entry(lambda: _kv_cache_plan(device_start=True),
                                        ("kv_cache_plan._kv_cache_plan_kernel",)),
    "rope_kv_append norm": Entry(lambda: _rope_kv_append(norm=True), ("rope_kv_append._rope_kv_append_kernel",)),
    "rope_kv_append normed": Entry(lambda: _rope_kv_append(norm=False), ("rope_kv_append._rope_kv_append_kernel",)),
    "kv_quant_append": Entry(_kv_quant_append, ("kv_quant_append._kv_quant_append_kernel",)),
    "token_merge": Entry(_token_merge, ("token_merge._match_kernel", "token_merge_plan._rank_kernel",
                                        "token_merge_plan._layout_kernel", "token_merge._merge_kernel")),
    "token_unmerge": Entry(_token_unmerge, ("token_merge._unmerge_kernel",)),
    "vae_rms_norm_silu 384 full": Entry(lambda: _vae_norm(384, LATENT, full=True),
                                        ("vae_rms_norm_silu._vae_rms_norm_silu_kernel",)),
    "vae_rms_norm 192 no silu": Entry(lambda: _vae_norm(192, UP2, silu=False),
                                      ("vae_rms_norm_silu._vae_rms_norm_silu_kernel",)),
    "vae_rms_norm_silu 96": Entry(lambda: _vae_norm(96, UP3), ("vae_rms_norm_silu._vae_rms_norm_silu_kernel",)),
    "vae_add 384": Entry(lambda: _vae_add(384, UP1), ("vae_rms_norm_silu._vae_rms_norm_silu_kernel",)),
    "vae_conv3d bf16 384-384 latent": Entry(lambda: _vae_conv(384, 384, LATENT), ("vae_conv3d._vae_conv3d_kernel",)),
    "vae_conv3d bf16 384-384 up1": Entry(lambda: _vae_conv(384, 384, UP1), ("vae_conv3d._vae_conv3d_kernel",)),
    "vae_conv3d bf16 192-384 no bias": Entry(lambda: _vae_conv(192, 384, UP1, bias=False),
                                             ("vae_conv3d._vae_conv3d_kernel",)),
    "vae_conv3d bf16 192-192": Entry(lambda: _vae_conv(192, 192, UP2), ("vae_conv3d._vae_conv3d_kernel",)),
    "vae_conv3d bf16 96-96": Entry(lambda: _vae_conv(96, 96, UP3), ("vae_conv3d._vae_conv3d_kernel",)),
    "vae_conv3d fp32 384-384": Entry(lambda: _vae_conv(384, 384, LATENT, fp32=True),
                                     ("vae_conv3d._vae_conv3d_kernel",)),
    "window_attention bf16": Entry(lambda: _attention(fp8=False), ("window_attention._window_attn_fwd",)),
    "window_attention bf16 tma": Entry(lambda: _attention(fp8=False, tma=True), ("window_attention._window_attn_fwd",)),
    "window_attention fp8": Entry(lambda: _attention(fp8=True), ("window_attention._window_attn_fwd",)),
    "window_attention fp8 tma": Entry(lambda: _attention(fp8=True, tma=True), ("window_attention._window_attn_fwd",)),
    "window_attention fp8 split 2": Entry(lambda: _attention(fp8=True, split=2),
                                          ("window_attention._window_attn_fwd",)),
}


def covered_kernels() -> set[str]:
    """"module.kernel" of every kernel some entry of LAUNCHES compiles."""
    return {kernel for entry in LAUNCHES.values() for kernel in entry.kernels}


# ---------------------------------------------------------------------------------------------
# Recording a launch instead of running it

@dataclass(frozen=True)
class Launch:
    kernel: str  # "module.kernel" under kernels/
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # argument name -> value
    attrs: dict  # argument name -> specialisation attributes (divisibility by 16)
    options: dict  # launch options: num_warps, num_stages


@contextlib.contextmanager
def _recording(launches: list[Launch]):
    """Launchers run on CPU tensors as on an sm_90 GPU; each Triton launch is recorded, not run."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("sass_diff compiles kernels: run it with TRITON_INTERPRET unset")
    backend = make_backend(TARGET)
    package = importlib.import_module("longlive_triton.kernels")
    modules = [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    # The launchers' only questions to the GPU; every module holds its own imported name.
    fakes = {"check_kernel_device": lambda what, device: None, "tma_supported": lambda device: True,
             "_num_sms": lambda device: _NUM_SMS}

    def record(fn, *args, grid, warmup, **kwargs):
        # What JITFunction.run does before it compiles: bind, specialise, split off the options.
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        names = fn.arg_names
        if any(len(path) != 1 for path in (*constexprs, *attrs)):
            raise NotImplementedError(f"{fn.__name__}: tuple arguments are not handled")
        module = fn.fn.__module__.rsplit(".", 1)[-1]
        launches.append(Launch(
            kernel=f"{module}.{fn.fn.__name__}", signature=signature,
            constexprs={names[i]: v for (i,), v in constexprs.items()},
            attrs={names[i]: v for (i,), v in attrs.items()},
            options={k: v for k, v in kwargs.items() if k not in names}))

    saved = [(m, name, getattr(m, name)) for m in modules for name in fakes if hasattr(m, name)]
    run = JITFunction.run
    try:
        for m, name, _ in saved:
            setattr(m, name, fakes[name])
        JITFunction.run = record
        yield
    finally:
        JITFunction.run = run
        for m, name, value in saved:
            setattr(m, name, value)


def record(label: str) -> list[Launch]:
    """The launches one entry of LAUNCHES makes, checked against the kernels it declares."""
    entry = LAUNCHES[label]
    launches: list[Launch] = []
    with torch.no_grad():
        call = entry.make()
        with _recording(launches):
            call()
    got = tuple(launch.kernel for launch in launches)
    if got != entry.kernels:
        raise RuntimeError(f"{label!r} launched {got}, but LAUNCHES declares {entry.kernels}")
    return launches


# ---------------------------------------------------------------------------------------------
# Compiling and disassembling

def sass(package: str, launch: Launch) -> list[str] | None:
    """The SASS lines of one recorded launch compiled from `package` (without addresses, encodings and
    comments); None when the kernel there takes other arguments than the recorded ones."""
    module, name = launch.kernel.split(".")
    fn = getattr(importlib.import_module(f"{package}.{module}"), name, None)
    if fn is None or set(fn.arg_names) != set(launch.signature):
        return None
    signature = {n: launch.signature[n] for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): v for n, v in launch.attrs.items()}
    kernel = triton.compile(ASTSource(fn, signature, dict(launch.constexprs), attrs), target=TARGET,
                            options=dict(launch.options))
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(nvdisasm), "-c", f.name], check=True, capture_output=True, text=True).stdout
    lines = (re.sub(r"/\*[0-9a-f]*\*/", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith(("//", "."))]


def _kernels_at(rev: str, root: Path) -> str:
    """kernels/ of `rev` as a package under `root`; returns its name."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "kernels"], check=True, capture_output=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout
    tarfile.open(fileobj=BytesIO(archive)).extractall(root, filter="data")
    # A name of its own: a plain `kernels` could be Hugging Face's package, already imported.
    (root / "kernels").rename(root / "kernels_at_rev")
    (root / "kernels_at_rev" / "__init__.py").touch()
    sys.path.insert(0, str(root))
    return "kernels_at_rev"


def _selected(only: list[str] | None) -> list[str]:
    """Labels of LAUNCHES that start with one of `only`, or launch a kernel of that name or module."""
    if not only:
        return list(LAUNCHES)
    picked = [label for label, entry in LAUNCHES.items()
              if any(label.startswith(word) or any(word in k.split(".") for k in entry.kernels) for word in only)]
    if not picked:
        raise SystemExit(f"--only {' '.join(only)} matches no entry; labels: {', '.join(LAUNCHES)}")
    return picked


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare the working tree with")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="entries to compare: a label or its start (\"adaln\", \"window_attention fp8\"), a kernel "
                             "(_merge_kernel) or its module (token_merge_plan)")
    args = parser.parse_args(argv)
    labels = _selected(args.only)
    print(f"triton {triton.__version__}, sm_90, working tree vs {args.rev}")
    with tempfile.TemporaryDirectory() as tmp:
        old_package = _kernels_at(args.rev, Path(tmp))
        differ = 0
        width = max(len(label) for label in labels) + 32
        print(f"{'launch / kernel':<{width}} {'now':>7} {'at rev':>7}  identical")
        for label in labels:
            for launch in record(label):
                new, old = sass("longlive_triton.kernels", launch), sass(old_package, launch)
                same = new == old
                differ += not same
                old_count = "args" if old is None else len(old)  # "args": the kernel's arguments differ there
                print(f"{label + ' / ' + launch.kernel.split('.')[1]:<{width}} {len(new):>7} {old_count:>7}  "
                      f"{'yes' if same else 'NO'}", flush=True)
    print(f"{differ} of the compiled kernels differ" if differ else "all identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
