"""Serving's per-item values of the loaded snapshots as dense arrays over one id space.

Serving handles candidates as numpy int arrays of rows in a ``CovisView`` id space
(state/covis_view.py: one dense id per item, never reused). ``ItemRows`` keeps, per
row, what the request path would otherwise look up item by item in the item tables'
dicts: the item's shard, its table's catalog entry (present, available, category),
raw popularity and trending counts (as of the table's ``ts``) and its MF vector in
the index snapshot. Rows are filled lazily, only for items that become candidates,
and refilled when their shard's table (or the index) is replaced by a new version:
each row remembers the generation of the table it was read from.

Invariant: a filled row's values equal the dict lookups on the table that is current
for its shard (``tables[shard[row]]``) whenever ``gen[row] == shard_gen[shard[row]]``.
Memory: O(items seen) per server, like the ``CovisView``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from state.covis_view import CovisView
from state.item_table import ItemTable


class ItemRows:
    """Lazily filled per-row values of the loaded item tables and index."""

    def __init__(self, view: CovisView, item_shard_of: Callable[[str], str]) -> None:
        self.view = view
        self.item_shard_of = item_shard_of
        self.shards: dict[str, int] = {}
        """Shard key -> shard index (in order of first sight)."""
        self.tables: list[ItemTable | None] = []
        """The current table of each shard index (None: not loaded)."""
        self.shard_gen = np.zeros(0, np.int64)
        """Generation of each shard's current table (bumped when it is replaced)."""
        self._map: dict[str, ItemTable] | None = None
        self.categories: list[str | None] = [None]
        """Category names by code (code 0: no category)."""
        self._category_code: dict[str | None, int] = {None: 0}
        size = 0
        self.shard = np.full(size, -1, np.int32)
        self.gen = np.full(size, -1, np.int64)
        self.entry = np.zeros(size, bool)
        """The item's table has a catalog entry for it."""
        self.available = np.ones(size, bool)
        self.category = np.zeros(size, np.int32)
        self.pop = np.zeros(size)
        self.trend = np.zeros(size)
        self.attr_id = np.zeros(size, np.int64)
        """``id`` of the shard catalog's attributes object each row's values below were
        read from (``fill_attrs``); the object is kept in ``_attrs`` so the id stays its."""
        self._attrs = np.zeros(size, object)
        self.unavailable = np.zeros(size, bool)
        """The shard catalog marks the item unavailable (``PointInTime.unavailable``)."""
        self.attr_codes: dict[str, np.ndarray] = {}
        """Per attribute, each row's string value as a code into ``attr_values`` (-1: none)."""
        self.attr_values: dict[str, list[str]] = {}
        self._attr_code: dict[str, dict[str, int]] = {}
        self._index: Any = None
        self._vec_gen = np.full(size, -1, np.int64)
        self._index_gen = 0
        self._vecs = np.zeros((size, 0), np.float32)
        self._found = np.zeros(size, bool)
        self.memo: dict[Any, Any] = {}
        """Readers' per-row caches tied to this id space (e.g. a ranker's static item
        terms, operators/linear_scorer.py), keyed by their owner."""

    # -- the id space ------------------------------------------------------------------
    def rows(self, items: list[str]) -> np.ndarray:
        """Rows of ``items`` (new items get new rows)."""
        get = self.view.ids.get
        found = list(map(get, items))
        if None in found:
            return self.view.intern(items)
        return np.fromiter(found, np.int64, len(found))

    def names(self, rows: np.ndarray) -> list[str]:
        """Item ids of ``rows``."""
        names = self.view.names
        return [names[r] for r in rows.tolist()]

    def _grow(self) -> None:
        n = len(self.view.names)
        if self.shard.size >= n:
            return
        size = max(n, 2 * self.shard.size, 1024)

        def grown(arr: np.ndarray, fill: Any) -> np.ndarray:
            out = np.full((size, *arr.shape[1:]), fill, arr.dtype)
            out[: arr.shape[0]] = arr
            return out

        self.shard = grown(self.shard, -1)
        self.gen = grown(self.gen, -1)
        self.entry = grown(self.entry, False)
        self.available = grown(self.available, True)
        self.category = grown(self.category, 0)
        self.pop = grown(self.pop, 0.0)
        self.trend = grown(self.trend, 0.0)
        self.attr_id = grown(self.attr_id, 0)
        self._attrs = grown(self._attrs, None)
        self.unavailable = grown(self.unavailable, False)
        for attr, codes in self.attr_codes.items():
            self.attr_codes[attr] = grown(codes, -1)
        self._vec_gen = grown(self._vec_gen, -1)
        self._vecs = grown(self._vecs, 0.0)
        self._found = grown(self._found, False)

    # -- tables ------------------------------------------------------------------------
    def sync(self, table_map: dict[str, ItemTable]) -> None:
        """Take the current tables (``SnapshotViews.table_map()``, an identity-cached
        dict): a shard whose table object changed gets a new generation."""
        if table_map is self._map:
            return
        self._map = table_map
        for key in table_map:
            self._shard_index(key)
        for key, s in self.shards.items():
            table = table_map.get(key)
            if table is not self.tables[s]:
                self.tables[s] = table
                self.shard_gen[s] += 1

    def _shard_index(self, key: str) -> int:
        s = self.shards.get(key)
        if s is None:
            s = self.shards[key] = len(self.tables)
            self.tables.append(None)
            self.shard_gen = np.append(self.shard_gen, 0)
        return s

    def fill(self, rows: np.ndarray) -> None:
        """Make the table values of ``rows`` current (after ``sync``)."""
        self._grow()
        shard = self.shard[rows]
        unknown = shard < 0
        if unknown.any():
            names = self.view.names
            for r in np.unique(rows[unknown]).tolist():
                self.shard[r] = self._shard_index(self.item_shard_of(names[r]))
            shard = self.shard[rows]
        stale = self.gen[rows] != self.shard_gen[shard]
        if not stale.any():
            return
        names = self.view.names
        codes = self._category_code
        for r in np.unique(rows[stale]).tolist():
            s = int(self.shard[r])
            table = self.tables[s]
            item = names[r]
            entry = table.catalog.get(item) if table is not None else None
            self.entry[r] = entry is not None
            self.available[r] = entry is None or entry.available
            category = entry.category if entry is not None else None
            code = codes.get(category)
            if code is None:
                code = codes[category] = len(self.categories)
                self.categories.append(category)
            self.category[r] = code
            self.pop[r] = table.popular.get(item, 0.0) if table is not None else 0.0
            self.trend[r] = table.trending.get(item, 0.0) if table is not None else 0.0
            self.gen[r] = self.shard_gen[s]

    def fill_attrs(self, rows: np.ndarray, attrs: list[dict[str, Any] | None],
                   cross: tuple[str, ...],
                   unavailable: Callable[[dict[str, Any] | None], bool]) -> None:
        """Make the catalog values of ``rows`` current: ``attrs`` are the shard catalog's
        attributes of each row's item now (rows whose attributes object changed are
        re-read): ``unavailable(attrs)`` and the string value code of each ``cross``
        attribute."""
        self._grow()
        for attr in cross:
            if attr not in self.attr_codes:
                self.attr_codes[attr] = np.full(self.shard.size, -1, np.int64)
                self.attr_values[attr] = []
                self._attr_code[attr] = {}
                self.attr_id[:] = 0  # read every row again for the new attribute
        ids = np.fromiter(map(id, attrs), np.int64, len(attrs))
        stale = np.flatnonzero(self.attr_id[rows] != ids)
        if not stale.size:
            return
        for j in stale.tolist():
            r = int(rows[j])
            a = attrs[j]
            self.unavailable[r] = unavailable(a)
            for attr in self.attr_codes:
                value = a.get(attr) if a else None
                if isinstance(value, str):
                    code = self._attr_code[attr].get(value)
                    if code is None:
                        code = self._attr_code[attr][value] = len(self.attr_values[attr])
                        self.attr_values[attr].append(value)
                    self.attr_codes[attr][r] = code
                else:
                    self.attr_codes[attr][r] = -1
            self.attr_id[r] = ids[j]
            self._attrs[r] = a

    def decay_factors(self, source: str, ts_ms: int) -> np.ndarray:
        """Per shard index, the factor that decays its table's ``source`` counts to
        ``ts_ms`` (0.0 for a shard without a table: its counts read 0)."""
        return np.array([t.decay_factor(source, ts_ms) if t is not None else 0.0
                         for t in self.tables])

    def table_list(self, rows: np.ndarray) -> list[ItemTable | None]:
        """The current table of each row's shard (after ``fill``)."""
        tables = self.tables
        return [tables[s] for s in self.shard[rows].tolist()]

    # -- the index ---------------------------------------------------------------------
    def vectors(self, rows: np.ndarray, index: Any) -> tuple[np.ndarray, np.ndarray]:
        """``index.vectors`` of the rows' items (vectors, found), read once per row and
        index version (``index``: the loaded ``ItemIndex`` object)."""
        self._grow()
        if index is not self._index:
            self._index = index
            self._index_gen += 1
        stale = self._vec_gen[rows] != self._index_gen
        if stale.any():
            todo = np.unique(rows[stale])
            vecs, found = index.vectors(self.names(todo))
            if vecs.shape[1] != self._vecs.shape[1]:
                self._vecs = np.zeros((self._vecs.shape[0], vecs.shape[1]), np.float32)
                self._vec_gen[:] = -1
            self._vecs[todo] = vecs
            self._found[todo] = found
            self._vec_gen[todo] = self._index_gen
        return self._vecs[rows], self._found[rows]
