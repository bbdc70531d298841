"""Reference Wan2.1 VAE decoder (longlive_triton/models/wan21_vae.py) and the streaming decode (vae_stream.py).

CPU, tiny preset, small latents. The stock-parity test at the end runs only where a LongLive v1.0
checkout is available (LONGLIVE_SRC, as tests/reference/test_stock_parity_cpu.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from longlive_triton.numerics import rel_l2
from longlive_triton.models.wan21_vae import (CACHE_T, VAE_PRESETS, VAECheckpointError, WAN21_LATENT_MEAN,
                                           WAN21_LATENT_STD, WanVAEDecoder, build_vae_decoder,
                                           load_wan_vae_decoder)
from longlive_triton.runtime.vae_stream import StreamingVAEDecoder

H, W = 4, 6


def _latents(f: int, b: int = 1, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(b, 16, f, H, W, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(scope="module")
def vae() -> WanVAEDecoder:
    return build_vae_decoder("tiny", seed=0)


# --- shapes and values -------------------------------------------------------------------------------

@pytest.mark.parametrize("f,b", [(1, 1), (2, 1), (4, 2)])
def test_decode_shape_and_range(vae, f, b):
    out = vae.decode(_latents(f, b))
    assert out.shape == (b, 3, 4 * f - 3, 8 * H, 8 * W)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1
    # non-degenerate: signal, not saturated, frames differ in time
    assert out.std() > 0.05
    assert (out.abs() == 1).float().mean() < 0.2
    if f > 1:
        assert not torch.equal(out[:, :, 0], out[:, :, -1])


def test_cache_t_and_constants():
    assert CACHE_T == 2
    assert len(WAN21_LATENT_MEAN) == len(WAN21_LATENT_STD) == 16
    assert WAN21_LATENT_MEAN[0] == -0.7571 and WAN21_LATENT_STD[-1] == 1.9160
    assert VAE_PRESETS["wan2.1"].dim == 96 and VAE_PRESETS["wan2.1"].temperal_downsample == (False, True, True)
    vae = build_vae_decoder("tiny", device="meta", seed=None)
    assert vae.temperal_upsample == [True, True, False]
    modes = [m.mode for m in vae.decoder.upsamples if hasattr(m, "mode")]
    assert modes == ["upsample3d", "upsample3d", "upsample2d"]
    # mean/std are not in the state dict (they live on the stock wrapper, not in Wan2.1_VAE.pth)
    assert not any("latent_" in k for k in vae.state_dict())


def test_unscale_is_stock_formula(vae):
    z = _latents(2)
    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, 16, 1, 1, 1)
    assert torch.equal(vae.unscale(z), z / (1.0 / std) + mean)


def test_determinism():
    z = _latents(3, seed=5)
    a = build_vae_decoder("tiny", seed=7)
    b = build_vae_decoder("tiny", seed=7)
    c = build_vae_decoder("tiny", seed=8)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    out = a.decode(z)
    assert torch.equal(out, a.decode(z))
    assert torch.equal(out, b.decode(z))
    assert not torch.equal(out, c.decode(z))


# --- streaming ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [3, 1, 2])
def test_streaming_equals_whole_decode(vae, block):
    f = 7
    z = _latents(f, seed=2)
    whole = vae.decode(z)
    dec = StreamingVAEDecoder(vae)
    outs = [dec.decode_block(z[:, :, i:i + block]) for i in range(0, f, block)]
    sizes = [o.shape[2] for o in outs]
    first = min(block, f)
    assert sizes[0] == 4 * first - 3
    assert all(s == 4 * min(block, f - i) for s, i in zip(sizes[1:], range(block, f, block)))
    streamed = torch.cat(outs, dim=2)
    assert streamed.shape == whole.shape == (1, 3, 4 * f - 3, 8 * H, 8 * W)
    assert rel_l2(streamed, whole) <= 1e-5
    assert torch.equal(streamed, whole)  # the same ops frame for frame
    assert dec.latent_frames_seen == f and dec.pixel_frames_out == 4 * f - 3


def test_streaming_blocks_of_three_sizes_and_reset(vae):
    z = _latents(6, seed=3)
    dec = StreamingVAEDecoder(vae)
    a = dec.decode_block(z[:, :, :3])
    b = dec.decode_block(z[:, :, 3:])
    assert a.shape[2] == 9 and b.shape[2] == 12
    dec.reset()
    a2 = dec.decode_block(z[:, :, :3])
    assert torch.equal(a, a2)  # reset starts a fresh stream
    # a fresh stream takes its first block as the start of a video: first latent frame -> one frame
    fresh = StreamingVAEDecoder(vae).decode_block(z[:, :, 3:])
    assert fresh.shape[2] == 9
    assert not torch.equal(fresh[:, :, -8:], b[:, :, -8:])  # the carried cache changes later frames too


def test_streaming_bf16_equals_whole_decode():
    vae = build_vae_decoder("tiny", seed=1, dtype=torch.bfloat16)
    z = _latents(4, seed=4, dtype=torch.bfloat16)
    dec = StreamingVAEDecoder(vae)
    streamed = torch.cat([dec.decode_block(z[:, :, :3]), dec.decode_block(z[:, :, 3:])], dim=2)
    assert torch.equal(streamed, vae.decode(z))


# --- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,match", [
    ((1, 16, 4, 6), "5 dims"),
    ((1, 15, 2, 4, 6), "15 channels"),
    ((1, 2, 16, 4, 6), "2 channels"),
    ((1, 16, 0, 4, 6), "empty"),
])
def test_wrong_shapes_raise(vae, shape, match):
    z = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        vae.decode(z)
    with pytest.raises(ValueError, match=match):
        StreamingVAEDecoder(vae).decode_block(z)


def test_wrong_dtype_device_and_geometry_raise(vae):
    with pytest.raises(ValueError, match="dtype"):
        vae.decode(_latents(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        StreamingVAEDecoder(vae).decode_block(_latents(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="meta"):
        StreamingVAEDecoder(vae).decode_block(torch.zeros(1, 16, 2, H, W, device="meta"))
    dec = StreamingVAEDecoder(vae)
    dec.decode_block(_latents(1))
    with pytest.raises(ValueError, match="reset"):
        dec.decode_block(torch.zeros(1, 16, 1, H + 1, W))
    with pytest.raises(ValueError, match="reset"):
        dec.decode_block(torch.zeros(2, 16, 1, H, W))
    with pytest.raises(TypeError):
        StreamingVAEDecoder(torch.nn.Linear(2, 2))


# --- state-dict names (stock WanVAE_ decoder side at the Wan2.1 shapes) -----------------------------

def _stock_decoder_keys(dim=96, z_dim=16, mult=(1, 2, 4, 4), nres=2, temporal_up=(True, True, False)):
    """The decoder-side keys of the stock WanVAE_, written out from its class definitions
    (Decoder3d, ResidualBlock, AttentionBlock, Resample, RMS_norm), with shapes."""
    keys = {"conv2.weight": (z_dim, z_dim, 1, 1, 1), "conv2.bias": (z_dim,)}

    def conv3(prefix, cout, cin, k):
        keys[f"{prefix}.weight"] = (cout, cin, *k)
        keys[f"{prefix}.bias"] = (cout,)

    def res(prefix, cin, cout):
        keys[f"{prefix}.residual.0.gamma"] = (cin, 1, 1, 1)
        conv3(f"{prefix}.residual.2", cout, cin, (3, 3, 3))
        keys[f"{prefix}.residual.3.gamma"] = (cout, 1, 1, 1)
        conv3(f"{prefix}.residual.6", cout, cout, (3, 3, 3))
        if cin != cout:
            conv3(f"{prefix}.shortcut", cout, cin, (1, 1, 1))

    dims = [dim * u for u in (mult[-1],) + tuple(mult[::-1])]
    conv3("decoder.conv1", dims[0], z_dim, (3, 3, 3))
    res("decoder.middle.0", dims[0], dims[0])
    keys["decoder.middle.1.norm.gamma"] = (dims[0], 1, 1)
    conv3("decoder.middle.1.to_qkv", 3 * dims[0], dims[0], (1, 1))
    conv3("decoder.middle.1.proj", dims[0], dims[0], (1, 1))
    res("decoder.middle.2", dims[0], dims[0])
    j = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        cin = cin // 2 if i > 0 else cin
        for _ in range(nres + 1):
            res(f"decoder.upsamples.{j}", cin, cout)
            cin, j = cout, j + 1
        if i != len(mult) - 1:
            conv3(f"decoder.upsamples.{j}.resample.1", cout // 2, cout, (3, 3))
            if temporal_up[i]:
                conv3(f"decoder.upsamples.{j}.time_conv", 2 * cout, cout, (3, 1, 1))
            j += 1
    keys["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv3("decoder.head.2", 3, dims[-1], (3, 3, 3))
    return keys


def test_state_dict_names_match_stock_decoder():
    vae = build_vae_decoder("wan2.1", device="meta", seed=None)
    got = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    expected = _stock_decoder_keys()
    assert set(got) == set(expected), (sorted(set(got) - set(expected)), sorted(set(expected) - set(got)))
    assert got == expected
    assert len(got) == 108
    representative = {
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.middle.0.residual.0.gamma": (384, 1, 1, 1),
        "decoder.middle.1.norm.gamma": (384, 1, 1),
        "decoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "decoder.middle.1.proj.weight": (384, 384, 1, 1),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3),
        "decoder.head.0.gamma": (96, 1, 1, 1),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
        "decoder.head.2.bias": (3,),
    }
    for k, shape in representative.items():
        assert got[k] == shape, k
    assert "decoder.upsamples.11.time_conv.weight" not in got  # the last upsample is 2-D only
    assert sum(1 for k in got if "shortcut" in k) == 2  # only upsamples.4 (192 -> 384) widens


# --- loading a full WanVAE_ checkpoint ---------------------------------------------------------------

def _full_checkpoint(vae: WanVAEDecoder) -> dict:
    """The decoder's tensors plus stand-ins for the stock encode half (encoder.*, conv1.*)."""
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    sd["conv1.weight"] = torch.randn(32, 32, 1, 1, 1)
    sd["conv1.bias"] = torch.randn(32)
    sd["encoder.conv1.weight"] = torch.randn(8, 3, 3, 3, 3)
    sd["encoder.head.2.bias"] = torch.randn(32)
    return sd


def test_loader_strict_with_encoder_keys(vae, tmp_path):
    path = tmp_path / "Wan2.1_VAE_tiny.pth"
    torch.save(_full_checkpoint(vae), path)
    fresh = build_vae_decoder("tiny", seed=None)
    assert not torch.equal(fresh.decoder.head[2].weight, vae.decoder.head[2].weight)
    assert load_wan_vae_decoder(fresh, path) is fresh
    for (k, a), (_, b) in zip(fresh.state_dict().items(), vae.state_dict().items()):
        assert torch.equal(a, b), k
    z = _latents(3)
    assert torch.equal(fresh.decode(z), vae.decode(z))
    # a module built on the meta device receives the tensors (assign)
    meta = build_vae_decoder("tiny", device="meta", seed=None)
    load_wan_vae_decoder(meta, str(path))
    assert not any(t.is_meta for t in list(meta.parameters()) + list(meta.buffers()))
    assert torch.equal(meta.decode(z), vae.decode(z))


def test_loader_errors_name_keys(vae, tmp_path):
    fresh = build_vae_decoder("tiny", seed=None)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    sd = _full_checkpoint(vae)
    del sd["decoder.head.2.bias"]
    with pytest.raises(VAECheckpointError, match=r"missing 1: decoder\.head\.2\.bias"):
        load_wan_vae_decoder(fresh, sd)

    sd = _full_checkpoint(vae)
    sd["decoder.conv1.weight"] = torch.zeros(32, 16, 3, 3, 3)[:, :, :1]
    with pytest.raises(VAECheckpointError, match=r"shape mismatch 1: decoder\.conv1\.weight"):
        load_wan_vae_decoder(fresh, sd)

    sd = _full_checkpoint(vae)
    sd["decoder.extra.weight"] = torch.zeros(1)
    sd["model.something"] = torch.zeros(1)
    with pytest.raises(VAECheckpointError, match=r"unexpected 2: decoder\.extra\.weight, model\.something"):
        load_wan_vae_decoder(fresh, sd)

    # the real Wan2.1 file does not fit the tiny preset: every mismatch is reported, not a torch traceback
    big = {k: torch.empty(v.shape, device="meta") for k, v in
           build_vae_decoder("wan2.1", device="meta", seed=None).state_dict().items()}
    with pytest.raises(VAECheckpointError, match=r"shape mismatch"):
        load_wan_vae_decoder(fresh, big)

    path = tmp_path / "list.pth"
    torch.save([1, 2], path)
    with pytest.raises(VAECheckpointError, match="not a state dict"):
        load_wan_vae_decoder(fresh, path)
    # nothing was half-loaded by the failed attempts
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- the stock WanVAE_ itself (optional: needs a LongLive v1.0 checkout) -----------------------------

_SRC = os.environ.get("LONGLIVE_SRC", "")


@pytest.mark.skipif(not _SRC or not (Path(_SRC) / "wan/modules/vae.py").is_file(),
                    reason="LONGLIVE_SRC is not set to a LongLive v1.0 checkout")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_stock_wan_vae(dtype, tmp_path):
    from longlive_triton.stock.vae import load_stock_vae
    sv = load_stock_vae(_SRC)
    with torch.device("meta"):
        stock_big = sv.WanVAE_(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                               temperal_downsample=[False, True, True])
    ours_big = build_vae_decoder("wan2.1", device="meta", seed=None)
    stock_keys = {k: tuple(v.shape) for k, v in stock_big.state_dict().items() if k.startswith(("decoder.", "conv2."))}
    assert list(stock_keys) == list({k: tuple(v.shape) for k, v in ours_big.state_dict().items()})
    assert stock_keys == {k: tuple(v.shape) for k, v in ours_big.state_dict().items()}

    stock = sv.WanVAE_(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True]).eval()
    ours = build_vae_decoder("tiny", seed=3)
    full = stock.state_dict()
    full.update(ours.state_dict())
    stock.load_state_dict(full, strict=True)  # our decoder weights in the stock module, its encoder as is
    path = tmp_path / "full.pth"
    torch.save(full, path)
    loaded = load_wan_vae_decoder(build_vae_decoder("tiny", seed=None), path)
    stock, ours, loaded = stock.to(dtype), ours.to(dtype), loaded.to(dtype)
    z = _latents(5, dtype=dtype)
    scale = [torch.tensor(WAN21_LATENT_MEAN, dtype=dtype), 1.0 / torch.tensor(WAN21_LATENT_STD, dtype=dtype)]
    with torch.no_grad():
        ref = stock.decode(z, scale).float().clamp_(-1, 1)
        stock.clear_cache()
        cached = torch.cat([stock.cached_decode(z[:, :, :3], scale), stock.cached_decode(z[:, :, 3:], scale)], 2)
        cached = cached.float().clamp_(-1, 1)
        stock.clear_cache()
    out = ours.decode(z)
    dec = StreamingVAEDecoder(ours)
    streamed = torch.cat([dec.decode_block(z[:, :, :3]), dec.decode_block(z[:, :, 3:])], dim=2)
    assert rel_l2(out, ref) <= (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(out, ref)
    assert torch.equal(loaded.decode(z), ref)
    assert torch.equal(streamed, cached)
