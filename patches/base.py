"""What a patch is: the Patch entry, the PatchSkip a replacement raises, the device check the
kernel patches share, and what applying patches leaves: the module swap (`set_submodule`) and the
`PatchReport` that patch_model and patch_vae return. Patch modules import this; patches/registry.py
lists them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn


class PatchSkip(Exception):
    """Raised by Patch.replace when a module cannot be patched; the message is the reason."""


def require_kernel_device(weight) -> None:
    """PatchSkip unless the Triton kernels can run where `weight` lives (CUDA, or the interpreter)."""
    from ..kernels._common import interpreting

    if weight.device.type != "cuda" and not interpreting():
        raise PatchSkip(f"the kernels need a CUDA device (or TRITON_INTERPRET=1); weights are on {weight.device}")


@dataclass(frozen=True)
class Patch:
    name: str
    matches: Callable[[nn.Module], bool]
    enabled: Callable[[object], bool]            # PatchConfig -> bool
    replace: Callable[[nn.Module, object], nn.Module]
    # What the report should say about the choices made when the patch applied (e.g. the backend).
    describe: Callable[[object], str] | None = None
    # A config rule over module paths: (path in the generator, module, PatchConfig) -> the reason to
    # leave this module as it is (it goes into the report), or None to patch it.
    keep: Callable[[str, nn.Module, object], str | None] | None = None


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` (a dotted name from root.named_modules()). nn.Module.set_submodule does
    this from torch 2.5 on; we support torch 2.4."""
    parent_path, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, leaf, module)


@dataclass
class PatchEntry:
    path: str
    patch: str
    reason: str = ""  # why a skipped module was left as it was


def _shown(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")


@dataclass
class PatchReport:
    """What patch_model or patch_vae did: each module replaced, each left as it was (and why), notes.
    `title` heads the printed report; `config` is what was applied (PatchConfig, VAEDecoderOptions)."""
    title: str
    config: object = None
    family: str = ""   # patch_model: the model family patched (patches/families.py)
    applied: list[PatchEntry] = field(default_factory=list)
    skipped: list[PatchEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for kind, entries in (("applied", self.applied), ("skipped", self.skipped)):
            for e in entries:
                out.setdefault(e.patch, {"applied": 0, "skipped": 0})[kind] += 1
        return out

    def __str__(self) -> str:
        lines = [f"longlive-triton {self.title}"]
        lines += [f"  note: {n}" for n in self.notes]
        for name, c in self.counts().items():
            at = _shown([e.path for e in self.applied if e.patch == name])
            lines.append(f"  {name}: {c['applied']} applied, {c['skipped']} skipped" + (f" (applied at {at})" if at else ""))
        reasons: dict[tuple[str, str], list[str]] = {}
        for e in self.skipped:
            reasons.setdefault((e.patch, e.reason), []).append(e.path)
        for (name, reason), paths in reasons.items():
            lines.append(f"  skipped {name} at {_shown(paths)}: {reason}")
        if not self.applied and not self.skipped:
            lines.append("  no module patched")
        return "\n".join(lines)
