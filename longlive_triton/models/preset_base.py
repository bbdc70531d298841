"""What the reference generators' presets share, whatever the family: the shape fields, the lookup by
name, seeded synthetic weights and the builder. Each family's presets.py adds its own fields and table."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["PresetShape", "lookup", "synthetic_init_", "build_reference"]


@dataclass(frozen=True)
class PresetShape:
    """The transformer's sizes. A family's preset subclasses it and adds latent_height, latent_width."""
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    text_dim: int
    text_len: int
    freq_dim: int

    @property
    def frame_seqlen(self) -> int:
        """Tokens per latent frame after the (1, 2, 2) patch."""
        return (self.latent_height // 2) * (self.latent_width // 2)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


def lookup(presets: dict, name: str, what: str):
    """presets[name], or a ValueError naming `what` was asked for and what is known."""
    try:
        return presets[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known: {sorted(presets)}") from None


@torch.no_grad()
def synthetic_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights that give a non-degenerate output (any family: the parameter names are the same).

    Xavier-scaled normal weights (std 0.02 for the text and time embeddings, as the stock init),
    modulation tables as the stock init, and, unlike it, a random output head (the stock init
    zeroes it, so the model would predict zeros), small random biases and norm weights near one,
    so that every parameter the kernels read carries signal. Drawn from a private generator on the
    model's device: the same seed gives the same weights on one device kind.
    """
    device = model.patch_embedding.weight.device
    gen = torch.Generator(device).manual_seed(seed)

    def randn(shape) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    def draw(p: torch.Tensor, std: float) -> None:
        p.copy_(randn(p.shape) * std)

    for name, p in model.named_parameters():
        if name.endswith("modulation"):
            draw(p, p.shape[-1] ** -0.5)
        elif name.endswith(".bias"):
            draw(p, 0.02)
        elif "norm" in name:  # RMSNorm / affine LayerNorm weights around one
            p.copy_(1.0 + randn(p.shape) * 0.1)
        elif p.dim() >= 2:
            fan_out, fan_in = p.shape[0], p[0].numel()
            std = 0.02 if name.startswith(("text_embedding", "time_embedding")) else (2.0 / (fan_in + fan_out)) ** 0.5
            draw(p, std)
        else:
            raise AssertionError(f"synthetic init does not know parameter {name}")
    return model


def build_reference(model_cls: type[nn.Module], model_kwargs: dict, overrides: dict, *, dtype: torch.dtype,
                    device, seed: int | None) -> nn.Module:
    """model_cls(**model_kwargs updated by overrides) with synthetic weights (seed=None: the stock init),
    in `dtype`, eval mode, no grad. An override that is not a constructor argument is refused."""
    unknown = set(overrides) - set(model_kwargs)
    if unknown:
        raise ValueError(f"unknown model arguments {sorted(unknown)}")
    # Built on the target device: at real shapes the initialisation is billions of draws.
    with torch.device(device):
        model = model_cls(**{**model_kwargs, **overrides})
    if seed is not None:
        synthetic_init_(model, seed)
    return model.to(dtype=dtype).eval().requires_grad_(False)
