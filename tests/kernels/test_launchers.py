"""What every kernel launcher shares: tensors where no Triton kernel can run are refused up front
(not "0 active drivers" from inside Triton), the TMA scratch allocator is installed once, and
use_tma=True is never dropped silently."""
import contextvars

import pytest
import torch

from longlive_triton.kernels import _common
from longlive_triton.kernels.adaln import adaln
from longlive_triton.kernels.fp8_gemm import fp8_gemm
from longlive_triton.kernels.fp8_kv_cache import fp8_kv_cache
from longlive_triton.kernels.fp8_quant import FP8_DTYPE, quantize_rowwise
from longlive_triton.kernels.kv_cache_plan import kv_cache_plan
from longlive_triton.kernels.kv_quant_append import kv_quant_append
from longlive_triton.kernels.rms_norm import rms_norm
from longlive_triton.kernels.rope_kv_append import rope_kv_append, rope_tables
from longlive_triton.kernels.token_merge import token_merge, token_unmerge
from longlive_triton.kernels.vae_rms_norm_silu import vae_rms_norm_silu
from longlive_triton.kernels import window_attention as wa

from .._numerics import assert_as_close_as_same_precision
from .test_window_attention import attention_same_precision

BF16 = torch.bfloat16


def _fp8_cache(device):
    """A 16-slot FP8 cache (2 heads of 32): k8, v8 (the V^T view), v_scale."""
    return fp8_kv_cache(1, 16, 2, 32, device)


def _launches():
    x = torch.randn(1, 8, 64).to(BF16)
    w = torch.ones(64, dtype=BF16)
    one = torch.zeros(1, dtype=torch.long)
    qkv = torch.randn(1, 8, 64).to(BF16)
    cache = torch.zeros(1, 16, 2, 32, dtype=BF16)
    cos, sin = rope_tables(32)
    q = torch.randn(1, 8, 2, 32).to(BF16)
    k8, v8, v_scale = _fp8_cache("cpu")
    q8, q_scale = torch.zeros(1, 8, 2, 32, dtype=FP8_DTYPE), torch.ones(1, 8, 2)
    ks = torch.ones(2)
    a8 = torch.zeros(8, 64, dtype=FP8_DTYPE)
    return {
        "adaln": lambda: adaln(x, norm=True),
        "fp8_gemm": lambda: fp8_gemm(a8, a8, torch.ones(8), torch.ones(8)),
        "quantize_rowwise": lambda: quantize_rowwise(x),
        "kv_cache_plan": lambda: kv_cache_plan(one, one.clone(), one.clone(), current_start=0, num_new=8,
                                               capacity=16, sink_tokens=0, budget=16),
        "rms_norm": lambda: rms_norm(x, w),
        "rope_kv_append": lambda: rope_kv_append(qkv, qkv, qkv, w, w, cos, sin, cache, cache.clone(), (1, 2, 4), 0, 0, 0),
        "kv_quant_append": lambda: kv_quant_append(qkv, qkv, qkv, w, w, cos, sin, k8, ks, v8, v_scale,
                                                   (1, 2, 4), 0, 0, 0),
        "token_merge": lambda: token_merge(x, frames=1, grid=(2, 4), ratio=0.5),
        "token_unmerge": lambda: token_unmerge(x, torch.zeros(1, 8, dtype=torch.long)),
        "vae_rms_norm_silu": lambda: vae_rms_norm_silu(
            torch.randn(1, 8, 1, 2, 2).to(BF16).contiguous(memory_format=torch.channels_last_3d), torch.ones(8, dtype=BF16)),
        "window_attention": lambda: wa.window_attention(q, cache, cache, 0, 0, 16),
        "window_attention_fp8": lambda: wa.window_attention_fp8(q8, q_scale, k8, ks, v8, v_scale, 0, 0, 16),
    }


@pytest.mark.parametrize("name", sorted(_launches()))
def test_cpu_tensors_without_the_interpreter_are_refused(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"needs CUDA tensors \(or Triton's CPU interpreter|runs on CUDA"):
        _launches()[name]()


def test_the_tma_allocator_is_installed_once(monkeypatch):
    calls = []
    real = _common.triton.set_allocator
    monkeypatch.setattr(_common.triton, "set_allocator", lambda fn: (calls.append(fn), real(fn)))

    def three_launches():
        for _ in range(3):
            _common.use_tma_allocator()

    contextvars.Context().run(three_launches)  # an empty context: Triton's default (no allocator)
    assert calls == [_common._tma_scratch]


def test_use_tma_is_refused_where_unsupported(device, monkeypatch):
    q = torch.randn(1, 8, 2, 32, device=device).to(BF16)
    cache = torch.randn(1, 16, 2, 32, device=device).to(BF16)
    monkeypatch.setattr(wa, "tma_supported", lambda device: False)
    with pytest.raises(ValueError, match="use_tma=True needs a CUDA GPU of compute capability >= 9"):
        wa.window_attention(q, cache, cache, 4, 4, 16, use_tma=True)
    k8, v8, v_scale = _fp8_cache(device)
    with pytest.raises(ValueError, match="use_tma=True needs a CUDA GPU of compute capability >= 9"):
        wa.window_attention_fp8(q.to(FP8_DTYPE), torch.ones(1, 8, 2, device=device), k8, torch.ones(2, device=device),
                                v8, v_scale, 4, 4, 16, use_tma=True)


def test_window_attention_honours_use_tma_in_the_interpreter(device):
    """TMA loads run in the interpreter too (before, use_tma was dropped there without a word)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 20, 2, 32, generator=gen).to(device, BF16)
    k, v = (torch.randn(1, 40, 2, 32, generator=gen).to(device, BF16) for _ in range(2))
    got = wa.window_attention(q, k, v, 8, 10, 40, use_tma=True)
    want = wa.window_attention_ref(q, k, v, 8, 10, 40)
    attended = (torch.arange(40, device=device) < 8) | (torch.arange(40, device=device) >= 10)
    assert_as_close_as_same_precision(got, want, attention_same_precision(q, k, v, attended[None]))


def test_fp8_window_attention_honours_use_tma_in_the_interpreter(device):
    """The FP8 cache through TMA descriptors (V^T tiles of [D, 128]) against the pointer-load path: the
    same tiles and arithmetic, so the same bits."""
    from longlive_triton.kernels.fp8_kv_cache import quantize_k_ref, quantize_rows_ref, quantize_v_groups_ref
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 20, 2, 32, generator=gen).to(device, BF16)
    k, v = (torch.randn(1, 160, 2, 32, generator=gen).to(device, BF16) for _ in range(2))
    k_scale = torch.full((2,), 0.02, device=device)
    ops = (*quantize_rows_ref(q), quantize_k_ref(k, k_scale), k_scale, *quantize_v_groups_ref(v))
    got = wa.window_attention_fp8(*ops, 8, 10, 150, use_tma=True)
    want = wa.window_attention_fp8(*ops, 8, 10, 150)
    assert torch.equal(got, want)
