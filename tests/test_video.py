"""Generate and decode in one loop (longlive_triton/runtime/video.py): tiny generator, tiny VAE, CPU."""
from __future__ import annotations

import pytest
import torch

from longlive_triton.runtime.pipeline import BlockPipeline
from longlive_triton.models import build_model, get_preset
from longlive_triton.models.wan21_vae import build_vae_decoder
from longlive_triton.runtime.vae_stream import StreamingVAEDecoder
from longlive_triton.runtime.video import generate_video, iter_video

TINY = get_preset("tiny")


def _inputs(frames: int, seed: int = 0, prompts: int = 1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, frames, 16, TINY.latent_height, TINY.latent_width, generator=g)
    ps = [torch.randn(1, 10, TINY.text_dim, generator=g) for _ in range(prompts)]
    return noise, ps


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=21)


@pytest.fixture(scope="module")
def vae():
    return build_vae_decoder("tiny", seed=4)


def test_frames_per_block_equal_whole_video_decode(model, vae):
    noise, (prompt,) = _inputs(6)
    torch.manual_seed(3)
    latents = BlockPipeline(model).generate(noise, prompt)
    whole = vae.decode(latents.permute(0, 2, 1, 3, 4))

    torch.manual_seed(3)
    seen = []
    blocks = list(iter_video(BlockPipeline(model), vae, noise, prompt))
    for blk in blocks:
        seen.append((blk.index, blk.start_frame, blk.first_pixel_frame, blk.pixels.shape[2]))
    assert seen == [(0, 0, 0, 9), (1, 3, 9, 12)]
    h, w = 8 * TINY.latent_height, 8 * TINY.latent_width
    assert all(blk.pixels.shape == (1, 3, blk.pixels.shape[2], h, w) for blk in blocks)
    assert all(blk.pixels.dtype == torch.float32 for blk in blocks)
    streamed = torch.cat([blk.pixels for blk in blocks], dim=2)
    assert streamed.shape[2] == 4 * 6 - 3 == whole.shape[2]
    assert torch.equal(streamed, whole)
    assert torch.equal(torch.cat([blk.latents for blk in blocks], dim=1), latents)
    assert streamed.std() > 0.05  # real frames, not a constant


def test_first_frames_come_before_the_second_block(model, vae):
    """The frames of block 0 are handed out before block 1 is generated."""
    noise, (prompt,) = _inputs(6, seed=1)
    calls = []
    original = model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["current_start"])
        return original(*args, **kwargs)

    model.forward = counting
    try:
        it = iter_video(BlockPipeline(model), vae, noise, prompt)
        first = next(it)
        assert first.pixels.shape[2] == 9
        assert calls and max(calls) == 0  # only block 0's forwards so far
        rest = list(it)
        assert len(rest) == 1 and max(calls) > 0
    finally:
        del model.forward


def test_generate_video_callback_switches_and_dtype(model):
    vae16 = build_vae_decoder("tiny", seed=4, dtype=torch.bfloat16)
    noise, prompts = _inputs(6, seed=2, prompts=2)
    got = []
    stream = StreamingVAEDecoder(vae16)
    stream.decode_block(torch.randn(1, 16, 1, TINY.latent_height, TINY.latent_width).bfloat16())  # reset by the call
    torch.manual_seed(5)
    video = generate_video(BlockPipeline(model), stream, noise, prompts, [3], on_block=got.append)
    assert video.shape == (1, 3, 21, 32, 64) and video.dtype == torch.float32
    assert [b.first_pixel_frame for b in got] == [0, 9]
    torch.manual_seed(5)
    latents = BlockPipeline(model).generate(noise, prompts, [3])
    assert torch.equal(video, vae16.decode(latents.permute(0, 2, 1, 3, 4).bfloat16()))


def test_errors(model, vae):
    noise, (prompt,) = _inputs(3)
    with pytest.raises(ValueError, match="C=16"):
        next(iter_video(BlockPipeline(model), vae, noise[:, :, :8], prompt))
    with pytest.raises(TypeError, match="WanVAEDecoder"):
        next(iter_video(BlockPipeline(model), torch.nn.Linear(2, 2), noise, prompt))
