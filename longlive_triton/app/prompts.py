"""Prompts with switch points, as LongLive's interactive inference takes them.

A video is one or more prompt segments; segment i+1 starts at latent frame `switch_frames[i]`
(LongLive's `switch_frame_indices`; the switch happens at the first block starting at or after it).
Three ways to give them:

- the command line: `--prompt "a cat" --switch 40:"a dog" --switch 80:"a bird"`;
- LongLive's prompt file (`example/interactive_example.jsonl`): one JSON object per line,
  `{"prompts": ["...", "..."]}`, every line one video; the switch frames come separately;
- a YAML file: LongLive's interactive config (`configs/longlive_interactive_inference.yaml`:
  `data_path` names the JSONL, `switch_frame_indices` the frames, `num_output_frames` and `seed`
  are taken too; its other keys are LongLive's and are ignored), or the same keys with the prompts
  inline: `prompts: [...]`.

Every problem with a file is one `PromptError` that names the file, the line or key, and what
was expected.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ["PromptError", "PromptSchedule", "from_command_line", "load_prompt_file", "parse_switch_frames"]


class PromptError(ValueError):
    """The prompts or their switch points are not usable (a file, a line, a switch spec)."""


@dataclass(frozen=True)
class PromptSchedule:
    texts: tuple[str, ...]              # one prompt per segment
    switch_frames: tuple[int, ...]      # latent frame where each next segment starts
    num_frames: int | None = None       # latent frames, when the file says (num_output_frames)
    seed: int | None = None             # when the file says
    source: str = "command line"

    def __post_init__(self):
        if not self.texts:
            raise PromptError(f"{self.source}: no prompt given")
        for i, text in enumerate(self.texts):
            if not isinstance(text, str) or not text.strip():
                raise PromptError(f"{self.source}: prompt {i} is {text!r}; every prompt must be non-empty text")
        _check_switches(self.switch_frames, len(self.texts), self.source)

    def effective_switches(self, frames_per_block: int) -> list[int]:
        """The latent frames where each switch really happens: the next block boundary."""
        return [-(-s // frames_per_block) * frames_per_block for s in self.switch_frames]

    def check_length(self, num_frames: int, frames_per_block: int) -> None:
        """Refuse a switch that would never happen inside a video of `num_frames` latent frames."""
        late = [s for s, e in zip(self.switch_frames, self.effective_switches(frames_per_block)) if e >= num_frames]
        if late:
            raise PromptError(f"{self.source}: switch frame(s) {late} fall at or after the end of the video "
                              f"({num_frames} latent frames): those prompts would never be shown")


def _check_switches(switches: Sequence[int], num_prompts: int, source: str) -> None:
    if len(switches) != num_prompts - 1:
        raise PromptError(f"{source}: {num_prompts} prompt(s) need {num_prompts - 1} switch frame(s) "
                          f"(LongLive's switch_frame_indices), got {len(switches)}: {list(switches)}")
    if any(not isinstance(s, int) or s <= 0 for s in switches) or list(switches) != sorted(set(switches)):
        raise PromptError(f"{source}: switch frames must be positive, increasing latent frame indices, "
                          f"got {list(switches)}")


def parse_switch_frames(value: Any, source: str = "--switch-frames") -> tuple[int, ...]:
    """LongLive's `switch_frame_indices`: an int, a list of ints, or a string "40, 80, 120"."""
    if isinstance(value, bool):
        raise PromptError(f"{source}: expected latent frame indices, got {value!r}")
    if isinstance(value, int):
        return (value,)
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise PromptError(f"{source}: expected latent frame indices like '40, 80', got {value!r}")
    out = []
    for item in items:
        item = str(item).strip()
        try:
            out.append(int(item))
        except ValueError:
            raise PromptError(f"{source}: {item!r} is not a latent frame index (in {value!r})") from None
    return tuple(out)


def from_command_line(prompt: str | None, switches: Sequence[str] = ()) -> PromptSchedule:
    """`--prompt TEXT` and `--switch FRAME:TEXT` (repeatable, in any order)."""
    if prompt is None:
        raise PromptError("give a prompt (--prompt TEXT) or a prompt file (--prompts FILE)")
    segments = []
    for spec in switches:
        frame, sep, text = spec.partition(":")
        try:
            index = int(frame.strip())
        except ValueError:
            index = None
        if not sep or index is None or not text.strip():
            raise PromptError(f"--switch {spec!r}: expected FRAME:PROMPT, e.g. --switch 40:\"a dog runs\"")
        segments.append((index, text.strip()))
    segments.sort()
    return PromptSchedule((prompt,) + tuple(t for _, t in segments), tuple(f for f, _ in segments))


def _read_jsonl(path: Path, source: str) -> list[list[str]]:
    lines = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PromptError(f"{source} line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        prompts = record.get("prompts") if isinstance(record, dict) else None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or not prompts:
            raise PromptError(f"{source} line {number}: expected an object with a non-empty list of strings "
                              f"under \"prompts\" (LongLive's format), got {raw[:80]!r}")
        lines.append(prompts)
    if not lines:
        raise PromptError(f"{source}: no prompts in the file")
    return lines


def _pick_line(lines: list[list[str]], line: int, source: str) -> list[str]:
    if not 0 <= line < len(lines):
        raise PromptError(f"{source}: asked for prompt line {line}, the file has {len(lines)} (counted from 0)")
    return lines[line]


def _from_yaml(path: Path, line: int, switch_frames: Sequence[int] | None) -> PromptSchedule:
    source = str(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PromptError(f"{source}: not valid YAML ({e})") from None
    if not isinstance(doc, dict):
        raise PromptError(f"{source}: expected a mapping with 'prompts' or 'data_path', got {type(doc).__name__}")
    if ("prompts" in doc) == ("data_path" in doc):
        raise PromptError(f"{source}: give exactly one of 'prompts' (a list of prompts) or 'data_path' "
                          f"(LongLive's JSONL prompt file)")
    if "prompts" in doc:
        texts = doc["prompts"]
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise PromptError(f"{source}: 'prompts' must be a list of strings")
    else:
        data = Path(str(doc["data_path"])).expanduser()
        # LongLive runs from its checkout, so its configs name paths from there; else next to the YAML.
        candidates = [data] if data.is_absolute() else [data, path.parent / data]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise PromptError(f"{source}: data_path {str(data)!r} not found (looked in "
                              f"{', '.join(repr(str(c)) for c in candidates)})")
        texts = _pick_line(_read_jsonl(found, str(found)), line, str(found))
    if switch_frames is None:
        raw = doc.get("switch_frame_indices", [] if len(texts) == 1 else None)
        if raw is None:
            raise PromptError(f"{source}: {len(texts)} prompts but no 'switch_frame_indices'")
        switch_frames = parse_switch_frames(raw, f"{source}: switch_frame_indices")
    num_frames, seed = doc.get("num_output_frames"), doc.get("seed")
    for key, value in (("num_output_frames", num_frames), ("seed", seed)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise PromptError(f"{source}: {key} must be a non-negative integer, got {value!r}")
    return PromptSchedule(tuple(texts), tuple(switch_frames), num_frames, seed, source)


def load_prompt_file(path: str | Path, *, line: int = 0,
                     switch_frames: Sequence[int] | None = None) -> PromptSchedule:
    """A PromptSchedule from a LongLive JSONL prompt file (line `line`) or a YAML config.

    `switch_frames` (e.g. from `--switch-frames`) overrides the file's; a JSONL file has none.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PromptError(f"prompt file {str(path)!r} does not exist" if not path.exists()
                          else f"prompt file {str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return _from_yaml(path, line, switch_frames)
    if suffix in (".jsonl", ".json"):
        texts = _pick_line(_read_jsonl(path, str(path)), line, str(path))
        if switch_frames is None and len(texts) > 1:
            raise PromptError(f"{path} line {line}: {len(texts)} prompts need {len(texts) - 1} switch frames: "
                              f"pass --switch-frames (LongLive's switch_frame_indices, e.g. 40,80,120,160,200)")
        return PromptSchedule(tuple(texts), tuple(switch_frames or ()), source=str(path))
    raise PromptError(f"prompt file {str(path)!r}: unknown kind {suffix or '(no extension)'!r}; "
                      f"expected LongLive's .jsonl prompts or a .yaml config")
