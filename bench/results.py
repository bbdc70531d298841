"""What both benchmarks share: the environment a result was measured in, tables, and result files."""
from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path
from typing import Sequence

import torch
import triton


def git_revision() -> str | None:
    """The short commit of the checkout this file lives in; None outside git (an installed wheel)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    """Enough to tell two result rows apart: the GPU, the software and the code revision."""
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git": git_revision(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80), computed as triton.testing.do_bench does, so both benchmarks agree."""
    q = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], labels: int = 1) -> str:
    """A plain aligned text table: the first `labels` columns left-aligned, the numbers right-aligned."""
    cells = [list(headers)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < labels else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "-" * len(line(cells[0]))
    return "\n".join([title, line(cells[0]), rule] + [line(r) for r in cells[1:]])


def save(record: dict, json_path: str | None, append_path: str | None) -> None:
    """Write the run as one JSON document (--json) and/or append it as one line of a JSON-lines log (--append)."""
    if json_path:
        Path(json_path).write_text(json.dumps(record, indent=2) + "\n")
    if append_path:
        with open(append_path, "a") as f:
            f.write(json.dumps(record) + "\n")
