"""Named shapes of the LongLive 2.0 generator (Wan2.2-TI2V-5B based) and the inference settings that go with them.

`longlive2-5b` is LongLive 2.0 at its real sizes and its `configs/inference.yaml`: 1280x704 video (a 44x80
latent, 880 tokens per latent frame after the (1, 2, 2) patch), 8 latent frames per block, a 32-frame
window with an 8-frame sink, the multi-shot sink on and a shot RoPE offset of 8 frames, 4 sampling steps
at shift 5. `tiny2` keeps that temporal structure (8-frame blocks, 32-frame window, 8-frame sink, the
multi-shot rules, 48 latent channels) with small widths and an 8-token frame, so CPU tests exercise every
cache rule, scene cuts included, in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from longlive_triton.models.longlive2.model import CausalWanModel
from longlive_triton.models.preset_base import PresetShape, build_reference, lookup

__all__ = ["Longlive2Preset", "PRESETS", "get_preset", "build_model"]


@dataclass(frozen=True)
class Longlive2Preset(PresetShape):
    in_dim: int = 48
    out_dim: int = 48
    model_type: str = "ti2v"
    latent_height: int = 44          # latent rows per frame (pixels / 16)
    latent_width: int = 80           # latent columns per frame
    # Inference settings (configs/inference.yaml): the pipeline sets them on the model at run time.
    num_frame_per_block: int = 8
    local_attn_size: int = 32
    sink_size: int = 8
    multi_shot_sink: bool = True
    multi_shot_rope_offset: float = 8.0
    sampling_steps: int = 4
    timestep_shift: float = 5.0

    family = "longlive2"

    def model_kwargs(self) -> dict:
        """The generator's constructor arguments, as LongLive 2.0's wrapper builds it (sink 0 at build time:
        its pipeline sets the sink on the attention modules when inference starts)."""
        return dict(model_type=self.model_type, patch_size=(1, 2, 2), text_len=self.text_len, in_dim=self.in_dim,
                    dim=self.dim, ffn_dim=self.ffn_dim, freq_dim=self.freq_dim, text_dim=self.text_dim,
                    out_dim=self.out_dim, num_heads=self.num_heads, num_layers=self.num_layers,
                    local_attn_size=self.local_attn_size, sink_size=0,
                    num_frame_per_block=self.num_frame_per_block, qk_norm=True, cross_attn_norm=True, eps=1e-6)


PRESETS: dict[str, Longlive2Preset] = {
    "longlive2-5b": Longlive2Preset(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, text_dim=4096,
                                    text_len=512, freq_dim=256),
    "tiny2": Longlive2Preset(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=48, text_len=16,
                             freq_dim=32, latent_height=4, latent_width=8),
}


def get_preset(name: str) -> Longlive2Preset:
    return lookup(PRESETS, name, "LongLive 2.0 model preset")


def build_model(preset: str = "tiny2", *, dtype: torch.dtype = torch.float32, device="cpu", seed: int | None = 0,
                **overrides) -> CausalWanModel:
    """A LongLive 2.0 reference generator at a named preset, with synthetic weights (seed=None: stock init).

    Constructor arguments can be overridden by name.
    """
    return build_reference(CausalWanModel, get_preset(preset).model_kwargs(), overrides, dtype=dtype, device=device,
                           seed=seed)
