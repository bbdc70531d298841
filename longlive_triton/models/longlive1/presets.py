"""Named model shapes and a seeded synthetic initialisation for the reference generator.

`longlive-1.3b` is LongLive-1.3B at its real shapes (Wan2.1-T2V-1.3B with a 12-frame window and a
3-frame sink); `tiny` keeps LongLive's temporal structure (3-frame blocks, 12-frame window, 3-frame
sink, fractional timesteps) with small widths and an 8-token frame, so CPU tests exercise every
cache rule in seconds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from longlive_triton.models.longlive1.model import CausalWanModel


@dataclass(frozen=True)
class ModelPreset:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    text_dim: int
    text_len: int
    freq_dim: int
    in_dim: int = 16
    out_dim: int = 16
    local_attn_size: int = 12
    sink_size: int = 3
    latent_height: int = 60          # latent rows per frame (pixels / 8)
    latent_width: int = 104          # latent columns per frame
    num_frame_per_block: int = 3

    family = "longlive1"

    def model_kwargs(self) -> dict:
        kw = asdict(self)
        for key in ("latent_height", "latent_width", "num_frame_per_block"):
            kw.pop(key)
        return kw

    @property
    def frame_seqlen(self) -> int:
        """Tokens per latent frame after the (1, 2, 2) patch."""
        return (self.latent_height // 2) * (self.latent_width // 2)


PRESETS: dict[str, ModelPreset] = {
    "longlive-1.3b": ModelPreset(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096,
                                 text_len=512, freq_dim=256),
    "tiny": ModelPreset(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=48, text_len=16,
                        freq_dim=32, latent_height=4, latent_width=8),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None


@torch.no_grad()
def synthetic_init_(model: CausalWanModel, seed: int = 0) -> CausalWanModel:
    """Seeded random weights that give a non-degenerate output.

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


def build_model(preset: str = "tiny", *, dtype: torch.dtype = torch.float32, device="cpu", seed: int | None = 0,
                **overrides) -> CausalWanModel:
    """A reference generator at a named preset, with synthetic weights (seed=None: stock init)."""
    cfg = get_preset(preset)
    kwargs = cfg.model_kwargs()
    unknown = set(overrides) - set(kwargs)
    if unknown:
        raise ValueError(f"unknown model arguments {sorted(unknown)}")
    kwargs.update(overrides)
    # Built on the target device: at 1.3B shapes the initialisation is 1.4e9 draws.
    with torch.device(device):
        model = CausalWanModel(**kwargs)
    if seed is not None:
        synthetic_init_(model, seed)
    model.num_frame_per_block = cfg.num_frame_per_block
    return model.to(dtype=dtype).eval().requires_grad_(False)
