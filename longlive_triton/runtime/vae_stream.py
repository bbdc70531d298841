"""Streaming VAE decode: latent blocks in, pixel frames out, the causal feature cache carried across calls.

    from longlive_triton.models.wan21_vae import build_vae_decoder
    from longlive_triton.runtime.vae_stream import StreamingVAEDecoder
    dec = StreamingVAEDecoder(build_vae_decoder("tiny"))
    frames = [dec.decode_block(z[:, :, i:i + 3]) for i in range(0, F, 3)]   # z [B, 16, F, H, W]
    torch.cat(frames, dim=2) == vae.decode(z)                                 # [B, 3, 4F-3, 8H, 8W]

This is what the stock `WanVAE_.cached_decode` does when called block by block (LongLive's
`decode_to_pixel(..., use_cache=True)`): un-normalise, `conv2`, then the decoder one latent frame at a
time with a feature cache that persists until `reset()`. Frame for frame the same operations run as in
the whole-clip `decode`, so the concatenated blocks equal it. The first block of a stream gives
4T-3 frames (its first latent frame gives one), every later block 4T.
"""
from __future__ import annotations

import torch

from longlive_triton.models.wan21_vae import FeatCache, WanVAEDecoder

__all__ = ["StreamingVAEDecoder"]


class StreamingVAEDecoder:
    """Decodes consecutive latent blocks of one video (or one batch of videos) as one causal stream."""

    def __init__(self, vae: WanVAEDecoder):
        if not isinstance(vae, WanVAEDecoder):
            raise TypeError(f"StreamingVAEDecoder wraps a WanVAEDecoder, got {type(vae).__name__}")
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Start a new stream: empty cache, no frames seen."""
        self._cache: FeatCache = self.vae.new_cache()
        self._geometry: tuple | None = None  # (B, H, W) fixed by the first block
        self.latent_frames_seen = 0
        self.pixel_frames_out = 0

    @property
    def cache(self) -> FeatCache:
        """The stream's feature cache (read it; reset() replaces it)."""
        return self._cache

    @torch.no_grad()
    def decode_block(self, z_block: torch.Tensor) -> torch.Tensor:
        """z_block [B, z_dim, T, H, W] (normalised latents, the next T frames of the stream) ->
        pixels [B, 3, T', 8H, 8W] float32 in [-1, 1], T' = 4T-3 for the first block, 4T after."""
        self.vae.check_latents(z_block, "z_block")
        b, _, t, h, w = z_block.shape
        if self._geometry is None:
            self._geometry = (b, h, w)
        elif self._geometry != (b, h, w):
            raise ValueError(f"z_block has batch/height/width {(b, h, w)} but this stream started with "
                             f"{self._geometry}; call reset() to start a new stream")
        x = self.vae.conv2(self.vae.unscale(z_block))
        out = self.vae.decode_frames(x, self._cache).float().clamp_(-1, 1)
        self.latent_frames_seen += t
        self.pixel_frames_out += out.shape[2]
        return out
