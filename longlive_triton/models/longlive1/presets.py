"""Named model shapes of the LongLive v1.0 reference generator.

`longlive-1.3b` is LongLive-1.3B at its real shapes (Wan2.1-T2V-1.3B with a 12-frame window and a
3-frame sink); `tiny` keeps LongLive's temporal structure (3-frame blocks, 12-frame window, 3-frame
sink, fractional timesteps) with small widths and an 8-token frame, so CPU tests exercise every
cache rule in seconds. The seeded synthetic weights are `longlive_triton.models.preset_base`'s.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from longlive_triton.models.longlive1.model import CausalWanModel
from longlive_triton.models.preset_base import PresetShape, build_reference, lookup


@dataclass(frozen=True)
class ModelPreset(PresetShape):
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


PRESETS: dict[str, ModelPreset] = {
    "longlive-1.3b": ModelPreset(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096,
                                 text_len=512, freq_dim=256),
    "tiny": ModelPreset(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=48, text_len=16,
                        freq_dim=32, latent_height=4, latent_width=8),
}


def get_preset(name: str) -> ModelPreset:
    return lookup(PRESETS, name, "model preset")


def build_model(preset: str = "tiny", *, dtype: torch.dtype = torch.float32, device="cpu", seed: int | None = 0,
                **overrides) -> CausalWanModel:
    """A reference generator at a named preset, with synthetic weights (seed=None: stock init)."""
    cfg = get_preset(preset)
    model = build_reference(CausalWanModel, cfg.model_kwargs(), overrides, dtype=dtype, device=device, seed=seed)
    model.num_frame_per_block = cfg.num_frame_per_block
    return model
