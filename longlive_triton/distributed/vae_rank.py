"""The VAE on its own rank: generation on one rank, streaming decode on another, pipelined.

    ctx = init_distributed(expected_world_size=2)       # torchrun --nproc-per-node 2 your_script.py
    if ctx.rank == 0:                                   # the generator's GPU
        for blk in iter_video_split(BlockPipeline(model), noise, prompt_embeds):
            show(blk.pixels)                            # VideoBlocks, as iter_video gives them, in order
    else:                                               # the VAE's GPU
        serve_vae(vae)                                  # until rank 0 ends the stream

Rank 1 decodes block i while rank 0 generates block i+1; frames come back to rank 0 one block
late, or stay on rank 1 (`serve_vae(vae, on_block=...)` with `stream_to_vae` on rank 0). Why, and
how the two ranks stay in step: docs/distributed.md.

Messages (point-to-point on the group: NCCL between GPUs, gloo on the CPU), each an int64 header
of HEADER_LEN values and an optional payload:

    0 -> 1  START   [START, VERSION, B, C, h, w, return_pixels]   1 -> 0  READY [READY, VERSION, z_dim, ok]
    0 -> 1  BLOCK   [BLOCK, index, start_frame, frames, dtype]  + latents [B, frames, C, h, w]
    1 -> 0  PIXELS  [PIXELS, index, first_pixel_frame, T', H, W] + pixels [B, 3, T', H, W] float32
                    (block i's, sent right after block i+1's BLOCK, or END, arrives)
    0 -> 1  END     (all blocks sent) or ABORT (rank 0 stopped early: an error, or its consumer left
                    the loop); rank 1 then returns.

A rank that dies or hangs makes the other's next call fail (after the group's timeout): both as
DistributedError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from longlive_triton.runtime.pipeline import BlockPipeline
from longlive_triton.models.wan21_vae import WanVAEDecoder
from longlive_triton.runtime.vae_stream import StreamingVAEDecoder
from longlive_triton.runtime.video import VideoBlock
from .group import DistributedError, comm_device, comm_errors

__all__ = ["VaeServeResult", "iter_video_split", "serve_vae", "stream_to_vae"]

VERSION = 1
HEADER_LEN = 8
START, READY, BLOCK, PIXELS, END, ABORT = range(1, 7)
_KIND_NAMES = {START: "START", READY: "READY", BLOCK: "BLOCK", PIXELS: "PIXELS", END: "END", ABORT: "ABORT"}
_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclass
class VaeServeResult:
    blocks: int         # blocks decoded
    ended: str          # "end": rank 0 sent every block; "abort": it stopped early


class _Link:
    """Headers and payloads to and from one peer rank, in order; sends stay in flight until waited."""

    def __init__(self, group, peer: int, role: str):
        self.group = group
        self.peer = peer if group is None else dist.get_global_rank(group, peer)
        self.role = role
        self.device = comm_device(group)
        self._sends: list = []

    def _what(self, what: str) -> str:
        return f"{self.role}: {what} (peer rank {self.peer})"

    def send(self, tensor: torch.Tensor, what: str) -> None:
        tensor = tensor.to(self.device).contiguous()
        with comm_errors(self._what(f"sending {what}")):
            self._sends.append((dist.isend(tensor, self.peer, group=self.group), tensor))

    def send_header(self, *values: int) -> None:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[:len(values)] = torch.tensor(values, dtype=torch.int64)
        self.send(header, f"a {_KIND_NAMES[values[0]]} header")

    def recv(self, shape, dtype: torch.dtype, what: str) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.device)
        with comm_errors(self._what(f"receiving {what}")):
            dist.recv(out, self.peer, group=self.group)
        return out

    def recv_header(self, *expected: int) -> list[int]:
        header = self.recv([HEADER_LEN], torch.int64, "a header").tolist()
        if header[0] not in expected:
            raise DistributedError(self._what(f"expected a {' or '.join(_KIND_NAMES[k] for k in expected)} message, got "
                                              f"kind {header[0]}: the ranks are out of step (is the peer running "
                                              "the other side of this protocol?)"))
        return header

    def wait_sends(self) -> None:
        sends, self._sends = self._sends, []
        with comm_errors(self._what("completing a send")):
            for work, _ in sends:
                work.wait()


def _handshake(link: _Link, noise: torch.Tensor, return_pixels: bool) -> None:
    b, _, c, h, w = noise.shape
    link.send_header(START, VERSION, b, c, h, w, int(return_pixels))
    _, version, z_dim, ok = link.recv_header(READY)[:4]
    if version != VERSION:
        raise DistributedError(link._what(f"the VAE rank speaks protocol version {version}, this rank {VERSION}"))
    if not ok:
        raise ValueError(f"the VAE rank's decoder takes {z_dim} latent channels; the noise has {c}")


def _stream_blocks(pipeline: BlockPipeline, noise, prompt_embeds, switch_frame_indices, vae_rank: int, group,
                   return_pixels: bool) -> Iterator[tuple[int, int, torch.Tensor, list | None]]:
    """Rank 0's side: yields (index, start_frame, latents, pixels message or None) per block."""
    if noise.dim() != 5:
        raise ValueError(f"noise must be [B, F, C, h, w], got shape {tuple(noise.shape)}")
    if noise.dtype not in _DTYPES:
        raise TypeError(f"noise is {noise.dtype}; the VAE link carries {_DTYPES}")
    link = _Link(group, vae_rank, "generator rank")
    _handshake(link, noise, return_pixels)
    pending = None
    try:
        for index, (start, x0) in enumerate(pipeline.iter_blocks(noise, prompt_embeds, switch_frame_indices)):
            link.wait_sends()  # the previous block's latents are out: their buffer may go
            link.send_header(BLOCK, index, start, x0.shape[1], _DTYPES.index(x0.dtype))
            link.send(x0, f"block {index}'s latents")
            if not return_pixels:
                yield index, start, x0, None
            elif pending is not None:
                yield (*pending, _recv_pixels(link, noise.shape[0], pending[0]))
            pending = (index, start, x0)
        link.send_header(END)
        if return_pixels and pending is not None:
            yield (*pending, _recv_pixels(link, noise.shape[0], pending[0]))
    except BaseException:  # an error, or the consumer leaving the loop (GeneratorExit)
        _abort(link)
        raise
    link.wait_sends()


def _abort(link: _Link) -> None:
    """Tell the VAE rank the stream stopped early. Best effort: the error that stopped it matters more."""
    try:
        link.send_header(ABORT)
        link.wait_sends()
    except DistributedError:
        pass


def _recv_pixels(link: _Link, batch: int, index: int) -> list:
    _, got, first, frames, height, width = link.recv_header(PIXELS)[:6]
    if got != index:
        raise DistributedError(link._what(f"expected block {index}'s pixels, got block {got}'s"))
    return [first, link.recv([batch, 3, frames, height, width], torch.float32, f"block {index}'s pixels")]


def iter_video_split(pipeline: BlockPipeline, noise: torch.Tensor,
                     prompt_embeds: torch.Tensor | Sequence[torch.Tensor], switch_frame_indices: Sequence[int] = (),
                     *, vae_rank: int = 1, group=None) -> Iterator[VideoBlock]:
    """On the generator's rank: iter_video with the decode on `vae_rank` (which runs serve_vae).

    Yields one VideoBlock per block, in order, each once the next block has been generated (the last
    once the VAE rank has decoded it); pixels are float32 on this rank's communication device (its
    GPU with NCCL, the CPU with gloo)."""
    for index, start, x0, (first, pixels) in _stream_blocks(pipeline, noise, prompt_embeds, switch_frame_indices,
                                                             vae_rank, group, return_pixels=True):
        yield VideoBlock(index, start, x0, pixels, first)


def stream_to_vae(pipeline: BlockPipeline, noise: torch.Tensor,
                  prompt_embeds: torch.Tensor | Sequence[torch.Tensor], switch_frame_indices: Sequence[int] = (),
                  *, vae_rank: int = 1, group=None) -> Iterator[tuple[int, torch.Tensor]]:
    """On the generator's rank: BlockPipeline.iter_blocks, each block's latents also sent to `vae_rank`
    for decoding there (its serve_vae on_block consumes the frames; none come back)."""
    for _, start, x0, _ in _stream_blocks(pipeline, noise, prompt_embeds, switch_frame_indices, vae_rank, group,
                                          return_pixels=False):
        yield start, x0


def serve_vae(vae: WanVAEDecoder | StreamingVAEDecoder, *, src: int = 0, group=None,
              on_block: Callable[[VideoBlock], None] | None = None) -> VaeServeResult:
    """On the VAE's rank: decode the block stream that rank `src` sends, until it ends or aborts.

    on_block(VideoBlock) sees each block's frames as soon as they are decoded (latents on this
    rank's communication device, pixels on the VAE's device). Pixels go back to `src` when it asked
    for them (iter_video_split), not when it streams only (stream_to_vae)."""
    stream = vae if isinstance(vae, StreamingVAEDecoder) else StreamingVAEDecoder(vae)
    dec = stream.vae
    param = dec.conv2.weight
    link = _Link(group, src, "VAE rank")
    _, version, batch, channels, height, width, return_pixels = link.recv_header(START)[:7]
    ok = version == VERSION and channels == dec.z_dim
    link.send_header(READY, VERSION, dec.z_dim, int(ok))
    if version != VERSION:
        raise DistributedError(link._what(f"the generator rank speaks protocol version {version}, this rank {VERSION}"))
    if not ok:
        raise ValueError(f"the generator rank streams latents with {channels} channels; this VAE takes {dec.z_dim}")
    stream.reset()
    held: VideoBlock | None = None
    count = 0
    while True:
        link.wait_sends()  # the previous block's pixels are out: their buffer may go
        header = link.recv_header(BLOCK, END, ABORT)
        if header[0] == ABORT:
            return VaeServeResult(count, "abort")
        if header[0] == END:
            if return_pixels and held is not None:
                _send_pixels(link, held)
                link.wait_sends()
            return VaeServeResult(count, "end")
        _, index, start, frames, dtype = header[:5]
        latents = link.recv([batch, frames, channels, height, width], _DTYPES[dtype], f"block {index}'s latents")
        if return_pixels and held is not None:
            _send_pixels(link, held)
        first = stream.pixel_frames_out
        pixels = stream.decode_block(latents.to(param.device, param.dtype).permute(0, 2, 1, 3, 4))
        held = VideoBlock(index, start, latents, pixels, first)
        count += 1
        if on_block is not None:
            on_block(held)


def _send_pixels(link: _Link, blk: VideoBlock) -> None:
    _, _, frames, height, width = blk.pixels.shape
    link.send_header(PIXELS, blk.index, blk.first_pixel_frame, frames, height, width)
    link.send(blk.pixels, f"block {blk.index}'s pixels")
