"""The figures a GPU test reports, merged under `key` into the JSON file that an environment variable names
(PARITY_OUT, VAE_OUT): a run on the device machine brings them back. Unset: nothing is written."""
from __future__ import annotations

import json
import os
from pathlib import Path


def record(env: str, key: str, figures: dict) -> None:
    path = os.environ.get(env)
    if not path:
        return
    out = Path(path)
    data = json.loads(out.read_text()) if out.is_file() and out.stat().st_size else {}
    data[key] = figures
    out.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
