"""IPS-style real-time feature profile store (no Bytewax).

One ``ProfileStore`` holds the profiles of one entity kind (``user``, ``item`` or
``user_x_<attr>``) for the features declared in ``state.feature_spec``. All times are
event time in integer epoch **milliseconds**.

Layout of one profile (keyed by ``stable_hash64`` of the entity id; raw ids are never
stored as keys), per feature:

* ``raw``: the newest events, unaggregated, ``[[ts, value], ...]`` sorted by ts. An event
  stays raw while ``ts >= floor(wm - raw_ms, g0)`` where ``wm = max_ts - lateness_ms`` is
  the entity's watermark (floored to the finest slice ``g0``).
* ``slices``: ``[[start, end, acc], ...]``, sorted, disjoint, each aligned to its own
  granularity. Tier ``i`` (granularity ``g_i``) holds data younger than ``span_i``
  (default: 1-minute slices for the last hour, 1-hour slices for the last day, 1-day
  slices beyond). As the watermark moves, slices are merged into the enclosing coarser
  slice with the aggregate's reduce function (compaction).
* ``tail``: everything older than ``longest finite window + retention_ms`` folded into one
  accumulator (only for features with an ``all`` window; otherwise such data is dropped:
  truncation).

Writes go to a write buffer (``key -> [(feature, ts, value)]``) merged into the profiles
in batches (``batch_size`` writes or ``flush_interval_ms`` of event time). A query
first merges the queried entity's own pending writes (flush-on-read for that entity
only), so reads always see every applied event and stay cheap.

Query semantics at time ``T`` (exclusive): an event counts iff ``ts < T`` and, for a
window ``w``, it lies in ``[T - w, T)``; raw events are exact, a slice counts iff
``T - w < end <= T`` (the left edge is rounded *outward* to the slice boundary, the right
edge *inward*, so an event at or after ``T`` never counts). Decayed sums weight an event
by ``2 ** (-(T - ts) / half_life)`` (slices are referenced at their end: exact).

Profiles at rest are ``zlib(orjson(state))``; at most ``hot_capacity`` profiles are kept
decoded (LRU). A hot profile also memoises its feature values with a validity interval
per output (order-free aggregates are updated in place as writes merge, the others
rescan only their raw events), so a current-time query is mostly a dict copy. Results
are a pure function of the applied events: memoised, decoded and restored profiles
answer bit for bit alike.
"""

from __future__ import annotations

import bisect
import math
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any

import orjson

from state.decay import exp2
from state.feature_spec import MISSING, FeatureSpec, as_specs, parse_duration
from state.hashing import stable_hash64

FAR = 1 << 62  # "never" / "infinitely late", in ms
DEFAULT_TIERS: tuple[tuple[int, int | None], ...] = (
    (60_000, 3_600_000),  # 1-minute slices for data younger than 1 hour
    (3_600_000, 86_400_000),  # 1-hour slices for data younger than 1 day
    (86_400_000, None),  # 1-day slices beyond, up to truncation
)
_FORMAT = 1
_TS = itemgetter(0)
_END = itemgetter(1)


def _NEG_GRAN(s: list[Any]) -> int:  # noqa: N802 - a key function, like _TS/_END
    return s[0] - s[1]


_BAD = object()
# aggregates whose memoised value can be updated in place exactly (order-free, no floats)
_EXACT_INCREMENTAL = frozenset({"count", "min", "max", "last", "distinct_count", "last_k"})
ItemAttrs = Callable[[Any], Mapping[str, Any] | None]


# --------------------------------------------------------------------------- aggregates
# Accumulators are plain JSON values and are never mutated (so they may be shared).
# add(acc, ts, v, r): fold one event into acc (acc referenced at r; None = empty).
# merge(a, ra, b, rb, r): a (older) with b (newer, wins ties), result referenced at r.
# out(acc, r, t): the feature value at query time t.
# "Referenced at r" only matters for decay_sum: acc = sum(v * 2**((ts - r) / half_life)).


class _Count:
    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        return 1 if acc is None else acc + 1

    def merge(self, a: Any, ra: int, b: Any, rb: int, r: int) -> Any:
        return b if a is None else a if b is None else a + b

    def out(self, acc: Any, r: int, t: int) -> Any:
        return float(acc)


class _Sum(_Count):
    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        return v if acc is None else acc + v


class _Mean(_Count):
    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        return [v, 1] if acc is None else [acc[0] + v, acc[1] + 1]

    def merge(self, a: Any, ra: int, b: Any, rb: int, r: int) -> Any:
        return b if a is None else a if b is None else [a[0] + b[0], a[1] + b[1]]

    def out(self, acc: Any, r: int, t: int) -> Any:
        return acc[0] / acc[1]


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
    """acc = [ts, value] of the newest event (ties: the later applied)."""

    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        return [ts, v] if acc is None or ts >= acc[0] else acc

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


class _Distinct(_Count):
    """KMV sketch: the k smallest 64-bit hashes, sorted. Exact below k distinct values."""

    def __init__(self, k: int) -> None:
        self.k = k

    def add(self, acc: Any, ts: int, v: Any, r: int) -> Any:
        if acc is None:
            return [v]
        i = bisect.bisect_left(acc, v)
        if (i < len(acc) and acc[i] == v) or i >= self.k:
            return acc
        new = acc[:i] + [v] + acc[i:self.k - 1 if len(acc) >= self.k else None]
        return new

    def merge(self, a: Any, ra: int, b: Any, rb: int, r: int) -> Any:
        if a is None:
            return b
        if b is None:
            return a
        return sorted(set(a).union(b))[: self.k]

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
        for e in sorted(b + a, key=_TS, reverse=True):  # stable: b (newer) first on ties
            if e[1] not in seen:
                seen.add(e[1])
                out.append(e)
                if len(out) == self.k:
                    break
        return out

    def out(self, acc: Any, r: int, t: int) -> Any:
        return [e[1] for e in acc]


def _make_agg(spec: FeatureSpec) -> Any:
    a = spec.aggregate
    if a == "decay_sum":
        return _Decay(spec.half_life_ms or 1)
    if a == "distinct_count":
        return _Distinct(spec.k or 64)
    if a == "last_k":
        return _LastK(spec.k or 20)
    return {"count": _Count, "sum": _Sum, "mean": _Mean, "min": _Min, "max": _Max,
            "last": _Last}[a]()


def _make_prep(spec: FeatureSpec) -> Callable[[Any], Any]:
    """Raw event value -> stored value, or _BAD (skipped, counted in stats)."""
    a = spec.aggregate
    if a == "count":
        return lambda v: 1
    if a == "distinct_count":
        return lambda v: stable_hash64(v) if isinstance(v, (str, int)) and not isinstance(v, bool) else _BAD
    if a == "last_k":
        return lambda v: v if isinstance(v, (str, int)) and not isinstance(v, bool) else _BAD
    if a == "last":
        def prep_last(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return _BAD
            return v if isinstance(v, (str, int, float)) else _BAD
        return prep_last

    def prep_num(v: Any) -> Any:
        if isinstance(v, (int, float)):
            f = float(v)
            if math.isfinite(f):
                return f
        return _BAD
    return prep_num


# --------------------------------------------------------------------------- profile


class _Cache:
    """Memoised outputs of one hot profile. Output j is valid for T in [lo[j], exp[j]).

    A window's value is ``merge(slice part, raw part)``: the slice part (slices + tail,
    ``sacc`` referenced at ``sref``, valid for T in [slo, sexp)) survives writes to the
    raw region, so refreshing after a write only rescans the few raw events.
    ``acc[j]`` is the combined value referenced at ``ref[j]`` (decay_sum); ``out`` holds
    finished values of the other outputs; ``lo[j] == FAR`` marks an invalidated output.
    Memoised values equal a recomputation from the current layout bit for bit (so a
    restored store answers identically): only order-free aggregates without float
    arithmetic are updated in place, a write invalidates the others' raw part.
    """

    __slots__ = ("acc", "ref", "lo", "exp", "sacc", "sref", "slo", "sexp", "out", "hi",
                 "lo_max")

    def __init__(self, n: int, out: dict[str, Any]) -> None:
        self.acc: list[Any] = [None] * n
        self.ref: list[int] = [0] * n
        self.lo: list[int] = [FAR] * n
        self.exp: list[int] = [0] * n
        self.sacc: list[Any] = [None] * n
        self.sref: list[int] = [0] * n
        self.slo: list[int] = [FAR] * n
        self.sexp: list[int] = [0] * n
        self.out = out
        self.hi = 0
        self.lo_max = FAR


class _Profile:
    """Decoded profile. ``feats[f]`` is None or ``[raw, slices, tail, tail_end]``."""

    __slots__ = ("max_ts", "cf", "feats", "dirty", "blob", "cache", "due", "due_min")

    def __init__(self, n_feats: int, due: int = FAR) -> None:
        self.max_ts: int | None = None  # newest event ts of this entity (ms)
        self.cf: int | None = None  # watermark floored to g0 at the last compaction pass
        self.feats: list[Any] = [None] * n_feats
        self.dirty = True
        self.blob: bytes | None = None  # the encoded profile while not dirty
        self.cache: _Cache | None = None
        # per feature: the watermark at which its layout next needs compaction work
        # (not persisted: a decoded profile starts at -FAR = "check everything")
        self.due: list[int] = [due] * n_feats
        self.due_min = due


def entity_key(entity_kind: str, entity_id: Any) -> int:
    """Stable 64-bit key of an entity; ``user_x_<attr>`` ids are ``(user_id, attr_value)``."""
    if entity_kind.startswith("user_x_"):
        if not isinstance(entity_id, (tuple, list)) or len(entity_id) != 2:
            raise TypeError(f"{entity_kind} ids are (user_id, attr_value) pairs, got {entity_id!r}")
        return stable_hash64(f"{entity_id[0]}\x1f{entity_id[1]}")
    return stable_hash64(entity_id)


def _parse_tiers(tiers: Sequence[Sequence[Any]]) -> tuple[tuple[int, int | None], ...]:
    out: list[tuple[int, int | None]] = []
    for i, t in enumerate(tiers):
        if len(t) != 2:
            raise ValueError(f"tiers[{i}]: expected (granularity, span), got {t!r}")
        g = parse_duration(t[0], f"tiers[{i}] granularity")
        span = None if t[1] is None else parse_duration(t[1], f"tiers[{i}] span")
        out.append((g, span))
    if not out:
        raise ValueError("tiers: at least one tier is required")
    for i in range(1, len(out)):
        g0, s0 = out[i - 1]
        g1, s1 = out[i]
        if s0 is None:
            raise ValueError(f"tiers[{i - 1}]: only the last tier may have span None")
        if g1 % g0 or g1 <= g0:
            raise ValueError(f"tiers[{i}]: granularity {g1} ms must be a multiple of {g0} ms")
        if s1 is not None and s1 < s0:
            raise ValueError(f"tiers[{i}]: span must not be shorter than the previous one")
    if out[-1][1] is not None:
        out[-1] = (out[-1][0], None)
    return tuple(out)


class ProfileStore:
    """Per-entity windowed feature profiles of one entity kind (see module docstring).

    ``specs``: parsed FeatureSpecs or raw feature dicts (only those of ``entity_kind``
    are used). Times are ms. Invariants after every merge, per feature, with
    ``wm = floor(max_ts - lateness_ms, g0)``: raw events have ``ts >= floor(wm - raw_ms,
    g0)``; slices are disjoint, sorted and aligned; data younger than ``span_i`` is at
    granularity ``g_i`` or finer; every slice ends after ``wm - (W + retention_ms)``
    (W = the feature's longest finite window).
    """

    def __init__(
        self,
        specs: Iterable[FeatureSpec | Mapping[str, Any]],
        entity_kind: str = "user",
        *,
        tiers: Sequence[Sequence[Any]] = DEFAULT_TIERS,
        raw_ms: int = 60_000,
        lateness_ms: int = 5_000,
        retention_ms: int = 3_600_000,
        batch_size: int = 1024,
        flush_interval_ms: int = 1_000,
        hot_capacity: int = 10_000,
        compress_level: int = 6,
        max_entities: int = 0,
    ) -> None:
        all_specs = as_specs(specs)
        self.entity_kind = entity_kind
        self.specs: list[FeatureSpec] = [s for s in all_specs if s.entity == entity_kind]
        if not self.specs:
            kinds = sorted({s.entity for s in all_specs})
            raise ValueError(f"no feature spec has entity {entity_kind!r} (have: {kinds})")
        self.tiers = _parse_tiers(tiers)
        for name, val in (("raw_ms", raw_ms), ("lateness_ms", lateness_ms),
                          ("retention_ms", retention_ms), ("flush_interval_ms", flush_interval_ms)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"{name}: must be an integer >= 0 (ms), got {val!r}")
        if self.tiers[0][1] is not None and raw_ms + self.tiers[0][0] > self.tiers[0][1]:
            raise ValueError("raw_ms: must be <= the finest tier's span minus its granularity")
        if batch_size < 1 or hot_capacity < 1:
            raise ValueError("batch_size and hot_capacity must be >= 1")
        if max_entities < 0:
            raise ValueError("max_entities must be >= 0 (0 = no limit)")
        self.params: dict[str, Any] = {
            "tiers": [list(t) for t in self.tiers], "raw_ms": raw_ms, "lateness_ms": lateness_ms,
            "retention_ms": retention_ms, "batch_size": batch_size,
            "flush_interval_ms": flush_interval_ms, "hot_capacity": hot_capacity,
            "compress_level": compress_level, "max_entities": max_entities,
        }
        self._g0 = self.tiers[0][0]
        self._raw_ms = raw_ms
        self._lateness = lateness_ms
        self._batch = batch_size
        self._flush_ms = flush_interval_ms
        self._cap = min(hot_capacity, max_entities) if max_entities else hot_capacity
        self._max_entities = max_entities
        self._level = compress_level
        self._cross = self.specs[0].cross_attr

        # per feature
        self._aggs = [_make_agg(s) for s in self.specs]
        self._getters = [s.value_getter() for s in self.specs]
        self._preps = [_make_prep(s) for s in self.specs]
        self._horizon = [s.longest_window_ms + retention_ms for s in self.specs]
        self._incremental = [s.aggregate in _EXACT_INCREMENTAL for s in self.specs]
        # per output j
        self._out_names: list[str] = []
        self._out_feat: list[int] = []
        self._out_w: list[int | None] = []
        self._feat_outs: list[list[int]] = []
        self._defaults: dict[str, Any] = {}
        self._decay_outs: list[tuple[int, str, float]] = []
        self._list_outs: list[str] = []
        for f, s in enumerate(self.specs):
            js = []
            for w, name in zip(s.windows, s.output_names, strict=True):
                j = len(self._out_names)
                js.append(j)
                self._out_names.append(name)
                self._out_feat.append(f)
                self._out_w.append(w)
                self._defaults[name] = s.default
                if s.aggregate == "decay_sum":
                    self._decay_outs.append((j, name, float(s.half_life_ms or 1)))
                if s.aggregate == "last_k":
                    self._list_outs.append(name)
            self._feat_outs.append(js)
        # routing: (type, action) -> feature indices; (type, None) -> action-agnostic ones
        any_by_type: dict[str, list[int]] = {}
        by_action: dict[tuple[str, str], list[int]] = {}
        for f, s in enumerate(self.specs):
            if s.actions is None:
                any_by_type.setdefault(s.event_type, []).append(f)
            else:
                for a in s.actions:
                    by_action.setdefault((s.event_type, a), []).append(f)
        self._route: dict[tuple[str, Any], list[int]] = {
            (t, None): fs for t, fs in any_by_type.items()}
        for (t, a), fs in by_action.items():
            self._route[(t, a)] = sorted(fs + any_by_type.get(t, []))
        self._min_values = [s.min_value for s in self.specs]

        # state
        self._hot: OrderedDict[int, _Profile] = OrderedDict()
        self._cold: dict[int, bytes] = {}
        self._buffer: dict[int, list[tuple[int, int, Any]]] = {}
        self._n_buffered = 0
        self._buf_since: int | None = None
        self._now: int | None = None
        self._cuts_memo: dict[int, tuple[int, list[int]]] = {}
        self.counters: dict[str, int] = dict.fromkeys((
            "events", "writes", "flushes", "merged_writes", "late_writes", "tail_writes",
            "dropped_writes", "skipped_no_id", "skipped_no_attr", "skipped_bad_value",
            "cache_hits", "cache_refreshes", "past_queries", "encodes", "decodes",
            "evicted"), 0)

    # ------------------------------------------------------------------ public API

    @property
    def output_names(self) -> list[str]:
        """All feature output names of this store, in query-dict order."""
        return list(self._out_names)

    @property
    def now(self) -> int | None:
        """The store clock (ms): max event ts applied, or as advanced by ``advance``."""
        return self._now

    def key_of(self, entity_id: Any) -> int:
        """Stable 64-bit key of an entity id of this store's kind."""
        return entity_key(self.entity_kind, entity_id)

    def apply(self, event: Mapping[str, Any], item_attrs: ItemAttrs | None = None) -> None:
        """Buffer the writes of every matching feature for ``event`` (ts in epoch ms).

        Every event moves the store clock to ``max(clock, ts)``. ``item_attrs(item_id) ->
        attrs dict`` is required by ``user_x_<attr>`` stores; a list-valued attribute
        (e.g. genres) updates one cross profile per value.
        """
        ts = event.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, int):
            raise ValueError(f"event ts must be integer epoch ms, got {ts!r}")
        if self._now is None or ts > self._now:
            self._now = ts
            if self._buf_since is not None and ts - self._buf_since >= self._flush_ms:
                self.flush()
        etype = event.get("type")
        action = event.get("action")
        if not isinstance(etype, str) or not isinstance(action, (str, type(None))):
            return
        fids = self._route.get((etype, action))
        if fids is None:
            fids = self._route.get((etype, None))
            if fids is None:
                return
        self.counters["events"] += 1
        keys = self._keys_for(event, item_attrs)
        if not keys:
            return
        writes: list[tuple[int, int, Any]] = []
        for f in fids:
            mv = self._min_values[f]
            if mv is not None:
                x = event.get("value", 1.0)
                if not isinstance(x, (int, float)) or x < mv:
                    continue
            v = self._getters[f](event)
            if v is MISSING:
                self.counters["skipped_bad_value"] += 1
                continue
            v = self._preps[f](v)
            if v is _BAD:
                self.counters["skipped_bad_value"] += 1
                continue
            writes.append((f, ts, v))
        if not writes:
            return
        buf = self._buffer
        for key in keys:
            lst = buf.get(key)
            if lst is None:
                buf[key] = list(writes)
            else:
                lst.extend(writes)
        n = len(writes) * len(keys)
        self._n_buffered += n
        self.counters["writes"] += n
        if self._buf_since is None:
            self._buf_since = self._now
        if self._n_buffered >= self._batch:
            self.flush()

    def advance(self, now_ms: int) -> None:
        """Move the store clock forward (wall-clock fallback for idle streams); may flush."""
        if self._now is None or now_ms > self._now:
            self._now = now_ms
        if self._buf_since is not None and self._now - self._buf_since >= self._flush_ms:
            self.flush()

    def flush(self) -> None:
        """Merge every buffered write into the read table (the profiles)."""
        buf = self._buffer
        if not buf:
            return
        self._buffer = {}
        self._n_buffered = 0
        self._buf_since = None
        self.counters["flushes"] += 1
        for key, writes in buf.items():
            self._merge(self._load(key, True), writes)

    def query(self, entity_id: Any, t_ms: int | None = None) -> dict[str, Any]:
        """All features of an entity at time ``t_ms`` (exclusive; None = now, every event).

        Only events with ``ts < t_ms`` count (point-in-time correct). Empty windows give
        the feature's ``default`` (0.0 for count/sum/decay_sum/distinct_count, None for
        mean/min/max/last, [] for last_k).
        """
        return self.query_key(self.key_of(entity_id), t_ms)

    def query_key(self, key: int, t_ms: int | None = None) -> dict[str, Any]:
        """``query`` by precomputed ``key_of(entity_id)``."""
        pending = self._buffer.pop(key, None)
        if pending is not None:
            self._n_buffered -= len(pending)
            self._merge(self._load(key, True), pending)
        p = self._load(key, False)
        t = (self._now + 1 if self._now is not None else 0) if t_ms is None else int(t_ms)
        if p is None:
            out = dict(self._defaults)
            for name in self._list_outs:
                out[name] = []
            return out
        if p.max_ts is None or t > p.max_ts:
            c = p.cache
            if c is None or not (c.lo_max <= t < c.hi):
                self.counters["cache_refreshes"] += 1
                c = self._refresh(p, t)
            else:
                self.counters["cache_hits"] += 1
            out = c.out.copy()
            for j, name, hl in self._decay_outs:
                acc = c.acc[j]
                if acc is not None:
                    out[name] = acc * exp2((c.ref[j] - t) / hl)
            for name in self._list_outs:
                out[name] = list(out[name])
            return out
        self.counters["past_queries"] += 1
        return self._compute_all(p, t)

    def snapshot(self) -> dict[str, Any]:
        """Picklable state: config, compressed profiles and the unflushed write buffer.

        Does not flush; hot profiles that changed are encoded (and stay hot). Profiles
        are listed least recently used first.
        """
        profiles = dict(self._cold)
        for key, p in self._hot.items():
            if p.dirty:
                p.blob = self._encode(p)
                p.dirty = False
            profiles[key] = p.blob
        return {
            "format": _FORMAT,
            "entity_kind": self.entity_kind,
            "specs": [s.to_dict() for s in self.specs],
            "params": dict(self.params),
            "now": self._now,
            "buf_since": self._buf_since,
            "profiles": profiles,
            "buffer": [(k, [tuple(w) for w in ws]) for k, ws in self._buffer.items()],
            "counters": dict(self.counters),
        }

    @classmethod
    def restore(cls, snap: Mapping[str, Any]) -> ProfileStore:
        """Rebuild a store from ``snapshot()``; it answers every query identically."""
        if snap.get("format") != _FORMAT:
            raise ValueError(f"unsupported profile snapshot format {snap.get('format')!r}")
        params = dict(snap["params"])
        params["tiers"] = [tuple(t) for t in params["tiers"]]
        store = cls(snap["specs"], snap["entity_kind"], **params)
        store._now = snap["now"]
        store._buf_since = snap["buf_since"]
        store._cold = dict(snap["profiles"])
        for key, ws in snap["buffer"]:
            store._buffer[key] = [tuple(w) for w in ws]  # type: ignore[misc]
            store._n_buffered += len(ws)
        store.counters.update(snap.get("counters", {}))
        return store

    def __reduce__(self) -> tuple[Any, ...]:
        return (ProfileStore.restore, (self.snapshot(),))

    def stats(self) -> dict[str, Any]:
        """Counters plus sizes: entities, hot profiles, compressed bytes, buffered writes."""
        hot_slices = sum(len(fs[1]) for p in self._hot.values() for fs in p.feats if fs)
        hot_raw = sum(len(fs[0]) for p in self._hot.values() for fs in p.feats if fs)
        return {
            "entity_kind": self.entity_kind,
            "features": len(self.specs),
            "outputs": len(self._out_names),
            "entities": len(self._cold) + len(self._hot),
            "hot": len(self._hot),
            "cold": len(self._cold),
            "cold_bytes": sum(len(b) for b in self._cold.values()),
            "buffered_writes": self._n_buffered,
            "buffered_entities": len(self._buffer),
            "hot_slices": hot_slices,
            "hot_raw_events": hot_raw,
            "now": self._now,
            **self.counters,
        }

    def inspect(self, entity_id: Any) -> dict[str, Any] | None:
        """Debug view of one profile (after merging its pending writes): per feature name,
        raw event count and oldest raw ts, ``[(start, end)]`` of its slices (ms) and the
        tail's end; ``watermark`` is the floored watermark of the last compaction."""
        key = self.key_of(entity_id)
        pending = self._buffer.pop(key, None)
        if pending is not None:
            self._n_buffered -= len(pending)
            self._merge(self._load(key, True), pending)
        p = self._load(key, False)
        if p is None:
            return None
        feats = {}
        for s, fs in zip(self.specs, p.feats, strict=True):
            if fs is not None:
                feats[s.name] = {"raw": len(fs[0]), "raw_oldest": fs[0][0][0] if fs[0] else None,
                                 "slices": [(x[0], x[1]) for x in fs[1]],
                                 "tail_end": fs[3] if fs[2] is not None else None}
        return {"max_ts": p.max_ts, "watermark": p.cf, "features": feats,
                "encoded_bytes": len(self._encode(p))}

    def encoded_size(self, entity_id: Any) -> int:
        """Compressed at-rest bytes of one profile (0 if unknown)."""
        info = self.inspect(entity_id)
        return 0 if info is None else int(info["encoded_bytes"])

    # ------------------------------------------------------------------ internals

    def _keys_for(self, event: Mapping[str, Any], item_attrs: ItemAttrs | None) -> list[int]:
        kind = self.entity_kind
        if kind == "user" or kind == "item":
            eid = event.get("user_id" if kind == "user" else "item_id")
            if eid is None:
                self.counters["skipped_no_id"] += 1
                return []
            return [stable_hash64(eid)]
        uid, iid = event.get("user_id"), event.get("item_id")
        if uid is None or iid is None:
            self.counters["skipped_no_id"] += 1
            return []
        if item_attrs is None:
            raise TypeError(f"{kind} store needs item_attrs (item_id -> attrs dict) in apply()")
        attrs = item_attrs(iid) or {}
        av = attrs.get(self._cross)
        if av is None or av == [] or av == ():
            self.counters["skipped_no_attr"] += 1
            return []
        vals = av if isinstance(av, (list, tuple)) else (av,)
        keys = [stable_hash64(f"{uid}\x1f{a}") for a in dict.fromkeys(
            a for a in vals if isinstance(a, (str, int)) and not isinstance(a, bool))]
        if not keys:
            self.counters["skipped_no_attr"] += 1
        return keys

    def _load(self, key: int, create: bool) -> _Profile | None:
        """The decoded profile of ``key`` (created when ``create``), now the most
        recently used. ``_hot`` (decoded, LRU) and ``_cold`` (encoded, least recently
        used first) hold disjoint keys; beyond ``max_entities`` the least recently used
        profile is dropped (``evicted``)."""
        p = self._hot.get(key)
        if p is not None:
            self._hot.move_to_end(key)
            return p
        blob = self._cold.pop(key, None)
        if blob is not None:
            p = self._decode(blob)
            p.blob = blob
        elif create:
            p = _Profile(len(self.specs))
        else:
            return None
        self._hot[key] = p
        if len(self._hot) > self._cap:
            k, q = self._hot.popitem(last=False)
            self._cold[k] = self._encode(q) if q.dirty or q.blob is None else q.blob
        if self._max_entities and len(self._cold) + len(self._hot) > self._max_entities:
            cold = self._cold
            while cold and len(cold) + len(self._hot) > self._max_entities:
                del cold[next(iter(cold))]
                self.counters["evicted"] += 1
        return p

    def _encode(self, p: _Profile) -> bytes:
        """zlib(orjson([format, max_ts, cf, [[f, raw, slices, tail, tail_end], ...]]))."""
        self.counters["encodes"] += 1
        feats = [[f, fs[0], fs[1], fs[2], fs[3]] for f, fs in enumerate(p.feats) if fs is not None]
        return zlib.compress(orjson.dumps([_FORMAT, p.max_ts, p.cf, feats]), self._level)

    def _decode(self, blob: bytes) -> _Profile:
        self.counters["decodes"] += 1
        fmt, max_ts, cf, feats = orjson.loads(zlib.decompress(blob))
        if fmt != _FORMAT:
            raise ValueError(f"unsupported profile format {fmt!r}")
        p = _Profile(len(self.specs), -FAR)
        p.max_ts, p.cf, p.dirty = max_ts, cf, False
        for f, raw, slices, tail, tail_end in feats:
            p.feats[f] = [raw, slices, tail, tail_end]
        return p

    def _cuts(self, cf: int) -> tuple[int, list[int]]:
        """(raw cut, tier bounds) for watermark cf: tier i holds slices starting in
        [bounds[i], bounds[i-1]) (tier 0 ends at the raw cut, the last tier is open)."""
        memo = self._cuts_memo.get(cf)
        if memo is not None:
            return memo
        g0 = self._g0
        raw_cut = (cf - self._raw_ms) // g0 * g0
        bounds = []
        for i in range(len(self.tiers) - 1):
            span = self.tiers[i][1]
            g_next = self.tiers[i + 1][0]
            bounds.append((cf - span) // g_next * g_next)  # type: ignore[operator]
        if len(self._cuts_memo) > 4096:
            self._cuts_memo.clear()
        memo = self._cuts_memo[cf] = (raw_cut, bounds)
        return memo

    def _gran(self, ts: int, bounds: list[int]) -> int:
        for i, b in enumerate(bounds):
            if ts >= b:
                return self.tiers[i][0]
        return self.tiers[-1][0]

    def _merge(self, p: _Profile, writes: list[tuple[int, int, Any]]) -> None:
        """Merge one entity's buffered writes into its profile (read table)."""
        self.counters["merged_writes"] += len(writes)
        mx = max(w[1] for w in writes)
        if p.max_ts is None or mx > p.max_ts:
            p.max_ts = mx
        g0 = self._g0
        cf = (p.max_ts - self._lateness) // g0 * g0
        c = p.cache
        if cf != p.cf:
            p.cf = cf
            changed = self._pass(p) if cf >= p.due_min else ()
            if c is not None:
                for f in changed:
                    self._invalidate(c, f)
        raw_cut, bounds = self._cuts(cf)
        feats = p.feats
        for f, ts, v in writes:
            fs = feats[f]
            if fs is None:
                fs = feats[f] = [[], [], None, None]
            if ts >= raw_cut:
                raw = fs[0]
                if not raw or ts >= raw[-1][0]:
                    raw.append([ts, v])
                else:
                    raw.insert(bisect.bisect_right(raw, ts, key=_TS), [ts, v])
                d = ts - ts % g0 + g0 + self._raw_ms
                if d < p.due[f]:
                    p.due[f] = d
                    if d < p.due_min:
                        p.due_min = d
                if c is not None:
                    if self._incremental[f]:
                        self._cache_add(c, f, ts, v)
                    else:
                        self._invalidate_raw(c, f)
            else:
                self._place_late(fs, f, ts, v, cf, bounds)
                p.due[f] = d = self._due(fs, f)
                if d < p.due_min:
                    p.due_min = d
                if c is not None:
                    self._invalidate(c, f)
        p.dirty = True
        p.blob = None

    def _invalidate(self, c: _Cache, f: int) -> None:
        """Forget feature f's memoised values (its slices changed)."""
        for j in self._feat_outs[f]:
            c.lo[j] = FAR
            c.slo[j] = FAR
        c.lo_max = FAR

    def _invalidate_raw(self, c: _Cache, f: int) -> None:
        """Forget feature f's combined values but keep their slice parts."""
        for j in self._feat_outs[f]:
            c.lo[j] = FAR
        c.lo_max = FAR

    def _place_late(self, fs: list[Any], f: int, ts: int, v: Any, cf: int,
                    bounds: list[int]) -> None:
        """Apply an event older than the raw region to the slice that covers ts."""
        agg = self._aggs[f]
        g = self._gran(ts, bounds)
        start = ts - ts % g
        end = start + g
        if end <= cf - self._horizon[f]:
            self.counters["tail_writes" if self.specs[f].has_all else "dropped_writes"] += 1
            self._to_tail(fs, f, agg.add(None, ts, v, end), end)
            return
        self.counters["late_writes"] += 1
        slices = fs[1]
        i = bisect.bisect_left(slices, start, key=_TS)
        if i < len(slices) and slices[i][0] == start:
            s = slices[i]
            s[2] = agg.add(s[2], ts, v, s[1])
        else:
            slices.insert(i, [start, end, agg.add(None, ts, v, end)])

    def _pass(self, p: _Profile) -> list[int]:
        """Compaction pass at watermark p.cf; returns the features whose layout changed.

        Folds raw events older than the raw cut into g0 slices and truncates (or folds
        into the tail) slices ending at or before ``cf - horizon``. Slices are merged into
        a coarser tier (full rebuild) only when one lies past its tier's bound, which a
        couple of bisections detect: granularity never increases along the slice list.
        """
        cf = p.cf
        assert cf is not None
        raw_cut, bounds = self._cuts(cf)
        g0 = self._g0
        changed: list[int] = []
        due = p.due
        for f, fs in enumerate(p.feats):
            if due[f] > cf:
                continue
            if fs is None:
                due[f] = FAR
                continue
            agg = self._aggs[f]
            raw, slices = fs[0], fs[1]
            n = bisect.bisect_left(raw, raw_cut, key=_TS) if raw and raw[0][0] < raw_cut else 0
            if n:
                folded: list[Any] = []
                for ts, v in raw[:n]:
                    start = ts - ts % g0
                    if folded and folded[-1][0] == start:
                        last = folded[-1]
                        last[2] = agg.add(last[2], ts, v, last[1])
                    else:
                        folded.append([start, start + g0, agg.add(None, ts, v, start + g0)])
                del raw[:n]
                if slices and folded[0][0] <= slices[-1][0]:
                    slices = fs[1] = sorted(slices + folded, key=_TS)  # stable: existing first
                else:
                    slices.extend(folded)
            trunc = cf - self._horizon[f]
            work = bool(n)
            if slices and self._misplaced(slices, bounds):
                self._rebuild(fs, f, bounds, trunc)
                slices = fs[1]
                work = True
            if slices and slices[0][1] <= trunc:
                k = 0
                while k < len(slices) and slices[k][1] <= trunc:
                    self._to_tail(fs, f, slices[k][2], slices[k][1])
                    k += 1
                del slices[:k]
                work = True
            if not work:
                due[f] = self._due(fs, f)
                continue
            changed.append(f)
            if not fs[0] and not fs[1] and fs[2] is None:
                p.feats[f] = None
                due[f] = FAR
            else:
                due[f] = self._due(fs, f)
        p.due_min = min(due)
        return changed

    def _due(self, fs: list[Any], f: int) -> int:
        """Smallest watermark (multiple of g0) at which feature f's layout changes:
        the oldest raw event folds, the oldest slice is truncated, or the oldest slice of
        a tier crosses that tier's bound. Granularity never increases along the list."""
        raw, slices = fs[0], fs[1]
        d = FAR
        if raw:
            ts = raw[0][0]
            g0 = self._g0
            d = ts - ts % g0 + g0 + self._raw_ms
        if slices:
            d = min(d, slices[0][1] + self._horizon[f])
            tiers = self.tiers
            for i in range(len(tiers) - 1):
                g, span = tiers[i]
                gn = tiers[i + 1][0]
                idx = bisect.bisect_left(slices, -g, key=_NEG_GRAN)  # first with gran <= g
                if idx < len(slices):
                    st = slices[idx][0]
                    d = min(d, st - st % gn + gn + span)  # type: ignore[operator]
        return d

    def _misplaced(self, slices: list[Any], bounds: list[int]) -> bool:
        """True if a slice older than tier bound i is finer than tier i+1's granularity."""
        tiers = self.tiers
        for i, b in enumerate(bounds):
            if slices[0][0] >= b:
                return False
            idx = bisect.bisect_left(slices, b, key=_TS)
            s = slices[idx - 1]  # the newest (finest) slice starting before b
            if s[1] - s[0] < tiers[i + 1][0]:
                return True
        return False

    def _to_tail(self, fs: list[Any], f: int, acc: Any, end: int) -> None:
        """Fold a truncated slice (acc referenced at end) into the tail, or drop it."""
        if not self.specs[f].has_all:
            return
        tail, tail_end = fs[2], fs[3]
        if tail is None:
            fs[2], fs[3] = acc, end
        else:
            r = max(end, tail_end)
            fs[2], fs[3] = self._aggs[f].merge(tail, tail_end, acc, end, r), r

    def _rebuild(self, fs: list[Any], f: int, bounds: list[int], trunc: int) -> None:
        """Merge the slices older than the finest tier into the slice of their tier's
        granularity (or the tail, past ``trunc``); finest-tier slices are already right."""
        agg = self._aggs[f]
        slices = fs[1]
        n_old = bisect.bisect_left(slices, bounds[0], key=_TS)
        tiers = self.tiers
        last_g = tiers[-1][0]
        new: list[Any] = []
        for s in slices[:n_old]:
            start, end, acc = s
            g = last_g
            for i in range(1, len(bounds)):
                if start >= bounds[i]:
                    g = tiers[i][0]
                    break
            if end - start != g or start % g:
                start -= start % g
                end = start + g
            if end <= trunc:
                self._to_tail(fs, f, acc, s[1])
                continue
            if new and new[-1][0] == start:
                prev = new[-1]
                prev[2] = agg.merge(prev[2], prev[1], acc, s[1], end)
                prev[1] = end
            elif end == s[1]:
                new.append(s)
            else:
                new.append([start, end, agg.merge(None, end, acc, s[1], end)])
        new.extend(slices[n_old:])
        fs[1] = new

    # ---- reads

    def _slice_part(self, f: int, fs: list[Any], t: int, r: int) -> list[tuple[Any, int]]:
        """Per window of feature f at query time t: (slices + tail merged, referenced at
        r; the first T at which a slice leaves the window). Slices count iff
        ``t - w < end <= t``; the tail counts for ``all`` iff ``t >= tail_end``."""
        agg = self._aggs[f]
        slices, tail, tail_end = fs[1], fs[2], fs[3]
        si = bisect.bisect_right(slices, t, key=_END) - 1
        acc: Any = None
        last_end: int | None = None
        res: list[tuple[Any, int]] = []
        for w in self.specs[f].windows:
            if w is None:
                while si >= 0:
                    sl = slices[si]
                    acc = agg.merge(sl[2], sl[1], acc, r, r)
                    si -= 1
                if tail is not None and t >= tail_end:
                    acc = agg.merge(tail, tail_end, acc, r, r)
                res.append((acc, FAR))
                continue
            lo = t - w
            while si >= 0 and slices[si][1] > lo:
                sl = slices[si]
                acc = agg.merge(sl[2], sl[1], acc, r, r)
                last_end = sl[1]
                si -= 1
            res.append((acc, FAR if last_end is None else last_end + w))
        return res

    def _raw_part(self, f: int, fs: list[Any], t: int, r: int) -> list[tuple[Any, int]]:
        """Per window of feature f at t: (raw events in [t - w, t) merged, referenced at
        r; the first T at which one leaves the window). Exact at both edges."""
        agg = self._aggs[f]
        raw = fs[0]
        i = bisect.bisect_left(raw, t, key=_TS) - 1
        acc: Any = None
        oldest: int | None = None
        res: list[tuple[Any, int]] = []
        for w in self.specs[f].windows:
            lo = -FAR if w is None else t - w
            while i >= 0 and raw[i][0] >= lo:
                ts, v = raw[i]
                acc = agg.merge(agg.add(None, ts, v, ts), ts, acc, r, r)
                oldest = ts
                i -= 1
            res.append((acc, FAR if w is None or oldest is None else oldest + w + 1))
        return res

    def _compute_all(self, p: _Profile, t: int) -> dict[str, Any]:
        """Slow path: every output at an arbitrary t, no memoisation."""
        out = dict(self._defaults)
        for name in self._list_outs:
            out[name] = []
        for f, fs in enumerate(p.feats):
            if fs is None:
                continue
            agg = self._aggs[f]
            parts = zip(self._slice_part(f, fs, t, t), self._raw_part(f, fs, t, t), strict=True)
            for j, ((sacc, _), (racc, _)) in zip(self._feat_outs[f], parts, strict=True):
                acc = agg.merge(sacc, t, racc, t, t)
                if acc is not None:
                    out[self._out_names[j]] = agg.out(acc, t, t)
        return out

    def _refresh(self, p: _Profile, t: int) -> _Cache:
        """Recompute the outputs not valid at t (t > max_ts); returns the cache.

        Decayed parts are referenced at the newest time of their own layout (newest slice
        end / newest raw ts + 1), so a memoised value never depends on when it was
        computed."""
        c = p.cache
        if c is None:
            out = dict(self._defaults)
            for name in self._list_outs:
                out[name] = []
            c = p.cache = _Cache(len(self._out_names), out)
        lo, exp = c.lo, c.exp
        stale = sorted({self._out_feat[j] for j in range(len(lo)) if not lo[j] <= t < exp[j]})
        for f in stale:
            fs = p.feats[f]
            agg = self._aggs[f]
            js = self._feat_outs[f]
            if fs is None:
                for j in js:
                    c.acc[j], c.ref[j], lo[j], exp[j] = None, 0, t, FAR
                    c.sacc[j], c.sref[j], c.slo[j], c.sexp[j] = None, 0, t, FAR
                    name = self._out_names[j]
                    c.out[name] = [] if name in self._list_outs else self._defaults[name]
                continue
            raw, slices = fs[0], fs[1]
            if any(not c.slo[j] <= t < c.sexp[j] for j in js):
                sref = slices[-1][1] if slices else (fs[3] or 0)
                for j, (sacc, se) in zip(js, self._slice_part(f, fs, t, sref), strict=True):
                    c.sacc[j], c.sref[j], c.slo[j], c.sexp[j] = sacc, sref, t, se
            rref = raw[-1][0] + 1 if raw else c.sref[js[0]]
            for j, (racc, re) in zip(js, self._raw_part(f, fs, t, rref), strict=True):
                acc = agg.merge(c.sacc[j], c.sref[j], racc, rref, rref)
                sexp = c.sexp[j]
                c.acc[j], c.ref[j], lo[j], exp[j] = acc, rref, t, re if re < sexp else sexp
                name = self._out_names[j]
                if acc is None:
                    c.out[name] = [] if name in self._list_outs else self._defaults[name]
                else:
                    c.out[name] = agg.out(acc, rref, rref)
        c.hi = min(exp)
        c.lo_max = max(lo)
        return c

    def _cache_add(self, c: _Cache, f: int, ts: int, v: Any) -> None:
        """Fold a new raw event into the memoised outputs of an order-free feature f."""
        agg = self._aggs[f]
        t1 = ts + 1
        for j in self._feat_outs[f]:
            lo = c.lo[j]
            if lo >= FAR:
                continue
            nlo = t1 if t1 > lo else lo
            w = self._out_w[j]
            if w is None or ts + w >= nlo:
                acc = agg.merge(c.acc[j], 0, agg.add(None, ts, v, ts), 0, 0)
                c.acc[j] = acc
                if w is not None and ts + w + 1 < c.exp[j]:
                    c.exp[j] = ts + w + 1
                    if c.exp[j] < c.hi:
                        c.hi = c.exp[j]
                c.out[self._out_names[j]] = agg.out(acc, 0, 0)
            c.lo[j] = nlo
            if nlo > c.lo_max:
                c.lo_max = nlo


def stores_for(specs: Iterable[FeatureSpec | Mapping[str, Any]], **kwargs: Any) -> dict[str, ProfileStore]:
    """One ProfileStore per entity kind present in ``specs`` (kwargs go to each store)."""
    parsed = as_specs(specs)
    kinds = list(dict.fromkeys(s.entity for s in parsed))
    return {k: ProfileStore(parsed, k, **kwargs) for k in kinds}
