"""Count-min sketch over uint64 keys: vectorized, conservative update, bounded memory.

Used as the admission filter of the embedding table: an ID gets a row only once its
estimated count reaches a threshold. A count-min sketch never under-counts (with or
without conservative update), so an ID is never admitted late; a hash collision can
only admit it early. Memory is fixed at ``depth * width`` counters.

Counters saturate at the dtype's maximum instead of wrapping. Optional aging
(TinyLFU-style): after ``decay_every`` increments all counters are halved, so old
sightings fade and a long-running stream does not saturate the sketch.
"""

from __future__ import annotations

import numpy as np

from state.hashing import splitmix64

# Hash-family members used by the sketch rows (distinct from the embedding table's).
_SEED_BASE = 0x5EED_C0


class CountMinSketch:
    """Count-min sketch with ``depth`` rows of ``width`` counters (width a power of two).

    Invariant: for every key, ``estimate(key) >=`` the number of times it was added
    since the last ``halve()`` (halving keeps ``estimate >= floor(true / 2)``).
    """

    def __init__(
        self,
        width: int = 1 << 18,
        depth: int = 4,
        *,
        seed: int = 0,
        dtype: type[np.unsignedinteger] | np.dtype = np.uint32,
        decay_every: int | None = None,
    ) -> None:
        if width < 1 or width & (width - 1):
            raise ValueError(f"width must be a power of two, got {width}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.width = int(width)
        self.depth = int(depth)
        self.seed = int(seed)
        self.decay_every = None if decay_every is None else int(decay_every)
        self.table = np.zeros((self.depth, self.width), dtype=np.dtype(dtype))
        self.since_decay = 0  # increments since the last halving
        self.total = 0  # increments ever added (not reduced by halving)

    @property
    def nbytes(self) -> int:
        """Bytes held by the counters."""
        return int(self.table.nbytes)

    def _cells(self, keys: np.ndarray) -> np.ndarray:
        """Counter column per (row, key): int64 array of shape (depth, n)."""
        keys = np.asarray(keys, dtype=np.uint64)
        mask = np.uint64(self.width - 1)
        return np.stack(
            [
                (splitmix64(keys, _SEED_BASE + self.seed * 64 + r) & mask).astype(np.int64)
                for r in range(self.depth)
            ]
        )

    def estimate(self, keys: np.ndarray) -> np.ndarray:
        """Estimated counts (int64, shape (n,)); never below the true count."""
        cells = self._cells(keys)
        rows = np.arange(self.depth)[:, None]
        return self.table[rows, cells].min(axis=0).astype(np.int64)

    def add(self, keys: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
        """Add ``counts`` (default 1 each) for ``keys`` with conservative update.

        Duplicate keys in one call are summed first. Returns the estimates after the
        update (int64, aligned with ``keys``). Conservative update raises a counter only
        as far as needed: ``cell = max(cell, estimate_before(key) + count(key))``.
        """
        keys = np.asarray(keys, dtype=np.uint64)
        if keys.size == 0:
            return np.zeros(0, dtype=np.int64)
        inc = np.ones(keys.size, np.int64) if counts is None else np.asarray(counts, np.int64)
        uniq, inverse = np.unique(keys, return_inverse=True)
        per_key = np.bincount(inverse, weights=inc, minlength=uniq.size).astype(np.int64)
        self.update_unique(uniq, per_key)
        return self.estimate(uniq)[inverse]

    def update_unique(self, keys: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Conservative update for distinct ``keys``; returns the estimates *before* it.

        Aging (``decay_every``) is applied after the whole batch, so a caller deciding
        on ``before + counts`` sees the batch as if it arrived one key at a time.
        """
        keys = np.asarray(keys, dtype=np.uint64)
        counts = np.asarray(counts, dtype=np.int64)
        if keys.size == 0:
            return np.zeros(0, dtype=np.int64)
        cells = self._cells(keys)
        rows = np.arange(self.depth)[:, None]
        before = self.table[rows, cells].min(axis=0).astype(np.int64)
        cap = int(np.iinfo(self.table.dtype).max)
        target = np.minimum(before + counts, cap).astype(self.table.dtype)
        for r in range(self.depth):
            np.maximum.at(self.table[r], cells[r], target)
        added = int(counts.sum())
        self.total += added
        self.since_decay += added
        if self.decay_every is not None and self.since_decay >= self.decay_every:
            self.halve()
        return before

    def halve(self) -> None:
        """Age the sketch: halve every counter (floor) and reset the decay clock."""
        self.table >>= 1
        self.since_decay = 0

    def clear(self) -> None:
        """Zero every counter."""
        self.table.fill(0)
        self.since_decay = 0

    # --- snapshot -------------------------------------------------------------------

    def snapshot(self, prefix: str = "", *, copy: bool = True) -> dict[str, np.ndarray | int]:
        """The sketch as arrays and scalars (keys prefixed with ``prefix``).

        ``copy=False`` shares the counter array (for pickling or saving right away).
        """
        return {
            f"{prefix}table": self.table.copy() if copy else self.table,
            f"{prefix}seed": self.seed,
            f"{prefix}decay_every": -1 if self.decay_every is None else self.decay_every,
            f"{prefix}since_decay": self.since_decay,
            f"{prefix}total": self.total,
        }

    @classmethod
    def restore(cls, snap: dict, prefix: str = "", *, copy: bool = True) -> CountMinSketch:
        """Rebuild a sketch from ``snapshot()`` output (copies arrays unless ``copy=False``)."""
        table = np.array(snap[f"{prefix}table"], copy=copy)
        decay = int(snap[f"{prefix}decay_every"])
        sketch = cls.__new__(cls)
        sketch.depth, sketch.width = (int(n) for n in table.shape)
        sketch.seed = int(snap[f"{prefix}seed"])
        sketch.decay_every = None if decay < 0 else decay
        sketch.table = table
        sketch.since_decay = int(snap[f"{prefix}since_decay"])
        sketch.total = int(snap[f"{prefix}total"])
        return sketch

    def __getstate__(self) -> dict:
        return self.snapshot(copy=False)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(CountMinSketch.restore(state, copy=False).__dict__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CountMinSketch):
            return NotImplemented
        return (
            self.seed == other.seed
            and self.decay_every == other.decay_every
            and self.since_decay == other.since_decay
            and self.total == other.total
            and self.table.dtype == other.table.dtype
            and np.array_equal(self.table, other.table)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable
