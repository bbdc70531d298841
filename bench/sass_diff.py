"""Whether a refactor changed kernels' machine code, without a GPU.

Compiles kernels for sm_90 (Triton's bundled ptxas) from the working tree and from a git revision
and compares the SASS (nvdisasm, addresses and comments stripped): the window attention in its
bf16, FP8 and FP8 split-KV forms at LongLive's head dim, and the VAE's 3x3x3 convolution in bf16
and fp32. Identical SASS means identical GPU behaviour, so a change that only moves code needs no
GPU run to show it; a difference means it does.

    python -m longlive_triton.bench.sass_diff --rev main~3
"""
from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_ATTENTION = dict(LQ_BUCKET=4096, HEAD_DIM=128, RING=True, N_RANGES=3, USE_TMA=False, INTERPRET=False,
                  BLOCK_M=128, BLOCK_N=128)
_CONV = dict(C_IN=128, C_OUT=128, HAS_BIAS=True, INTERPRET=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
# label -> (module in kernels/, kernel, constexpr values, launch options)
VARIANTS = {
    "window attention bf16": ("window_attention", "_window_attn_fwd", dict(_ATTENTION, FP8=False, SPLIT=1), 2),
    "window attention fp8": ("window_attention", "_window_attn_fwd", dict(_ATTENTION, FP8=True, SPLIT=1), 2),
    "window attention fp8 split 2": ("window_attention", "_window_attn_fwd", dict(_ATTENTION, FP8=True, SPLIT=2), 2),
    "vae conv3d bf16": ("vae_conv3d", "_vae_conv3d_kernel", dict(_CONV, FP32=False), 3),
    "vae conv3d fp32": ("vae_conv3d", "_vae_conv3d_kernel", dict(_CONV, FP32=True), 3),
}


def _signature(fn, const: dict) -> dict:
    if "C_IN" in const:  # the convolution
        data = "*fp32" if const["FP32"] else "*bf16"
        return {n: "constexpr" if n in const else data if n in ("x_ptr", "w_ptr", "o_ptr")
                else "*fp32" if n == "b_ptr" else "i32" for n in fn.arg_names}
    fp8 = const["FP8"]
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in ("q_ptr", "k_ptr", "v_ptr"):
            sig[name] = "*fp8e4nv" if fp8 else "*bf16"
        elif name == "o_ptr":
            sig[name] = "*bf16"
        elif name in ("cnt_ptr", "sink_end_ptr", "win_start_ptr", "win_end_ptr", "shift_ptr"):
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    return sig


def sass(package: str, label: str) -> list[str]:
    """The SASS lines of one compiled variant, without addresses, encodings and comments."""
    module, name, const, stages = VARIANTS[label]
    fn = getattr(importlib.import_module(f"{package}.{module}"), name)
    kernel = triton.compile(ASTSource(fn, _signature(fn, const), const), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=8, num_stages=stages))
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare the working tree with")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        old_package = _kernels_at(args.rev, Path(tmp))
        differ = 0
        for label in VARIANTS:
            new, old = sass("longlive_triton.kernels", label), sass(old_package, label)
            same = new == old
            differ += not same
            print(f"{label}: {'identical' if same else 'DIFFERS'} SASS ({len(new)} instructions now, "
                  f"{len(old)} at {args.rev})")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
