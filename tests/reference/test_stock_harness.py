"""Without the stock source: the stock importer's errors, laziness and flash-attn stand-in, and the
parity harness's LoRA-merge verdict (tests/stock_harness.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from longlive_triton.models.longlive1.model import attention
from longlive_triton.stock.longlive1 import _flash_attention_anywhere, flash_attn_varlen_func, resolve_stock_src


def test_missing_source_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("LONGLIVE_SRC", raising=False)
    with pytest.raises(FileNotFoundError, match="LONGLIVE_SRC"):
        resolve_stock_src()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_stock_src(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a LongLive v1.0 tree"):
        resolve_stock_src(tmp_path)


def test_a_foreign_causal_model_is_refused(tmp_path):
    for f in ("wan/modules/causal_model.py", "wan/modules/model.py", "wan/modules/attention.py",
              "utils/memory.py", "utils/debug_option.py"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("class CausalWanModel: pass\n")
    with pytest.raises(ValueError, match="not LongLive v1.0"):
        resolve_stock_src(tmp_path)


def test_importing_the_package_loads_no_stock_code():
    code = "import sys, longlive_triton; assert 'longlive_triton.stock.longlive1' not in sys.modules and 'wan' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attention_standin_computes_what_the_reference_computes(dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn([2, 24, 3, 16], generator=gen).to(dtype)
    k = torch.randn([2, 40, 3, 16], generator=gen).to(dtype)
    v = torch.randn([2, 40, 3, 16], generator=gen).to(dtype)
    out = _flash_attention_anywhere(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(out, attention(q, k, v))


def test_varlen_standin_refuses_what_it_cannot_do():
    q = torch.randn([8, 2, 16], dtype=torch.bfloat16)
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="equal sequence lengths"):
        flash_attn_varlen_func(q, q, q, cu, cu, 3, 3)
    with pytest.raises(NotImplementedError, match="window_size"):
        flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, window_size=(2, 2))
    assert flash_attn_varlen_func(q, q, q, cu, cu, 4, 4).shape == q.shape


def test_lora_merge_problems_flags_each_failure():
    from ..stock_harness import lora_merge_problems
    good = dict(lora_targets=20, num_layers=2, lora_layers=[f"l{i}" for i in range(20)],
                merged_paths=sorted(f"l{i}" for i in range(20)), merge_skipped=[], lora_layers_left=[],
                lora_effect_rel_l2=1e-2, layer_max_rel_err=1e-7, rounding_control_rel_l2=1e-4,
                merged_vs_unmerged_rel_l2=2e-4)
    assert lora_merge_problems(good) == []
    for change in (dict(merged_paths=[]), dict(merge_skipped=["l0"]), dict(lora_effect_rel_l2=0.0),
                   dict(layer_max_rel_err=1e-3), dict(merged_vs_unmerged_rel_l2=1e-3)):
        assert len(lora_merge_problems({**good, **change})) == 1, change
