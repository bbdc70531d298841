"""The TMA kernels on a second GPU while the current device is the first (a model on cuda:1): the
launches, descriptors and their scratch memory follow the tensors' device. Needs two GPUs."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


def test_tma_kernels_on_the_second_gpu():
    from longlive_triton.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
    from longlive_triton.kernels.fp8_quant import quantize_rowwise, quantize_weight_per_channel
    from longlive_triton.kernels.window_attention import window_attention, window_attention_ref

    assert torch.cuda.current_device() == 0
    dev = torch.device("cuda", 1)
    gen = torch.Generator(dev).manual_seed(0)
    a = torch.randn(300, 512, generator=gen, device=dev).to(torch.bfloat16)
    w = torch.randn(256, 512, generator=gen, device=dev).to(torch.bfloat16)
    with torch.cuda.device(dev):  # inputs made there; the kernels under test launch from device 0
        a8, a_scale = quantize_rowwise(a)
        w8, w_scale = quantize_weight_per_channel(w)
    got = fp8_gemm(a8, w8, a_scale, w_scale, use_tma=True)
    torch.testing.assert_close(got.float(), fp8_gemm_ref(a8, w8, a_scale, w_scale).float(), atol=2e-2, rtol=2e-2)
    q = torch.randn(1, 256, 2, 128, generator=gen, device=dev).to(torch.bfloat16)
    k, v = (torch.randn(1, 1024, 2, 128, generator=gen, device=dev).to(torch.bfloat16) for _ in range(2))
    out = window_attention(q, k, v, 128, 256, 1024, use_tma=True)
    torch.testing.assert_close(out.float(), window_attention_ref(q, k, v, 128, 256, 1024), atol=2e-2, rtol=2e-2)
    assert got.device == out.device == dev and torch.cuda.current_device() == 0
