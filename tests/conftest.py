"""Shared test setup: hypothesis profiles, the device under test, GPU markers, and test isolation.

On a machine without CUDA the Triton kernels run in Triton's CPU interpreter; the variable must be
set before triton is first imported, which is why it is set here and not in a fixture.

Every test starts from the same global state, whatever ran before it (`isolated_global_state`): the
torch RNGs seeded, the numeric switches (TF32, cuDNN benchmark and determinism, matmul precision,
SDPA backends, default dtype) as they were, no stock-import stand-in left in sys.modules, and on the
GPU the memory of dropped models given back. `--reverse-order` runs the collected tests last to
first, to show that the order does not matter.
"""
import gc
import os
import random
import sys
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=10,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
# On the GPU every @example at LongLive's real shapes runs, and a few drawn cases add odd shapes: each
# new shape class compiles the kernel again (about a second), so 5 of them keep the GPU suite within
# its 4 minutes.
settings.register_profile(
    "gpu",
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
# Many random cases (`HYPOTHESIS_PROFILE=stress python -m pytest tests/kernels --hypothesis-seed=N`):
# what shows whether a bound holds for every case the strategies draw, not just for one seed's.
settings.register_profile(
    "stress",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else ("ci" if os.environ.get("CI") else "dev"))
)

ON_GPU = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--reverse-order", action="store_true",
                     help="run the collected tests in reverse order (the GPU suite runs both ways: no test may "
                          "depend on what ran before it)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip_gpu)
    if config.getoption("--reverse-order"):
        items.reverse()


def _numeric_switches() -> dict:
    """The process-wide settings that change what a kernel computes or which algorithm torch picks."""
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    return {
        "torch.backends.cudnn.enabled": cudnn.enabled,
        "torch.backends.cudnn.benchmark": cudnn.benchmark,
        "torch.backends.cudnn.deterministic": cudnn.deterministic,
        "torch.backends.cudnn.allow_tf32": cudnn.allow_tf32,
        "torch.backends.cuda.matmul.allow_tf32": cuda.matmul.allow_tf32,
        "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction":
            cuda.matmul.allow_bf16_reduced_precision_reduction,
        "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction":
            cuda.matmul.allow_fp16_reduced_precision_reduction,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "default_dtype": torch.get_default_dtype(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "sdp flash": cuda.flash_sdp_enabled(),
        "sdp mem_efficient": cuda.mem_efficient_sdp_enabled(),
        "sdp math": cuda.math_sdp_enabled(),
        "sdp cudnn": cuda.cudnn_sdp_enabled(),
    }


def _restore_numeric_switches(saved: dict) -> None:
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    cudnn.enabled = saved["torch.backends.cudnn.enabled"]
    cudnn.benchmark = saved["torch.backends.cudnn.benchmark"]
    cudnn.deterministic = saved["torch.backends.cudnn.deterministic"]
    cudnn.allow_tf32 = saved["torch.backends.cudnn.allow_tf32"]
    cuda.matmul.allow_tf32 = saved["torch.backends.cuda.matmul.allow_tf32"]
    cuda.matmul.allow_bf16_reduced_precision_reduction = \
        saved["torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction"]
    cuda.matmul.allow_fp16_reduced_precision_reduction = \
        saved["torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction"]
    torch.set_float32_matmul_precision(saved["float32_matmul_precision"])
    torch.set_default_dtype(saved["default_dtype"])
    torch.use_deterministic_algorithms(saved["deterministic_algorithms"])
    cuda.enable_flash_sdp(saved["sdp flash"])
    cuda.enable_mem_efficient_sdp(saved["sdp mem_efficient"])
    cuda.enable_math_sdp(saved["sdp math"])
    cuda.enable_cudnn_sdp(saved["sdp cudnn"])


def _standin_modules() -> list[str]:
    """Stand-ins of the stock importers (longlive_triton.stock) still in sys.modules: they must be there
    only while the stock code is imported."""
    # The module's own dict: some modules (torch.classes) answer any attribute lookup with an error.
    return sorted(name for name, mod in list(sys.modules.items())
                  if "longlive_triton.standin" in str(getattr(mod, "__dict__", {}).get("__version__", "")))


# Reserved GPU memory above which a test's garbage is collected at its end: reference cycles (a model
# and the CUDA-graph runner installed on it) otherwise hold gigabytes until Python's next full
# collection, and a later test then runs short of memory (cuDNN falls back to other algorithms when
# its workspace cannot be allocated, and large allocations fail). Below it a collection is not worth
# its ~0.1 s. A test that still holds more than _LEAK_BYTES more than it started with is reported.
_COLLECT_ABOVE_BYTES = 2 << 30
_LEAK_BYTES = 1 << 30


@pytest.fixture(autouse=True)
def isolated_global_state():
    """Each test starts from the same global state and leaves none behind (module docstring). What a
    test changed and did not put back is restored and reported as a warning naming it: the code that
    changed it is the bug (a library must leave the process as it found it)."""
    switches = _numeric_switches()
    standins = _standin_modules()
    on_gpu = ON_GPU and torch.cuda.is_initialized()
    allocated = torch.cuda.memory_allocated() if on_gpu else 0
    torch.manual_seed(0)  # the CPU and every CUDA generator
    random.seed(0)
    yield
    # pytest keeps a failed test's exception for post-mortem debugging (sys.last_value): its traceback
    # holds the test's frames, and so its GPU tensors (a whole model), until the next failure.
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)
    changed = {k: (v, now) for (k, v), now in zip(switches.items(), _numeric_switches().values()) if v != now}
    if changed:
        _restore_numeric_switches(switches)
        warnings.warn(f"the test left global switches changed (restored): {changed}")
    left = [name for name in _standin_modules() if name not in standins]
    for name in left:
        del sys.modules[name]
    if left:
        warnings.warn(f"the test left stand-in modules in sys.modules (removed): {left}")
    if ON_GPU and torch.cuda.is_initialized() and torch.cuda.memory_reserved() > _COLLECT_ABOVE_BYTES:
        gc.collect()
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated() - allocated
        if held > _LEAK_BYTES:  # a module or session fixture's tensors count here, in its first test
            warnings.warn(f"{held / 2**30:.1f} GiB of GPU memory more is allocated after the test than before it")


@pytest.fixture(autouse=True, scope="session")
def one_cpu_thread():
    """One torch thread for the CPU suite: its tensors are tiny, and two threads contending with other
    work for two cores ran them several times slower (the graph-runner tests under load: 31 s against
    8.5 s). The GPU machine keeps its threads."""
    if ON_GPU:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def device() -> torch.device:
    """The device kernels are tested on: the GPU at real shapes, else the CPU interpreter."""
    return torch.device("cuda" if ON_GPU else "cpu")
