"""Writing frames to an H.264 mp4 as they come, through imageio-ffmpeg (which ships its own ffmpeg).

    check_output_path("video.mp4")               # before any work: a clear error if it cannot be written
    with Mp4Writer("video.mp4", width=832, height=480, fps=16, comment="...") as out:
        out.write(frames)                        # uint8 [T, H, W, 3], as each block is decoded

`to_uint8` turns the VAE's pixels into frames the way LongLive's inference scripts do:
(x * 0.5 + 0.5).clamp(0, 1) * 255, truncated to uint8.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["OutputError", "MissingWriterError", "check_output_path", "require_writer", "to_uint8", "Mp4Writer",
           "read_mp4"]


class OutputError(ValueError):
    """The output video cannot be written where asked."""


class MissingWriterError(ImportError):
    """imageio-ffmpeg is not installed."""


def require_writer():
    try:
        import imageio_ffmpeg
    except ImportError:
        raise MissingWriterError("writing mp4 needs imageio-ffmpeg (it bundles ffmpeg): "
                                 "pip install 'longlive-triton[app]' or pip install imageio-ffmpeg") from None
    return imageio_ffmpeg


def check_output_path(path: str | os.PathLike) -> Path:
    """The output path, if a video can be written there: an .mp4 in an existing, writable folder."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".mp4":
        raise OutputError(f"--output {str(path)!r}: the video is written as H.264 mp4; give a name ending in .mp4")
    if path.is_dir():
        raise OutputError(f"--output {str(path)!r} is a directory; give a file name ending in .mp4")
    if not path.parent.is_dir():
        raise OutputError(f"--output {str(path)!r}: folder {str(path.parent)!r} does not exist")
    existed = path.exists()
    try:  # the one sure test, whoever runs it (root passes every permission check) and wherever
        with open(path, "ab"):
            pass
    except OSError as e:
        raise OutputError(f"--output {str(path)!r} cannot be written ({e.strerror})") from None
    if not existed:
        path.unlink()
    return path


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] (one video of a VideoBlock's pixels) -> uint8 [T, H, W, 3]."""
    frames = ((pixels.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous().cpu().numpy()


class Mp4Writer:
    """Streams uint8 RGB frames into ffmpeg (libx264, yuv420p: what every player takes)."""

    def __init__(self, path: str | os.PathLike, *, width: int, height: int, fps: float = 16.0, comment: str = ""):
        ffmpeg = require_writer()
        if width % 2 or height % 2:
            raise OutputError(f"H.264 in yuv420p needs even frame sizes, got {width}x{height}")
        self.path, self.size, self.frames = Path(path), (width, height), 0
        params = ["-metadata", f"comment={comment}"] if comment else []
        self._gen = ffmpeg.write_frames(str(self.path), self.size, fps=fps, codec="libx264", pix_fmt_in="rgb24",
                                        pix_fmt_out="yuv420p", macro_block_size=1, quality=8,
                                        output_params=params, ffmpeg_log_level="error")
        self._gen.send(None)  # starts ffmpeg

    def write(self, frames: np.ndarray) -> None:
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.size[1], self.size[0], 3):
            raise ValueError(f"frames must be uint8 [T, {self.size[1]}, {self.size[0]}, 3], "
                             f"got {frames.dtype} {list(frames.shape)}")
        for frame in frames:
            self._gen.send(np.ascontiguousarray(frame))
        self.frames += len(frames)

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_mp4(path: str | os.PathLike) -> tuple[dict, np.ndarray]:
    """(ffmpeg's metadata, frames uint8 [T, H, W, 3]) of a video: reading back what was written."""
    reader = require_writer().read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(h, w, 3) for f in reader]
    return meta, np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)
