"""IPS-style real-time feature profile store (no Bytewax).

One ``ProfileStore`` holds the profiles of one entity kind (``user``, ``item`` or
``user_x_<attr>``) for the features declared in ``state.feature_spec``. All times are
event time in integer epoch **milliseconds**.

Layout of one profile (keyed by ``stable_hash64`` of the entity id; raw ids are never
stored as keys), per feature, one list ``[slices, tail, tail_end, *raw]``
(``state.profile_codec``'s ``SLICES``, ``TAIL``, ``TAIL_END``, raw events from ``RAW`` on):

* ``raw``: the newest events, unaggregated, ``(ts, value)`` sorted by ts, in the
  feature's list after the tail's end (one tracked list per feature; tuples: the
  collector untracks a tuple of atomic values, so events held for minutes are not
  scanned by every young collection; a list at rest, read back as tuples). An event
  stays raw while ``ts >= floor(wm - raw_ms, g0)`` where ``wm = max_ts - lateness_ms`` is
  the entity's watermark (floored to the finest slice ``g0``).
* ``slices``: ``[(start, end, acc), ...]`` (tuples, replaced when a slice changes; read
  back as tuples; no slices: the empty tuple ``NO_SLICES``, not a list, untracked),
  sorted, disjoint, each aligned to its own granularity. Tier ``i``
  (granularity ``g_i``) holds data younger than ``span_i``
  (default: 1-minute slices for the last hour, 1-hour slices for the last day, 1-day
  slices beyond). As the watermark moves, slices are merged into the enclosing coarser
  slice with the aggregate's reduce function (compaction).
* ``tail``: everything older than ``longest finite window + retention_ms`` folded into one
  accumulator (only for features with an ``all`` window; otherwise such data is dropped:
  truncation).

Writes go to a write buffer (``key -> [(feature, ts, value)]``) merged into the profiles
in batches (``batch_size`` writes or ``flush_interval_ms`` of event time): a closed
buffer joins a merge queue that later writes drain a few entities at a time, so no one
call merges a whole buffer. A query first merges the queried entity's own queued and
pending writes (flush-on-read for that entity only), so reads always see every applied
event and stay cheap.

Query semantics at time ``T`` (exclusive): an event counts iff ``ts < T`` and, for a
window ``w``, it lies in ``[T - w, T)``; raw events are exact, a slice counts iff
``T - w < end <= T`` (the left edge is rounded *outward* to the slice boundary, the right
edge *inward*, so an event at or after ``T`` never counts). Decayed sums weight an event
by ``2 ** (-(T - ts) / half_life)`` (slices are referenced at their end: exact).

Profiles at rest are ``zlib(orjson(state))``; at most ``hot_capacity`` profiles are kept
decoded (LRU; ``state.profile_codec``). A hot profile also memoises its feature values with a validity interval
per output (order-free aggregates are updated in place as writes merge, the others
rescan only their raw events), so a current-time query is mostly a dict copy. Results
are a pure function of the applied events: memoised, decoded and restored profiles
answer bit for bit alike.

The pieces: ``state.aggregates`` (the reduce functions), ``state.profile_plan`` (the
parameters, ``ProfileParams``, and the specs compiled into routing and output tables),
``state.profile_tiers`` (slice placement and compaction), ``state.profile_codec``
(hot/cold profiles); this module holds the store: write buffer, merge, queries.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any

from state.aggregates import BAD, FOLD_SUM, TS, _Count, _Distinct, _Last
from state.feature_spec import MISSING, FeatureSpec, as_specs
from state.profile_codec import FORMAT, NO_SLICES, RAW, SLICES, TAIL, TAIL_END, HotCold, Profile
from state.profile_plan import (
    FAR,
    FIELD_READERS,
    ItemAttrs,
    ProfileParams,
    ProfilePlan,
    entity_key,
    field_reader,
)
from state.profile_tiers import Tiers

_END = itemgetter(1)
"""A slice's end, a write's ts (``[start, end, acc]``, ``(feature, ts, value)``)."""
DRAIN_PER_WRITE = 2
"""Queued writes merged per write ``apply`` buffers (``ProfileStore._close``): a closed
buffer is merged before the next one closes by count."""
_EXACT = frozenset((_Count, _Distinct))
"""Aggregates (exact type) whose slice parts do not depend on the order slices are merged
in (integer counts, KMV sets): each window's part is kept apart (``_refresh``) and slices
appended by compaction are folded into it (``_extend``)."""


def cache_offsets(n: int) -> tuple[int, int, int, int, int, int, int, int]:
    """Where the blocks of ``Profile.memo`` of ``n`` outputs start: acc, ref, lo, exp,
    sacc, sref, slo, sexp (output j's lo is ``v[lo + j]``; acc's block starts at 0)."""
    return 0, n, 2 * n, 3 * n, 4 * n, 5 * n, 6 * n, 7 * n


def blank_memo(n: int, t: int) -> list[Any]:
    """``Profile.memo`` of ``n`` outputs, each as a feature holding no data has it at t
    (values None, references 0, valid for T in [t, FAR): ``lo = slo = t``).

    A hot profile's memoised outputs (``Profile.memo``, ``out``, ``hi``, ``lo_max``; kept
    on the profile itself, not in an object of their own: one tracked object fewer per
    hot profile read). Output j is valid for T in [lo[j], exp[j]).

    A window's value is ``merge(slice part, raw part)``: the slice part (slices + tail,
    ``sacc`` referenced at ``sref``, valid for T in [slo, sexp)) survives writes to the
    raw region, so refreshing after a write only rescans the few raw events.
    ``acc[j]`` is the combined value referenced at ``ref[j]`` (decay_sum); ``out`` holds
    finished values of the other outputs; ``lo[j] == FAR`` marks an invalidated output.
    Memoised values equal a recomputation from the current layout bit for bit (so a
    restored store answers identically): only order-free aggregates without float
    arithmetic are updated in place, a write invalidates the others' raw part.

    The per-output values (``acc``, ``ref``, ``lo``, ``exp``, ``sacc``, ``sref``,
    ``slo``, ``sexp``; times in ms) are the blocks of one list (``cache_offsets``):
    a memo is made for every profile read after it is created or decoded and lives as
    long, and one list instead of eight is seven containers fewer for the collector to
    scan (``bench/gc_census.py``).
    """
    return [None] * n + [0] * n + [t] * n + [FAR] * n + [None] * n + [0] * n + [t] * n + [FAR] * n


class ProfileStore:
    """Per-entity windowed feature profiles of one entity kind (see module docstring).

    ``specs``: parsed FeatureSpecs or raw feature dicts (only those of ``entity_kind``
    are used). Times are ms. Invariants after every merge, per feature, with
    ``wm = floor(max_ts - lateness_ms, g0)``: raw events have ``ts >= floor(wm - raw_ms,
    g0)``; slices are disjoint, sorted and aligned; data younger than ``span_i`` is at
    granularity ``g_i`` or finer; every slice ends after ``wm - (W + retention_ms)``
    (W = the feature's longest finite window). ``params``: see ``ProfileParams``.

    >>> spec = {"name": "clicks", "entity": "user", "aggregate": "count",
    ...         "filter": {"type": "feedback", "action": "click"}, "windows": ["1h", "all"]}
    >>> store = ProfileStore([spec], "user")
    >>> for ts in (0, 60_000, 7_200_000):
    ...     store.apply({"type": "feedback", "action": "click", "user_id": "u1", "ts": ts})
    >>> store.query("u1")  # now: every event; the last hour holds one
    {'user.clicks.1h': 1.0, 'user.clicks.all': 3.0}
    >>> store.query("u1", t_ms=3_600_000)  # as of 1 h: events before it only
    {'user.clicks.1h': 2.0, 'user.clicks.all': 2.0}
    >>> ProfileStore.restore(store.snapshot()).query("u1") == store.query("u1")
    True
    """

    def __init__(self, specs: Iterable[FeatureSpec | Mapping[str, Any]],
                 entity_kind: str = "user", **params: Any) -> None:
        """``params``: the fields of ``ProfileParams`` (tiers, raw_ms, lateness_ms, ...)."""
        self.params = ProfileParams(**params)
        self.plan = ProfilePlan(as_specs(specs), entity_kind, self.params)
        self.counters: dict[str, int] = dict.fromkeys((
            "events", "writes", "flushes", "merged_writes", "late_writes", "tail_writes",
            "dropped_writes", "skipped_no_id", "skipped_no_attr", "skipped_bad_value",
            "cache_hits", "cache_refreshes", "past_queries", "encodes", "decodes",
            "evicted"), 0)
        self._tiers = Tiers(self.plan, self.params, self.counters)
        self._at = cache_offsets(len(self.plan.out_names))
        """Where each field's block of a ``Profile.memo`` starts."""
        self._blank_memo = blank_memo(len(self.plan.out_names), 0)
        """``blank_memo`` at 0: copied, its lo blocks set, per new memo (``_refresh``)."""
        self._table = HotCold(len(self.specs), self.params.hot_limit, self.params.compress_level,
                              self.params.max_entities, self.counters)
        self._buffer: dict[int, list[tuple[int, int, Any]]] = {}  # the write table
        self._n_buffered = 0
        self._queue: dict[int, list[list[tuple[int, int, Any]]]] = {}
        """Closed write buffers not merged yet: per entity, its groups of writes in the
        order they were buffered, merged newest entity first (``_close``, ``_drain``)."""
        self._n_queued = 0
        self._table.on_evict = self._evicting
        self._buf_since: int | None = None
        self._now: int | None = None

    @property
    def entity_kind(self) -> str:
        """``user``, ``item`` or ``user_x_<attr>``."""
        return self.plan.entity_kind

    @property
    def specs(self) -> list[FeatureSpec]:
        """The stored feature specs of this store's entity kind (feature index order; the
        derived ``rate`` ones are in ``plan.all_specs``)."""
        return self.plan.specs

    @property
    def output_names(self) -> list[str]:
        """All feature output names of this store, in query-dict order (rates last)."""
        return list(self.plan.out_names) + [r[0] for r in self.plan.rates]

    @property
    def now(self) -> int | None:
        """The store clock (ms): max event ts applied, or as advanced by ``advance``."""
        return self._now

    def key_of(self, entity_id: Any) -> int:
        """Stable 64-bit key of an entity id of this store's kind."""
        return entity_key(self.plan.entity_kind, entity_id)

    def apply(self, event: Mapping[str, Any], item_attrs: ItemAttrs | None = None) -> None:
        """Buffer the writes of every matching feature for ``event`` (ts in epoch ms).

        Every event moves the store clock to ``max(clock, ts)``. ``item_attrs(item_id) ->
        attrs dict`` is required by ``user_x_<attr>`` stores; a list-valued attribute
        (e.g. genres) updates one cross profile per value.
        """
        get = FIELD_READERS.get(type(event)) or field_reader(type(event))
        ts = get(event, "ts", None)
        if type(ts) is not int and (isinstance(ts, bool) or not isinstance(ts, int)):
            raise ValueError(f"event ts must be integer epoch ms, got {ts!r}")
        now = self._now
        if now is None or ts > now:
            self._now = ts
            if self._buf_since is not None and ts - self._buf_since >= self.params.flush_interval_ms:
                self._close()
        etype = get(event, "type", None)
        action = get(event, "action", None)
        plan = self.plan
        if type(etype) is str and (action is None or type(action) is str):
            steps = plan.steps.get((etype, action))  # write_steps' memo (the usual case)
            if steps is None:
                steps = plan.write_steps(etype, action)
        elif not isinstance(etype, str) or not isinstance(action, (str, type(None))):
            return
        else:
            steps = plan.write_steps(etype, action)
        if not steps:
            return
        counters = self.counters
        counters["events"] += 1
        if plan.id_field is not None:  # a user or item store: one key
            eid = get(event, plan.id_field, None)
            if eid is None:
                counters["skipped_no_id"] += 1
                return
            key = plan.keys.get(eid)  # key()'s memo: string ids only
            keys: Sequence[int] = (plan.key(eid) if key is None else key,)
        else:
            keys, skipped = plan.cross_keys_for(event, item_attrs, get)
            if skipped is not None:
                counters[skipped] += 1
            if not keys:
                return
        writes: list[tuple[int, int, Any]] = []
        for f, mv, v, field, default, getter, prep in steps:
            if mv is not None:
                x = get(event, "value", 1.0)
                if not isinstance(x, (int, float)) or x < mv:
                    continue
            if v is MISSING:
                v = getter(event) if field is None else get(event, field, default)
                if v is MISSING:
                    counters["skipped_bad_value"] += 1
                    continue
                v = prep(v)
                if v is BAD:
                    counters["skipped_bad_value"] += 1
                    continue
            writes.append((f, ts, v))
        if not writes:
            return
        buf = self._buffer
        n = len(writes)
        added = 0
        for key in keys:
            lst = buf.get(key)
            if lst is None:
                buf[key] = writes if len(keys) == 1 else list(writes)
                added += n
            elif lst[-1][1] != ts or not self._fold(lst, writes):  # _fold: the same ts only
                lst.extend(writes)
                added += n
        n *= len(keys)
        self._n_buffered += added
        counters["writes"] += n
        if self._buf_since is None:
            self._buf_since = self._now
        if self._queue:
            self._drain(DRAIN_PER_WRITE * n)
        if self._n_buffered >= self.params.batch_size:
            self._close()

    def _fold(self, lst: list[tuple[int, int, Any]], writes: list[tuple[int, int, Any]]) -> bool:
        """Fold an event's ``writes`` into the same features' writes of the entity's
        previous event, when that event wrote exactly these features at the same ts
        (the tail of ``lst``) and each pair folds (``ProfilePlan.fold``: counts add up,
        equal values of order-free aggregates are one). Each feature's writes, in order,
        are then what merging both gives (a request's impressions: one write per feature
        instead of one per impression). Returns whether it folded (``lst`` changed)."""
        n = len(writes)
        base = len(lst) - n
        if base < 0:
            return False
        fold = self.plan.fold
        folded = []
        for i in range(n):
            f, ts, v = writes[i]
            old = lst[base + i]
            kind = fold[f]
            if old[0] != f or old[1] != ts or not kind:
                return False
            if kind == FOLD_SUM:
                folded.append((f, ts, old[2] + v))
            elif type(old[2]) is not type(v) or old[2] != v:  # FOLD_SAME: equal values
                return False
            else:
                folded.append(old)
        lst[base:] = folded
        return True

    def advance(self, now_ms: int) -> None:
        """Move the store clock forward (wall-clock fallback for idle streams); may flush."""
        if self._now is None or now_ms > self._now:
            self._now = now_ms
        if self._buf_since is not None and self._now - self._buf_since >= self.params.flush_interval_ms:
            self._close()

    def flush(self) -> None:
        """Merge every buffered and queued write into the read table (the profiles)."""
        self._close()
        self._drain(FAR)

    def _close(self) -> None:
        """Close the write buffer (``batch_size`` writes or ``flush_interval_ms`` reached):
        its entities' profiles are loaded now, in order, as merging them now would (so
        the LRU order, and which entity ``max_entities`` forgets, stay the same), and
        their writes join the merge queue, one group per entity. ``apply`` then merges
        ``DRAIN_PER_WRITE`` queued writes per write it buffers (``_drain``), and a read
        first merges its entity's own groups: the same merges of the same groups per
        entity as merging the whole buffer at once, spread over the calls that follow
        instead of one long call. The queue holds at most one buffer's writes."""
        buf = self._buffer
        if not buf:
            return
        n = self._n_buffered
        self._buffer = {}
        self._n_buffered = 0
        self._buf_since = None
        self.counters["flushes"] += 1
        if self._queue and self._n_queued + n > self.params.batch_size:
            self._drain(FAR)
        queue, hot, load = self._queue, self._table.hot, self._table.load
        move = hot.move_to_end
        for key, writes in buf.items():
            if key in hot:
                move(key)  # what load(key, True) does here
            else:
                load(key, True)
            groups = queue.get(key)
            if groups is None:
                queue[key] = [writes]
            else:
                groups.append(writes)
        self._n_queued += n

    def _drain(self, budget: int) -> None:
        """Merge queued entities until ``budget`` writes were merged (at least one
        entity) or the queue is empty. Newest queued first (``popitem``: taking the
        first key of a dict whose front was popped rescans the deleted slots)."""
        queue, hot, merge = self._queue, self._table.hot, self._merge
        while queue and budget > 0:
            key, groups = queue.popitem()
            p = hot.get(key)
            if p is None:  # cold or forgotten since (not after on_evict): the slow path
                budget -= self._merge_queued(key, groups)
                continue
            for writes in groups:
                merge(p, writes)
                n = len(writes)
                budget -= n
                self._n_queued -= n

    def _evicting(self, key: int, p: Profile) -> None:
        """A hot profile leaves for the cold side: its queued groups are merged first, so
        it is encoded once, with them, as when the whole buffer was merged at once."""
        groups = self._queue.pop(key, None)
        if groups is not None:
            self._n_queued -= sum(len(g) for g in groups)
            for writes in groups:
                self._merge(p, writes)

    def _merge_queued(self, key: int, groups: list[list[tuple[int, int, Any]]]) -> int:
        """Merge an entity's queued groups in order, without making it the most recently
        used (an entity forgotten since takes its writes with it); returns the writes."""
        n = sum(len(g) for g in groups)
        self._n_queued -= n
        merge = self._merge

        def merge_all(p: Profile) -> None:
            for writes in groups:
                merge(p, writes)
        self._table.change(key, merge_all)
        return n

    def query(self, entity_id: Any, t_ms: int | None = None) -> dict[str, Any]:
        """All features of an entity at time ``t_ms`` (exclusive; None = now, every event).

        Only events with ``ts < t_ms`` count (point-in-time correct). Empty windows give
        the feature's ``default`` (0.0 for count/sum/decay_sum/distinct_count, None for
        mean/min/max/last, [] for last_k).
        """
        return self.query_key(self.key_of(entity_id), t_ms)

    def empty_answer(self) -> dict[str, Any]:
        """What a query of an entity the store does not know (``knows``) gives: every
        output at its empty-window default, rates included (a fresh dict)."""
        plan = self.plan
        out = plan.empty_outputs()
        return plan.add_rates(out) if plan.rates else out

    def knows(self, key: int) -> bool:
        """Whether the store holds a profile or pending writes for ``key``
        (``key_of(entity_id)``): if not, every query of it gives ``empty_answer()``."""
        table = self._table
        return key in self._buffer or key in table.hot or key in table.cold  # table.has(key)

    def query_key(self, key: int, t_ms: int | None = None) -> dict[str, Any]:
        """``query`` by precomputed ``key_of(entity_id)``."""
        hot = self._table.hot
        p = hot.get(key)
        if p is not None and key not in self._buffer and key not in self._queue:
            hot.move_to_end(key)  # what _load_current does here
        else:
            p = self._load_current(key)
        if p is None:
            return self.empty_answer()
        return self._answer(p, self._query_time(t_ms))

    def query_keys(self, keys: Sequence[int], t_ms: int | None = None,
                   unknown: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """``[query_key(key, t_ms) for key in keys]`` in one call (the same answers and
        counters, the query time read once); a key the store does not know (``knows``)
        gives ``unknown`` itself when one is given (a shared, read-only answer, e.g. an
        ``empty_answer()`` kept by the caller) instead of a fresh dict. A hot profile
        with no writes pending is answered without ``_load_current`` (its LRU move only)."""
        t = self._query_time(t_ms)
        buffer, queue, answer = self._buffer, self._queue, self._answer
        hot, cold, load = self._table.hot, self._table.cold, self._load_current
        move = hot.move_to_end
        answers: list[dict[str, Any]] = []
        for key in keys:
            p = hot.get(key)
            if p is not None and key not in buffer and key not in queue:
                move(key)  # what load(key) does here
            elif unknown is not None and p is None and key not in buffer and key not in cold:
                answers.append(unknown)
                continue
            else:
                p = load(key)
            answers.append(self.empty_answer() if p is None else answer(p, t))
        return answers

    def _query_time(self, t_ms: int | None) -> int:
        """The query time in ms: ``t_ms``, or just after the store's clock."""
        return (self._now + 1 if self._now is not None else 0) if t_ms is None else int(t_ms)

    def _answer(self, p: Any, t: int) -> dict[str, Any]:
        """The answer of loaded profile ``p`` at query time ``t`` (ms): from its cache when
        ``t`` is past its last write (refreshed when ``t`` left the cache's span), else
        computed from the parts; counted in ``counters``."""
        plan = self.plan
        if p.max_ts is None or t > p.max_ts:
            if p.memo is None or not (p.lo_max <= t < p.hi):
                self.counters["cache_refreshes"] += 1
                self._refresh(p, t)
            else:
                self.counters["cache_hits"] += 1
            out = p.out.copy()
            v, at_ref = p.memo, self._at[1]
            e2 = math.exp2  # decay.exp2's value: a reference is not after t (x <= 0)
            for j, name, hl in plan.decay_outs:
                acc = v[j]  # acc: the first block
                if acc is not None:
                    out[name] = acc * e2((v[at_ref + j] - t) / hl)
            for name in plan.list_outs:
                out[name] = list(out[name])
        else:
            self.counters["past_queries"] += 1
            out = self._compute_all(p, t)
        return plan.add_rates(out) if plan.rates else out

    def snapshot(self) -> dict[str, Any]:
        """Picklable state: config, compressed profiles and the unflushed write buffer.

        Does not flush (the queue of closed buffers is merged first: ``_close``); hot
        profiles that changed are encoded (and stay hot). Profiles are listed least
        recently used first.
        """
        self._drain(FAR)
        return {
            "format": FORMAT,
            "entity_kind": self.entity_kind,
            "specs": [s.to_dict() for s in self.plan.all_specs],
            "params": self.params.to_dict(),
            "now": self._now,
            "buf_since": self._buf_since,
            "profiles": self._table.blobs(),
            "buffer": [(k, [tuple(w) for w in ws]) for k, ws in self._buffer.items()],
            "counters": dict(self.counters),
        }

    @classmethod
    def restore(cls, snap: Mapping[str, Any]) -> ProfileStore:
        """Rebuild a store from ``snapshot()``; it answers every query identically."""
        if snap.get("format") != FORMAT:
            raise ValueError(f"unsupported profile snapshot format {snap.get('format')!r}")
        store = cls(snap["specs"], snap["entity_kind"], **snap["params"])
        store._now = snap["now"]
        store._buf_since = snap["buf_since"]
        store._table.cold = dict(snap["profiles"])
        for key, ws in snap["buffer"]:
            store._buffer[key] = [tuple(w) for w in ws]  # type: ignore[misc]
            store._n_buffered += len(ws)
        store.counters.update(snap.get("counters", {}))
        return store

    def __reduce__(self) -> tuple[Any, ...]:
        return (ProfileStore.restore, (self.snapshot(),))

    def stats(self) -> dict[str, Any]:
        """Counters plus sizes: entities, hot profiles, compressed bytes, buffered writes."""
        hot, cold = self._table.hot, self._table.cold
        hot_slices = sum(len(fs[SLICES]) for p in hot.values() for fs in p.feats if fs)
        hot_raw = sum(len(fs) - RAW for p in hot.values() for fs in p.feats if fs)
        return {
            "entity_kind": self.entity_kind,
            "features": len(self.specs),
            "outputs": len(self.plan.out_names),
            "entities": len(cold) + len(hot),
            "hot": len(hot),
            "cold": len(cold),
            "cold_bytes": sum(len(b) for b in cold.values()),
            "buffered_writes": self._n_buffered,
            "buffered_entities": len(self._buffer),
            "queued_writes": self._n_queued,
            "queued_entities": len(self._queue),
            "hot_slices": hot_slices,
            "hot_raw_events": hot_raw,
            "now": self._now,
            **self.counters,
        }

    def inspect(self, entity_id: Any) -> dict[str, Any] | None:
        """Debug view of one profile (after merging its pending writes): per feature name,
        raw event count and oldest raw ts, ``[(start, end)]`` of its slices (ms) and the
        tail's end; ``watermark`` is the floored watermark of the last compaction."""
        p = self._load_current(self.key_of(entity_id))
        if p is None:
            return None
        feats = {}
        for s, fs in zip(self.specs, p.feats, strict=True):
            if fs is not None:
                feats[s.name] = {"raw": len(fs) - RAW,
                                 "raw_oldest": fs[RAW][0] if len(fs) > RAW else None,
                                 "slices": [(x[0], x[1]) for x in fs[SLICES]],
                                 "tail_end": fs[TAIL_END] if fs[TAIL] is not None else None}
        return {"max_ts": p.max_ts, "watermark": p.cf, "features": feats,
                "encoded_bytes": len(self._table.encode(p))}

    def encoded_size(self, entity_id: Any) -> int:
        """Compressed at-rest bytes of one profile (0 if unknown)."""
        info = self.inspect(entity_id)
        return 0 if info is None else int(info["encoded_bytes"])

    # ------------------------------------------------------------------ internals

    def _load_current(self, key: int) -> Profile | None:
        """The decoded profile of ``key`` with its pending writes merged (flush-on-read
        for this entity only), or None if the store has never seen it."""
        groups = self._queue.pop(key, None)
        if groups is not None:
            self._merge_queued(key, groups)
        pending = self._buffer.pop(key, None)
        if pending is None:
            return self._table.load(key, False)
        self._n_buffered -= len(pending)
        p = self._table.load(key, True)  # now the most recently used (a load evicts older ones)
        self._merge(p, pending)
        return p

    def _merge(self, p: Profile, writes: list[tuple[int, int, Any]]) -> None:
        """Merge one entity's buffered writes into its profile (read table)."""
        plan = self.plan
        self.counters["merged_writes"] += len(writes)
        mx = writes[0][1] if len(writes) == 1 else max(map(_END, writes))
        max_ts = p.max_ts
        if max_ts is None or mx > max_ts:
            p.max_ts = max_ts = mx
        params = self.params
        g0 = params.tiers[0][0]
        cf = (max_ts - params.lateness_ms) // g0 * g0
        tiers = self._tiers
        c = p if p.memo is not None else None  # the memo's fields live on the profile
        if cf != p.cf:
            p.cf = cf
            changed = tiers.compact(p) if cf >= p.due_min else ()
            if c is not None:
                aggs = plan.aggs
                for f, appended in changed:
                    if appended is not None and type(aggs[f]) in _EXACT:
                        self._extend(c, f, appended)
                    else:
                        self._invalidate(c, f)
        raw_cut, bounds = tiers.cuts_memo.get(cf) or tiers.cuts(cf)
        feats, due, incremental = p.feats, p.due, plan.incremental
        raw_ms = params.raw_ms
        adds: list[tuple[int, int, Any]] = []  # raw writes of order-free features (c set)
        for w in writes:
            f, ts, v = w
            fs = feats[f]
            if fs is None:
                fs = feats[f] = [NO_SLICES, None, None]
            if ts >= raw_cut:
                if len(fs) == RAW or ts >= fs[-1][0]:  # raw events: fs[RAW:]
                    fs.append((ts, v))
                else:
                    fs.insert(bisect.bisect_right(fs, ts, RAW, key=TS), (ts, v))
                d = ts - ts % g0 + g0 + raw_ms  # Tiers.raw_due(ts)
                if d < due[f]:
                    p.set_due(f, d)
                    due = p.due
                if c is not None:
                    if incremental[f]:
                        adds.append(w)
                    else:  # its combined values forgotten, the slice parts kept
                        cv, at_lo = c.memo, self._at[2]
                        for j in plan.feat_outs[f]:
                            cv[at_lo + j] = FAR
                        c.lo_max = FAR
            else:
                tiers.place_late(fs, f, ts, v, cf, bounds)
                p.set_due(f, tiers.due(fs, f))
                due = p.due
                if c is not None:
                    self._invalidate(c, f)
        if adds:
            self._cache_add(c, adds)  # type: ignore[arg-type]
        p.dirty = True
        p.blob = None

    def _invalidate(self, c: Profile, f: int) -> None:
        """Forget feature f's memoised values (its slices changed; ``c.memo`` is set)."""
        v, at_lo, at_slo = c.memo, self._at[2], self._at[6]
        for j in self.plan.feat_outs[f]:
            v[at_lo + j] = FAR
            v[at_slo + j] = FAR
        c.lo_max = FAR

    def _extend(self, c: Profile, f: int, appended: list[Any]) -> None:
        """Fold slices that compaction appended after feature f's others (its raw events
        folded) into f's memoised slice parts (count / distinct count only: the value a
        recomputation gives). A window's part then holds while its own slices stay
        in and every appended slice counts: for T in [newest appended end, oldest
        appended end + w). A combined value (slice part merged with the raw part) keeps
        its value where every moved event counts both as a raw event (``T <= ts + w``)
        and in its slice (``end <= T < end + w``): for T in [newest appended end, oldest
        appended start + w + 1), within its old interval; otherwise it is forgotten."""
        plan = self.plan
        agg = plan.aggs[f]
        first, last = appended[0][1], appended[-1][1]
        first_start = appended[0][0]
        accs = [s[2] for s in appended]  # never None: a folded slice holds an event
        v, out_w = c.memo, plan.out_w
        _, _, at_lo, at_exp, at_sacc, _, at_slo, at_sexp = self._at
        lo_max = c.lo_max  # the lo block's max: f's los only rise here, so it stays one
        sketch_in: Any = MISSING  # the last KMV sketch the slices went into, the result
        sketch_out = None
        for j in plan.feat_outs[f]:
            w = out_w[j]
            lo_c = v[at_lo + j]
            if lo_c < FAR:  # the combined value holds while each moved event counts both ways
                lo_c = last if last > lo_c else lo_c
                exp_c = v[at_exp + j]
                if w is not None and first_start + w + 1 < exp_c:
                    exp_c = first_start + w + 1
                if lo_c < exp_c:
                    v[at_lo + j], v[at_exp + j] = lo_c, exp_c
                    if exp_c < c.hi:
                        c.hi = exp_c
                else:
                    v[at_lo + j] = lo_c = FAR
                if lo_c > lo_max:
                    lo_max = lo_c
            slo = v[at_slo + j]
            if slo >= FAR:
                continue
            lo = last if last > slo else slo
            hi = v[at_sexp + j]
            if w is not None and first + w < hi:
                hi = first + w
            if lo >= hi:
                v[at_slo + j] = FAR
                continue
            acc = v[at_sacc + j]
            if type(agg) is _Distinct:
                if acc is not sketch_in:  # windows sharing one sketch: added to once
                    sketch_in = acc
                    for a in accs:
                        acc = agg.add_all(acc, a)
                    sketch_out = acc
                acc = sketch_out
            else:
                for a in accs:
                    acc = a if acc is None else acc + a
            v[at_sacc + j], v[at_slo + j], v[at_sexp + j] = acc, lo, hi
        c.lo_max = lo_max

    # ---- reads

    def _slice_part(self, f: int, fs: list[Any], t: int, r: int) -> list[tuple[Any, int]]:
        """Per window of feature f at query time t: (slices + tail merged, referenced at
        r; the first T at which a slice leaves the window). Slices count iff
        ``t - w < end <= t``; the tail counts for ``all`` iff ``t >= tail_end``."""
        agg = self.plan.aggs[f]
        slices, tail, tail_end = fs[SLICES], fs[TAIL], fs[TAIL_END]
        si = bisect.bisect_right(slices, t, key=_END) - 1
        if type(agg) is _Distinct:  # the slices of a window merged in one pass
            return self._slice_part_run(f, agg, fs, t, si)
        acc: Any = None
        last_end: int | None = None
        res: list[tuple[Any, int]] = []
        for w in self.plan.specs[f].windows:
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

    def _slice_part_run(self, f: int, agg: _Distinct, fs: list[Any], t: int, si: int
                        ) -> list[tuple[Any, int]]:
        """``_slice_part`` of a KMV sketch (``_Distinct``, whose merge ignores the
        references): the slices entering each window merged in one pass
        (``merge_run``): the same values as merging them one by one."""
        slices, tail, tail_end = fs[SLICES], fs[TAIL], fs[TAIL_END]
        acc: Any = None
        last_end: int | None = None
        res: list[tuple[Any, int]] = []
        for w in self.plan.specs[f].windows:
            run = []
            if w is None:
                while si >= 0:
                    run.append(slices[si][2])
                    si -= 1
                if tail is not None and t >= tail_end:
                    run.append(tail)
                acc = agg.merge_run(run, acc)
                res.append((acc, FAR))
                continue
            lo = t - w
            while si >= 0 and slices[si][1] > lo:
                sl = slices[si]
                run.append(sl[2])
                last_end = sl[1]
                si -= 1
            acc = agg.merge_run(run, acc)
            res.append((acc, FAR if last_end is None else last_end + w))
        return res

    def _window_part(self, f: int, fs: list[Any], t: int, w: int | None) -> tuple[Any, int]:
        """One window's ``_slice_part`` of a count or distinct count (``_EXACT``), on its
        own: its slices (``t - w < end <= t``; every one and the tail for ``all``)
        merged, and the first T at which one of them leaves."""
        agg = self.plan.aggs[f]
        slices = fs[SLICES]
        hi = bisect.bisect_right(slices, t, key=_END)
        lo = 0 if w is None else bisect.bisect_right(slices, t - w, key=_END)
        accs = [s[2] for s in slices[lo:hi]]
        if w is None and fs[TAIL] is not None and t >= fs[TAIL_END]:
            accs.append(fs[TAIL])
        acc = agg.merge_run(accs, None) if type(agg) is _Distinct else sum(accs) if accs else None
        return acc, FAR if w is None or lo >= hi else slices[lo][1] + w

    def _raw_part(self, f: int, fs: list[Any], t: int, r: int) -> list[tuple[Any, int]]:
        """Per window of feature f at t: (raw events in [t - w, t) merged, referenced at
        r; the first T at which one leaves the window). Exact at both edges."""
        fold = self.plan.aggs[f].fold_raw
        n = len(fs)
        hi = (n if n == RAW or fs[-1][0] < t  # fs[RAW:hi]: the raw events before t
              else bisect.bisect_left(fs, t, RAW, key=TS))
        acc: Any = None
        oldest: int | None = None
        res: list[tuple[Any, int]] = []
        for w in self.plan.specs[f].windows:
            if hi > RAW:  # events left that a shorter window did not hold
                lo = (RAW if w is None or fs[RAW][0] >= t - w  # all of them (raw: ~2 min)
                      else bisect.bisect_left(fs, t - w, RAW, hi, key=TS))
                if lo < hi:  # fs[lo:hi]: the window's events not in a shorter window
                    acc = fold(reversed(fs[lo:hi]), acc, r)
                    oldest = fs[lo][0]
                    hi = lo
            res.append((acc, FAR if w is None or oldest is None else oldest + w + 1))
        return res

    def _compute_all(self, p: Profile, t: int) -> dict[str, Any]:
        """Slow path: every output at an arbitrary t, no memoisation."""
        plan = self.plan
        out = plan.empty_outputs()
        for f, fs in enumerate(p.feats):
            if fs is None:
                continue
            agg = plan.aggs[f]
            parts = zip(self._slice_part(f, fs, t, t), self._raw_part(f, fs, t, t), strict=True)
            for j, ((sacc, _), (racc, _)) in zip(plan.feat_outs[f], parts, strict=True):
                acc = agg.merge(sacc, t, racc, t, t)
                if acc is not None:
                    out[plan.out_names[j]] = agg.out(acc, t, t)
        return out

    def _refresh(self, p: Profile, t: int) -> None:
        """Recompute the outputs not valid at t (t > max_ts) in ``p``'s memo (made now
        if it has none).

        Decayed parts are referenced at the newest time of their own layout (newest slice
        end / newest raw ts + 1), so a memoised value never depends on when it was
        computed."""
        plan = self.plan
        _, at_ref, at_lo, at_exp, at_sacc, at_sref, at_slo, at_sexp = self._at
        v = p.memo
        new = v is None
        if new:  # every output as an empty feature's; the features holding data computed
            v = p.memo = self._blank_memo.copy()  # blank_memo(n, t):
            v[at_lo:at_exp] = v[at_slo:at_sexp] = [t] * len(plan.out_names)
            p.out = plan.empty_outputs()
            stale = [f for f, fs in enumerate(p.feats) if fs is not None]
        else:
            stale = sorted({f for f, lo_j, exp_j in zip(plan.out_feat, v[at_lo:at_exp],
                                                        v[at_exp:at_sacc], strict=True)
                            if not lo_j <= t < exp_j})
        out, names = p.out, plan.out_names
        for f in stale:
            fs = p.feats[f]
            agg = plan.aggs[f]
            js = plan.feat_outs[f]
            if fs is None:
                for j in js:
                    v[j] = v[at_sacc + j] = None
                    v[at_ref + j] = v[at_sref + j] = 0
                    v[at_lo + j] = v[at_slo + j] = t
                    v[at_exp + j] = v[at_sexp + j] = FAR
                    name = names[j]
                    out[name] = [] if name in plan.list_outs else plan.defaults[name]
                continue
            slices = fs[SLICES]
            stale_parts = js if new else [j for j in js if not v[at_slo + j] <= t < v[at_sexp + j]]
            if stale_parts:
                sref = slices[-1][1] if slices else (fs[TAIL_END] or 0)
                if len(stale_parts) < len(js) and type(agg) in _EXACT:
                    for j in stale_parts:  # the other windows' parts still hold
                        part, se = self._window_part(f, fs, t, plan.out_w[j])
                        v[at_sacc + j], v[at_sref + j], v[at_slo + j], v[at_sexp + j] = (
                            part, sref, t, se)
                else:
                    for j, (part, se) in zip(js, self._slice_part(f, fs, t, sref), strict=True):
                        v[at_sacc + j], v[at_sref + j], v[at_slo + j], v[at_sexp + j] = (
                            part, sref, t, se)
            rref = fs[-1][0] + 1 if len(fs) > RAW else v[at_sref + js[0]]  # newest raw ts + 1
            kind = type(agg)
            for j, (racc, re) in zip(js, self._raw_part(f, fs, t, rref), strict=True):
                sacc = v[at_sacc + j]
                if kind is _Count:  # agg.merge: integer counts
                    acc = racc if sacc is None else sacc if racc is None else sacc + racc
                elif kind is _Distinct and racc is not None:  # a few raw hashes into the sketch
                    acc = agg.add_all(sacc, racc)
                else:
                    acc = agg.merge(sacc, v[at_sref + j], racc, rref, rref)
                sexp = v[at_sexp + j]
                v[j], v[at_ref + j], v[at_lo + j], v[at_exp + j] = (
                    acc, rref, t, re if re < sexp else sexp)
                name = names[j]
                if acc is None:
                    out[name] = [] if name in plan.list_outs else plan.defaults[name]
                else:
                    out[name] = float(acc) if kind is _Count else agg.out(acc, rref, rref)
        p.hi = min(v[at_exp:at_sacc])
        p.lo_max = max(v[at_lo:at_exp])

    def _cache_add(self, c: Profile, adds: list[tuple[int, int, Any]]) -> None:
        """Fold new raw events ``(f, ts, v)`` of order-free features into the memoised
        outputs, in turn. Done after the merge's other memo changes rather than between
        them: those only forget outputs (``lo = FAR``, ``lo_max = FAR``), which an add
        skips and a later refresh recomputes whole, so the memo answers alike. Windows of
        a distinct count holding equal sketches (a young item's 1d and 7d viewers) take
        the hash once and share the resulting tuple (accumulators are never mutated)."""
        plan = self.plan
        aggs, feat_outs = plan.aggs, plan.feat_out_specs
        cv, out = c.memo, c.out
        at_lo, at_exp = self._at[2], self._at[3]
        hi, lo_max = c.hi, c.lo_max
        for f, ts, v in adds:
            agg = aggs[f]
            kind = type(agg)
            t1 = ts + 1
            if t1 > lo_max:  # each live window's lo becomes max(lo, t1), and lo <= lo_max
                lo_max = t1
            sketch_in: Any = MISSING  # the KMV sketch the hash last went into, the result
            sketch_out = sketch_value = None
            for j, w, name in feat_outs[f]:
                lo = cv[at_lo + j]
                if lo >= FAR:
                    continue
                nlo = t1 if t1 > lo else lo
                if w is None or ts + w >= nlo:
                    acc = cv[j]  # acc: the first block
                    if kind is _Count:  # agg.merge(acc, 0, agg.add(None, ts, v, ts), 0, 0)
                        acc = v if acc is None else acc + v
                        out[name] = float(acc)  # agg.out
                    elif kind is _Last:  # the same merge: the newer (ts, v) wins ties
                        if acc is None or ts >= acc[0]:
                            acc = (ts, v)
                        out[name] = acc[1]  # agg.out
                    elif kind is _Distinct:  # windows holding equal sketches: one add
                        if acc is not sketch_in and acc != sketch_in:
                            sketch_in = acc
                            sketch_out = agg.add_all(acc, (v,))
                            sketch_value = agg.out(sketch_out, 0, 0)
                        acc = sketch_out
                        out[name] = sketch_value
                    else:
                        acc = agg.merge(acc, 0, agg.add(None, ts, v, ts), 0, 0)
                        out[name] = agg.out(acc, 0, 0)
                    cv[j] = acc
                    if w is not None and ts + w + 1 < cv[at_exp + j]:
                        cv[at_exp + j] = e = ts + w + 1
                        if e < hi:
                            hi = e
                cv[at_lo + j] = nlo
        c.hi, c.lo_max = hi, lo_max


def stores_for(specs: Iterable[FeatureSpec | Mapping[str, Any]], **kwargs: Any) -> dict[str, ProfileStore]:
    """One ProfileStore per entity kind present in ``specs`` (kwargs go to each store)."""
    parsed = as_specs(specs)
    kinds = list(dict.fromkeys(s.entity for s in parsed))
    return {k: ProfileStore(parsed, k, **kwargs) for k in kinds}
