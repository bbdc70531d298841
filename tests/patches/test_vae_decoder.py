"""patch_vae / FastDecoder3d on the tiny VAE, CPU (Triton kernels in the interpreter).

Patched vs unpatched: fp32 within 1e-5; bf16 within twice the unpatched decoder's own bf16 error
against fp32 (the tiny preset's 8-channel norms make bf16 noisier than the real 96-384 channels; the
real-shape bound 1e-2 is checked on the GPU in tests/gpu/test_vae_gpu.py). The stock `WanVAE_` is
patched too when a LongLive checkout is named by LONGLIVE_SRC.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from longlive_triton import patch_vae
from longlive_triton.patches.vae_decoder import FastDecoder3d
from longlive_triton.reference.vae import build_vae_decoder, load_wan_vae_decoder
from longlive_triton.vae_stream import StreamingVAEDecoder

H, W = 3, 5
_SRC = os.environ.get("LONGLIVE_SRC", "")


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _z(f, dtype=torch.float32, seed=0):
    return torch.randn(1, 16, f, H, W, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convolutions on a shared CPU run many times faster on one thread than on contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair():
    ref = build_vae_decoder("tiny", seed=2)
    fast = copy.deepcopy(ref)
    report = patch_vae(fast)
    assert report.applied == ["decoder"] and not report.skipped, str(report)
    return ref, fast


def test_patched_equals_unpatched_fp32(pair):
    ref, fast = pair
    assert isinstance(fast.decoder, FastDecoder3d)
    z = _z(3)
    want, got = ref.decode(z), fast.decode(z)
    assert got.shape == want.shape == (1, 3, 9, 8 * H, 8 * W)
    assert _rel(got, want) <= 1e-5
    assert want.std() > 0.05


def test_patched_streaming_equals_patched_whole(pair):
    _, fast = pair
    z = _z(4, seed=1)
    dec = StreamingVAEDecoder(fast)
    outs = [dec.decode_block(z[:, :, :3]), dec.decode_block(z[:, :, 3:])]
    assert [o.shape[2] for o in outs] == [9, 4]
    assert torch.equal(torch.cat(outs, 2), fast.decode(z))  # the same chunks, the same kernels


def test_patched_bf16_within_twice_the_bf16_error():
    ref32 = build_vae_decoder("tiny", seed=2)
    ref16 = build_vae_decoder("tiny", seed=2, dtype=torch.bfloat16)
    fast16 = copy.deepcopy(ref16)
    patch_vae(fast16)
    z = _z(2, seed=3)
    truth = ref32.decode(z)
    naive = _rel(ref16.decode(z.bfloat16()), truth)
    got = fast16.decode(z.bfloat16())
    assert _rel(got, truth) <= 2 * naive + 1e-3
    assert _rel(got, ref16.decode(z.bfloat16())) <= 2 * naive + 1e-3


def test_state_dict_unchanged_and_loads(pair, tmp_path):
    ref, fast = pair
    a, b = ref.state_dict(), fast.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fast.decoder.upsamples[0].residual[2].weight.is_contiguous(memory_format=torch.channels_last_3d)
    other = copy.deepcopy(ref)
    patch_vae(other)
    path = tmp_path / "vae.pth"
    torch.save(build_vae_decoder("tiny", seed=9).state_dict(), path)
    load_wan_vae_decoder(other, path)  # the strict loader accepts the patched module
    assert torch.equal(other.decoder.head[2].weight, build_vae_decoder("tiny", seed=9).decoder.head[2].weight)


def test_patch_twice_and_refusals():
    vae = build_vae_decoder("tiny", seed=0)
    patch_vae(vae)
    again = patch_vae(vae)
    assert not again.applied and "already patched" in str(again)
    with pytest.raises(TypeError, match="no Wan VAE decoder"):
        patch_vae(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expects a Wan VAE module"):
        patch_vae(object())
    with pytest.raises(TypeError, match="holds the decoder"):
        patch_vae(build_vae_decoder("tiny", seed=0).decoder)


def test_holder_objects_are_patched_through_model():
    """LongLive's WanVAE keeps the VAE module as .model on a plain object; WanVAEWrapper as a child."""
    holder = SimpleNamespace(model=build_vae_decoder("tiny", seed=0))
    assert patch_vae(holder).applied == ["decoder"]
    wrapper = nn.Module()
    wrapper.model = build_vae_decoder("tiny", seed=0)
    assert patch_vae(wrapper).applied == ["model.decoder"]
    assert isinstance(wrapper.model.decoder, FastDecoder3d)


def test_unknown_structure_is_skipped_with_reason():
    vae = build_vae_decoder("tiny", seed=0)
    vae.decoder.upsamples[1].residual[1] = nn.GELU()
    before = vae.decoder
    report = patch_vae(vae)
    assert not report.applied and vae.decoder is before
    (path, why), = report.skipped
    assert path == "decoder" and "upsamples.1" in why and "GELU" in why
    assert "skipped" in str(report)


def test_cache_from_the_unpatched_decoder_is_refused(pair):
    ref, fast = pair
    cache = ref.new_cache()
    x = ref.conv2(ref.unscale(_z(1)))
    ref.decoder(x, cache)
    with pytest.raises(ValueError, match="unpatched decoder"):
        fast.decoder(x, cache)


def test_stream_geometry_change_is_refused(pair):
    _, fast = pair
    cache = fast.new_cache()
    x = fast.conv2(fast.unscale(_z(1)))
    fast.decoder(x, cache)
    with pytest.raises(ValueError, match="does not continue the stream"):
        fast.decoder(torch.cat([x, x], dim=3), cache)


def test_wrong_latents_still_raise(pair):
    _, fast = pair
    with pytest.raises(ValueError, match="15 channels"):
        fast.decode(torch.randn(1, 15, 2, H, W))
    with pytest.raises(ValueError, match="5 dims"):
        StreamingVAEDecoder(fast).decode_block(torch.randn(16, 2, H, W))


@pytest.mark.skipif(not _SRC or not (Path(_SRC) / "wan/modules/vae.py").is_file(),
                    reason="LONGLIVE_SRC is not set to a LongLive v1.0 checkout")
def test_patches_the_stock_wan_vae(pair):
    from longlive_triton.stock_vae import build_stock_vae, load_stock_vae, stock_cached_decode, stock_decode
    ref, _ = pair
    sv = load_stock_vae(_SRC)
    stock = build_stock_vae(sv, ref)
    z = _z(4, seed=4)
    want = stock_decode(stock, z)
    assert torch.equal(want, ref.decode(z))  # the reference is the stock code, bit for bit
    report = patch_vae(stock)
    assert report.applied == ["decoder"], str(report)
    assert type(stock.encoder).__name__ == "Encoder3d"  # the encoder is left alone
    got = stock_decode(stock, z)
    assert _rel(got, want) <= 1e-5
    stock.clear_cache()
    streamed = torch.cat([stock_cached_decode(stock, z[:, :, :3]), stock_cached_decode(stock, z[:, :, 3:])], 2)
    assert torch.equal(streamed, got)
