"""Where the real LongLive-1.3B files are: find every one locally, or say what is missing and how to get it.

LongLive's README has users download two folders:

    huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B
    huggingface-cli download Efficient-Large-Model/LongLive-1.3B --local-dir longlive_models

`--wan` and `--longlive` name those folders (or the repo ids, found in the local Hugging Face cache;
nothing is ever downloaded). Each file can also be given on its own (`--base`, `--generator`,
`--lora`, `--vae`, `--text-encoder`, `--tokenizer`). `locate_weights` checks them all first and
raises one `MissingWeightsError` that lists everything missing, each with the command that gets it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from longlive_triton.loading.files import (LONGLIVE_BASE_FILENAMES, LONGLIVE_LORA_FILENAMES, WAN_BASE_FILENAME,
                               WAN_BASE_INDEX_FILENAME, resolve_checkpoint)

__all__ = ["MissingWeightsError", "WeightFiles", "locate_weights", "WAN_REPO", "LONGLIVE_REPO"]

WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B"
LONGLIVE_REPO = "Efficient-Large-Model/LongLive-1.3B"
WAN_VAE_FILENAME = "Wan2.1_VAE.pth"
WAN_T5_FILENAME = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"
WAN_CONFIG_FILENAME = "config.json"

_GET_WAN = (f"huggingface-cli download {WAN_REPO} --local-dir wan_models/Wan2.1-T2V-1.3B, "
            f"then --wan wan_models/Wan2.1-T2V-1.3B")
_GET_LONGLIVE = f"huggingface-cli download {LONGLIVE_REPO} --local-dir longlive_models, then --longlive longlive_models"


class MissingWeightsError(FileNotFoundError):
    """One or more checkpoint files are not on this machine (the message lists each, and how to get it)."""


@dataclass(frozen=True)
class WeightFiles:
    base: Path                   # Wan2.1 diffusion_pytorch_model.safetensors (or its index)
    generator: Path              # LongLive longlive_base.pt
    lora: Path | None            # LongLive lora.pt (None: run without the adapter)
    vae: Path                    # Wan2.1_VAE.pth
    config: Path | None          # Wan2.1 config.json (model sizes), if present
    text_encoder: Path | None    # umT5-XXL encoder weights (None: embeddings come from a file)
    tokenizer: Path | None       # the umT5 tokenizer folder


def _root(flag: str, value: str | None, problems: list[str]) -> Path | None:
    if value is None:
        return None
    try:
        return resolve_checkpoint(value)
    except FileNotFoundError as e:
        problems.append(f"{flag} {value!r}: {e}")
        return None


def _find(what: str, flag: str, explicit: str | None, root: Path | None, root_flag: str,
          names: tuple[str, ...], how: str, problems: list[str]) -> Path | None:
    """An explicit path (it must exist), else the first of `names` under `root`, else a problem."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.exists():
            return path
        problems.append(f"{what}: {flag} {explicit!r} does not exist")
        return None
    if root is not None:
        for name in names:
            if (root / name).exists():
                return root / name
        problems.append(f"{what}: none of {list(names)} in {root_flag} {str(root)!r} (get it: {how}; or pass {flag})")
        return None
    problems.append(f"{what}: not given (pass {root_flag} or {flag}; get it: {how})")
    return None


def locate_weights(*, wan: str | None = None, longlive: str | None = None, base: str | None = None,
                   generator: str | None = None, lora: str | None = None, vae: str | None = None,
                   text_encoder: str | None = None, tokenizer: str | None = None,
                   need_text_encoder: bool = True) -> WeightFiles:
    """Every file the real-weights run reads, or one MissingWeightsError naming all that is missing.

    `lora="none"` runs without the LoRA adapter; `need_text_encoder=False` (precomputed embeddings)
    skips the text encoder and tokenizer.
    """
    problems: list[str] = []
    wan_root = _root("--wan", wan, problems)
    ll_root = _root("--longlive", longlive, problems)
    found = {
        "base": _find("Wan2.1 base weights", "--base", base, wan_root, "--wan",
                      (WAN_BASE_FILENAME, WAN_BASE_INDEX_FILENAME), _GET_WAN, problems),
        "vae": _find("Wan2.1 VAE", "--vae", vae, wan_root, "--wan", (WAN_VAE_FILENAME,), _GET_WAN, problems),
        "generator": _find("LongLive generator", "--generator", generator, ll_root, "--longlive",
                           LONGLIVE_BASE_FILENAMES, _GET_LONGLIVE, problems),
    }
    found["lora"] = None if lora == "none" else _find(
        "LongLive LoRA", "--lora", lora, ll_root, "--longlive", LONGLIVE_LORA_FILENAMES,
        _GET_LONGLIVE + "; or --lora none to run without it", problems)
    found["text_encoder"] = found["tokenizer"] = None
    if need_text_encoder:
        found["text_encoder"] = _find("umT5-XXL text encoder", "--text-encoder", text_encoder, wan_root, "--wan",
                                      (WAN_T5_FILENAME,), _GET_WAN + "; or pass --embeddings FILE", problems)
        found["tokenizer"] = _find("umT5 tokenizer", "--tokenizer", tokenizer, wan_root, "--wan",
                                   (WAN_TOKENIZER_DIR,), _GET_WAN, problems)
    if problems:
        raise MissingWeightsError("the real-weights run cannot start; missing:\n  - " + "\n  - ".join(problems)
                                  + "\n(nothing is downloaded; run without any weight option for the embedded "
                                    "random-weights demo)")
    config = wan_root / WAN_CONFIG_FILENAME if wan_root is not None else None
    return WeightFiles(config=config if config is not None and config.is_file() else None, **found)
