"""Whether a refactor changed the window-attention kernel's machine code, without a GPU.

Compiles `_window_attn_fwd` for sm_90 (Triton's bundled ptxas) from the working tree and from a git
revision, in its bf16, FP8 and FP8 split-KV forms at LongLive's head dim, and compares the SASS
(nvdisasm, addresses and comments stripped). Identical SASS means identical GPU behaviour, so a
change that only moves code needs no GPU run to show it; a difference means it does.

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

VARIANTS = {"bf16": dict(FP8=False, SPLIT=1), "fp8": dict(FP8=True, SPLIT=1), "fp8 split 2": dict(FP8=True, SPLIT=2)}


def _signature(fn, const: dict) -> dict:
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


def sass(module_name: str, variant: dict) -> list[str]:
    """The SASS lines of one compiled variant, without addresses, encodings and comments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = importlib.import_module(module_name)._window_attn_fwd
    const = dict(LQ_BUCKET=4096, HEAD_DIM=128, RING=True, N_RANGES=3, USE_TMA=False, INTERPRET=False,
                 BLOCK_M=128, BLOCK_N=128, **variant)
    kernel = triton.compile(ASTSource(fn, _signature(fn, const), const), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=8, num_stages=2))
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(nvdisasm), "-c", f.name], check=True, capture_output=True, text=True).stdout
    lines = (re.sub(r"/\*[0-9a-f]*\*/", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith(("//", "."))]


def _kernels_at(rev: str, root: Path) -> str:
    """kernels/ of `rev` as a package under `root`; returns the window attention module's name."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "kernels"], check=True, capture_output=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout
    tarfile.open(fileobj=BytesIO(archive)).extractall(root / "at_rev", filter="data")
    (root / "at_rev" / "kernels" / "__init__.py").touch()
    sys.path.insert(0, str(root / "at_rev"))
    return "kernels.window_attention"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare the working tree with")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        old_module = _kernels_at(args.rev, Path(tmp))
        differ = 0
        for label, variant in VARIANTS.items():
            new, old = sass("longlive_triton.kernels.window_attention", variant), sass(old_module, variant)
            same = new == old
            differ += not same
            print(f"{label}: {'identical' if same else 'DIFFERS'} SASS ({len(new)} instructions now, "
                  f"{len(old)} at {args.rev})")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
