"""longlive-triton: Triton kernels and a one-line patcher for faster LongLive inference.

    from longlive_triton import patch_model, patch_vae, warmup
    report = patch_model(model)          # model: LongLive's CausalWanModel (peft-wrapped or not)
    print(warmup(model))                 # optional: compile and tune every shape of a run before it starts
    print(patch_vae(vae))                # the Wan2.1 VAE: stock WanVAE_ or our reference decoder

The names below load on first use, so that importing a submodule (the `longlive-triton` command
among them) does not import Triton: on a machine without a GPU the command first chooses Triton's
CPU interpreter, which has to happen before any kernel is defined.
"""
from importlib import import_module

_EXPORTS = {
    "PatchConfig": ".config", "load_preset": ".config",
    "PatchReport": ".patch", "patch_model": ".patch",
    "VAEPatchReport": ".vae_patch", "patch_vae": ".vae_patch",
    "WarmupReport": ".runtime.warmup", "warmup": ".runtime.warmup",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
