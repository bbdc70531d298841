"""The autotune cache (kernels/_common.py): tuned configs kept on disk across processes, keyed by GPU
name, Triton version, kernel source and tuning key; a bad file is ignored with a warning; the folder
follows $LONGLIVE_TRITON_CACHE_DIR. Runs without a GPU: the GPU name is given, and the autotuner's
disk hook is called directly with a stand-in benchmark."""
import json

import pytest
import triton
import triton.language as tl

from longlive_triton.kernels import _common
from longlive_triton.kernels._common import AutotuneCache, PersistentAutotuner, autotune, autotune_cache_dir

CONFIG = {"BLOCK": 64, "num_warps": 4, "num_ctas": 1, "num_stages": 3}


@triton.jit
def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _copy_twice(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def test_a_config_is_read_back_by_another_process(tmp_path):
    AutotuneCache("NVIDIA H100 80GB HBM3", "3.6.0", tmp_path).put("k-1", (8192, 1536, "torch.bfloat16"), CONFIG)
    fresh = AutotuneCache("NVIDIA H100 80GB HBM3", "3.6.0", tmp_path)  # nothing read yet, as a new process
    assert fresh.get("k-1", (8192, 1536, "torch.bfloat16")) == CONFIG
    assert fresh.path.name == "autotune-NVIDIA-H100-80GB-HBM3-triton3.6.0.json"
    doc = json.loads(fresh.path.read_text())
    assert doc["gpu"] == "NVIDIA H100 80GB HBM3" and doc["triton"] == "3.6.0"


def test_keyed_by_gpu_triton_version_kernel_and_key(tmp_path):
    AutotuneCache("NVIDIA H100 80GB HBM3", "3.6.0", tmp_path).put("k-1", (8192, True), CONFIG)
    assert AutotuneCache("NVIDIA H200", "3.6.0", tmp_path).get("k-1", (8192, True)) is None
    assert AutotuneCache("NVIDIA H100 80GB HBM3", "3.7.0", tmp_path).get("k-1", (8192, True)) is None
    same = AutotuneCache("NVIDIA H100 80GB HBM3", "3.6.0", tmp_path)
    assert same.get("k-2", (8192, True)) is None
    assert same.get("k-1", (4096, True)) is None
    assert same.get("k-1", (8192, False)) is None
    assert same.get("k-1", (8192, True)) == CONFIG


def test_writes_merge_with_another_process(tmp_path):
    a, b = AutotuneCache("G", "3.6.0", tmp_path), AutotuneCache("G", "3.6.0", tmp_path)
    assert a.get("k", (1,)) is None and b.get("k", (2,)) is None  # both read the (empty) file
    a.put("k", (1,), CONFIG)
    b.put("k", (2,), {**CONFIG, "BLOCK": 128})
    fresh = AutotuneCache("G", "3.6.0", tmp_path)
    assert fresh.get("k", (1,)) == CONFIG and fresh.get("k", (2,))["BLOCK"] == 128


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": 1, "entries": []}),
                                  json.dumps({"format": 99, "entries": {}}), json.dumps([1, 2])])
def test_a_corrupt_file_is_ignored_with_a_warning_and_rewritten(tmp_path, text):
    cache = AutotuneCache("G", "3.6.0", tmp_path)
    cache.path.write_text(text)
    with pytest.warns(UserWarning, match="not a valid cache file"):
        assert cache.get("k", (1,)) is None
    with pytest.warns(UserWarning, match="not a valid cache file"):
        cache.put("k", (1,), CONFIG)
    assert AutotuneCache("G", "3.6.0", tmp_path).get("k", (1,)) == CONFIG


def test_an_unwritable_folder_costs_only_the_persistence(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = AutotuneCache("G", "3.6.0", blocker / "sub")
    with pytest.warns(UserWarning, match="cannot be written"):
        cache.put("k", (1,), CONFIG)
    assert cache.get("k", (1,)) == CONFIG


def test_the_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGLIVE_TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert autotune_cache_dir() == tmp_path / "mine"
    assert AutotuneCache("G").path.parent == tmp_path / "mine"
    monkeypatch.delenv("LONGLIVE_TRITON_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune_cache_dir() == tmp_path / "xdg" / "longlive-triton"


def test_the_kernel_name_follows_its_source():
    assert AutotuneCache.kernel_name(_copy).startswith("_copy-")
    assert AutotuneCache.kernel_name(_copy) == AutotuneCache.kernel_name(_copy)
    assert AutotuneCache.kernel_name(_copy) != AutotuneCache.kernel_name(_copy_twice).replace("_twice", "")


def _tuner():
    configs = [triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 128}, num_warps=4)]
    tuner = autotune(configs=configs, key=["n"])(_copy)
    assert isinstance(tuner, PersistentAutotuner)
    return tuner, configs


def test_the_autotuner_searches_once_then_reads_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(_common, "current_autotune_cache", lambda: AutotuneCache("G", "3.6.0", tmp_path))
    searches = []

    def search(tuner, best):
        def bench():
            searches.append(best)
            tuner.cache[(4680,)] = best
        return bench

    tuner, configs = _tuner()
    assert tuner.check_disk_cache((4680,), configs, search(tuner, configs[1])) is False
    assert searches == [configs[1]]
    again, configs2 = _tuner()  # a new process: a new autotuner, an empty in-memory cache
    assert again.check_disk_cache((4680,), configs2, search(again, configs2[0])) is True
    assert searches == [configs[1]] and again.cache[(4680,)] is configs2[1]
    # A stored config that is no longer a candidate (the config list changed) is searched again.
    assert again.check_disk_cache((4680,), configs2[:1], search(again, configs2[0])) is False
    assert searches == [configs[1], configs2[0]]
