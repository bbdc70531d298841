"""Where a checkpoint is: a local file or directory, or a Hugging Face repo id looked up in the
local Hugging Face cache only. Nothing here touches the network: a missing file is a
FileNotFoundError that says what was looked for and how to download it.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["WAN_BASE_FILENAME", "WAN_BASE_INDEX_FILENAME", "LONGLIVE_BASE_FILENAMES", "LONGLIVE_LORA_FILENAMES",
           "resolve_checkpoint", "resolve_first"]

WAN_BASE_FILENAME = "diffusion_pytorch_model.safetensors"
WAN_BASE_INDEX_FILENAME = "diffusion_pytorch_model.safetensors.index.json"
# Where the files sit inside a directory (or HF repo): the repo keeps them under models/.
LONGLIVE_BASE_FILENAMES = ("longlive_base.pt", "models/longlive_base.pt")
LONGLIVE_LORA_FILENAMES = ("lora.pt", "models/lora.pt")


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~")) and "\\" not in s


def resolve_checkpoint(path_or_repo: str | Path, filename: str | None = None, *,
                       cache_dir: str | Path | None = None) -> Path:
    """Find a checkpoint file or directory on this machine, without any network access.

    - An existing local path: a file is returned as is (if `filename` is given it must be that
      file's name); a directory is returned as is, or `directory / filename` when `filename` is given.
    - Otherwise `path_or_repo` is taken as a Hugging Face repo id (``"org/name"``) and looked up in the
      local Hugging Face cache (`cache_dir`, default the standard hub cache) at revision ``main``:
      with `filename`, that file of the cached snapshot (``huggingface_hub.try_to_load_from_cache``);
      without it, the snapshot directory (``snapshot_download(local_files_only=True)``).

    Raises FileNotFoundError naming what was looked for (path, repo id, file name, cache dir) when
    nothing is found; it never downloads.
    """
    raw = str(path_or_repo)
    p = Path(raw).expanduser()
    if p.exists():
        if p.is_dir():
            if filename is None:
                return p
            target = p / filename
            if target.exists():
                return target
            raise FileNotFoundError(f"checkpoint file {filename!r} not found in directory {str(p)!r}")
        if filename is not None and p.name != Path(filename).name:
            raise FileNotFoundError(f"asked for {filename!r} but {str(p)!r} is a different file")
        return p
    if not _looks_like_repo_id(raw):
        what = f"{raw!r}" if filename is None else f"{filename!r} in {raw!r}"
        raise FileNotFoundError(f"checkpoint {what} not found: no such local path, and not a Hugging Face "
                                f"repo id ('org/name')")

    import huggingface_hub  # lazy: importing this module has no side effects
    from huggingface_hub import constants as hf_constants

    where = f"Hugging Face cache {str(cache_dir if cache_dir is not None else hf_constants.HF_HUB_CACHE)!r}"
    if filename is not None:
        found = huggingface_hub.try_to_load_from_cache(raw, filename, cache_dir=cache_dir)
        if isinstance(found, str) and Path(found).exists():
            return Path(found)
        raise FileNotFoundError(
            f"checkpoint file {filename!r} of repo {raw!r} not found locally (no local path {raw!r}; not in the "
            f"{where}); download it first, e.g. `huggingface-cli download {raw} {filename}`")
    try:
        snap = huggingface_hub.snapshot_download(raw, cache_dir=cache_dir, local_files_only=True)
    except (FileNotFoundError, OSError, ValueError) as e:  # LocalEntryNotFoundError is a FileNotFoundError
        raise FileNotFoundError(
            f"repo {raw!r} not found locally (no local path {raw!r}; no snapshot in the {where}); "
            f"download it first, e.g. `huggingface-cli download {raw}`") from e
    return Path(snap)


def resolve_first(path_or_repo: str | Path, candidates: Iterable[str], *,
                  cache_dir: str | Path | None) -> Path:
    """A local file as is; else the first of `candidates` inside a directory or a cached repo."""
    candidates = tuple(candidates)
    p = Path(str(path_or_repo)).expanduser()
    if p.is_file():
        return p
    for name in candidates:
        try:
            return resolve_checkpoint(path_or_repo, name, cache_dir=cache_dir)
        except FileNotFoundError:
            continue
    fetch = ""
    if not p.exists() and _looks_like_repo_id(str(path_or_repo)):
        fetch = (f"; to fetch it from the Hugging Face Hub: `huggingface-cli download {path_or_repo} {candidates[0]}` "
                 "(this loader never downloads)")
    raise FileNotFoundError(f"no checkpoint found at {str(path_or_repo)!r}: looked for a file there, or "
                            f"one of {list(candidates)} inside it (local directory or Hugging Face cache"
                            f"{'' if cache_dir is None else ' ' + repr(str(cache_dir))}){fetch}")
