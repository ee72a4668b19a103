"""Item-to-item co-visitation: decayed, bounded counts of items consumed close together.

A retrieval source ("users who consumed your recent items next consumed ...") and a
ranking feature, with no Bytewax in it.

* **Pairs.** When a user consumes ``new_item``, each of their recent items (newest
  first, position ``k = 0, 1, ...``, at most ``window``) forms the symmetric pairs
  ``(new_item, r_k, w)`` and ``(r_k, new_item, w)`` with ``w = position_decay**k``
  (so the most recent item weighs 1). :meth:`CoVisitation.pairs_for` builds them on
  the user side; :meth:`CoVisitation.add` applies them on the side that owns the
  row's item (``pair[0]``), so an item-sharded flow routes each pair by its first item.
* **Decay.** Weights decay exponentially in event time with ``half_life_ms``: a pair
  added at ``t`` weighs ``w * 2**(-(now - t) / half_life_ms)`` at ``now``. Stored as
  ``w * 2**((t - t_ref) / half_life_ms)`` (a "grown" value) so adding is a plain sum
  and comparisons never need ``now``; ``t_ref`` is moved forward (all values rescaled)
  before the growth factor could overflow. Out-of-order events are exact.
* **Bound.** Each row keeps at most ``max_neighbors`` (M) neighbours: when a new
  neighbour arrives in a full row, the weakest (smallest decayed weight, the new one
  included) is dropped. With ``prune_slack`` s > 0 a row may grow to ``M * (1 + s)``
  and is then cut to its M strongest in one pass: O(log M) amortised per pair instead
  of O(M) per eviction (M = 300 rows at window 40 made eviction the cost of the item
  side), and newcomers get ``M * s`` pairs' time to prove themselves before a cut. At
  most ``max_items`` rows (least recently written dropped first), so memory is
  O(max_items * M * (1 + s)).
* **Candidates.** ``score(c) = sum_k position_decay**k * covis(r_k, c)`` over the
  user's recent items ``r_k``, divided by ``popularity[c] ** pop_alpha`` when a
  popularity map is given (so merely popular items do not dominate every list).
* **Sharding / serving.** :meth:`merge` folds another table's rows in (rows of the
  same item are summed, then cut to M) so a serving copy can be assembled from the
  item shards' snapshots; :meth:`select` keeps the rows an owner predicate accepts
  (re-sharding). ``save``/``load`` write one ``.npz`` file (no pickled objects) for the
  snapshot store; pickling uses the same compact arrays.

Times are event time in **ms**. Scores are in "decayed pair weight" units.
"""

from __future__ import annotations

import heapq
import os
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from itertools import chain, islice, repeat

import numpy as np

from state.decay import decay_factor
from state.npz import save_npz
from state.packing import pack_strings, unpack_strings

Pair = tuple[str, str, float]
Csr = tuple[list[str], np.ndarray, np.ndarray, np.ndarray]
"""(vocabulary: row items first, then the other neighbours; row sizes; neighbour ids
int32; grown values float64): what ``to_arrays`` packs."""

KEEP_ARRAYS_BYTES = 8 << 20
"""``publish_arrays(keep=True)`` keeps the arrays it returned for the next call when they
take at most this many bytes (a MovieLens shard's ~2 MB; larger tables are read back
from the last table's file by the caller instead)."""
_MAX_EXP2 = 600.0  # rebase before values could exceed 2**600 (float64 max is ~2**1024)
_FORMAT = 1


@dataclass(frozen=True)
class CoVisConfig:
    """Parameters of a :class:`CoVisitation` table (all of them are snapshotted)."""

    half_life_ms: int = 30 * 86_400_000  # event-time half-life of a pair's weight
    max_neighbors: int = 100  # M: neighbours kept per item row
    window: int = 20  # recent items paired with each new one
    position_decay: float = 0.8  # the k-th most recent item (k = 0 newest) pairs with weight decay**k
    max_items: int = 1_000_000  # rows kept (least recently written dropped first)
    pop_alpha: float = 0.25  # candidates: divide by popularity**pop_alpha when given
    prune_slack: float = 0.0  # rows may grow to M * (1 + slack) before one prune to the M strongest

    def __post_init__(self) -> None:
        if self.half_life_ms <= 0 or self.max_neighbors < 1 or self.window < 1 or self.max_items < 1:
            raise ValueError("need half_life_ms > 0, max_neighbors >= 1, window >= 1, max_items >= 1")
        if not 0.0 < self.position_decay <= 1.0:
            raise ValueError("position_decay must be in (0, 1]")
        if self.prune_slack < 0.0:
            raise ValueError("prune_slack must be >= 0")


def _weight(kv: tuple[str, float]) -> float:
    return kv[1]


@cache
def _position_weights(decay: float, window: int) -> tuple[float, ...]:
    """``decay**k`` for ``k < window`` as repeated products (``w *= decay`` from 1.0):
    the pair weight of the ``k``-th kept recent item."""
    out, w = [], 1.0
    for _ in range(window):
        out.append(w)
        w *= decay
    return tuple(out)


def _first_distinct(recent_items: Sequence[str], new_item: str, window: int) -> list[str]:
    """The first ``window`` distinct items of ``recent_items`` other than ``new_item``, in
    order: a list's head as it is when it holds neither a repeat nor ``new_item`` (the
    user shard's lists), else by ``dict.fromkeys``."""
    if isinstance(recent_items, list):
        head = recent_items[:window]
        distinct = set(head)
        if len(distinct) == len(head) and new_item not in distinct:
            return head
    return list(islice(dict.fromkeys(chain((new_item,), recent_items)), 1, window + 1))


_SLOTS: list[int] = list(range(1024))
"""Shared int objects for row slots (a slot past 256 would otherwise be a new int per
neighbour): ``Row.idx`` values are taken from here."""


_SLOTS_LOCK = threading.Lock()


def _slots(n: int) -> list[int]:
    """``_SLOTS`` holding at least ``n`` slots (``_SLOTS[k] == k`` always: grown under a
    lock, since tables of several worker threads share it)."""
    if len(_SLOTS) < n:
        with _SLOTS_LOCK:
            if len(_SLOTS) < n:
                _SLOTS.extend(range(len(_SLOTS), max(n, 2 * len(_SLOTS))))
    return _SLOTS


class Row(Mapping[str, float]):
    """One co-visitation row: neighbour -> grown weight, in insertion order, as a
    name -> slot dict and the weights in a float64 ``array`` by slot (slot ``k`` is the
    ``k``-th name of ``idx``). The weights are one buffer, so publication copies a row's
    values with one ``memcpy`` instead of reading a float object per neighbour; a read
    is a mapping like the ``dict`` it replaces (same keys, values and order)."""

    __slots__ = ("idx", "val")

    def __init__(self, idx: dict[str, int] | None = None, val: array | None = None) -> None:
        self.idx: dict[str, int] = {} if idx is None else idx
        self.val: array = array("d") if val is None else val

    @classmethod
    def of(cls, items: Iterable[tuple[str, float]]) -> Row:
        """A row holding ``items`` (distinct names) in their order."""
        pairs = list(items)
        return cls(dict(zip([b for b, _ in pairs], _slots(len(pairs)), strict=False)),
                   array("d", [v for _, v in pairs]))

    @classmethod
    def from_columns(cls, names: list[str], values: np.ndarray) -> Row:
        """A row of ``names`` (distinct) with ``values`` (float64, same length)."""
        val = array("d")
        val.frombytes(np.ascontiguousarray(values, np.float64).tobytes())
        return cls(dict(zip(names, _slots(len(names)), strict=False)), val)

    def __getitem__(self, name: str) -> float:
        return self.val[self.idx[name]]

    def get(self, name: str, default: float | None = None) -> float | None:  # type: ignore[override]
        s = self.idx.get(name)
        return default if s is None else self.val[s]

    def __setitem__(self, name: str, value: float) -> None:
        s = self.idx.get(name)
        if s is None:
            self.idx[name] = _slots(len(self.val) + 1)[len(self.val)]
            self.val.append(value)
        else:
            self.val[s] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __contains__(self, name: object) -> bool:
        return name in self.idx

    def items(self) -> Iterator[tuple[str, float]]:  # type: ignore[override]
        """(name, weight) in row order (an iterator: one pass)."""
        return zip(self.idx, self.val, strict=False)

    def values(self) -> array:  # type: ignore[override]
        """The weights in row order (the row's own buffer: do not resize it)."""
        return self.val

    def weights(self) -> np.ndarray:
        """The weights as a float64 view of the row's buffer (no copy): drop it before
        the row is written again (a buffer with a view cannot grow)."""
        return np.frombuffer(self.val, np.float64) if self.val else np.zeros(0)

    def copy(self) -> Row:
        return Row(dict(self.idx), array("d", self.val))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Row({dict(self.items())!r})"


class CoVisitation:
    """Decayed co-visitation rows ``item -> {neighbour: grown weight}`` (each a :class:`Row`),
    bounded per row."""

    _written: dict[str, bool] | None = None
    """Rows written since the arrays of the last ``publish_arrays`` (at most ``max_items``;
    None: not tracked, every row counts as written), each with whether its neighbours may
    no longer start with those it had then (True: the row was created, pruned or cut
    since; False: only values changed and neighbours were appended)."""

    def __init__(self, config: CoVisConfig | None = None, **kw: float) -> None:
        if config is None:
            config = CoVisConfig(**kw)  # type: ignore[arg-type]
        elif kw:
            raise TypeError("pass either config or keyword options, not both")
        self.config = config
        self._rows: OrderedDict[str, Row] = OrderedDict()
        self._t_ref: int | None = None  # event time (ms) where grown == decayed
        self.pairs_added = 0
        self.evicted_neighbors = 0
        self.evicted_rows = 0

    # --- time ------------------------------------------------------------------------------

    def _grow(self, ts_ms: int) -> float:
        """Growth factor ``2**((ts - t_ref) / half_life)``, rebasing ``t_ref`` if needed."""
        if self._t_ref is None:
            self._t_ref = int(ts_ms)
        e = (ts_ms - self._t_ref) / self.config.half_life_ms
        if e > _MAX_EXP2:
            self._rebase(int(ts_ms))
            e = 0.0
        return 2.0**e

    def _rebase(self, t_new: int) -> None:
        """Move ``t_ref`` to ``t_new`` (rescaling every value; amortised over ~600 half-lives)."""
        assert self._t_ref is not None
        f = decay_factor(t_new - self._t_ref, self.config.half_life_ms)
        for row in self._rows.values():
            if row.val:
                weights = np.frombuffer(row.val, np.float64)
                weights *= f  # in place: the same product per value as ``v * f``
                del weights  # release the buffer (the row may grow again)
        self._t_ref = t_new

    def _decay(self, now_ms: int) -> float:
        """Factor turning grown values into weights decayed to ``now_ms``."""
        if self._t_ref is None:
            return 0.0
        return decay_factor(now_ms - self._t_ref, self.config.half_life_ms)

    # --- writes ------------------------------------------------------------------------------

    def pairs_for(self, recent_items: Sequence[str], new_item: str, ts_ms: int | None = None) -> list[Pair]:
        """Symmetric weighted pairs for ``new_item`` consumed after ``recent_items``
        (newest first): ``(new, r_k, d**k)`` and ``(r_k, new, d**k)`` for the first
        ``window`` distinct recent items other than ``new_item`` (``k`` counts those
        kept, 0 = most recent), in that order. ``ts_ms`` is accepted for API symmetry
        (unused). Built by C-level iteration (``zip`` into the even and odd slots), not a
        loop per recent item."""
        c = self.config
        kept = _first_distinct(recent_items, new_item, c.window)
        n = len(kept)
        weights = _position_weights(c.position_decay, c.window)
        out: list[Pair] = [None] * (2 * n)  # type: ignore[list-item]
        out[0::2] = zip(repeat(new_item, n), kept, weights, strict=False)
        out[1::2] = zip(kept, repeat(new_item, n), weights, strict=False)
        return out

    def add(self, pairs: Iterable[Pair], ts_ms: int) -> None:
        """Add each ``(a, b, w)`` to row ``a`` at event time ``ts_ms`` (ms), keeping each
        row to the ``max_neighbors`` strongest neighbours."""
        g = self._grow(ts_ms)
        m = self.config.max_neighbors
        limit = m + int(m * self.config.prune_slack)
        rows = self._rows
        written = self._written
        slots = _slots(limit + 2)
        last: str | None = None  # the previous pair's row item: its row is ``row``, last in rows
        row = Row()
        idx, val = row.idx, row.val
        added = 0
        try:
            for a, b, w in pairs:
                added += 1
                if a != last:
                    last = a
                    row = rows.get(a)  # type: ignore[assignment]
                    if row is None:
                        row = rows[a] = Row()
                        if written is not None:
                            written[a] = True
                        if len(rows) > self.config.max_items:
                            rows.popitem(last=False)
                            self.evicted_rows += 1
                    else:
                        rows.move_to_end(a)
                        if written is not None:
                            written.setdefault(a, False)
                    idx, val = row.idx, row.val
                s = idx.get(b)
                if s is not None:
                    val[s] += w * g
                    continue
                n = len(val)
                val.append(w * g)  # before the name: a weight that raises leaves its row as it was
                idx[b] = slots[n]
                if n >= limit:
                    if written is not None:
                        written[a] = True
                    names = list(idx)
                    if limit == m:  # the first weakest (row order) goes
                        weakest = min(range(n + 1), key=val.__getitem__)
                        del names[weakest], val[weakest]
                        idx = row.idx = dict(zip(names, slots, strict=False))
                        self.evicted_neighbors += 1
                    else:  # amortised: one O(row) prune per slack inserts, not one per insert
                        self.evicted_neighbors += n + 1 - m
                        # heapq.nlargest(m, ...) is this order's head: strongest first, ties
                        # in row order (a stable sort of the negated weights, all >= 0)
                        weights = np.frombuffer(val, np.float64)
                        keep = np.argsort(-weights, kind="stable")[:m]
                        idx = row.idx = dict(zip([names[k] for k in keep.tolist()], slots,
                                                 strict=False))
                        val = row.val = array("d", weights[keep].tobytes())
                        del weights  # the old buffer's view
        finally:
            self.pairs_added += added
        if written is not None and len(written) > self.config.max_items:
            self._written = None  # more rows written than a table holds: rebuild them all

    def observe(self, recent_items: Sequence[str], new_item: str, ts_ms: int) -> list[Pair]:
        """``add(pairs_for(...))`` in one call (unsharded use); returns the pairs."""
        pairs = self.pairs_for(recent_items, new_item, ts_ms)
        self.add(pairs, ts_ms)
        return pairs

    def remove(self, item_ids: Iterable[str]) -> int:
        """Drop the rows of retired items (they stay as neighbours until they fade or are
        evicted; filter them at serving). Returns how many rows were dropped."""
        return sum(self._rows.pop(i, None) is not None for i in item_ids)

    # --- reads -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Rows (items with at least one neighbour)."""
        return len(self._rows)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._rows

    def row_size(self, item_id: str) -> int:
        return len(self._rows.get(item_id, ()))

    def score(self, item_a: str, item_b: str, now_ms: int) -> float:
        """Decayed co-visitation weight of ``b`` in ``a``'s row at ``now_ms`` (0 if absent)."""
        row = self._rows.get(item_a)
        if not row:
            return 0.0
        return row.get(item_b, 0.0) * self._decay(now_ms)

    def row_arrays(self, item_id: str, now_ms: int) -> tuple[list[str], np.ndarray]:
        """(neighbour ids, weights decayed to ``now_ms``) of ``item_id``'s whole row,
        strongest first: ``neighbors`` as a list and an array."""
        top = self.neighbors(item_id, self.row_size(item_id), now_ms)
        return [b for b, _ in top], np.fromiter((v for _, v in top), np.float64, len(top))

    def row_weights(self, item_id: str, now_ms: int) -> dict[str, float]:
        """Every neighbour of ``item_id`` -> its weight decayed to ``now_ms``, in stored
        order (the values of ``neighbors``, unsorted: for lookups by neighbour)."""
        row = self._rows.get(item_id)
        if not row:
            return {}
        f = self._decay(now_ms)
        return {b: v * f for b, v in row.items()}

    def neighbors(self, item_id: str, n: int, now_ms: int) -> list[tuple[str, float]]:
        """The ``n`` strongest neighbours of ``item_id`` with decayed weights, strongest first."""
        row = self._rows.get(item_id)
        if not row:
            return []
        f = self._decay(now_ms)
        top = heapq.nlargest(n, row.items(), key=lambda kv: kv[1])
        return [(b, v * f) for b, v in top]

    def candidates(
        self,
        recent_items: Sequence[str],
        n: int,
        now_ms: int,
        popularity: Mapping[str, float] | None = None,
        exclude: set[str] | frozenset[str] | None = None,
    ) -> list[tuple[str, float]]:
        """Top ``n`` items by ``sum_k d**k covis(r_k, c)`` over the first ``window`` recent
        items (newest first), divided by ``popularity[c] ** pop_alpha`` if ``popularity``
        is given (items missing from it count as popularity 1). The recent items and
        ``exclude`` are never returned. Scores are decayed to ``now_ms``."""
        c = self.config
        acc: dict[str, float] = {}
        w = 1.0
        seen: set[str] = set()
        for r in recent_items:
            if r in seen:
                continue
            seen.add(r)
            if len(seen) > c.window:
                break
            row = self._rows.get(r)
            if row:
                get = acc.get
                for b, v in row.items():
                    acc[b] = get(b, 0.0) + w * v
            w *= c.position_decay
        for r in seen:
            acc.pop(r, None)
        if exclude:
            for e in exclude:
                acc.pop(e, None)
        if not acc:
            return []
        if popularity is not None and c.pop_alpha != 0.0:
            a = c.pop_alpha
            for b in acc:
                p = popularity.get(b, 1.0)
                if p > 0.0:
                    acc[b] /= p**a
        f = self._decay(now_ms)
        top = heapq.nlargest(n, acc.items(), key=lambda kv: kv[1])
        return [(b, v * f) for b, v in top]

    # --- sharding --------------------------------------------------------------------------

    def merge(self, other: CoVisitation) -> CoVisitation:
        """Fold ``other``'s rows into this table (same config; values of a shared
        ``(a, b)`` summed, rows cut to M). Returns self."""
        if other.config.half_life_ms != self.config.half_life_ms:
            raise ValueError("cannot merge tables with different half-lives")
        if other._t_ref is None:
            return self
        self._written = None
        if self._t_ref is None:
            self._t_ref = other._t_ref
        if other._t_ref > self._t_ref:
            self._rebase(other._t_ref)
        f = decay_factor(self._t_ref - other._t_ref, self.config.half_life_ms)
        m = self.config.max_neighbors
        for a, orow in other._rows.items():
            row = self._rows.get(a)
            if row is None:
                row = self._rows[a] = Row()
            for b, v in orow.items():
                row[b] = row.get(b, 0.0) + v * f  # type: ignore[operator]
            if len(row) > m:
                keep = heapq.nlargest(m, row.items(), key=lambda kv: kv[1])
                self.evicted_neighbors += len(row) - m
                self._rows[a] = Row.of(keep)
        while len(self._rows) > self.config.max_items:
            self._rows.popitem(last=False)
            self.evicted_rows += 1
        return self

    def select(self, owns: Callable[[str], bool]) -> CoVisitation:
        """A new table with the rows whose item ``owns(item)`` accepts (e.g. one shard's)."""
        out = CoVisitation(self.config)
        out._t_ref = self._t_ref
        for a, row in self._rows.items():
            if owns(a):
                out._rows[a] = row.copy()
        return out

    # --- persistence ---------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Compact arrays: item vocabulary, CSR rows (neighbour indices, grown values)."""
        return self._packed(*self._csr())

    def _csr(self) -> Csr:
        """``to_arrays``' vocabulary and CSR rows, built from every row."""
        rows = self._rows
        # rows first (row i = vocab[i]), then neighbours in order of first appearance
        idxs = [r.idx for r in rows.values()]
        names = list(dict.fromkeys(chain(rows, chain.from_iterable(idxs))))
        vocab: dict[str, int] = dict(zip(names, range(len(names)), strict=True))
        sizes = np.fromiter(map(len, idxs), np.int64, len(rows))
        nbr = np.fromiter(map(vocab.__getitem__, chain.from_iterable(idxs)), np.int32,
                          int(sizes.sum()))
        val = (np.concatenate([r.weights() for r in rows.values()]) if rows
               else np.zeros(0))
        return names, sizes, nbr, val

    _kept: tuple[dict[str, np.ndarray], list[str]] | None = None
    """The arrays the last ``publish_arrays(keep=True)`` returned, when they fit
    ``KEEP_ARRAYS_BYTES``, and their vocabulary as the list they were packed from (so the
    next call need not decode it); not pickled: a restored table builds its next arrays
    whole."""

    def publish_arrays(self, previous: Mapping[str, np.ndarray] | None = None,
                       keep: bool = False) -> dict[str, np.ndarray]:
        """``to_arrays`` for a published version, and from here on the rows written are
        tracked until the next call. ``previous``: the arrays the last call returned
        (e.g. read back from its file, or ``kept_arrays``): the rows not written since
        are then copied from them instead of walked (between two item tables most rows
        are unwritten), the same arrays bit for bit; anything that does not fit them
        builds from the rows. ``keep``: hold the result for ``kept_arrays`` if it takes
        at most ``KEEP_ARRAYS_BYTES`` (callers must not modify it)."""
        csr = None
        if previous is not None and self._written is not None:
            csr = self._csr_since(previous, self._written)
        if csr is None:
            csr = self._csr()
        out = self._packed(*csr)
        self._written = {}
        self._kept = ((out, csr[0])
                      if keep and sum(a.nbytes for a in out.values()) <= KEEP_ARRAYS_BYTES
                      else None)
        return out

    def kept_arrays(self) -> dict[str, np.ndarray] | None:
        """The last ``publish_arrays(keep=True)``'s arrays if kept (see there), else None."""
        return None if self._kept is None else self._kept[0]

    def _vocabulary_of(self, prev: Mapping[str, np.ndarray]) -> list[str]:
        """``prev``'s vocabulary as a new list: a copy of the kept one when ``prev`` is the
        kept arrays (the same strings), else decoded from its blob."""
        kept = self._kept
        if kept is not None and prev is kept[0]:
            return list(kept[1])
        return unpack_strings(prev["vocab_blob"], prev["vocab_offsets"])

    def written_share(self) -> float | None:
        """Rows written since the last ``publish_arrays`` per row held (None: untracked)."""
        if self._written is None or not self._rows:
            return None
        return len(self._written) / len(self._rows)

    def _csr_since(self, prev: Mapping[str, np.ndarray], written: dict[str, bool]
                   ) -> Csr | None:
        """``_csr`` from ``prev`` (this table's arrays when ``written`` was emptied)
        and the rows written since; None when ``prev`` cannot be that version.

        Names are first numbered in a working space (``prev``'s vocabulary, then new
        names), each row's neighbours taken as ids from ``prev`` (unwritten rows, runs of
        them in one slice; a written row that only appended neighbours, the ids of its
        first ones) or looked up (the rest); the vocabulary is then the rows in order
        followed by the other ids in order of first appearance (distinct positions: the
        order is unambiguous), as ``to_arrays`` numbers them."""
        rows = self._rows
        try:
            if (int(prev["format"]) != _FORMAT or self._t_ref is None or not rows
                    or not bool(prev["has_t_ref"]) or int(prev["t_ref"]) != self._t_ref):
                return None
            names = self._vocabulary_of(prev)
            n_prev = int(prev["n_rows"])
            pnbr, pval = np.asarray(prev["neighbors"]), np.asarray(prev["values"])
            starts = np.zeros(n_prev + 1, np.int64)
            np.cumsum(np.asarray(prev["row_sizes"]), out=starts[1:])
        except (KeyError, TypeError, ValueError):
            return None
        if starts[-1] != pnbr.size or pval.size != pnbr.size or n_prev > len(names):
            return None
        ids: dict[str, int] = dict(zip(names, range(len(names)), strict=True))
        bounds = starts.tolist()

        def new_id(name: str) -> int:
            ids[name] = len(names)
            names.append(name)
            return ids[name]

        nbr_parts: list[np.ndarray] = []
        val_parts: list[np.ndarray] = []
        row_ids: list[int] = []
        run: list[int] | None = None  # [start, end) of unwritten rows adjacent in prev
        for a, row in rows.items():
            idx = row.idx
            g = ids.get(a)
            if g is None:
                g = new_id(a)
            row_ids.append(g)
            reordered = written.get(a)
            if g < n_prev and reordered is None:
                s, e = bounds[g], bounds[g + 1]
                if e - s != len(idx):
                    return None
                if run is not None and run[1] == s:
                    run[1] = e
                    continue
                if run is not None:
                    nbr_parts.append(pnbr[run[0]:run[1]])
                    val_parts.append(pval[run[0]:run[1]])
                run = [s, e]
                continue
            if run is not None:
                nbr_parts.append(pnbr[run[0]:run[1]])
                val_parts.append(pval[run[0]:run[1]])
                run = None
            kept = 0  # leading neighbours whose ids are prev's
            if g < n_prev and not reordered:  # prev's neighbours, then the appended ones
                s, e = bounds[g], bounds[g + 1]
                kept = e - s
                if kept > len(idx) or (kept and names[pnbr[s]] != next(iter(idx))):
                    return None
                nbr_parts.append(pnbr[s:e])
            keys = islice(idx, kept, None) if kept else idx
            try:
                part = np.fromiter(map(ids.__getitem__, keys), np.int64, len(idx) - kept)
            except KeyError:  # a name new since prev
                get = ids.get
                keys = islice(idx, kept, None) if kept else idx
                part = np.array([i if (i := get(b)) is not None else new_id(b) for b in keys],
                                np.int64)
            nbr_parts.append(part)
            val_parts.append(row.weights())  # a view: copied by the concatenation below
        if run is not None:
            nbr_parts.append(pnbr[run[0]:run[1]])
            val_parts.append(pval[run[0]:run[1]])
        occ = np.concatenate(nbr_parts).astype(np.int64, copy=False)
        heads = np.asarray(row_ids, np.int64)
        first = np.full(len(names), occ.size, np.int64)  # each id's first position in occ
        np.minimum.at(first, occ, np.arange(occ.size))
        first[heads] = occ.size
        others = np.flatnonzero(first < occ.size)
        order = np.concatenate([heads, others[np.argsort(first[others])]])
        remap = np.zeros(len(names), np.int64)
        remap[order] = np.arange(order.size)
        sizes = np.fromiter([len(r.idx) for r in rows.values()], np.int64, len(rows))
        return ([names[g] for g in order.tolist()], sizes, remap[occ].astype(np.int32),
                np.concatenate(val_parts))

    def _packed(self, names: list[str], sizes: np.ndarray, nbr: np.ndarray, val: np.ndarray
                ) -> dict[str, np.ndarray]:
        """The arrays of ``to_arrays`` around its vocabulary and CSR rows."""
        blob, offsets = pack_strings(names)
        cfg = {f"cfg_{k}": np.asarray(v) for k, v in asdict(self.config).items()}
        return {
            "format": np.asarray(_FORMAT),
            "vocab_blob": blob,
            "vocab_offsets": offsets,
            "n_rows": np.asarray(len(self._rows)),
            "row_sizes": sizes,
            "neighbors": nbr,
            "values": val,
            "t_ref": np.asarray(-1 if self._t_ref is None else self._t_ref, np.int64),
            "has_t_ref": np.asarray(self._t_ref is not None),
            "stats": np.array([self.pairs_added, self.evicted_neighbors, self.evicted_rows], np.int64),
            **cfg,
        }

    @classmethod
    def from_arrays(cls, s: Mapping[str, np.ndarray], frozen: bool = False) -> CoVisitation:
        """Inverse of :meth:`to_arrays`; ``frozen``: a read-only ``FrozenCoVisitation``
        that keeps the arrays and decodes a row when it is read (published tables)."""
        if int(s["format"]) != _FORMAT:
            raise ValueError(f"unsupported co-visitation format {s['format']}")
        if frozen:
            return FrozenCoVisitation(s)
        out = cls(_config_of(s))
        vocab = unpack_strings(np.asarray(s["vocab_blob"]), np.asarray(s["vocab_offsets"]))
        n_rows = int(s["n_rows"])
        sizes = np.asarray(s["row_sizes"]).tolist()
        nbr = np.asarray(s["neighbors"])
        val = np.asarray(s["values"])
        pos = 0
        for i in range(n_rows):  # row by row: no long GIL hold (tables load off-thread)
            end = pos + sizes[i]
            out._rows[vocab[i]] = Row.from_columns([vocab[j] for j in nbr[pos:end].tolist()],
                                                   val[pos:end])
            pos = end
        out._t_ref = int(s["t_ref"]) if bool(s["has_t_ref"]) else None
        out.pairs_added, out.evicted_neighbors, out.evicted_rows = (int(x) for x in s["stats"])
        return out

    def __getstate__(self) -> dict[str, np.ndarray]:
        return self.to_arrays()

    def __setstate__(self, state: dict[str, np.ndarray]) -> None:
        self.__dict__.update(CoVisitation.from_arrays(state).__dict__)

    def save(self, path: str | os.PathLike) -> None:
        """Write one uncompressed ``.npz`` file (no pickled objects)."""
        save_npz(path, self.to_arrays())

    @classmethod
    def load(cls, path: str | os.PathLike) -> CoVisitation:
        """Read a table written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            return cls.from_arrays({k: z[k] for k in z.files})

    def stats(self) -> dict[str, int | float]:
        """Counters and sizes."""
        sizes = [len(r) for r in self._rows.values()]
        return {
            "rows": len(self._rows),
            "neighbors": int(sum(sizes)),
            "max_row": max(sizes, default=0),
            "pairs_added": self.pairs_added,
            "evicted_neighbors": self.evicted_neighbors,
            "evicted_rows": self.evicted_rows,
        }


def _config_of(s: Mapping[str, np.ndarray]) -> CoVisConfig:
    return CoVisConfig(**{k[4:]: np.asarray(v).item() for k, v in s.items()
                          if k.startswith("cfg_")})


class FrozenCoVisitation(CoVisitation):
    """A published table as serving reads it: the CSR arrays of :meth:`to_arrays` kept
    as they are, a row decoded only when it is read (serving reads the rows of its
    users' recent items, a small part of a table). Loading costs one string per item
    instead of a dict entry per neighbour (20k rows x 100: ~2M objects, ~0.7 s and long
    GIL holds and GC pauses on the loader thread). Reads equal those of the table it was
    saved from; a write (or any other use of ``_rows``) decodes every row once, after
    which it is an ordinary table."""

    def __init__(self, s: Mapping[str, np.ndarray]) -> None:  # noqa: D107 (no super: no rows)
        self.config = _config_of(s)
        self._arrays = {k: np.asarray(v) for k, v in s.items()}
        self._vocab = unpack_strings(self._arrays["vocab_blob"], self._arrays["vocab_offsets"])
        n_rows = int(self._arrays["n_rows"])
        self._row_of = dict(zip(self._vocab[:n_rows], range(n_rows), strict=True))
        self._starts = np.zeros(n_rows + 1, np.int64)
        np.cumsum(self._arrays["row_sizes"], out=self._starts[1:])
        self._full: OrderedDict[str, Row] | None = None
        self._read: tuple[list[int], np.ndarray] | None = None
        self._t_ref = int(s["t_ref"]) if bool(s["has_t_ref"]) else None
        self.pairs_added, self.evicted_neighbors, self.evicted_rows = (
            int(x) for x in self._arrays["stats"])

    @property  # type: ignore[override]
    def _rows(self) -> OrderedDict[str, Row]:
        """Every row (decoded on first use)."""
        if self._full is None:
            full: OrderedDict[str, Row] = OrderedDict()
            vocab, nbr, val = self._vocab, self._arrays["neighbors"], self._arrays["values"]
            starts = self._starts.tolist()
            for item, r in self._row_of.items():
                a, b = starts[r], starts[r + 1]
                full[item] = Row.from_columns([vocab[j] for j in nbr[a:b].tolist()], val[a:b])
            self._full = full
        return self._full

    @_rows.setter
    def _rows(self, rows: OrderedDict[str, Row]) -> None:
        self._full = rows

    def row_arrays(self, item_id: str, now_ms: int) -> tuple[list[str], np.ndarray]:
        """(neighbour ids, weights decayed to ``now_ms``) of ``item_id``'s row, strongest
        first, equal weights in stored order: ``neighbors`` as arrays."""
        if self._full is not None:
            return super().row_arrays(item_id, now_ms)
        r = self._row_of.get(item_id)
        if r is None:
            return [], np.zeros(0)
        starts, names = self._read or self._reader()
        a, b = starts[r], starts[r + 1]
        vals = self._arrays["values"][a:b]
        order = np.argsort(-vals, kind="stable")
        return (names[self._arrays["neighbors"][a:b][order]].tolist(),
                vals[order] * self._decay(now_ms))

    def row_weights(self, item_id: str, now_ms: int) -> dict[str, float]:
        if self._full is not None:
            return super().row_weights(item_id, now_ms)
        r = self._row_of.get(item_id)
        if r is None:
            return {}
        starts, names = self._read or self._reader()
        a, b = starts[r], starts[r + 1]
        return dict(zip(names[self._arrays["neighbors"][a:b]].tolist(),
                        (self._arrays["values"][a:b] * self._decay(now_ms)).tolist(), strict=True))

    def _reader(self) -> tuple[list[int], np.ndarray]:
        """(row starts as ints, the vocabulary as an object array), made at the first row
        read of this table: a row's bounds without numpy scalars and its names by one
        gather (readers read a few rows of a version; ~8 B a name and ~40 B a row)."""
        if self._read is None:
            names = np.empty(len(self._vocab), object)
            names[:] = self._vocab
            self._read = (self._starts.tolist(), names)
        return self._read

    def neighbors(self, item_id: str, n: int, now_ms: int) -> list[tuple[str, float]]:
        if self._full is not None:
            return super().neighbors(item_id, n, now_ms)
        names, vals = self.row_arrays(item_id, now_ms)
        return list(zip(names[:n], vals[:n].tolist(), strict=True))

    def __len__(self) -> int:
        return len(self._row_of) if self._full is None else len(self._full)

    def __contains__(self, item_id: str) -> bool:
        return item_id in (self._row_of if self._full is None else self._full)

    def row_size(self, item_id: str) -> int:
        if self._full is not None:
            return super().row_size(item_id)
        r = self._row_of.get(item_id)
        return 0 if r is None else int(self._starts[r + 1] - self._starts[r])

    def to_arrays(self) -> dict[str, np.ndarray]:
        return dict(self._arrays) if self._full is None else super().to_arrays()

    def __getstate__(self) -> dict[str, np.ndarray]:
        return self.to_arrays()

    def __setstate__(self, state: dict[str, np.ndarray]) -> None:
        self.__dict__.update(FrozenCoVisitation(state).__dict__)


def decayed(weight: float, added_ms: int, now_ms: int, half_life_ms: int) -> float:
    """Reference formula: ``weight`` added at ``added_ms`` seen at ``now_ms``."""
    return weight * decay_factor(now_ms - added_ms, half_life_ms)
