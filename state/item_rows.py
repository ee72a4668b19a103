"""Serving's per-item values of the loaded snapshots as dense arrays over one id space.

Serving handles candidates as numpy int arrays of rows in a ``CovisView`` id space
(state/covis_view.py: one dense id per item, never reused). ``ItemRows`` keeps, per
candidate item, what the request path would otherwise look up item by item in the
item tables' dicts: the item's shard, its table's catalog entry (present, available,
category, first sighting), raw popularity and trending counts (as of the table's ``ts``), the shard
catalog's attributes (unavailable, cross-profile attribute values) and its MF vector
in the index snapshot. Values live in slots, given only to rows that become
candidates (``fill(rows) -> slots``), and are refilled when their shard's table, the
index or the item's catalog attributes are replaced: each slot remembers the
generation of the table and the attributes object it was read from.

Invariant: a slot's values equal the dict lookups on the table that is current for its
shard (``tables[shard[slot]]``) whenever ``gen[slot] == shard_gen[shard[slot]]``.
Memory: 4 bytes per id of the ``CovisView``, plus per slot ~150 bytes and the catalog
attributes object it keeps; slots are all dropped (and refilled lazily) once there are
more than ``max(min_slots, SLACK (1.5) x items in the loaded tables)``, so they stay bounded by
the catalog however many items churned through.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from state.covis_view import SLACK, CovisView
from state.item_table import FrozenCatalog, ItemTable, set_memo

_COLUMNS_MAX = 8_192
"""Catalogs of at most this many items are read as per-version columns by ``_fill_frozen``
(``catalog_columns``, ~1 ms a version); larger ones item by item for the stale candidates
(a 25k-item catalog's columns took ~9 ms, on the first request after a new table)."""
_ARRAY_FILL = 32
"""Stale slots from which ``fill`` reads loaded tables as arrays (fewer: entry by entry,
cheaper than the array calls)."""


def catalog_columns(table: ItemTable
                    ) -> tuple[np.ndarray, np.ndarray, list[str | None], np.ndarray, np.ndarray]:
    """A loaded table's catalog items, by catalog position: popularity and trending counts
    (0.0 without), the category as an index into the table's distinct category names
    (None: no category), with those names, and the item's row in ``feature_matrix``
    (``len(index)`` without a profile: ``ItemRows.feat_row``). Once per table version
    for every user shard of the process (``table.memo``; 24 B an item)."""
    found = table.memo.get("slot_columns")
    if found is None:
        catalog = table.catalog
        assert isinstance(catalog, FrozenCatalog)
        ids = list(catalog._index)  # catalog positions in order
        pop = np.fromiter(map(table.popular.get, ids, itertools.repeat(0.0)), np.float64,
                          len(ids))
        trend = np.fromiter(map(table.trending.get, ids, itertools.repeat(0.0)), np.float64,
                            len(ids))
        distinct = list(dict.fromkeys(catalog._category))
        position = {name: k for k, name in enumerate(distinct)}
        cat = np.fromiter(map(position.__getitem__, catalog._category), np.int32, len(ids))
        index = table.feature_matrix()[0]
        feat = np.fromiter(map(index.get, ids, itertools.repeat(len(index))), np.int32,
                           len(ids))
        found = table.memo.setdefault("slot_columns", (pop, trend, [name or None for name
                                                                    in distinct], cat, feat))
    return found


def _as_columns(table: ItemTable) -> bool:
    """Whether ``ItemRows`` reads ``table``'s catalog items from ``catalog_columns``: a
    loaded table whose catalog is neither empty nor past ``_COLUMNS_MAX``."""
    catalog = table.catalog
    return isinstance(catalog, FrozenCatalog) and 0 < catalog._available.size <= _COLUMNS_MAX


@dataclass(frozen=True, slots=True)
class LoadedColumns:
    """Every loaded table's catalog columns (``catalog_columns``, the catalog's
    availability and first sightings) side by side, tables in shard-key order."""

    offsets: dict[str, int]
    """Shard key -> its table's first position."""
    available: np.ndarray
    """bool."""
    first_seen: np.ndarray
    pop: np.ndarray
    trend: np.ndarray
    cat: np.ndarray
    """The category as an index into ``distinct`` (each table's distinct names in turn)."""
    distinct: list[str | None]
    feat: np.ndarray
    """The item's row in its own table's ``feature_matrix``."""


def loaded_columns(tables: list[ItemTable]) -> LoadedColumns:
    """``LoadedColumns`` of ``tables`` (each read as columns, ``_as_columns``), made once
    per set of table versions for every user shard of the process (``set_memo``; 33 B
    an item)."""
    ordered = sorted(tables, key=lambda t: t.shard)

    def make() -> LoadedColumns:
        offsets, at, parts, distinct = {}, 0, [], []
        for t in ordered:
            pop, trend, names, cat, feat = catalog_columns(t)
            catalog = t.catalog
            assert isinstance(catalog, FrozenCatalog)
            offsets[t.shard] = at
            at += cat.size
            parts.append((catalog._available.astype(bool), catalog._first_seen, pop, trend,
                          cat + len(distinct), feat))
            distinct.extend(names)
        if not parts:
            return LoadedColumns({}, np.ones(0, bool), np.zeros(0, np.int64), np.zeros(0),
                                 np.zeros(0), np.zeros(0, np.int32), [], np.zeros(0, np.int32))
        joined = [np.concatenate(column) for column in zip(*parts, strict=True)]
        return LoadedColumns(offsets, joined[0], joined[1], joined[2], joined[3], joined[4],
                             distinct, joined[5])

    return set_memo(ordered, "loaded_columns", make)


@dataclass(slots=True)
class _LoadedMemo:
    """``ItemRows._fill_loaded``'s view of the shards' tables, kept while they are these."""

    table_map: dict[str, ItemTable] | None
    """The ``ItemRows._map`` it was made for (``sync`` takes a new one)."""
    n_tables: int
    columns: LoadedColumns
    start: np.ndarray
    """Each shard index's first position in ``columns`` (-1: its table is not read as
    columns, or none)."""
    gets: list[Any]
    """Each shard index's ``catalog._index.get`` (None: as ``start`` -1)."""
    codes: np.ndarray | None
    """This space's category code of each of ``columns.distinct`` (None: not yet)."""


def dense_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct codes >= 0 ascending, each element's position among them, -1 for a
    code -1): ``np.unique(codes, return_inverse=True)`` without the -1, by counting
    instead of sorting (the codes are small ints >= -1: categories, attribute values)."""
    if not codes.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    shifted = codes + 1
    present = np.bincount(shifted) > 0
    present[0] = False  # code -1: no value
    rank = present.cumsum() - 1  # rank[0] = -1
    return present.nonzero()[0] - 1, rank[shifted]


@dataclass(slots=True)
class _ColumnsMemo:
    """``ItemRows.profile_values``' gather source, kept while the shards' tables are these."""

    table_map: dict[str, ItemTable] | None
    """The ``ItemRows._map`` the columns were built for (``sync`` takes a new one)."""
    n_tables: int
    names: tuple[str, ...]
    matrix: np.ndarray
    """Every loaded table's ``names`` columns side by side, a last all-0.0 column."""
    start: np.ndarray
    """Each shard's first column in ``matrix`` (the last entry: no table)."""
    none: int
    """The all-0.0 column."""
    epoch: int
    """``ItemRows._epoch`` of ``column``."""
    column: np.ndarray
    """Each slot's column in ``matrix`` (int32, -1: not looked up in this epoch)."""


class ItemRows:
    """Lazily filled per-candidate values of the loaded item tables, catalog and index."""

    def __init__(self, view: CovisView, item_shard_of: Callable[[str], str],
                 min_slots: int = 16_384) -> None:
        self.view = view
        self.item_shard_of = item_shard_of
        self.min_slots = min_slots
        self.shards: dict[str, int] = {}
        """Shard key -> shard index (in order of first sight)."""
        self.tables: list[ItemTable | None] = []
        """The current table of each shard index (None: not loaded)."""
        self.shard_gen = np.zeros(0, np.int64)
        """Generation of each shard's current table (bumped when it is replaced)."""
        self._map: dict[str, ItemTable] | None = None
        self._max_slots = min_slots
        self.categories: list[str | None] = [None]
        """Category names by code (code 0: no category)."""
        self._category_code: dict[str | None, int] = {None: 0}
        self._codes_memo: dict[int, tuple[int, np.ndarray]] = {}
        """``_table_codes`` by shard index: (the table's generation, its names' codes)."""
        self._loaded: _LoadedMemo | None = None
        self.attr_values: dict[str, list[str]] = {}
        self._attr_code: dict[str, dict[str, int]] = {}
        self._index: Any = None
        self._index_gen = 0
        self._epoch = 0
        """Bumped when slots are dropped or a shard's table is replaced: the end of every
        ``_last_fill`` / ``_last_attrs`` memo."""
        self._clear()

    def _clear(self) -> None:
        """Drop every slot (and the readers' memos tied to them)."""
        self._epoch = getattr(self, "_epoch", 0) + 1
        self._last_fill: tuple[np.ndarray, np.ndarray, int] | None = None
        """``(rows, slots, epoch)`` of the last ``fill`` (or ``remember``): the same rows
        array asked again in that epoch (the filter's pool, then its columns) has those
        slots, current."""
        self._last_attrs: tuple[np.ndarray, list[Any], tuple[str, ...], int] | None = None
        """``(slots, attrs, cross, epoch)`` of the last ``fill_attrs`` (or ``remember``)."""
        self.slot_of = np.full(len(self.view.names), -1, np.intp)
        """Each id's slot (-1: none). Slots, shard indices and category codes are intp,
        numpy's index type: gathering by them (``x[slots]``, ~15 arrays a request) takes
        numpy's one-dimensional fast path, where an int32 index sets up an iterator
        (~6k more instructions a gather)."""
        self.n_slots = 0
        self.shard = np.full(0, -1, np.intp)
        self.gen = np.full(0, -1, np.int32)
        """The ``shard_gen`` each slot's table values were read at (int32: a generation
        counts table versions of one shard)."""
        self.entry = np.zeros(0, bool)
        """The item's table has a catalog entry for it."""
        self.available = np.ones(0, bool)
        self.category = np.zeros(0, np.intp)
        self.first_seen = np.zeros(0, np.int64)
        """The catalog entry's first sighting (event time, ms; 0 without an entry)."""
        self.pop = np.zeros(0)
        self.trend = np.zeros(0)
        self.feat_row = np.zeros(0, np.int32)
        """The item's row in its table's ``feature_columns`` (-1: not looked up since the
        slot's table values were last read; ``profile_values`` fills it)."""
        self.attr_id = np.zeros(0, np.int64)
        """``id`` of the shard catalog's attributes object each slot's values below were
        read from (``fill_attrs``); the object is kept in ``_attrs`` so the id stays its."""
        self._attrs = np.zeros(0, object)
        self.unavailable = np.zeros(0, bool)
        """The shard catalog marks the item unavailable (``PointInTime.unavailable``)."""
        self.attr_codes: dict[str, np.ndarray] = {a: np.zeros(0, np.int64)
                                                  for a in self.attr_values}
        """Per attribute, each slot's string value as a code into ``attr_values`` (-1: none)."""
        self._vec_gen = np.full(0, -1, np.int32)
        self._vecs = np.zeros((0, 0), np.float32)
        self._found = np.zeros(0, bool)
        self.memo: dict[Any, Any] = {}
        """Readers' per-slot caches (e.g. a ranker's static item terms,
        operators/linear_scorer.py), keyed by their owner; dropped with the slots."""

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
        return self.view.name_array()[rows].tolist()

    def _slots(self, rows: np.ndarray) -> np.ndarray:
        """Slots of ``rows``, new ones for rows without (all slots are dropped first when
        the new ones would pass the bound)."""
        n_ids = len(self.view.names)
        if self.slot_of.size < n_ids:
            grown = np.full(max(n_ids, self.slot_of.size + self.slot_of.size // 2), -1, np.intp)
            grown[: self.slot_of.size] = self.slot_of
            self.slot_of = grown
        slots = self.slot_of[rows]
        missing = slots < 0
        if not missing.any():
            return slots
        new = np.unique(rows[missing])
        if self.n_slots + new.size > self._max_slots:
            known = sum(len(t.catalog) for t in self.tables if t is not None)
            self._max_slots = max(self.min_slots, int(SLACK * known), 2 * rows.size)
            self._clear()
            return self._slots(rows)
        self.slot_of[new] = np.arange(self.n_slots, self.n_slots + new.size)
        self.n_slots += new.size
        self._grow()
        return self.slot_of[rows]

    def _grow(self) -> None:
        n = self.n_slots
        if self.shard.size >= n:
            return
        size = max(n, self.shard.size + self.shard.size // 2, 256)

        def grown(arr: np.ndarray, fill: Any) -> np.ndarray:
            out = np.full((size, *arr.shape[1:]), fill, arr.dtype)
            out[: arr.shape[0]] = arr
            return out

        self.shard = grown(self.shard, -1)
        self.gen = grown(self.gen, -1)
        self.entry = grown(self.entry, False)
        self.available = grown(self.available, True)
        self.category = grown(self.category, 0)
        self.first_seen = grown(self.first_seen, 0)
        self.pop = grown(self.pop, 0.0)
        self.trend = grown(self.trend, 0.0)
        self.feat_row = grown(self.feat_row, -1)
        self.attr_id = grown(self.attr_id, 0)
        self._attrs = grown(self._attrs, None)
        self.unavailable = grown(self.unavailable, False)
        for attr, codes in self.attr_codes.items():
            self.attr_codes[attr] = grown(codes, -1)
        self._vec_gen = grown(self._vec_gen, -1)
        self._vecs = grown(self._vecs, 0.0)
        self._found = grown(self._found, False)

    @property
    def capacity(self) -> int:
        """Length of the per-slot arrays."""
        return int(self.shard.size)

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
                self._epoch += 1

    def _shard_index(self, key: str) -> int:
        s = self.shards.get(key)
        if s is None:
            s = self.shards[key] = len(self.tables)
            self.tables.append(None)
            self.shard_gen = np.append(self.shard_gen, 0)
        return s

    def fill(self, rows: np.ndarray) -> np.ndarray:
        """The slots of ``rows`` with their table values current (after ``sync``); the
        same ``rows`` object as the last call's (or ``remember``'s) in the same epoch
        returns its slots at once (do not write into either array)."""
        last = self._last_fill
        if last is not None and last[0] is rows and last[2] == self._epoch:
            return last[1]
        slots = self._fill(rows)
        self._last_fill = (rows, slots, self._epoch)
        return slots

    def remember(self, rows: np.ndarray, slots: np.ndarray, attrs: list[Any] | None,
                 cross: tuple[str, ...]) -> None:
        """Note that ``slots`` are ``rows``' current slots (a subset of the last
        ``fill``'s, taken after it) and, with ``attrs``, that their catalog values are
        current for ``cross`` (a subset of the last ``fill_attrs``'), so the next
        ``fill(rows)`` and ``fill_attrs(slots, attrs, cross, ...)`` need no checks."""
        self._last_fill = (rows, slots, self._epoch)
        if attrs is not None:
            self._last_attrs = (slots, attrs, cross, self._epoch)

    def _fill(self, rows: np.ndarray) -> np.ndarray:
        """``fill`` without the memo."""
        slots = self._slots(rows)
        shard = self.shard[slots]
        # a slot without a shard yet was never read (gen -1, below every generation), so
        # it is stale whatever shard_gen[-1] holds
        stale = ((self.gen[slots] != self.shard_gen[shard]).nonzero()[0]
                 if self.shard_gen.size else np.arange(slots.size))
        if not stale.size:
            return slots
        unknown = stale[shard[stale] < 0]
        if unknown.size:
            names = self.view.names
            for r, s in zip(rows[unknown].tolist(), slots[unknown].tolist(), strict=True):
                self.shard[s] = self._shard_index(self.item_shard_of(names[r]))
            shard = self.shard[slots]
        names = self.view.names
        if stale.size < _ARRAY_FILL:  # a few new candidates: entry by entry
            self._fill_entries(names, rows[stale].tolist(), slots[stale].tolist())
            return slots
        stale_shard = shard[stale]
        if self._fill_loaded(slots[stale], [names[r] for r in rows[stale].tolist()],
                             stale_shard):
            return slots
        for k in np.unique(stale_shard).tolist():
            at = stale[stale_shard == k]
            table = self.tables[k]
            if table is not None and isinstance(table.catalog, FrozenCatalog):
                self._fill_frozen(table, slots[at], [names[r] for r in rows[at].tolist()], k)
                self.gen[slots[at]] = self.shard_gen[k]
            else:
                self._fill_entries(names, rows[at].tolist(), slots[at].tolist())
        return slots

    def _fill_entries(self, names: list[str], rows: list[int], slots: list[int]) -> None:
        """The table values of ``slots`` (holding the items of ``rows``), item by item."""
        for r, s in zip(rows, slots, strict=True):
            k = int(self.shard[s])
            table = self.tables[k]
            item = names[r]
            entry = table.catalog.get(item) if table is not None else None
            self.entry[s] = entry is not None
            self.available[s] = entry is None or entry.available
            self.category[s] = self._code(entry.category if entry is not None else None)
            self.first_seen[s] = entry.first_seen_ms if entry is not None else 0
            self.pop[s] = table.popular.get(item, 0.0) if table is not None else 0.0
            self.trend[s] = table.trending.get(item, 0.0) if table is not None else 0.0
            self.feat_row[s] = -1
            self.gen[s] = self.shard_gen[k]

    def _code(self, category: str | None) -> int:
        """The code of a category name (new names get the next code)."""
        code = self._category_code.get(category)
        if code is None:
            code = self._category_code[category] = len(self.categories)
            self.categories.append(category)
        return code

    def _fill_frozen(self, table: ItemTable, slots: np.ndarray, items: list[str],
                     shard: int) -> None:
        """The table values of ``slots`` (holding ``items``) from shard index ``shard``'s
        current table, a loaded one: from its catalog columns, the per-item reads of
        ``fill`` as array lookups (the same values; the
        catalog's items' counts and category names read once per table version for the
        process, ``catalog_columns``, with the feature rows of the items it holds)."""
        catalog = table.catalog
        assert isinstance(catalog, FrozenCatalog)
        n = len(items)
        j = np.fromiter(map(catalog._index.get, items, itertools.repeat(-1)), np.int64, n)
        found = j >= 0
        at = np.where(found, j, 0)
        self.entry[slots] = found
        self.feat_row[slots] = -1
        size = catalog._available.size
        if size:
            self.available[slots] = ~found | catalog._available[at].astype(bool)
            self.first_seen[slots] = np.where(found, catalog._first_seen[at], 0)
        else:  # an empty catalog
            self.available[slots] = True
            self.first_seen[slots] = 0
            self.category[slots] = 0
        if not _as_columns(table):
            # an empty catalog, or one whose columns would cost more than the candidates
            if size:
                self.category[slots] = self._named_codes(catalog, j, found)
            self.pop[slots] = np.fromiter(map(table.popular.get, items, itertools.repeat(0.0)),
                                          np.float64, n)
            self.trend[slots] = np.fromiter(map(table.trending.get, items,
                                                itertools.repeat(0.0)), np.float64, n)
            return
        pop, trend, distinct, cat, feat = catalog_columns(table)
        self.feat_row[slots] = np.where(found, feat[at], -1)  # -1: looked up when read
        codes = self._table_codes(shard, distinct)
        # a category new to this space: codes in the candidates' order, as named
        self.category[slots] = (np.where(found, codes[cat[at]], 0) if codes is not None
                                else self._named_codes(catalog, j, found))
        pop, trend = pop[at], trend[at]  # copies
        if not found.all():  # items without a catalog entry may still have counts
            for i in (~found).nonzero()[0].tolist():
                pop[i] = table.popular.get(items[i], 0.0)
                trend[i] = table.trending.get(items[i], 0.0)
        self.pop[slots] = pop
        self.trend[slots] = trend

    def _fill_loaded(self, slots: np.ndarray, items: list[str], shard: np.ndarray) -> bool:
        """``_fill_frozen`` of every shard's stale slots at once (``slots`` holding
        ``items``, of shard indices ``shard``): each item looked up in its table's
        catalog, then one gather from every loaded table's catalog columns side by side
        (``loaded_columns``), not one set of array calls per shard. False (nothing
        written) unless every slot's table is a loaded one read as columns and every
        category name of those tables has a code here (then ``_fill_frozen`` shard by
        shard codes new names in its order)."""
        memo = self._loaded_memo()
        start = memo.start[shard]
        if (start < 0).any():
            return False
        codes = memo.codes if memo.codes is not None else self._loaded_codes(memo)
        if codes is None:
            return False
        gets = memo.gets
        j = np.array([gets[k](item, -1) for k, item in zip(shard.tolist(), items, strict=True)],
                     np.int64)
        found = j >= 0
        at = np.where(found, start + j, 0)
        columns = memo.columns
        self.entry[slots] = found
        self.available[slots] = ~found | columns.available[at]
        self.first_seen[slots] = np.where(found, columns.first_seen[at], 0)
        self.feat_row[slots] = np.where(found, columns.feat[at], -1)  # -1: looked up when read
        self.category[slots] = np.where(found, codes[columns.cat[at]], 0)
        pop, trend = columns.pop[at], columns.trend[at]  # copies
        if not found.all():  # items without a catalog entry may still have counts
            tables = self.tables
            for i in (~found).nonzero()[0].tolist():
                table = tables[int(shard[i])]
                pop[i] = table.popular.get(items[i], 0.0)
                trend[i] = table.trending.get(items[i], 0.0)
        self.pop[slots] = pop
        self.trend[slots] = trend
        self.gen[slots] = self.shard_gen[shard]
        return True

    def _loaded_memo(self) -> _LoadedMemo:
        """``_fill_loaded``'s view of the shards' current tables (kept while they are
        these: ``sync`` takes a new map for any new table)."""
        memo = self._loaded
        tables = self.tables
        if memo is not None and memo.table_map is self._map and memo.n_tables == len(tables):
            return memo
        read = [t if t is not None and _as_columns(t) else None for t in tables]
        columns = loaded_columns([t for t in read if t is not None])
        start = np.array([-1 if t is None else columns.offsets[t.shard] for t in read],
                         np.int64)
        gets = [None if t is None else t.catalog._index.get for t in read]
        memo = self._loaded = _LoadedMemo(self._map, len(tables), columns, start, gets, None)
        return memo

    def _loaded_codes(self, memo: _LoadedMemo) -> np.ndarray | None:
        """This space's code of each of ``memo.columns.distinct`` (kept in the memo once
        every name has one); None while a name has none."""
        get = self._category_code.get
        known = [get(name) for name in memo.columns.distinct]
        if None in known:
            return None
        memo.codes = np.asarray(known, np.int32)
        return memo.codes

    def _named_codes(self, catalog: FrozenCatalog, j: np.ndarray, found: np.ndarray
                     ) -> list[int]:
        """The category codes of catalog positions ``j`` (0 where not ``found``), new
        names coded in this order."""
        names = catalog._category
        return [self._code(names[c] or None) if ok else 0
                for c, ok in zip(j.tolist(), found.tolist(), strict=True)]

    def _table_codes(self, shard: int, distinct: list[str | None]) -> np.ndarray | None:
        """This space's category codes of the distinct category names of shard index
        ``shard``'s current table (kept per shard and table generation); None while a
        name has no code yet."""
        memo = self._codes_memo
        found = memo.get(shard)
        gen = int(self.shard_gen[shard])
        if found is None or found[0] != gen:
            known = [self._category_code.get(name) for name in distinct]
            if None in known:
                return None
            found = memo[shard] = (gen, np.asarray(known, np.int32))
        return found[1]

    def catalog_attrs(self, slots: np.ndarray, items: list[str], catalog: Any,
                      cross: tuple[str, ...],
                      unavailable: Callable[[dict[str, Any] | None], bool]
                      ) -> list[dict[str, Any] | None]:
        """``catalog``'s attributes of ``items`` (in ``slots``) now, their values made
        current (``fill_attrs``). A catalog that logs its writes (``ChangeLogDict``,
        the user shard's) is read only for the slots whose item was written since they
        were read, or that were never read; any other mapping item by item."""
        version = getattr(catalog, "version", None)
        if version is None or any(attr not in self.attr_codes for attr in cross):
            attrs = list(map(catalog.get, items))
            self.fill_attrs(slots, attrs, cross, unavailable)
            return attrs
        self._catalog_changes(catalog, version)
        attrs = self._attrs[slots].tolist()
        stale = (self.attr_id[slots] == 0).nonzero()[0]
        if stale.size == slots.size:
            get = catalog.get
            attrs = list(map(get, items))
            self.fill_attrs(slots, attrs, cross, unavailable)
            return attrs
        if stale.size:
            # only the unread slots: every other slot holds its attributes object
            # (``attr_id`` is its id), so its values are current already
            get = catalog.get
            at = stale.tolist()
            fresh = [get(items[j]) for j in at]
            for j, a in zip(at, fresh, strict=True):
                attrs[j] = a
            self.fill_attrs(slots[stale], fresh, cross, unavailable)
        # what the columns ask next (``fill_attrs``, ``attr_ids``): no second check
        self._last_attrs = (slots, attrs, cross, self._epoch)
        return attrs

    def _catalog_changes(self, catalog: Any, version: int) -> None:
        """Mark the slots of the items ``catalog`` wrote since the last call as unread
        (``attr_id`` 0; every slot for another catalog or one too far behind)."""
        seen = getattr(self, "_catalog_seen", None)
        if seen is not None and seen[0] is catalog and seen[1] == version:
            return
        keys = catalog.changed_since(seen[1]) if seen is not None and seen[0] is catalog else None
        if keys is None:
            self.attr_id[:] = 0
        elif keys:
            get, slot_of = self.view.ids.get, self.slot_of
            rows = np.fromiter(map(get, keys, itertools.repeat(-1)), np.int64, len(keys))
            rows = rows[(rows >= 0) & (rows < slot_of.size)]
            at = slot_of[rows]
            self.attr_id[at[at >= 0]] = 0
        self._catalog_seen = (catalog, version)

    def fill_attrs(self, slots: np.ndarray, attrs: list[dict[str, Any] | None],
                   cross: tuple[str, ...],
                   unavailable: Callable[[dict[str, Any] | None], bool]) -> None:
        """Make the catalog values of ``slots`` current: ``attrs`` are the shard catalog's
        attributes of each slot's item now (slots whose attributes object changed are
        re-read): ``unavailable(attrs)`` and the string value code of each ``cross``
        attribute. The same ``slots`` and ``attrs`` objects as the last call's (or
        ``remember``'s) in the same epoch are current already."""
        last = self._last_attrs
        if (last is not None and last[0] is slots and last[1] is attrs and last[2] == cross
                and last[3] == self._epoch):
            return
        for attr in cross:
            if attr not in self.attr_codes:
                self.attr_codes[attr] = np.full(self.capacity, -1, np.int64)
                self.attr_values[attr] = []
                self._attr_code[attr] = {}
                self.attr_id[:] = 0  # read every slot again for the new attribute
        ids = np.fromiter(map(id, attrs), np.int64, len(attrs))
        stale = (self.attr_id[slots] != ids).nonzero()[0]
        for j in stale.tolist():
            s = int(slots[j])
            a = attrs[j]
            self.unavailable[s] = unavailable(a)
            for attr, codes in self.attr_codes.items():
                value = a.get(attr) if a else None
                if isinstance(value, str):
                    code = self._attr_code[attr].get(value)
                    if code is None:
                        code = self._attr_code[attr][value] = len(self.attr_values[attr])
                        self.attr_values[attr].append(value)
                    codes[s] = code
                else:
                    codes[s] = -1
            self.attr_id[s] = ids[j]
            self._attrs[s] = a
        self._last_attrs = (slots, attrs, cross, self._epoch)

    def value_codes(self, attr: str, slots: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(the distinct string values of cross attribute ``attr`` among ``slots``, each
        slot's position in them, -1: no string value), after ``fill_attrs``."""
        uniq, at = dense_codes(self.attr_codes[attr][slots])
        values = self.attr_values[attr]
        return [values[c] for c in uniq.tolist()], at

    def attr_ids(self, slots: np.ndarray, attrs: list[dict[str, Any] | None]) -> np.ndarray:
        """``id`` of each of ``attrs`` (int64): read from ``attr_id`` when ``slots`` and
        ``attrs`` are the last ``fill_attrs``' (or ``remember``'s) objects in this epoch
        (made current then), else computed."""
        last = self._last_attrs
        if (last is not None and last[0] is slots and last[1] is attrs
                and last[3] == self._epoch):
            return self.attr_id[slots]
        return np.fromiter(map(id, attrs), np.int64, len(attrs))

    def profile_values(self, slots: np.ndarray, rows: np.ndarray, names: tuple[str, ...]
                       ) -> np.ndarray:
        """The item-profile features ``names`` of the slots' items (holding ``rows``) in
        their current tables (after ``fill``), names x slots, 0.0 without a value or a
        table: ``ItemTable.feature_columns`` read by each slot's row in it
        (``feature_rows``), one gather from every loaded table's columns side by side
        (``table_columns``)."""
        if not slots.size:
            return np.zeros((len(names), 0))
        tables = self.tables
        memo = getattr(self, "_columns_memo", None)  # older state: none (or a list)
        if (not isinstance(memo, _ColumnsMemo) or memo.table_map is not self._map
                or memo.n_tables != len(tables) or memo.names != names):
            offsets, matrix = table_columns([t for t in tables if t is not None], names)
            none = matrix.shape[1] - 1  # all 0.0: no table
            start = np.array([offsets[t.shard] if t is not None else none for t in tables]
                             + [none], np.int64)  # shard -1 reads the last entry
            # kept while the shards' tables are these (``sync`` takes a new map for any)
            memo = self._columns_memo = _ColumnsMemo(self._map, len(tables), names, matrix,
                                                     start, none, self._epoch,
                                                     np.zeros(0, np.int32))
        matrix = memo.matrix
        # each slot's column in matrix (-1: not looked up since the slot was given or its
        # table values were read again: both start a new epoch); 4 B a slot
        col = memo.column
        if memo.epoch != self._epoch or col.size < self.capacity:
            if memo.epoch != self._epoch:
                col = np.zeros(0, np.int32)
                memo.epoch = self._epoch
            col = memo.column = np.concatenate(
                [col, np.full(self.capacity - col.size, -1, np.int32)])
        at = col[slots]
        todo = (at < 0).nonzero()[0]
        if todo.size:
            stale = slots[todo]
            j = self.feature_rows(stale, rows[todo])
            # a slot without a table keeps feat_row -1: it reads the zero column too
            col[stale] = np.where(j >= 0, memo.start[self.shard[stale]] + j, memo.none)
            at = col[slots]
        return matrix.take(at, axis=1)  # matrix[:, at] in a quarter of the instructions

    def feature_rows(self, slots: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Each slot's row in its current table's ``feature_matrix`` (holding ``rows``;
        after ``fill``): its column in every ``feature_columns``, ``len(index)`` (the
        last) for an item without a profile, -1 for a shard without a table; looked up
        once per slot and table version (``feat_row``), for every reader."""
        j = self.feat_row[slots]
        todo = (j < 0).nonzero()[0]
        if todo.size:
            at = slots[todo]
            self._feature_rows(at, rows[todo], self.shard[at])
            j = self.feat_row[slots]
        return j

    def _feature_rows(self, slots: np.ndarray, rows: np.ndarray, shard: np.ndarray) -> None:
        """``feat_row`` of ``slots`` (holding ``rows``, of shard indices ``shard``): the
        item's row in its table's ``feature_matrix`` (``len(index)`` for an item without
        a profile); left -1 for a shard without a table."""
        item_of = self.view.names.__getitem__
        for k in set(shard.tolist()):
            table = self.tables[k] if k >= 0 else None
            if table is None:
                continue
            index = table.feature_matrix()[0]
            at = (shard == k).nonzero()[0]
            self.feat_row[slots[at]] = np.fromiter(
                map(index.get, map(item_of, rows[at].tolist()), itertools.repeat(len(index))),
                np.int32, at.size)

    def decayed_counts(self, shard: np.ndarray, slots: np.ndarray, ts_ms: int
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Popularity and trending of ``slots`` (after ``fill``; ``shard``: their shard
        indices, ``self.shard[slots]``) decayed to ``ts_ms``: each raw count times its
        table's ``decay_factor`` (0.0 for a shard without a table: its counts read 0)."""
        pop_f, trend_f = [], []
        for t in self.tables:
            pop_f.append(t.decay_factor("popular", ts_ms) if t is not None else 0.0)
            trend_f.append(t.decay_factor("trending", ts_ms) if t is not None else 0.0)
        return (self.pop[slots] * np.array(pop_f)[shard],
                self.trend[slots] * np.array(trend_f)[shard])

    def table_list(self, shard: np.ndarray) -> list[ItemTable | None]:
        """The current table of each shard index of ``shard`` (slots' ``self.shard``,
        after ``fill``)."""
        tables = self.tables  # a comprehension: list(map(tables.__getitem__, ...)) is slower
        return [tables[s] for s in shard.tolist()]

    # -- the index ---------------------------------------------------------------------
    def vectors(self, slots: np.ndarray, rows: np.ndarray, index: Any
                ) -> tuple[np.ndarray, np.ndarray]:
        """``index.vectors`` of the items (vectors, found), read once per slot and index
        version (``index``: the loaded ``ItemIndex`` object; ``rows``: the slots' rows)."""
        if index is not self._index:
            self._index = index
            self._index_gen += 1
        stale = (self._vec_gen[slots] != self._index_gen).nonzero()[0]
        if stale.size:
            todo = slots[stale]
            vecs, found = index.vectors(self.names(rows[stale]))
            if vecs.shape[1] != self._vecs.shape[1]:
                self._vecs = np.zeros((self._vecs.shape[0], vecs.shape[1]), np.float32)
                self._vec_gen[:] = -1
            self._vecs[todo] = vecs
            self._found[todo] = found
            self._vec_gen[todo] = self._index_gen
        return self._vecs.take(slots, axis=0), self._found[slots]  # take: rows in 1/3 the instructions


def table_columns(tables: list[ItemTable], names: tuple[str, ...]
                  ) -> tuple[dict[str, int], np.ndarray]:
    """Every table's ``feature_columns(names)`` side by side, tables in shard-key order,
    and a last column of 0.0: (shard key -> its first column, names x columns). Made once
    per set of table versions and shared by every reader in the process
    (``set_memo``); memory: one more copy of the tables' columns (flows/memory.py
    ``table_rate_item``)."""
    ordered = sorted(tables, key=lambda t: t.shard)

    def make() -> tuple[dict[str, int], np.ndarray]:
        offsets, parts, at = {}, [], 0
        for t in ordered:
            values = t.feature_columns(names)[1]
            offsets[t.shard] = at
            parts.append(values)
            at += values.shape[1]
        parts.append(np.zeros((len(names), 1)))
        return offsets, np.concatenate(parts, axis=1)

    return set_memo(ordered, ("table_columns", names), make)
