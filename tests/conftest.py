"""Shared test setup: hypothesis profiles, the device under test, and GPU markers.

On a machine without CUDA the Triton kernels run in Triton's CPU interpreter; the variable must be
set before triton is first imported, which is why it is set here and not in a fixture.
"""
import os

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
# On the GPU the random cases reach LongLive's real shapes and every @example at them runs too: 15
# drawn cases keep the whole GPU suite within one device call.
settings.register_profile(
    "gpu",
    max_examples=15,
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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip_gpu)


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
