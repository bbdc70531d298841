"""Progress on long benchmark runs: a tqdm bar per row, on stderr and only on a terminal (a log
keeps the tables clean), plus a line before work that takes minutes with no block to count."""
from __future__ import annotations

import sys

from tqdm import tqdm


def block_bar(total: int, desc: str) -> tqdm:
    """A bar over one row's blocks; tqdm's disable=None hides it when stderr is not a terminal."""
    return tqdm(total=total, desc=desc, unit="block", file=sys.stderr, disable=None, leave=False, dynamic_ncols=True)


def announce(what: str) -> None:
    """Say what is about to take a while (building a 1.3B model on a CPU takes minutes)."""
    print(f"e2e: {what} ...", file=sys.stderr, flush=True)
