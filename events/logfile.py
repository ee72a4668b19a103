"""Event log files: JSONL, one event per line, gzip when the name ends with ``.gz``."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import IO


def open_log(path: str | Path) -> IO[bytes]:
    """Open a JSONL log for binary reading, transparently gunzipping ``.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return path.open("rb")


def open_log_for_write(path: str | Path) -> IO[bytes]:
    """Open (truncate) a JSONL log for binary writing, gzipped when ``.gz``; parents created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        # Level 3: ~12x smaller than plain JSONL at >1M events/s (level 9 is ~10x slower).
        return gzip.open(path, "wb", compresslevel=3)
    return path.open("wb")


def count_lines(path: str | Path) -> int | None:
    """Non-empty lines of a log (the events a replay of it reads), or None when it is not
    a regular file (a named pipe must not be read twice)."""
    path = Path(path)
    if not path.is_file():
        return None
    count = 0
    with open_log(path) as f:
        for line in f:
            if line.strip():
                count += 1
    return count
