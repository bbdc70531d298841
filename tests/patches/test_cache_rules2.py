"""patches/cache_rules2.py without the stock source: the effective sink rule, and unrolling a ring-buffered
cache to the stock layout, bf16 and FP8 (whole 128-slot groups of value scales; a partial group refused)."""
import pytest
import torch

from longlive_triton.kernels.fp8_kv_cache import dequantize_fp8_cache, quantize_k_ref, quantize_v_groups_ref
from longlive_triton.kernels.kv_cache_plan import physical_slot
from longlive_triton.patches.cache_rules2 import effective_sink, unroll_cache


def test_effective_sink():
    assert effective_sink(16, 16, -1, 0) == 16          # no pin: the sink
    assert effective_sink(0, 24, -1, 0) == 24           # no global sink (multi_shot_sink off): v1.0's sink
    assert effective_sink(16, 16, 16, 16) == 32         # a pin on the global sink: kept with it
    assert effective_sink(16, 16, 48, 16) == 16         # a floating pin: only the global sink is kept


def _ring(logical: torch.Tensor, ring_lo: int, shift: int) -> torch.Tensor:
    """The physical ring layout of a stock-layout cache [B, C, ...] with the given shift."""
    C = logical.shape[1]
    slots = physical_slot(torch.arange(C), ring_lo, C - ring_lo, shift)
    physical = torch.empty_like(logical)
    physical[:, slots] = logical
    return physical


@pytest.mark.parametrize("shift", [0, 128, 256])
def test_unroll_bf16_and_fp8(shift):
    torch.manual_seed(0)
    B, C, H, D, lo = 1, 512, 2, 32, 128
    k, v = torch.randn(2, B, C, H, D).to(torch.bfloat16)
    cache = {"k": _ring(k, lo, shift), "v": _ring(v, lo, shift)}
    unroll_cache(cache, lo, shift)
    assert torch.equal(cache["k"], k) and torch.equal(cache["v"], v)

    k_scale = torch.full((H,), 4.0 / 448)
    v8, v_scale = quantize_v_groups_ref(_ring(v, lo, shift))
    fp8 = {"k": quantize_k_ref(_ring(k, lo, shift), k_scale), "v": v8, "v_scale": v_scale}
    unroll_cache(fp8, lo, shift)
    want_v8, want_scale = quantize_v_groups_ref(v)
    assert torch.equal(fp8["v_scale"], want_scale)
    got = dequantize_fp8_cache(fp8["k"], k_scale, fp8["v"], fp8["v_scale"])
    want = dequantize_fp8_cache(quantize_k_ref(k, k_scale), k_scale, want_v8, want_scale)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_unroll_fp8_refuses_a_partial_group():
    v8, v_scale = quantize_v_groups_ref(torch.randn(1, 512, 2, 32).to(torch.bfloat16))
    cache = {"k": torch.zeros(1, 512, 2, 32), "v": v8, "v_scale": v_scale}
    with pytest.raises(ValueError, match="whole groups"):
        unroll_cache(cache, 128, 64)
