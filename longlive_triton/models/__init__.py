"""Faithful references of the stock LongLive v1.0 inference path (what our kernels are judged against)."""
from longlive_triton.models.longlive1.model import (CausalHead, CausalWanAttentionBlock, CausalWanModel, CausalWanSelfAttention,
                    WanLayerNorm, WanRMSNorm, WanT2VCrossAttention)
from longlive_triton.models.longlive1.presets import PRESETS, ModelPreset, build_model, get_preset, synthetic_init_

__all__ = [
    "CausalHead", "CausalWanAttentionBlock", "CausalWanModel", "CausalWanSelfAttention", "WanLayerNorm",
    "WanRMSNorm", "WanT2VCrossAttention", "PRESETS", "ModelPreset", "build_model", "get_preset",
    "synthetic_init_",
]
