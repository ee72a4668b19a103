"""Serving-side view of the item tables' co-visitation rows in one numeric id space.

Serving sums up to ``recent_items`` rows of up to ``max_neighbors`` (x 1.5) neighbours
per channel for every request: ~25k additions, ~8 ms as Python dict updates. Here
each row is a pair of numpy arrays (neighbour ids in a process-wide id space, weights
decayed to the table's ``ts``), built once per table version and row, so a request
is one ``bincount`` per channel. Counts (the channel's normalising popularity) live
in one dense array per channel, refreshed from each table as a new version of it is
seen (an item belongs to one shard, so a shard's new table overwrites only its own
items' counts).

Invariant: ids are dense ``0..len(names)-1`` and never reused by a view; an id grows
the dense arrays. Bounded like ``ItemRows``' slots: once a view holds more than
``max(min_ids, SLACK (1.5) x the loaded tables' items)`` ids (``over_bound``; items churned
through), its owner starts a new view between requests (serving: ``Server``), so every
id handed out within a request stays valid for that request and memory stays
O(items in the loaded tables) per user shard.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np

from state.covisitation import FrozenCoVisitation
from state.item_table import ItemTable

SLACK = 1.5
"""Serving's per-item id spaces (this view's ids, ``ItemRows`` slots) start afresh past
``SLACK`` x the loaded tables' items: churned-out items are dropped then (memory
``SLACK`` x the live items at most; a reset costs the next request its row rebuilds)."""

CHANNELS = ("liked", "any")
_EAGER_VOCAB = 8_192
"""Tables with at most this many distinct items have all their ids looked up at once."""
_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.float64))


class CovisView:
    """Numeric co-visitation rows and counts of the loaded item tables."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        self.counts = {ch: np.zeros(0) for ch in CHANNELS}
        self._tables: dict[str, ItemTable] = {}
        self._rows: dict[int, dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]] = {}
        """``row``'s rows by table (``id``) and (channel, item): a replaced table's go at once."""
        self._known: dict[int, dict[tuple[str, str], tuple[np.ndarray, np.ndarray, int]]] = {}
        """``_known_row``'s rows by table and (channel, item): (ids, weights, -1 or the id
        count they are valid for)."""
        self._vmaps: dict[tuple[int, str], list[Any]] = {}
        """Per (loaded table, channel) with CSR rows: [table, its vocabulary's ids here
        (-2: none known yet)]."""
        self._by_seed: dict[str, dict[str, tuple[np.ndarray, np.ndarray, str]]] = {
            ch: {} for ch in CHANNELS}
        """``row`` of each seed in its shard's synced table and that shard, by channel and
        seed (what ``gather_seeds`` reads first: no shard lookup); a shard's entries go
        with its table."""
        self._seeds_of: dict[str, list[tuple[str, str]]] = {}
        """Per shard: the (channel, seed) entries of ``_by_seed`` its table holds."""

    def name_array(self) -> np.ndarray:
        """``names`` as an object array (its first ``len(names)`` entries; grown by
        doubling as ids are added): naming many ids is one gather (``ItemRows.names``)."""
        named = getattr(self, "_named", 0)  # older state: none
        arr = getattr(self, "_name_arr", None)
        n = len(self.names)
        if arr is None or named < n:
            if arr is None or arr.size < n:
                size = arr.size if arr is not None else 0
                bigger = np.empty(max(n, size + size // 4, 1_024), object)
                if arr is not None:
                    bigger[:named] = arr[:named]
                arr = self._name_arr = bigger
            arr[named:n] = self.names[named:n]
            self._named = n
        return arr

    def over_bound(self, min_ids: int = 16_384) -> bool:
        """More ids than ``max(min_ids, SLACK x the loaded tables' items)`` (per table the
        largest of its catalog and its two channels' counts: what a new view interns at
        once), so the owner should start a new view."""
        n = len(self.names)
        if n <= min_ids:
            return False
        known = sum(max(len(t.catalog), len(t.liked_counts), len(t.interactions))
                    for t in self._tables.values())
        return n > SLACK * known

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
                for ch, seed in self._seeds_of.pop(shard, ()):
                    self._by_seed[ch].pop(seed, None)
                self._rows.pop(id(old), None)
                self._known.pop(id(old), None)
                for ch in CHANNELS:
                    self._vmaps.pop((id(old), ch), None)
            self._tables[shard] = table
            get = self.ids.get
            for ch in CHANNELS:
                counts = table.channel(ch)[1]
                idx = np.fromiter(map(get, counts, itertools.repeat(-1)), np.int64, len(counts))
                if idx.size and idx.min() < 0:  # new items: ids in the counts' order
                    idx = self.intern(counts)
                self._grow()
                self.counts[ch][idx] = np.fromiter(counts.values(), np.float64, len(counts))

    def row(self, table: ItemTable, channel: str, item: str) -> tuple[np.ndarray, np.ndarray]:
        """(neighbour ids, weights decayed to ``table.ts``) of ``item``'s row: strongest
        first when it has neighbours without an id, which get the next ones in that order
        (it breaks the blend's ties); a loaded table's row whose neighbours all have ids
        comes in its stored order (no sort: every reader sums per id, and an id appears
        once in a row, so the sums are the same floats)."""
        rows = self._rows.get(id(table))
        if rows is None:
            rows = self._rows[id(table)] = {}
        key = (channel, item)
        row = rows.get(key)
        if row is None:
            found = self._csr_row(table, channel, item)
            if found is None:
                names, weights = table.covis_row_arrays(channel, item)
                row = (self.intern(names), weights) if names else _EMPTY
            else:
                ids, weights, covis, complete = found
                if not complete:  # new ids: in the strongest-first order
                    nbr, weights = sorted_row(table, channel, covis, item)
                    ids = self.intern([covis._vocab[j] for j in nbr.tolist()])
                row = (ids, weights) if ids.size else _EMPTY
            rows[key] = row
            self._grow()
        return row

    def _known_row(self, table: ItemTable, channel: str, item: str
                   ) -> tuple[np.ndarray, np.ndarray]:
        """``row`` without new ids: the entries whose neighbour has an id (cached while
        no id is added, or for good when none was left out: then it is ``row`` itself,
        see ``_whole_row``)."""
        key = (channel, item)
        row = self._rows.get(id(table), {}).get(key)
        if row is not None:
            return row
        known = self._known.get(id(table))
        if known is None:
            known = self._known[id(table)] = {}
        hit = known.get(key)
        n_names = len(self.names)
        if hit is not None and hit[2] in (-1, n_names):
            return hit[0], hit[1]
        found = self._csr_row(table, channel, item)
        if found is None:
            names, weights = table.covis_row_arrays(channel, item)
            get = self.ids.get
            ids = np.fromiter((get(name, -1) for name in names), np.int64, len(names))
        else:
            ids, weights = found[0], found[1]
        keep = ids >= 0
        complete = bool(keep.all())
        if not complete:
            ids, weights = ids[keep], weights[keep]
        known[key] = (ids, weights, -1 if complete else n_names)
        return ids, weights

    def _csr_row(self, table: ItemTable, channel: str, item: str
                 ) -> tuple[np.ndarray, np.ndarray, FrozenCoVisitation, bool] | None:
        """A loaded (CSR) table's row in its stored order as (ids here, -1 where none;
        weights decayed to ``table.ts``; the table; whether every neighbour has an id);
        None for a table built in process."""
        covis = table.channel(channel)[0]
        if not isinstance(covis, FrozenCoVisitation) or covis._full is not None:
            return None
        nbr, weights = stored_row(table, channel, covis, item)
        if not nbr.size:
            return _EMPTY[0], _EMPTY[1], covis, True
        ids, complete = self._vocab_ids(table, channel, covis, nbr)
        return ids, weights, covis, complete

    def channel_sums(self, channel: str, seeds: list[str], seed_weights: np.ndarray,
                     tables: dict[str, ItemTable], shard_of: Any, ts_ms: int
                     ) -> tuple[np.ndarray, np.ndarray]:
        """``sum weight * row(seed)`` over the seeds (``gather_seeds``) as sparse (ids
        ascending, sums); items no row reaches are absent."""
        ids, w = self.gather_seeds(channel, seeds, seed_weights, tables, shard_of, ts_ms)
        if not ids.size:
            return _EMPTY
        return sparse_sum(ids, w, len(self.names))

    def gather_seeds(self, channel: str, seeds: list[str], seed_weights: np.ndarray,
                     tables: dict[str, ItemTable], shard_of: Any, ts_ms: int,
                     intern: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Every ``(id, weight * w)`` of the seeds' rows (``row``), seed by seed, so sums
        per id add in seed order: seed k (newest first) weighted ``seed_weights[k]`` x
        its table's ``covis_factor(ts_ms)`` (its table: ``tables[shard_of(seed)]``; seeds
        without one are left out); one concatenation of the cached rows and one product.
        Rows are cached by seed for the view's synced tables (one dict read a seed);
        rows not cached yet are made in seed order (new neighbours get ids in that
        order). ``intern=False``: neighbours without an id are left out instead of
        getting one (they cannot be candidates: candidates have ids)."""
        ids, w, _ = self.gather_prefixes(channel, seeds, seed_weights, tables, shard_of, ts_ms,
                                         (len(seeds),), intern)
        return ids, w

    def gather_prefixes(self, channel: str, seeds: list[str], seed_weights: np.ndarray,
                        tables: dict[str, ItemTable], shard_of: Any, ts_ms: int,
                        prefixes: tuple[int, ...], intern: bool = True
                        ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """``gather_seeds``, and for each ``p`` of ``prefixes`` how many of the entries
        come from ``seeds[:p]``: ``ids[:end], w[:end]`` is ``gather_seeds`` of those seeds
        (rows are concatenated in seed order), so one gather serves several seed counts."""
        none = [0] * len(prefixes)
        if not seeds:
            return *_EMPTY, none
        synced = self._tables
        by_seed = self._by_seed[channel]
        seed_row = by_seed.get
        get_row = self.row if intern else self._known_row
        shard_info: dict[str, tuple[float, ItemTable | None, bool]] = {}
        taken: list[tuple[tuple[np.ndarray, np.ndarray, Any], float, int]] = []
        take = taken.append  # (row, its weight, its seed's position): one append a seed
        seed_weight = seed_weights.tolist()
        if len(seed_weight) != len(seeds):
            raise ValueError("one weight per seed")
        for k, seed in enumerate(seeds):
            row = seed_row(seed)  # (ids, weights, shard) of a synced table's whole row
            sh = shard_of(seed) if row is None else row[2]
            info = shard_info.get(sh)
            if info is None:
                t = tables.get(sh)
                info = shard_info[sh] = ((t.covis_factor(ts_ms), t, t is synced.get(sh))
                                         if t is not None else (0.0, None, False))
            if row is None or not info[2]:  # not cached, or its table is not the synced one
                table = info[1]
                if table is None:
                    continue
                row = get_row(table, channel, seed)
                if info[2] and self._whole_row(table, channel, seed, row):
                    by_seed[seed] = (row[0], row[1], sh)
                    self._seeds_of.setdefault(sh, []).append((channel, seed))
            take((row, seed_weight[k] * info[0], k))
        if not taken:
            return *_EMPTY, none
        ids_parts = [t[0][0] for t in taken]
        ids = np.concatenate(ids_parts)
        if not ids.size:
            return *_EMPTY, none
        sizes = np.fromiter(map(len, ids_parts), np.int64, len(ids_parts))
        w = np.concatenate([t[0][1] for t in taken])
        w *= np.array([t[1] for t in taken]).repeat(sizes)  # in place: no third array of ~10^4
        if prefixes == (len(seeds),):
            return ids, w, [ids.size]
        at = [t[2] for t in taken]
        ends = np.concatenate([[0], sizes.cumsum()])[np.searchsorted(at, prefixes)]
        return ids, w, ends.tolist()

    def _whole_row(self, table: ItemTable, channel: str, item: str,
                   row: tuple[np.ndarray, np.ndarray]) -> bool:
        """Whether ``row`` (from ``row`` or ``_known_row``) is the item's whole row: the one
        ``row`` made, or a ``_known_row`` that left no neighbour out (every neighbour had
        an id, so ``row`` would give the same ids and weights without interning any)."""
        key = (channel, item)
        if self._rows.get(id(table), {}).get(key) is row:
            return True
        known = self._known.get(id(table), {}).get(key)
        return known is not None and known[2] == -1 and known[0] is row[0]

    def _vocab_ids(self, table: ItemTable, channel: str, covis: FrozenCoVisitation,
                   vocab_idx: np.ndarray) -> tuple[np.ndarray, bool]:
        """This view's ids of a table's vocabulary entries (-1: not an id) and whether all
        are ids. Found ids are kept per table version (ids are never reused); entries
        without one are looked up again when read (they may have got one since). Once
        every entry of the table has its id, a read is one gather."""
        key = (id(table), channel)
        entry = self._vmaps.get(key)
        if entry is None:
            vocab = covis._vocab
            vmap = np.full(len(vocab), -2, np.int64)  # -2: no id known (yet)
            if len(vocab) <= _EAGER_VOCAB:  # small: every entry at once
                vmap[:] = np.fromiter(map(self.ids.get, vocab, itertools.repeat(-2)), np.int64,
                                      len(vocab))
            entry = self._vmaps[key] = [table, vmap, bool(vmap.size) and int(vmap.min()) >= 0]
        vmap = entry[1]
        ids = vmap.take(vocab_idx)  # vmap[vocab_idx]: take casts the int32 index once
        if entry[2] or ids.min() >= 0:  # every entry has its id (the usual case)
            return ids, True
        unknown = ids == -2
        if unknown.any():
            todo = np.unique(vocab_idx[unknown])
            get, vocab = self.ids.get, covis._vocab
            vmap[todo] = np.fromiter((get(vocab[j], -2) for j in todo.tolist()), np.int64,
                                     todo.size)
            entry[2] = int(vmap.min()) >= 0
            ids = vmap.take(vocab_idx)
            ids[ids == -2] = -1
        return ids, bool(ids.min() >= 0)


def stored_row(table: ItemTable, channel: str, covis: FrozenCoVisitation, item: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """A loaded table's row of ``item`` in ``channel`` in its stored order as
    (neighbours' vocabulary indices, weights decayed to ``table.ts``); computed once per
    table version and row for every view in the process (the item shards' tables are
    shared by the user shards: ``table.memo``)."""
    rows = table.memo.get(("covis_stored", channel))
    if rows is None:
        rows = table.memo.setdefault(("covis_stored", channel), {})
    row = rows.get(item)
    if row is None:
        r = covis._row_of.get(item)
        if r is None:
            row = _EMPTY
        else:
            a, b = int(covis._starts[r]), int(covis._starts[r + 1])
            row = (covis._arrays["neighbors"][a:b],
                   covis._arrays["values"][a:b] * covis._decay(table.ts))
        rows[item] = row
    return row


def sorted_row(table: ItemTable, channel: str, covis: FrozenCoVisitation, item: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """``stored_row`` strongest first (``neighbors``' order; equal weights in stored
    order): what a view interns new neighbours in. Once per table version and row for
    every view in the process (``table.memo``)."""
    rows = table.memo.get(("covis_rows", channel))
    if rows is None:
        rows = table.memo.setdefault(("covis_rows", channel), {})
    row = rows.get(item)
    if row is None:
        nbr, weights = stored_row(table, channel, covis, item)
        if nbr.size:  # by the stored values (decaying them may round two to one)
            r = covis._row_of[item]
            vals = covis._arrays["values"][int(covis._starts[r]):int(covis._starts[r + 1])]
            order = (-vals).argsort(kind="stable")
            row = (nbr[order], weights[order])
        else:
            row = _EMPTY
        rows[item] = row
    return row


class SparseScores:
    """Per-item scores held as (ids ascending, values) in a :class:`CovisView` id space;
    looked up for a few items at a time (the candidates) instead of built into a dict
    of every reachable item."""

    def __init__(self, ids: np.ndarray, values: np.ndarray, index: dict[str, int]) -> None:
        self.ids = ids
        self.values = values
        self.index = index
        self.normalized: tuple[float, np.ndarray | None] | None = None
        """``(alpha, values / count**alpha / their max)`` once retrieval computed the
        channel's part of the blend (None as the array: the max was not positive), so
        the pool ranker's features reuse it."""

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
        pos = np.minimum(self.ids.searchsorted(rows), self.ids.size - 1)
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
        nz = dense.nonzero()[0]
        return nz, dense[nz]
    order, first = group_ids(ids)
    return ids[order][first], np.bincount(first.cumsum() - 1, weights=weights[order])


def sums_at(ids: np.ndarray, weights: np.ndarray, wanted: np.ndarray,
            size: int | None = None) -> np.ndarray:
    """``sparse_sum(ids, weights)`` read at ``wanted`` (0.0 where absent, and for -1):
    each wanted id's weights added in input order (the same floats), without summing
    the ids nobody wants: one scratch array over the id space (``size``: above every id;
    default: the largest + 1) maps an id to its wanted position (serving: ~100 pool
    items among ~10^4 gathered entries, several times faster than summing every id)."""
    if not ids.size or not wanted.size:
        return np.zeros(wanted.size)
    if size is None:
        size = max(int(ids.max()), int(wanted.max())) + 1
    ok = wanted >= 0
    every = bool(ok.all())
    known = wanted if every else wanted[ok]
    slot = np.full(size, -1, np.int64)
    slot[known] = np.arange(wanted.size) if every else ok.nonzero()[0]
    at = slot[ids]
    hit = at >= 0
    sums = np.bincount(at[hit], weights=weights[hit], minlength=wanted.size)
    found = sums[slot[known]]  # a repeated id: the sum sits at its last position
    if every:
        return found
    out = np.zeros(wanted.size)
    out[ok] = found
    return out


def group_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, first)``: a stable argsort of ``ids`` and, along it, where each distinct
    id starts. Equal ids keep their input order, so sums over a group (``bincount``)
    add in input order, as ``np.unique(..., return_inverse=True)`` + ``bincount`` do,
    without scattering the inverse back (about 2x faster on ~5k ids)."""
    order = ids.argsort(kind="stable")
    ordered = ids[order]
    first = np.empty(ordered.size, bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return order, first
