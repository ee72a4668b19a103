"""Serving-side view of the item tables' co-visitation rows in one numeric id space.

Serving sums up to ``recent_items`` rows of up to ``max_neighbors`` (x 1.5) neighbours
per channel for every request: ~25k additions, ~8 ms as Python dict updates. Here
each row is a pair of numpy arrays (neighbour ids in a process-wide id space, weights
decayed to the table's ``ts``), built once per table version and row, so a request
is one ``bincount`` per channel. Counts (the channel's normalising popularity) live
in one dense array per channel, refreshed from each table as a new version of it is
seen (an item belongs to one shard, so a shard's new table overwrites only its own
items' counts).

Invariant: ids are dense ``0..len(names)-1`` and never reused; an id grows the dense
arrays, so memory is O(items seen) per process, like the tables themselves.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from state.item_table import ItemTable

CHANNELS = ("liked", "any")
_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.float64))


class CovisView:
    """Numeric co-visitation rows and counts of the loaded item tables."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        self.counts = {ch: np.zeros(0) for ch in CHANNELS}
        self._tables: dict[str, ItemTable] = {}
        self._rows: dict[tuple[int, str, str], tuple[np.ndarray, np.ndarray]] = {}

    def intern(self, items: Iterable[str]) -> np.ndarray:
        """Ids of ``items`` (new ones get the next ids)."""
        ids, names = self.ids, self.names
        out = []
        for item in items:
            i = ids.get(item)
            if i is None:
                i = ids[item] = len(names)
                names.append(item)
            out.append(i)
        return np.asarray(out, np.int64)

    def _grow(self) -> None:
        n = len(self.names)
        for ch in CHANNELS:
            arr = self.counts[ch]
            if arr.size < n:
                bigger = np.zeros(max(n, 2 * arr.size))
                bigger[: arr.size] = arr
                self.counts[ch] = bigger

    def sync(self, tables: dict[str, ItemTable]) -> None:
        """Take in every table that is new since the last call (identity check)."""
        for shard, table in tables.items():
            if self._tables.get(shard) is table:
                continue
            old = self._tables.get(shard)
            if old is not None:  # rows of the replaced version go
                self._rows = {k: v for k, v in self._rows.items() if k[0] != id(old)}
            self._tables[shard] = table
            for ch in CHANNELS:
                counts = table.channel(ch)[1]
                idx = self.intern(counts)
                self._grow()
                self.counts[ch][idx] = np.fromiter(counts.values(), np.float64, len(counts))

    def row(self, table: ItemTable, channel: str, item: str) -> tuple[np.ndarray, np.ndarray]:
        """(neighbour ids, weights decayed to ``table.ts``) of ``item``'s row."""
        key = (id(table), channel, item)
        row = self._rows.get(key)
        if row is None:
            plain = table.covis_row(channel, item)
            row = (self.intern(plain), np.fromiter(plain.values(), np.float64, len(plain))) \
                if plain else _EMPTY
            self._rows[key] = row
            self._grow()
        return row

    def channel_sums(self, channel: str, seeds: list[tuple[ItemTable, str, float]]
                     ) -> tuple[np.ndarray, np.ndarray]:
        """``sum weight * row(seed)`` over ``(table, seed, weight)`` as sparse (ids
        ascending, sums); items no row reaches are absent."""
        parts = [(ids, w * weight) for table, seed, weight in seeds
                 for ids, w in (self.row(table, channel, seed),) if ids.size]
        if not parts:
            return _EMPTY
        return sparse_sum(np.concatenate([p[0] for p in parts]),
                          np.concatenate([p[1] for p in parts]), len(self.names))


class SparseScores:
    """Per-item scores held as (ids ascending, values) in a :class:`CovisView` id space;
    looked up for a few items at a time (the candidates) instead of built into a dict
    of every reachable item."""

    def __init__(self, ids: np.ndarray, values: np.ndarray, index: dict[str, int]) -> None:
        self.ids = ids
        self.values = values
        self.index = index

    def __len__(self) -> int:
        return int(self.ids.size)

    def many(self, items: list[str]) -> list[float]:
        """Score of each item (0.0 where absent), in order."""
        if not self.ids.size or not items:
            return [0.0] * len(items)
        get = self.index.get
        wanted = np.fromiter((get(i, -1) for i in items), np.int64, len(items))
        return self.at_rows(wanted).tolist()

    def at_rows(self, rows: np.ndarray) -> np.ndarray:
        """Score of each id in ``rows`` (the view's id space; 0.0 where absent)."""
        if not self.ids.size or not rows.size:
            return np.zeros(rows.size)
        pos = np.minimum(np.searchsorted(self.ids, rows), self.ids.size - 1)
        return np.where(self.ids[pos] == rows, self.values[pos], 0.0)

    def to_dict(self, names: list[str]) -> dict[str, float]:
        """Every item -> score (for tests and small views)."""
        return dict(zip([names[i] for i in self.ids.tolist()], self.values.tolist(), strict=True))


def sparse_sum(ids: np.ndarray, weights: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``weights`` per id: (distinct ids ascending, their sums, added in input
    order). Dense ``bincount`` when the id space ``n`` is small next to the entries, a
    stable sort otherwise."""
    if n <= 8 * ids.size:
        dense = np.bincount(ids, weights=weights, minlength=n)
        nz = np.flatnonzero(dense)
        return nz, dense[nz]
    order, first = group_ids(ids)
    return ids[order][first], np.bincount(np.cumsum(first) - 1, weights=weights[order])


def group_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, first)``: a stable argsort of ``ids`` and, along it, where each distinct
    id starts. Equal ids keep their input order, so sums over a group (``bincount``)
    add in input order, as ``np.unique(..., return_inverse=True)`` + ``bincount`` do,
    without scattering the inverse back (about 2x faster on ~5k ids)."""
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    first = np.empty(ordered.size, bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return order, first
