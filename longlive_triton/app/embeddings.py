"""Prompt embeddings for the generator: [1, L, text_dim] per prompt, L <= text_len.

Two sources live here; the third, the stock umT5-XXL encoder, is in `stock_text.py`:

- `HashedPromptEmbeddings`: for the embedded default (random weights), embeddings drawn from a
  generator seeded by a hash of the prompt text. The same text always gives the same tensor and
  different texts give different ones, so prompt switches change the video, but the numbers
  carry no meaning: there is no text encoder behind them.
- `load_embeddings_file`: precomputed embeddings, [N, L, text_dim] for N prompt segments, from a
  torch file (a tensor, or a dict with `prompt_embeds`), a safetensors file (`prompt_embeds`, or its
  only tensor) or a numpy `.npy`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, Sequence

import torch

__all__ = ["EmbeddingsError", "PromptEncoder", "HashedPromptEmbeddings", "load_embeddings_file"]


class EmbeddingsError(ValueError):
    """A precomputed embeddings file that the generator cannot take."""


class PromptEncoder(Protocol):
    label: str

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """One [1, L, text_dim] tensor per text, on the generator's device and in its dtype."""


class HashedPromptEmbeddings:
    """Deterministic stand-in embeddings: one token row per word plus an end token, zero padding after.

    The row count and the zero padding mimic what the T5 encoder hands LongLive (padding rows are
    zeroed there too); the scale is that of a unit normal times `scale`.
    """

    label = "prompt embeddings derived from a hash of the prompt text (no text encoder)"

    def __init__(self, text_len: int, text_dim: int, *, device, dtype: torch.dtype, scale: float = 0.5):
        self.text_len, self.text_dim = text_len, text_dim
        self.device, self.dtype, self.scale = torch.device(device), dtype, scale

    def _one(self, text: str) -> torch.Tensor:
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        tokens = min(len(text.split()) + 1, self.text_len)
        out = torch.zeros(1, self.text_len, self.text_dim)
        out[0, :tokens] = torch.randn(tokens, self.text_dim, generator=gen) * self.scale
        return out.to(self.device, self.dtype)

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        return [self._one(t) for t in texts]


def _read_tensor(path: Path) -> torch.Tensor:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "prompt_embeds" in tensors:
            return tensors["prompt_embeds"]
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise EmbeddingsError(f"{path}: holds {sorted(tensors)}; expected one tensor or one named 'prompt_embeds'")
    if suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path, allow_pickle=False))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise EmbeddingsError(f"{path}: not a torch file of embeddings ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict):
        obj = obj.get("prompt_embeds")
    if not isinstance(obj, torch.Tensor):
        raise EmbeddingsError(f"{path}: expected a tensor (or a dict with 'prompt_embeds'), got {type(obj).__name__}")
    return obj


def load_embeddings_file(path: str | Path, *, text_len: int, text_dim: int, device,
                         dtype: torch.dtype) -> list[torch.Tensor]:
    """[N, L, text_dim] (or [L, text_dim] for one prompt) -> N tensors [1, L, text_dim] on `device`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EmbeddingsError(f"embeddings file {str(path)!r} does not exist")
    t = _read_tensor(path)
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] < 1:
        raise EmbeddingsError(f"{path}: embeddings must be [N, L, {text_dim}] (N prompts), got {list(t.shape)}")
    if t.shape[2] != text_dim:
        raise EmbeddingsError(f"{path}: embeddings are {t.shape[2]} wide, the generator takes {text_dim} "
                              f"(its text_dim; LongLive's umT5-XXL gives 4096)")
    if t.shape[1] > text_len:
        raise EmbeddingsError(f"{path}: {t.shape[1]} tokens per prompt, more than the generator's text_len {text_len}")
    if not t.is_floating_point() or not torch.isfinite(t).all():
        raise EmbeddingsError(f"{path}: embeddings must be finite floating-point numbers ({t.dtype})")
    return [row.unsqueeze(0).to(device, dtype) for row in t]
