"""longlive-triton: Triton kernels and a one-line patcher for faster LongLive inference.

    from longlive_triton import patch_model
    report = patch_model(model)          # model: LongLive's CausalWanModel (peft-wrapped or not)
"""
from .config import PatchConfig, load_preset
from .patch import PatchReport, patch_model

__all__ = ["PatchConfig", "PatchReport", "load_preset", "patch_model"]
