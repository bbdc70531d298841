"""vae_conv3d: the implicit-GEMM causal 3x3x3 convolution equals torch's conv3d on the time-padded input.

Judged against the fp64 convolution: the error may be at most twice that of `conv3d_same_precision`
(the kernel's sum in plain torch: 27 shifted fp32 GEMMs added in turn, one rounding to the output
dtype at the end) plus one output ulp and the noise of another fp32 summation order (tests/_numerics.py)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st

from longlive_triton.kernels.vae_conv3d import vae_conv3d, vae_conv3d_flops, vae_conv3d_ref, vae_conv3d_weight

from .._numerics import assert_as_close_as_same_precision

CL = torch.channels_last_3d


def _inputs(device, dtype, B, c_in, c_out, T, H, W, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, c_in, T + 2, H, W, generator=gen).to(dtype).to(device).contiguous(memory_format=CL)
    w = (torch.randn(c_out, c_in, 3, 3, 3, generator=gen) / (27 * c_in) ** 0.5).to(dtype).to(device)
    b = (0.1 * torch.randn(c_out, generator=gen)).to(dtype).to(device)
    return x, w, b


# Tilings the property test checks (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); the autotuned path
# runs at the real sizes on the GPU.
TILES = [(64, 16, 32, 4, 2), (64, 64, 32, 4, 3), (128, 64, 64, 8, 3)]


def conv3d_same_precision(x, w, b):
    """The kernel's arithmetic in plain torch: for each of the 27 taps an fp32 GEMM of the shifted
    input rows and the tap's weights (bf16 products are exact in fp32), added to an fp32
    accumulator tap after tap, the bias added, one rounding to x's dtype."""
    xp = F.pad(x.float(), (1, 1, 1, 1))
    T, H, W = x.shape[2] - 2, x.shape[3], x.shape[4]
    acc = 0
    for kt in range(3):
        for kh in range(3):
            for kw in range(3):
                tap = xp[:, :, kt:kt + T, kh:kh + H, kw:kw + W]
                acc = acc + torch.einsum("bcthw,oc->bothw", tap, w[:, :, kt, kh, kw].float())
    if b is not None:
        acc = acc + b.float()[:, None, None, None]
    return acc.to(x.dtype)


@st.composite
def tiles_dividing(draw, c_in):
    """A tiling the launcher takes for c_in: its BLOCK_K divides C_in (other tilings are refused:
    test_bad_input_is_refused)."""
    return draw(st.sampled_from([t for t in TILES if c_in % t[2] == 0]))


def _check(device, dtype, B, c_in, c_out, T, H, W, bias, into_view, seed, tile=None):
    x, w, b = _inputs(device, dtype, B, c_in, c_out, T, H, W, seed)
    b = b if bias else None
    if into_view:  # the decoder's case: the buffer holds more frames than this call uses
        big = torch.randn(B, c_in, T + 4, H, W, device=device).to(dtype).contiguous(memory_format=CL)
        big[:, :, :T + 2] = x
        x = big[:, :, :T + 2]
    out = torch.full((B, c_out, T, H, W), float("nan"), dtype=dtype, device=device).contiguous(memory_format=CL)
    got = vae_conv3d(x, vae_conv3d_weight(w), b, out=out, tile=tile)
    assert got is out and torch.isfinite(got.float()).all()
    exact = vae_conv3d_ref(x.double(), w.double(), None if b is None else b.double())
    assert_as_close_as_same_precision(got, exact, conv3d_same_precision(x, w, b), terms=27 * c_in)


# Each drawn shape and tiling is a compilation on the GPU: fewer examples there than the profile's.
@settings(max_examples=12 if torch.cuda.is_available() else settings.default.max_examples)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16]), B=st.integers(1, 2),
       c_in_tile=st.sampled_from([32, 64]).flatmap(lambda c: st.tuples(st.just(c), tiles_dividing(c))),
       c_out=st.sampled_from([16, 32, 48]), T=st.integers(1, 3), H=st.integers(1, 5), W=st.integers(1, 6),
       bias=st.booleans(), into_view=st.booleans(), seed=st.integers(0, 2**16))
@example(dtype=torch.float32, B=1, c_in_tile=(32, TILES[1]), c_out=48, T=2, H=5, W=6, bias=True, into_view=True,
         seed=0)
@example(dtype=torch.bfloat16, B=2, c_in_tile=(64, TILES[2]), c_out=16, T=1, H=3, W=4, bias=False, into_view=False,
         seed=1)
def test_matches_conv3d(device, dtype, B, c_in_tile, c_out, T, H, W, bias, into_view, seed):
    c_in, tile = c_in_tile
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    _check(device, dtype, B, c_in, c_out, T, H, W, bias, into_view, seed, dict(zip(names, tile)))


def test_default_tiling(device):
    """Without a tile: the autotuned kernel on the GPU, the interpreter's own tile on the CPU."""
    _check(device, torch.float32, 1, 64, 48, 2, 3, 5, bias=True, into_view=False, seed=5)


@pytest.mark.gpu
@pytest.mark.parametrize("c,t,h,w", [(96, 4, 480, 832), (192, 4, 240, 416), (384, 2, 120, 208), (384, 3, 60, 104)])
def test_matches_conv3d_at_real_size(c, t, h, w):
    """The decoder's residual convolutions at 480x832, steady-state frame counts (one latent frame per call);
    one tile (the autotuned launch runs in tests/gpu/test_vae_gpu.py's triton_conv variants)."""
    tile = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
    _check(torch.device("cuda"), torch.bfloat16, 1, c, c, t, h, w, bias=True, into_view=False, seed=c, tile=tile)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, wk: vae_conv3d(x.contiguous(), wk), ValueError, "channels-last"),
    (lambda x, wk: vae_conv3d(x[:, :, :2], wk), ValueError, "2 frames"),
    (lambda x, wk: vae_conv3d(x, wk[:-1]), ValueError, "27 \\* C_in"),
    (lambda x, wk: vae_conv3d(x, wk.double()), TypeError, "weight_kn must be torch.float32"),
    (lambda x, wk: vae_conv3d(x, wk, torch.zeros(3)), ValueError, "bias must have shape"),
    (lambda x, wk: vae_conv3d(torch.randn(1, 16, 4, 3, 4, device=x.device).contiguous(memory_format=CL), wk[:27 * 16]),
     ValueError, "multiple of 32"),
    (lambda x, wk: vae_conv3d(x, wk, out=torch.empty(1, 16, 3, 3, 4).contiguous(memory_format=CL)), ValueError,
     "out must have shape"),
    (lambda x, wk: vae_conv3d_weight(torch.zeros(16, 32, 1, 3, 3)), ValueError, "3x3x3 Conv3d weight"),
    (lambda x, wk: vae_conv3d(x, wk, tile=dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=64)), ValueError, "does not divide"),
])
def test_bad_input_is_refused(device, call, error, match):
    x = torch.randn(1, 32, 4, 3, 4, device=device).contiguous(memory_format=CL)
    wk = vae_conv3d_weight(torch.randn(16, 32, 3, 3, 3, device=device))
    with pytest.raises(error, match=match):
        call(x, wk)


def test_flops():
    assert vae_conv3d_flops(1, 96, 96, 4, 480, 832) == 2 * 4 * 480 * 832 * 96 * 27 * 96
