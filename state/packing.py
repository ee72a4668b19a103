"""Lists of strings as numpy arrays (for ``.npz`` snapshots without pickled objects)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pack_strings(items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one UTF-8 byte array (uint8) plus int64 offsets (no fixed-width padding)."""
    data = [s.encode("utf-8") for s in items]
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    return np.frombuffer(b"".join(data), np.uint8).copy(), offsets


def unpack_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    """Inverse of :func:`pack_strings`."""
    raw = np.asarray(blob).tobytes()
    off = np.asarray(offsets).tolist()
    return [raw[off[i] : off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]
