"""patch_vae / FastDecoder3d on the tiny VAE, CPU (Triton kernels in the interpreter).

Parity as issue 14 defines it, for the default options and for variants that switch each option
the other way: fp32 patched vs unpatched within 1e-5 (relative L2); in bf16 the patched decode is
no further from the fp32 decode than the unpatched bf16 decode is, times 1.1; streaming in blocks
equals the whole-video decode, over 8 blocks. The same at the real shapes runs on the GPU in
tests/gpu/test_vae_gpu.py. The stock `WanVAE_` is patched too when a LongLive checkout is named by
LONGLIVE_SRC. CUDA graphs have their own tests (test_vae_graphs.py).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from longlive_triton import PatchReport, VAEPatchReport, patch_vae
from longlive_triton.numerics import rel_l2
from longlive_triton.patches.vae_decoder import FastDecoder3d, VAEDecoderOptions
from longlive_triton.models.wan21_vae import build_vae_decoder, load_wan_vae_decoder
from longlive_triton.runtime.vae_stream import StreamingVAEDecoder

H, W = 3, 5
_SRC = os.environ.get("LONGLIVE_SRC", "")


def _z(f, dtype=torch.float32, seed=0):
    return torch.randn(1, 16, f, H, W, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(scope="module")
def pair():
    ref = build_vae_decoder("tiny", seed=2)
    fast = copy.deepcopy(ref)
    report = patch_vae(fast)
    assert [e.path for e in report.applied] == ["decoder"] and not report.skipped, str(report)
    assert "fast_decoder: 1 applied, 0 skipped (applied at decoder)" in str(report)
    assert isinstance(report, PatchReport) and isinstance(report, VAEPatchReport)  # one report type, both names
    return ref, fast


# Each option both ways, with few decoder calls (the interpreter's launches are what costs here).
VARIANTS = {
    "defaults": {},
    "all off": dict(subpixel_upsample=False, fused_bias=False, frames_per_call=1),
    "subpixel, bias unfused, 1 frame per call": dict(fused_bias=False, frames_per_call=1),
    "upsample copy, fused bias, 3 frames per call": dict(subpixel_upsample=False),
}


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_patched_stream_equals_unpatched_fp32(options):
    ref = build_vae_decoder("tiny", seed=2)
    fast = copy.deepcopy(ref)
    patch_vae(fast, options)
    z = _z(5)
    want = ref.decode(z)
    dec = StreamingVAEDecoder(fast)
    got = torch.cat([dec.decode_block(z[:, :, :3]), dec.decode_block(z[:, :, 3:])], dim=2)
    assert got.shape == want.shape == (1, 3, 17, 8 * H, 8 * W)
    assert rel_l2(got, want) <= 1e-5
    assert want.std() > 0.05


def test_triton_conv_option_fp32():
    """triton_conv: the tiny decoder's 32-channel residual convs (not its 8 and 16) through
    kernels/vae_conv3d.py; small latents, because the interpreter runs that kernel slowly."""
    ref = build_vae_decoder("tiny", seed=2)
    fast = copy.deepcopy(ref)
    patch_vae(fast, {"triton_conv": True})
    assert fast.decoder._triton_weight("middle.0.residual.2", fast.decoder.middle[0].residual[2]) is not None
    assert fast.decoder._triton_weight("upsamples.8.residual.2", fast.decoder.upsamples[8].residual[2]) is None
    z = torch.randn(1, 16, 3, 1, 2, generator=torch.Generator().manual_seed(4))
    assert rel_l2(StreamingVAEDecoder(fast).decode_block(z), ref.decode(z)) <= 1e-5


def test_patched_streaming_8_blocks_equals_whole_decode():
    """8 blocks of 3 latent frames through the patched decoder (defaults) vs the unpatched whole decode."""
    ref = build_vae_decoder("tiny", seed=3)
    fast = copy.deepcopy(ref)
    patch_vae(fast)
    z = torch.randn(1, 16, 24, 2, 3, generator=torch.Generator().manual_seed(8))
    dec = StreamingVAEDecoder(fast)
    blocks = [dec.decode_block(z[:, :, i:i + 3]) for i in range(0, 24, 3)]
    assert [b.shape[2] for b in blocks] == [9] + [12] * 7
    assert rel_l2(torch.cat(blocks, dim=2), ref.decode(z)) <= 1e-5


def test_patched_streaming_equals_patched_whole(pair):
    _, fast = pair
    z = _z(4, seed=1)
    dec = StreamingVAEDecoder(fast)
    outs = [dec.decode_block(z[:, :, :3]), dec.decode_block(z[:, :, 3:])]
    assert [o.shape[2] for o in outs] == [9, 4]
    # other chunks (whole: frames 1-3 in one call; streamed: 1-2 and 3): the same numbers up to the
    # convolutions' summation order
    assert rel_l2(torch.cat(outs, 2), fast.decode(z)) <= 1e-6


@pytest.mark.parametrize("options", [VARIANTS["defaults"], VARIANTS["all off"]], ids=["defaults", "all off"])
def test_patched_bf16_no_further_from_fp32_than_unpatched_bf16(options):
    """Issue 14's bf16 bound: |patched bf16 - fp32| <= 1.1 x |unpatched bf16 - fp32| (relative L2)."""
    ref32 = build_vae_decoder("tiny", seed=2)
    ref16 = build_vae_decoder("tiny", seed=2, dtype=torch.bfloat16)
    fast16 = copy.deepcopy(ref16)
    patch_vae(fast16, options)
    z = _z(4, seed=3)
    truth = ref32.decode(z)
    naive = rel_l2(ref16.decode(z.bfloat16()), truth)
    assert 1e-3 < naive < 5e-2  # bf16 is bf16: the bound is not vacuous
    assert rel_l2(fast16.decode(z.bfloat16()), truth) <= 1.1 * naive


def test_options_are_validated():
    assert VAEDecoderOptions().frames_per_call >= 1
    with pytest.raises(ValueError, match="frames_per_call must be an int >= 1"):
        VAEDecoderOptions(frames_per_call=0)
    with pytest.raises(TypeError, match="cuda_graphs must be a bool"):
        VAEDecoderOptions(cuda_graphs="yes")
    with pytest.raises(ValueError, match="unknown VAE options"):
        patch_vae(build_vae_decoder("tiny", seed=0), {"subpixel": True})
    with pytest.raises(TypeError, match="options must be"):
        patch_vae(build_vae_decoder("tiny", seed=0), "fast")
    vae = build_vae_decoder("tiny", seed=0)
    report = patch_vae(vae, VAEDecoderOptions(frames_per_call=2, cuda_graphs=False))
    assert "frames_per_call=2" in str(report) and vae.decoder.options.frames_per_call == 2
    assert "frames_per_call=2" in repr(vae.decoder)


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
    fresh = build_vae_decoder("tiny", seed=9)
    assert torch.equal(other.decoder.head[2].weight, fresh.decoder.head[2].weight)
    z = _z(2, seed=5)  # the sub-pixel weights follow the loaded 3x3 weights
    assert rel_l2(other.decode(z), fresh.decode(z)) <= 1e-5


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
    assert [e.path for e in patch_vae(holder).applied] == ["decoder"]
    wrapper = nn.Module()
    wrapper.model = build_vae_decoder("tiny", seed=0)
    assert [e.path for e in patch_vae(wrapper).applied] == ["model.decoder"]
    assert isinstance(wrapper.model.decoder, FastDecoder3d)


def test_unknown_structure_is_skipped_with_reason():
    vae = build_vae_decoder("tiny", seed=0)
    vae.decoder.upsamples[1].residual[1] = nn.GELU()
    before = vae.decoder
    report = patch_vae(vae)
    assert not report.applied and vae.decoder is before
    (entry,) = report.skipped
    assert (entry.path, entry.patch) == ("decoder", "fast_decoder") and "upsamples.1" in entry.reason
    assert "GELU" in entry.reason
    assert f"skipped fast_decoder at decoder: {entry.reason}" in str(report)


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
    # the decoder itself, as the stock WanVAE_ calls it (after its conv2): refused before any kernel
    cache = fast.new_cache()
    x = torch.randn(1, 16, 1, H, W)
    for bad, error, match in [(x[:, :8], ValueError, "8 channels, the decoder takes 16"),
                              (x.double(), TypeError, "torch.float64, the decoder's weights are torch.float32"),
                              (x[:, :, :0], ValueError, "empty dimension"),
                              (x[0], ValueError, r"\[B, C, T, H, W\]"),
                              ("x", TypeError, "must be a tensor")]:
        with pytest.raises(error, match=match):
            fast.decoder(bad, cache)
    assert cache.slots[0] is None  # nothing ran


@pytest.mark.skipif(not _SRC or not (Path(_SRC) / "wan/modules/vae.py").is_file(),
                    reason="LONGLIVE_SRC is not set to a LongLive v1.0 checkout")
def test_patches_the_stock_wan_vae(pair):
    from longlive_triton.stock.vae import build_stock_vae, load_stock_vae, stock_cached_decode, stock_decode
    ref, _ = pair
    sv = load_stock_vae(_SRC)
    stock = build_stock_vae(sv, ref)
    z = _z(4, seed=4)
    want = stock_decode(stock, z)
    assert torch.equal(want, ref.decode(z))  # the reference is the stock code, bit for bit
    report = patch_vae(stock, {"frames_per_call": 3})
    assert [e.path for e in report.applied] == ["decoder"], str(report)
    assert type(stock.encoder).__name__ == "Encoder3d"  # the encoder is left alone
    assert "decode and cached_decode pass up to 3 latent frames" in str(report)
    got = stock_decode(stock, z)
    assert rel_l2(got, want) <= 1e-5
    stock.clear_cache()
    streamed = torch.cat([stock_cached_decode(stock, z[:, :, :3]), stock_cached_decode(stock, z[:, :, 3:])], 2)
    assert rel_l2(streamed, got) <= 1e-6
    twin = copy.deepcopy(stock)  # the instance's decode loops are objects that copy with it
    assert twin.decode.vae is twin and twin.cached_decode.vae is twin
    assert torch.equal(stock_decode(twin, z), got)


def test_decoder_built_under_inference_mode():
    """Weights made under torch.inference_mode() carry no version counter; the patched decoder copes."""
    with torch.inference_mode():
        vae = build_vae_decoder("tiny", seed=6)
        ref = copy.deepcopy(vae)
        patch_vae(vae, {"frames_per_call": 1})
        z = _z(2, seed=7)
        assert rel_l2(vae.decode(z), ref.decode(z)) <= 1e-5
