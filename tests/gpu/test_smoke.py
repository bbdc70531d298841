"""The GPU smoke run: one real-shape parity case per kernel, cheap enough to run after every change
(`bash tests/gpu/run_device.sh smoke`, which adds one short stock-class e2e).

Each case is one of the kernel tests' own real-shape cases (their check helpers, so the tolerances
are theirs), at LongLive-1.3B's steady-state shapes: one 3-frame block of 4680 tokens, the full
12-frame window of 18720 cache slots, the VAE at 480x832. Tiles are fixed where a kernel is
autotuned (the search is what `gpu-suite` and `warmup` exercise; here it would cost more than the
cases). The full real-shape sets are the `gpu` tests in tests/kernels.
"""
import pytest
import torch

from ..kernels import test_adaln, test_fp8_gemm, test_fp8_quant, test_kv_quant_append, test_rms_norm
from ..kernels import test_rope_kv_append, test_token_merge, test_vae_conv3d, test_vae_rms_norm_silu
from ..kernels import test_window_attention, test_window_attention_fp8

pytestmark = [pytest.mark.gpu, pytest.mark.smoke]
CUDA = torch.device("cuda")
# The steady block: q of 4680 tokens over sink (4680 slots) + the rest of the full 18720-slot window.
STEADY = test_window_attention._real(4680, 18720, 4680, 4680, 18720, split=2)
# The block written at frame 9 into slots 14040.. of the 18720-slot cache (the window filling).
APPEND = ((3, 30, 52), 18720, 9, 14040, 0)


def _tma() -> bool:
    return torch.cuda.get_device_capability()[0] >= 9


def test_window_attention_bf16():
    test_window_attention.check_window_attention(STEADY, CUDA, use_tma=_tma(),
                                                 config={"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3})


def test_window_attention_fp8():
    test_window_attention_fp8.check_window_attention_fp8(
        STEADY, CUDA, use_tma=_tma(), config={"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3})


def test_rope_kv_append():
    test_rope_kv_append.check_rope_kv_append(test_rope_kv_append._real(*APPEND), CUDA)


def test_kv_quant_append():
    test_kv_quant_append.check_kv_quant_append(test_kv_quant_append._real(*APPEND), CUDA)


def test_adaln():
    variant = "gated residual + affine LN (after self-attention)"
    test_adaln._check(CUDA, 1, 3, 1560, 1536, variant, seed=1)


def test_rms_norm():
    test_rms_norm._check(CUDA, 1, 4680, 1536, seed=1)


def test_fp8_quant():
    gen = torch.Generator(CUDA).manual_seed(0)
    test_fp8_quant._check_quant((torch.randn(1, 4680, 8960, generator=gen, device=CUDA) * 3).to(torch.bfloat16))


def test_fp8_gemm():
    """The FFN-up shape with its bias + GELU epilogue, on the persistent TMA path where there is one."""
    config = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    test_fp8_gemm._check(CUDA, 4680, 8960, 1536, seed=1, bias=True, gelu=True, use_tma=_tma(), config=config)


def test_token_merge():
    test_token_merge.test_real_size()


def test_vae_conv3d():
    tile = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
    test_vae_conv3d._check(CUDA, torch.bfloat16, 1, 96, 96, 4, 480, 832, bias=True, into_view=False, seed=96,
                           tile=tile)


def test_vae_rms_norm_silu():
    test_vae_rms_norm_silu._check(CUDA, torch.bfloat16, 1, 96, 4, 480, 832, residual=True, silu=True, bias=False,
                                  sum_out=True, into_buffer=True, seed=96)
