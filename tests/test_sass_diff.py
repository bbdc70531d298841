"""bench/sass_diff.py covers every kernel the launchers in kernels/ launch (nothing is compiled here)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longlive_triton.bench import sass_diff

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def _is_jit(decorator: ast.expr) -> bool:
    """@triton.jit or @triton.jit(...)."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "jit"


def _launched(path: Path) -> set[str]:
    """"module.kernel" of each `name[grid](...)` launch in one file; a launched name bound to a wrapper
    (`_tuned = autotune(...)(_kernel)`) counts as the @triton.jit kernel it wraps."""
    tree = ast.parse(path.read_text())
    jit = {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and any(map(_is_jit, node.decorator_list))}
    wraps = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            wrapped = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name) and n.id in jit}
            if wrapped:
                wraps[node.targets[0].id] = wrapped
    launched = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and isinstance(node.func.value, ast.Name):
            name = node.func.value.id
            kernels = {name} if name in jit else wraps.get(name, set())
            launched |= {f"{path.stem}.{kernel}" for kernel in kernels}
    return launched


def test_the_scan_finds_direct_and_autotuned_launches():
    assert _launched(KERNELS / "rms_norm.py") == {"rms_norm._rms_norm_kernel"}
    assert _launched(KERNELS / "fp8_gemm.py") == {"fp8_gemm._fp8_gemm_kernel", "fp8_gemm._fp8_gemm_tma_kernel"}


def test_every_launched_kernel_is_compiled_by_sass_diff():
    launched = set().union(*(_launched(path) for path in KERNELS.glob("*.py")))
    covered = sass_diff.covered_kernels()
    assert launched - covered == set(), "launched in kernels/ but missing from sass_diff.LAUNCHES"
    assert covered - launched == set(), "in sass_diff.LAUNCHES but launched by no launcher in kernels/"


def test_only_picks_labels_kernels_and_modules():
    assert sass_diff._selected(None) == list(sass_diff.LAUNCHES)
    assert sass_diff._selected(["rms_norm"]) == ["rms_norm"]
    assert sass_diff._selected(["adaln"]) == [label for label in sass_diff.LAUNCHES if label.startswith("adaln ")]
    assert sass_diff._selected(["_rank_kernel"]) == ["token_merge"]
    assert sass_diff._selected(["token_merge_plan", "token_unmerge"]) == ["token_merge", "token_unmerge"]
    with pytest.raises(SystemExit, match="matches no entry"):
        sass_diff._selected(["no_such_kernel"])


def test_recording_refuses_the_interpreter(monkeypatch):
    # The interpreter swaps the kernels for Python ones, which have nothing to compile.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        sass_diff.record("rms_norm")


def test_every_entry_records_the_launches_it_declares():
    # The launchers run in compiled mode (not this process's interpreter) on CPU tensors, launches
    # recorded: a launcher whose arguments changed breaks its entry here, not in a later sass_diff run.
    code = "from longlive_triton.bench import sass_diff as s\nfor label in s.LAUNCHES: s.record(label)"
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=dict(os.environ, TRITON_INTERPRET="0"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
