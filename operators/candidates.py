"""One request's candidates as arrays: the pool that serving filters, scores and orders.

Retrieval gives, per source, item rows (int arrays in the server's ``ItemRows`` id
space, state/item_rows.py) and scores; ``merge`` turns them into one ``CandidatePool``
(each item once, in order of first retrieval, as a dict keyed by item would hold them),
filters are boolean masks (``take``), scores are float arrays, and ``Candidate``
objects are made only for what leaves the array path: the top k, or every candidate
when a business-rule hook is configured (``candidates``; ``from_candidates`` takes a
hook's list back).

At score time the pool is ``rows`` + ``items`` (ids) and the ``ItemColumns`` feature
matrix built for them (operators/point_in_time.py): what a pool re-ranker consumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.category_bandit import CodedCategories
from state.covis_view import group_ids
from state.packing import pick

SOURCES = ("ann", "covis", "trending", "popular", "category")
"""Retrieval sources in the order they are retrieved (an item's ``sources`` list is
always in this order unless a hook changes it)."""

_SOURCE_BITS = 1 << np.arange(len(SOURCES), dtype=np.int64)
"""Bit of each source in a candidate's pattern number (``CandidatePool.candidates``)."""
_PATTERN_AT = [tuple(b for b in range(len(SOURCES)) if m >> b & 1)
               for m in range(1 << len(SOURCES))]
"""Each pattern's positions in a candidate's per-source scores, in ``SOURCES`` order."""
_PATTERN_SOURCES = [tuple(SOURCES[b] for b in at) for at in _PATTERN_AT]
"""The sources of each pattern number, in ``SOURCES`` order."""
_PATTERN_NAMES = ["+".join(sources) for sources in _PATTERN_SOURCES]
"""``Candidate.source`` of each pattern number."""


_POWERS = [10.0**d for d in range(23)]
"""``10**d`` as floats, each exact (5**22 < 2**53)."""
_FAST_BELOW = 2.0**30
"""``round_to``'s arithmetic path: ``|x 10**d|`` below this, where the product's
rounding error is at most 2**-24."""


def round_to(x: float, ndigits: int) -> float:
    """``round(x, ndigits)``, the same float (0 <= ndigits <= 22), without its decimal
    string: ``float.__round__`` rounds through ``dtoa`` and ``snprintf`` (1.7% of
    serving's instructions on zero-config, the records' scores and propensities). Below
    2**30, ``y = x 10**d`` is within 2**-24 of the exact product, so when ``y`` is
    farther than 1e-4 from a half its nearest integer ``n`` is the exact product's
    (the decimal rounding), and ``n / 10**d`` is the float nearest ``n 10**-d``, what
    ``round`` reads its string back as. ``round`` itself otherwise: near a half,
    ``n = 0`` (the sign of a zero), large values, NaN, infinities and non-``float``
    values (numpy's scalars round their own way)."""
    if type(x) is float:
        scale = _POWERS[ndigits]
        y = x * scale
        if -_FAST_BELOW < y < _FAST_BELOW:
            n = math.floor(y + 0.5)
            if n and -0.4999 < y - n < 0.4999:
                return n / scale
    return round(x, ndigits)


def record_item(item_id: str, score: float, source: str, propensity: float) -> dict[str, Any]:
    """One entry of a recommendation record's ``items``: score and propensity rounded to 6
    places (``round_to``: ``round``'s floats)."""
    return {"item_id": item_id, "score": round_to(score, 6), "source": source,
            "propensity": round_to(propensity, 6)}


def _with_propensities(cands: list[Candidate], propensities: list[float] | None
                       ) -> list[Candidate]:
    """``cands``, each given its propensity when ``propensities`` (one per candidate)."""
    if propensities is not None:
        for c, p in zip(cands, propensities, strict=True):
            c.propensity = p
    return cands


@dataclass(slots=True)
class Candidate:
    """An item under consideration; ``scores`` holds each retrieval source's score."""

    item_id: str
    sources: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    score: float = 0.0
    category: str | None = None
    propensity: float = 1.0
    """Probability that the policy puts this item in this slot (exploration logging)."""

    @property
    def source(self) -> str:
        return "+".join(self.sources)


@dataclass
class CandidatePool:
    """Candidates column-wise; position ``i`` is one item throughout."""

    rows: np.ndarray
    """Item rows (int64) in the server's ``ItemRows`` id space."""
    items: list[str]
    """Item ids."""
    scores: np.ndarray
    """(len(SOURCES), n) retrieval scores, 0.0 where a source did not retrieve the item."""
    has: np.ndarray
    """(len(SOURCES), n) bool: the source retrieved the item."""
    score: np.ndarray
    """Final score (float64)."""
    category: list[str | None] | None = None
    """Each item's category (from a hook's candidates; the filter sets ``coded``)."""
    attrs: list[dict[str, Any] | None] | None = None
    """Each item's attributes in the shard's catalog (read once by the filter)."""
    objs: list[Candidate] | None = None
    """The ``Candidate`` objects a hook returned (kept, so what a hook set stays)."""
    columns: Any = None
    """The pool's ``ItemColumns`` once computed for the request (``Server.pool_columns``),
    so the ranker and the pool ranker read one set."""
    coded: CodedCategories | None = None
    """Each item's category as a code into the ``ItemRows`` category names (set by the
    filter from its table's catalog; read where ``category`` is None)."""

    def __len__(self) -> int:
        return int(self.rows.size)

    def take(self, keep: np.ndarray) -> CandidatePool:
        """The candidates where ``keep`` (a bool mask or indices), in pool order: arrays
        compressed by the mask (or gathered by the indices), lists picked by one
        ``itemgetter`` (``pick``)."""
        if keep.dtype == bool:
            idx = keep.nonzero()[0]

            def arrays(a: np.ndarray) -> np.ndarray:
                return a.compress(keep, axis=-1)
        else:
            idx = keep

            def arrays(a: np.ndarray) -> np.ndarray:
                return a.take(idx, axis=-1)  # a[..., idx]: take is 2-4x fewer instructions
        il = idx.tolist()
        return CandidatePool(
            arrays(self.rows), pick(self.items, il), arrays(self.scores), arrays(self.has),
            arrays(self.score),
            None if self.category is None else pick(self.category, il),
            None if self.attrs is None else pick(self.attrs, il),
            None if self.objs is None else pick(self.objs, il),
            coded=None if self.coded is None else CodedCategories(arrays(self.coded.codes),
                                                                  self.coded.names))

    def candidates(self, idx: np.ndarray | None = None,
                   propensities: list[float] | None = None) -> list[Candidate]:
        """``Candidate`` objects of the positions ``idx`` (default: all), with the pool's
        score and category, and each one's ``propensities`` when given."""
        il = range(len(self.items)) if idx is None else idx.tolist()
        score: list[float] = (self.score if idx is None else self.score[idx]).tolist()
        category: Any = self.category
        if category is None and self.coded is not None:  # the names of the codes taken
            names = self.coded.names
            codes = self.coded.codes if idx is None else self.coded.codes[idx]
            category = [names[c] for c in codes.tolist()]
        elif category is not None and idx is not None:
            category = [category[i] for i in il]
        if self.objs is not None:
            out = []
            for j, i in enumerate(il):
                c = self.objs[i]
                c.score = score[j]
                if category is not None:
                    c.category = category[j]
                out.append(c)
            return _with_propensities(out, propensities)
        # each candidate's sources as one pattern number (bit b: SOURCES[b] retrieved it)
        # and its scores by source as Python lists (one conversion each)
        patterns = self._patterns(idx)
        scores = (self.scores if idx is None else self.scores.take(idx, axis=1)).T.tolist()
        items = self.items
        if category is None:
            category = [None] * len(score)
        return _with_propensities(
            [Candidate(items[i], list(_PATTERN_SOURCES[p]),
                       dict(zip(_PATTERN_SOURCES[p], [values[j] for j in _PATTERN_AT[p]], strict=True)),
                       s, c)
             for i, p, values, s, c in zip(il, patterns, scores, score, category, strict=True)],
            propensities)

    def _patterns(self, idx: np.ndarray | None) -> list[int]:
        """Each candidate's pattern number at positions ``idx`` (default: all): bit b set
        when ``SOURCES[b]`` retrieved it."""
        return (_SOURCE_BITS @ (self.has if idx is None else self.has.take(idx, axis=1))).tolist()

    def record_items(self, idx: np.ndarray, propensities: list[float] | None = None
                     ) -> list[dict[str, Any]]:
        """The recommendation record's ``items`` of the positions ``idx`` (best first)
        straight from the arrays: what ``candidates(idx)`` gives as the record's dicts
        (score and propensity rounded to 6 places, sources joined by "+"; propensity 1.0
        without ``propensities``), with no ``Candidate`` objects."""
        items = self.items
        il = idx.tolist()
        score = self.score[idx].tolist()
        patterns = self._patterns(idx)
        props = [1.0] * len(il) if propensities is None else propensities
        return [record_item(items[i], s, _PATTERN_NAMES[p], q)
                for i, s, p, q in zip(il, score, patterns, props, strict=True)]

    @classmethod
    def from_candidates(cls, cands: list[Candidate], rows: np.ndarray) -> CandidatePool:
        """A pool over a hook's ``Candidate`` list (``rows``: their rows)."""
        n = len(cands)
        scores = np.zeros((len(SOURCES), n))
        has = np.zeros((len(SOURCES), n), bool)
        for j, c in enumerate(cands):
            for k, s in enumerate(SOURCES):
                v = c.scores.get(s)
                if v is not None:
                    scores[k, j] = v
                    has[k, j] = True
        return cls(rows, [c.item_id for c in cands], scores, has,
                   np.array([c.score for c in cands], np.float64),
                   [c.category for c in cands], None, list(cands))


_SOURCE_CODE = {name: k for k, name in enumerate(SOURCES)}
_DENSE_IDS = 16
"""``merge`` marks first appearances in a scratch array over the ids when the largest id
is below this many times the entries (else a stable sort groups them)."""


_FAR = np.iinfo(np.int32).max


class MergeScratch:
    """Arrays over an id space that ``merge`` reuses, so finding first appearances costs
    O(entries), not O(ids): ``earliest`` holds ``_FAR`` at every id between calls,
    ``rank`` is scratch (read only where written in the same call). 8 B per id (int32:
    a pool's entries and ids stay below 2**31)."""

    def __init__(self) -> None:
        self.earliest = np.zeros(0, np.int32)
        self.rank = np.zeros(0, np.int32)

    def first_appearance(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``_first_appearance(rows)`` (rows >= 0)."""
        top = int(rows.max()) + 1
        if self.earliest.size < top:
            size = max(top, self.earliest.size + self.earliest.size // 2)
            self.earliest = np.full(size, _FAR, np.int32)
            self.rank = np.empty(size, np.int32)
        earliest = self.earliest
        pos = np.arange(rows.size, dtype=np.int32)
        try:
            np.minimum.at(earliest, rows, pos)  # unbuffered: repeated rows keep the least
            first = (earliest[rows] == pos).nonzero()[0]  # ascending
        finally:
            earliest[rows] = _FAR
        rank = self.rank
        rank[rows[first]] = np.arange(first.size, dtype=np.int32)
        return first, rank[rows].astype(np.int64)


def merge(parts: list[tuple[str, np.ndarray, np.ndarray]], items_of: Any,
          scratch: MergeScratch | None = None) -> CandidatePool:
    """One pool from ``(source, rows, scores)`` parts in retrieval order: each row once, in
    order of first appearance (a later source adds its score to the row's entry).
    ``items_of(rows) -> list[str]`` names the rows; ``scratch``: the caller's reusable
    arrays (the same pool without a pass over the id space)."""
    parts = [p for p in parts if p[1].size]
    if not parts:
        empty = np.zeros(0, np.int64)
        return CandidatePool(empty, [], np.zeros((len(SOURCES), 0)),
                             np.zeros((len(SOURCES), 0), bool), np.zeros(0))
    rows = np.concatenate([p[1] for p in parts])
    vals = np.concatenate([np.asarray(p[2], np.float64) for p in parts])
    src = np.array([_SOURCE_CODE[p[0]] for p in parts]).repeat([p[1].size for p in parts])
    first, at = (scratch.first_appearance(rows) if scratch is not None
                 else _first_appearance(rows))
    out_rows = rows[first]
    m = out_rows.size
    scores = np.zeros((len(SOURCES), m))
    has = np.zeros((len(SOURCES), m), bool)
    flat = src * m + at  # (source, position) in the flattened (sources x m) arrays
    scores.ravel()[flat] = vals
    has.ravel()[flat] = True
    return CandidatePool(out_rows, items_of(out_rows), scores, has, np.zeros(m))


def _first_appearance(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, at)``: the positions of each distinct row's first appearance, ascending
    (so ``rows[first]`` are the distinct rows in order of first appearance), and each
    entry's index into ``first`` (its distinct row's)."""
    n = rows.size
    top = int(rows.max()) + 1
    if top <= _DENSE_IDS * n:  # scratch arrays over the ids: one sort of the firsts
        earliest = np.full(top, n)
        np.minimum.at(earliest, rows, np.arange(n))  # unbuffered: repeated rows keep the least
        first = np.sort(earliest[earliest < n])
        rank = np.empty(top, np.int64)
        rank[rows[first]] = np.arange(first.size)
        return first, rank[rows]
    by_row, starts = group_ids(rows)
    first = by_row[starts]  # each distinct row's first position (the sort is stable)
    group = np.empty(n, np.int64)
    group[by_row] = starts.cumsum() - 1
    order = first.argsort()  # groups in order of first appearance
    position = np.empty(first.size, np.int64)
    position[order] = np.arange(first.size)
    return first[order], position[group]


_SORT_ALL = 512
"""``top_indices`` sorts all of at most this many values (fewer numpy calls than a
partition first; measured faster up to ~500 values, slower from ~600)."""


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest values, largest first, equal values in position
    order: ``sorted(range(n), key=values.__getitem__, reverse=True)[:k]`` (a stable
    sort, as ``sorted`` and ``heapq.nlargest`` give), in O(n + k log k)."""
    n = values.size
    if k <= 0 or n == 0:
        return np.zeros(0, np.int64)
    if n <= _SORT_ALL:
        total = values.sum()
        if total == total:  # no NaN: the stable sort of every value gives the same first k
            return (-values).argsort(kind="stable")[:k]
    if k < n:
        kth = np.partition(values, n - k)[n - k]
        pick = (values >= kth).nonzero()[0]
    else:
        pick = np.arange(n)
    return pick[(-values[pick]).argsort(kind="stable")][:k]
