"""The aggregate algebra of profile features (no Bytewax).

One accumulator kind per ``FeatureSpec.aggregate``. Accumulators are plain JSON values
and are never mutated (so they may be shared between slices, caches and snapshots); a
few atomic values (mean, last, distinct_count) are a tuple, which a collection untracks
(``state.profile_codec.decode`` reads them back as tuples):

* ``add(acc, ts, v, r)``: fold one event (time ``ts`` ms, value ``v``) into ``acc``
  (referenced at ``r``; ``None`` = empty);
* ``merge(a, ra, b, rb, r)``: ``a`` (older) with ``b`` (newer, wins ties), the result
  referenced at ``r``;
* ``out(acc, r, t)``: the feature value at query time ``t`` (ms);
* ``fold_raw(events, acc, r)``: raw ``(ts, v)`` events, newest first, folded into ``acc``
  one by one as ``merge(add(None, ts, v, ts), ts, acc, r, r)`` (a profile's raw part);
  sums, means and decayed sums do it in one loop of the same float operations.

"Referenced at r" only matters for ``decay_sum``: ``acc = sum(v * 2**((ts - r) / half_life))``.

>>> from state.feature_spec import parse_features
>>> spec = parse_features([{"name": "clicks", "entity": "user", "filter": {"type": "feedback"},
...                         "aggregate": "count", "windows": ["1h"]}])[0]
>>> agg = make_agg(spec)
>>> agg.out(agg.merge(agg.add(None, 0, 1, 0), 0, agg.add(None, 5, 1, 5), 5, 5), 5, 5)
2.0
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from operator import itemgetter
from typing import Any

from state.bounded import memo_put
from state.decay import exp2
from state.feature_spec import DEFAULT_DISTINCT_K, DEFAULT_LAST_K, TRANSFORMS, FeatureSpec
from state.hashing import stable_hash64

TS = itemgetter(0)
"""Sort key of ``[ts, ...]`` entries (raw events, last_k entries, slices by start)."""
BAD = object()
"""A raw value a feature cannot aggregate (skipped and counted by the store)."""
EXACT_INCREMENTAL = frozenset({"count", "min", "max", "last", "distinct_count", "last_k"})
"""Aggregates whose memoised value can be updated in place exactly (order-free, no floats)."""
MAX_HASHES = 4_096
"""String ids whose ``stable_hash64`` a distinct count's prep keeps (``_hash_prep``; ~120 B
each: flows/memory.py ``profile_key``)."""
FOLD_SUM, FOLD_SAME = 1, 2
"""How two writes of one feature in a row at the same ts fold into one (``fold_kind``):
``FOLD_SUM`` adds their values (counts: integers), ``FOLD_SAME`` keeps one of two equal
values (the aggregate of both is the aggregate of one)."""


def fold_kind(aggregate: str) -> int:
    """``FOLD_SUM``, ``FOLD_SAME`` or 0 (never folded: float sums, means and decayed sums
    depend on the order of their additions, bit for bit)."""
    if aggregate == "count":
        return FOLD_SUM
    return FOLD_SAME if aggregate in ("last", "min", "max", "distinct_count", "last_k") else 0


class _Count:
    """acc = the number of events (int). A stored count value is the number of events it
    stands for: 1 per event (``make_prep``), k for k events of one time folded in the
    write buffer (``FOLD_SUM``)."""

    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        return v if acc is None else acc + v

    def merge(self, a: Any, ra: int, b: Any, rb: int, r: int) -> Any:
        return b if a is None else a if b is None else a + b

    def out(self, acc: Any, r: int, t: int) -> Any:
        return float(acc)

    def fold_raw(self, events: Iterable[tuple[int, Any]], acc: Any, r: int) -> Any:
        """Each ``(ts, v)`` of ``events`` (newest first) folded into ``acc`` (referenced at
        ``r``, None = empty) in turn: ``acc = merge(add(None, ts, v, ts), ts, acc, r, r)``."""
        for ts, v in events:
            acc = self.merge(self.add(None, ts, v, ts), ts, acc, r, r)
        return acc

    def slices_of(self, events: Iterable[tuple[int, Any]], g: int) -> list[tuple[int, int, Any]]:
        """Raw ``(ts, v)`` events (sorted by ts) folded into ``[(start, end, acc), ...]``
        slices aligned to ``g`` ms: each event ``add`` ed in turn to its slice's accumulator
        (referenced at the slice's end). Counts and sums add their values in one loop
        (``add``'s ``acc + v``, the same additions in the same order)."""
        out: list[tuple[int, int, Any]] = []
        additive = type(self) is _Count or type(self) is _Sum
        start = acc = None
        for ts, v in events:
            s = ts - ts % g
            if s != start:
                if start is not None:
                    out.append((start, start + g, acc))
                start, acc = s, (v if additive else self.add(None, ts, v, s + g))
            else:
                acc = acc + v if additive else self.add(acc, ts, v, s + g)
        if start is not None:
            out.append((start, start + g, acc))
        return out


class _Sum(_Count):
    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        return v if acc is None else acc + v

    def fold_raw(self, events: Iterable[tuple[int, Any]], acc: Any, r: int) -> Any:
        """``_Count.fold_raw`` in one loop: each value added to the sum so far (``v + acc``,
        the same float additions in the same order)."""
        for _, v in events:
            acc = v if acc is None else v + acc
        return acc


class _Mean(_Count):
    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        return (v, 1) if acc is None else (acc[0] + v, acc[1] + 1)

    def merge(self, a: Any, ra: int, b: Any, rb: int, r: int) -> Any:
        return b if a is None else a if b is None else (a[0] + b[0], a[1] + b[1])

    def out(self, acc: Any, r: int, t: int) -> Any:
        return acc[0] / acc[1]

    def fold_raw(self, events: Iterable[tuple[int, Any]], acc: Any, r: int) -> Any:
        """``_Count.fold_raw`` in one loop: the values' sum and count (``(v + s, 1 + n)``,
        the same float additions in the same order)."""
        for _, v in events:
            acc = (v, 1) if acc is None else (v + acc[0], 1 + acc[1])
        return acc


class _Min(_Count):
    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        return v if acc is None or v < acc else acc

    def merge(self, a: Any, ra: int, b: Any, rb: int, r: int) -> Any:
        return b if a is None else a if b is None else (b if b < a else a)

    def out(self, acc: Any, r: int, t: int) -> Any:
        return acc


class _Max(_Min):
    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        return v if acc is None or v > acc else acc

    def merge(self, a: Any, ra: int, b: Any, rb: int, r: int) -> Any:
        return b if a is None else a if b is None else (b if b > a else a)


class _Last(_Min):
    """acc = (ts, value) of the newest event (ties: the later applied)."""

    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        return (ts, v) if acc is None or ts >= acc[0] else acc

    def merge(self, a: Any, ra: int, b: Any, rb: int, r: int) -> Any:
        return b if a is None else a if b is None else (b if b[0] >= a[0] else a)

    def out(self, acc: Any, r: int, t: int) -> Any:
        return acc[1]


class _Decay(_Count):
    """Exponentially decayed sum; merging two slices decays both to the new reference."""

    def __init__(self, half_life_ms: int) -> None:
        self.hl = float(half_life_ms)

    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        x = v * exp2((ts - r) / self.hl)
        return x if acc is None else acc + x

    def merge(self, a: Any, ra: int, b: Any, rb: int, r: int) -> Any:
        if a is None:
            return b if b is None or rb == r else b * exp2((rb - r) / self.hl)
        x = a if ra == r else a * exp2((ra - r) / self.hl)
        if b is None:
            return x
        return x + (b if rb == r else b * exp2((rb - r) / self.hl))

    def out(self, acc: Any, r: int, t: int) -> Any:
        return acc * exp2((r - t) / self.hl)

    def fold_raw(self, events: Iterable[tuple[int, Any]], acc: Any, r: int) -> Any:
        """``_Count.fold_raw`` in one loop: ``acc = v * 2**((ts - r) / hl) + acc`` per event,
        the float operations of ``merge(add(None, ts, v, ts), ts, acc, r, r)`` (``add``'s
        factor is ``exp2(0.0) == 1.0``, and ``x * 1.0 == x``). Events are not after ``r``
        (``ts <= r``: a raw part is referenced after its events), so the exponent is at
        most 0, below ``exp2``'s cap: ``math.exp2`` gives ``exp2``'s value."""
        hl, e2 = self.hl, math.exp2
        for ts, v in events:
            x = v * e2((ts - r) / hl)
            acc = x if acc is None else x + acc
        return acc


class _Distinct(_Count):
    """KMV sketch: the k smallest 64-bit hashes, a sorted tuple. Exact below k distinct
    values."""

    def __init__(self, k: int) -> None:
        self.k = k

    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        return self.add_all(acc, (v,))

    def merge(self, a: Any, ra: int, b: Any, rb: int, r: int) -> Any:
        if a is None:
            return b
        if b is None:
            return a
        return tuple(sorted(set(a).union(b))[: self.k])

    def merge_run(self, accs: list[Any], b: Any) -> Any:
        """``merge`` of each of ``accs`` into ``b`` in turn, in one pass: the k smallest of
        the union, sorted once (what the pairwise merges give, since the k smallest of
        A and of the k smallest of B are the k smallest of A and B). A window of a
        profile's slices costs one sort instead of one per slice."""
        if not accs:
            return b
        if b is None and len(accs) == 1:
            return accs[0]
        union = set() if b is None else set(b)
        for a in accs:
            if a is not None:
                union.update(a)
        return tuple(sorted(union)[: self.k]) if union or b is not None else None

    def add_all(self, acc: Any, values: list[int]) -> Any:
        """``add`` of each hash of ``values`` (a few) into ``acc`` in turn: the k smallest of
        both, as ``merge`` gives, without sorting the union (a hash above a full sketch's
        largest is skipped at one comparison)."""
        k = self.k
        for v in values:
            if acc is None:
                acc = (v,)
            elif len(acc) < k or v < acc[-1]:  # else v is not among the k smallest
                i = bisect.bisect_left(acc, v)
                if i == len(acc) or acc[i] != v:  # a new hash: inserted in order
                    end = k - 1 if len(acc) >= k else len(acc)  # a full sketch drops its largest
                    acc = (*acc[:i], v, *acc[i:end])
        return acc

    def fold_raw(self, events: Iterable[tuple[int, Any]], acc: Any, r: int) -> Any:
        """``_Count.fold_raw``: the hashes added in turn (``add_all``; a sketch ignores
        references)."""
        return self.add_all(acc, [v for _, v in events])

    def out(self, acc: Any, r: int, t: int) -> Any:
        n = len(acc)
        if n < self.k:
            return float(n)
        return (self.k - 1) * 18446744073709551616.0 / (acc[-1] + 1.0)


class _LastK(_Count):
    """acc = [[ts, item], ...] newest first (ties: later applied first), distinct, <= k."""

    def __init__(self, k: int) -> None:
        self.k = k

    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        if acc is None:
            return [[ts, v]]
        for e in acc:
            if e[1] == v and e[0] > ts:
                return acc
        new = [e for e in acc if e[1] != v]
        i = 0
        while i < len(new) and new[i][0] > ts:
            i += 1
        if i >= self.k:
            return acc
        new.insert(i, [ts, v])
        del new[self.k:]
        return new

    def merge(self, a: Any, ra: int, b: Any, rb: int, r: int) -> Any:
        if a is None:
            return b
        if b is None:
            return a
        out: list[Any] = []
        seen: set[Any] = set()
        for e in sorted(b + a, key=TS, reverse=True):  # stable: b (newer) first on ties
            if e[1] not in seen:
                seen.add(e[1])
                out.append(e)
                if len(out) == self.k:
                    break
        return out

    def out(self, acc: Any, r: int, t: int) -> Any:
        return [e[1] for e in acc]


def make_agg(spec: FeatureSpec) -> Any:
    """The accumulator algebra of ``spec.aggregate`` (with its k / half-life)."""
    a = spec.aggregate
    if a == "decay_sum":
        return _Decay(spec.half_life_ms or 1)
    if a == "distinct_count":
        return _Distinct(spec.k or DEFAULT_DISTINCT_K)
    if a == "last_k":
        return _LastK(spec.k or DEFAULT_LAST_K)
    return {"count": _Count, "sum": _Sum, "mean": _Mean, "min": _Min, "max": _Max,
            "last": _Last}[a]()


def _hash_prep() -> Callable[[Any], Any]:
    """A distinct count's prep: a string or integer id's ``stable_hash64`` (BAD for other
    values). String ids' hashes are memoised (at most ``MAX_HASHES`` per feature, cleared
    when full: an item shard's ``viewers`` hash each user once while the memo holds it);
    other ids are hashed every time (``1``, ``True`` and ``1.0`` are one dict key)."""
    memo: dict[str, int] = {}

    def prep(v: Any) -> Any:
        if type(v) is str:
            h = memo.get(v)
            return memo_put(memo, v, stable_hash64(v), MAX_HASHES) if h is None else h
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            return BAD
        return stable_hash64(v)
    return prep


def make_prep(spec: FeatureSpec) -> Callable[[Any], Any]:
    """Raw event value -> stored value, or BAD (skipped, counted in stats)."""
    a = spec.aggregate
    if a == "count":
        return lambda v: 1
    if a == "distinct_count":
        return _hash_prep()
    if a == "last_k":
        return lambda v: v if isinstance(v, (str, int)) and not isinstance(v, bool) else BAD
    if a == "last":
        def prep_last(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return BAD
            return v if isinstance(v, (str, int, float)) else BAD
        return prep_last

    def prep_num(v: Any) -> Any:
        if isinstance(v, (int, float)):
            f = float(v)
            if math.isfinite(f):
                return f
        return BAD
    if spec.transform is not None:
        fn = TRANSFORMS[spec.transform]

        def prep_transformed(v: Any) -> Any:
            f = prep_num(v)
            return f if f is BAD else fn(f)
        return prep_transformed
    return prep_num

