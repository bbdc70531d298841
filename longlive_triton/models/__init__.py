"""Faithful references of the stock LongLive generators (what our kernels are judged against), by family.

`longlive1/`: LongLive v1.0 (LongLive-1.3B, Wan2.1-T2V-1.3B), presets `longlive-1.3b`, `tiny`.
`longlive2/`: LongLive 2.0 (Wan2.2-TI2V-5B based), presets `longlive2-5b`, `tiny2`.
`get_preset` and `build_model` take a preset name of either family; a preset's `family` says which.
The classes exported here by name are v1.0's; 2.0's are in `longlive_triton.models.longlive2.model`.
"""
from longlive_triton.models.longlive1.model import (CausalHead, CausalWanAttentionBlock, CausalWanModel, CausalWanSelfAttention,
                    WanLayerNorm, WanRMSNorm, WanT2VCrossAttention)
from longlive_triton.models.longlive1.presets import PRESETS as PRESETS_V1
from longlive_triton.models.longlive1.presets import ModelPreset
from longlive_triton.models.longlive2.presets import PRESETS as PRESETS_V2
from longlive_triton.models.longlive2.presets import Longlive2Preset
from longlive_triton.models.preset_base import lookup, synthetic_init_

__all__ = [
    "CausalHead", "CausalWanAttentionBlock", "CausalWanModel", "CausalWanSelfAttention", "WanLayerNorm",
    "WanRMSNorm", "WanT2VCrossAttention", "PRESETS", "ModelPreset", "Longlive2Preset", "build_model", "get_preset",
    "synthetic_init_",
]

PRESETS: dict = {**PRESETS_V1, **PRESETS_V2}


def get_preset(name: str) -> ModelPreset | Longlive2Preset:
    """The preset named `name`, of either family (its `family` attribute: "longlive1" or "longlive2")."""
    return lookup(PRESETS, name, "model preset")


def build_model(preset: str = "tiny", **kwargs):
    """The reference generator of `preset`'s family with synthetic weights (see each family's `build_model`)."""
    if get_preset(preset).family == "longlive2":
        from longlive_triton.models.longlive2.presets import build_model as build
    else:
        from longlive_triton.models.longlive1.presets import build_model as build
    return build(preset, **kwargs)
