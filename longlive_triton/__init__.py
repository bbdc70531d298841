"""longlive-triton: Triton kernels and a one-line patcher for faster LongLive inference.

    from longlive_triton import patch_model, patch_vae
    report = patch_model(model)          # model: LongLive's CausalWanModel (peft-wrapped or not)
    print(patch_vae(vae))                # the Wan2.1 VAE: stock WanVAE_ or our reference decoder
"""
from .config import PatchConfig, load_preset
from .patch import PatchReport, patch_model
from .vae_patch import VAEPatchReport, patch_vae

__all__ = ["PatchConfig", "PatchReport", "VAEPatchReport", "load_preset", "patch_model", "patch_vae"]
