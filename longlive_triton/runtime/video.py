"""Generate and decode in one loop: each block's pixel frames as soon as the block is denoised.

    from longlive_triton.runtime.video import iter_video
    for blk in iter_video(BlockPipeline(model), vae, noise, prompt_embeds):
        show(blk.pixels)             # [B, 3, T', 8h, 8w] float32 in [-1, 1]; T' = 9 then 12 for 3-frame blocks

`BlockPipeline.iter_blocks` hands out each block's clean latents; they go straight into a
`StreamingVAEDecoder` that carries the VAE's causal cache from block to block, so the first frames
appear after the first block, and all blocks together are exactly the frames the stock whole-video
decode gives (4F - 3 for F latent frames). The VAE may be our reference decoder, patched or not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from longlive_triton.runtime.pipeline import BlockPipeline
from longlive_triton.models.wan21_vae import WanVAEDecoder
from longlive_triton.runtime.vae_stream import StreamingVAEDecoder

__all__ = ["VideoBlock", "iter_video", "generate_video"]


@dataclass
class VideoBlock:
    index: int               # block number, from 0
    start_frame: int         # first latent frame of the block
    latents: torch.Tensor    # [B, F_block, C, h, w], as the pipeline yields them (copy to keep: may be reused)
    pixels: torch.Tensor     # [B, 3, T', 8h, 8w] float32 in [-1, 1]
    first_pixel_frame: int   # where pixels[:, :, 0] sits in the whole video


def _stream_of(vae: WanVAEDecoder | StreamingVAEDecoder) -> StreamingVAEDecoder:
    if isinstance(vae, StreamingVAEDecoder):
        return vae
    if isinstance(vae, WanVAEDecoder):
        return StreamingVAEDecoder(vae)
    raise TypeError(f"vae must be a WanVAEDecoder or a StreamingVAEDecoder, got {type(vae).__name__}")


def iter_video(pipeline: BlockPipeline, vae: WanVAEDecoder | StreamingVAEDecoder, noise: torch.Tensor,
               prompt_embeds: torch.Tensor | Sequence[torch.Tensor],
               switch_frame_indices: Sequence[int] = (), *,
               next_prompt: Callable[[int], torch.Tensor | None] | None = None) -> Iterator[VideoBlock]:
    """Yield one VideoBlock per generated block: latents and their decoded frames.

    noise [B, F, C, h, w] and the prompts (and live switches, `next_prompt`) as
    `BlockPipeline.iter_blocks` takes them. The latents are
    cast to the VAE's dtype before decoding (the generator may run in another precision). A given
    StreamingVAEDecoder is reset first: one call of iter_video is one video.
    """
    stream = _stream_of(vae)
    dec = stream.vae
    if noise.dim() != 5 or noise.shape[2] != dec.z_dim:
        raise ValueError(f"noise must be [B, F, C={dec.z_dim}, h, w] (the VAE's latent channels), "
                         f"got shape {tuple(noise.shape)}")
    stream.reset()
    dtype = dec.conv2.weight.dtype
    blocks = pipeline.iter_blocks(noise, prompt_embeds, switch_frame_indices, next_prompt=next_prompt)
    for index, (start, x0) in enumerate(blocks):
        first = stream.pixel_frames_out
        pixels = stream.decode_block(x0.permute(0, 2, 1, 3, 4).to(dtype))
        yield VideoBlock(index, start, x0, pixels, first)


def generate_video(pipeline: BlockPipeline, vae: WanVAEDecoder | StreamingVAEDecoder, noise: torch.Tensor,
                   prompt_embeds: torch.Tensor | Sequence[torch.Tensor], switch_frame_indices: Sequence[int] = (),
                   on_block: Callable[[VideoBlock], None] | None = None) -> torch.Tensor:
    """The whole video [B, 3, 4F-3, 8h, 8w] float32, streamed: on_block(block) sees each block's frames."""
    chunks = []
    for block in iter_video(pipeline, vae, noise, prompt_embeds, switch_frame_indices):
        chunks.append(block.pixels)
        if on_block is not None:
            on_block(block)
    return torch.cat(chunks, dim=2)
