"""Time-slice tiers of a profile: where data belongs at a watermark, and compaction.

No Bytewax in here. Per feature, a profile layout is ``[slices, tail, tail_end, *raw]``
(``state.profile_codec``'s ``SLICES``, ``TAIL``, ``TAIL_END``, ``RAW``; ``state.profiles``
explains it; no slices: ``NO_SLICES``, never an empty list).
``Tiers`` knows, for a floored watermark ``cf``, the raw cut and the tier bounds; it
places late events into their slice, runs the compaction pass (fold old raw events
into finest slices, merge slices into coarser tiers, truncate past the horizon into
the tail or drop them) and computes when a feature's layout next needs work (``due``),
so a pass touches only features due.

>>> from collections import Counter
>>> from state.feature_spec import default_features
>>> from state.profile_plan import ProfileParams, ProfilePlan
>>> params = ProfileParams()
>>> tiers = Tiers(ProfilePlan(default_features("user"), "user", params), params, Counter())
>>> raw_cut, bounds = tiers.cuts(7_200_000)  # watermark 2 h: raw from 1 h 59 m, 1-min slices from 1 h
>>> raw_cut, bounds[0]
(7140000, 3600000)
"""

from __future__ import annotations

import bisect
import gc
from typing import Any

from state.aggregates import TS
from state.profile_codec import NO_SLICES, RAW, SLICES, TAIL, TAIL_END, Profile
from state.profile_plan import FAR, ProfileParams, ProfilePlan

YOUNG_ACCS_LIMIT = 1 << 17
"""At most this many accumulators held by ``hold_young`` (more only with the collector
off: then they are let go)."""
_YOUNG_ACCS: list[Any] = []
"""Tuple accumulators of the slices made since the last garbage collection, referenced
from here too (``hold_young``); emptied after every collection (``_release_young``)."""


def hold_young(accs: list[tuple[Any, ...]]) -> None:
    """Reference the tuple accumulators ``accs`` of new slices from ``_YOUNG_ACCS`` until
    the next collection, so the first young collection untracks both. A new slice ``(start,
    end, acc)`` holding a new tuple ``acc`` reachable only through it is otherwise
    untracked one collection late (and scanned once more in generation 1): the collector
    moves such an ``acc`` behind its slice in the young list and checks the slice first,
    while ``acc`` is still tracked. Referenced from this older list, ``acc`` keeps its
    place before the slice (it was made first) and is untracked first. Values and order
    are untouched: the list only holds references."""
    young = _YOUNG_ACCS
    if len(young) >= YOUNG_ACCS_LIMIT:
        young.clear()
    young += accs


def _release_young(phase: str, info: dict[str, int]) -> None:
    """``gc.callbacks`` hook: after a collection the held accumulators are let go."""
    if phase == "stop":
        _YOUNG_ACCS.clear()


gc.callbacks.append(_release_young)


def _neg_gran(s: list[Any]) -> int:
    """Sort key of slices by decreasing granularity."""
    return s[0] - s[1]


class Tiers:
    """Layout work of one store: ``plan`` (aggregates, horizons), ``params`` (tiers,
    raw_ms); counts ``late_writes``, ``tail_writes`` and ``dropped_writes``."""

    def __init__(self, plan: ProfilePlan, params: ProfileParams, counters: dict[str, int]) -> None:
        self.plan = plan
        self.params = params
        self.counters = counters
        self.cuts_memo: dict[int, tuple[int, list[int]]] = {}
        """``cuts``' memo: watermark -> (raw cut, tier bounds)."""
        self._g0 = params.g0
        tiers = params.tiers
        self._crossings = [(tiers[i][0], tiers[i + 1][0], tiers[i][1]) for i in range(len(tiers) - 1)]
        """Per tier but the last: (its granularity, the next tier's, its span), ms."""

    def cuts(self, cf: int) -> tuple[int, list[int]]:
        """(raw cut, tier bounds) for watermark cf: tier i holds slices starting in
        [bounds[i], bounds[i-1]) (tier 0 ends at the raw cut, the last tier is open)."""
        memo = self.cuts_memo.get(cf)
        if memo is not None:
            return memo
        g0 = self.params.g0
        raw_cut = (cf - self.params.raw_ms) // g0 * g0
        bounds = []
        for i in range(len(self.params.tiers) - 1):
            span = self.params.tiers[i][1]
            g_next = self.params.tiers[i + 1][0]
            bounds.append((cf - span) // g_next * g_next)  # type: ignore[operator]
        if len(self.cuts_memo) > 4096:
            self.cuts_memo.clear()
        memo = self.cuts_memo[cf] = (raw_cut, bounds)
        return memo

    def gran(self, ts: int, bounds: list[int]) -> int:
        """The granularity (ms) of the tier that holds a slice starting at ``ts``."""
        for i, b in enumerate(bounds):
            if ts >= b:
                return self.params.tiers[i][0]
        return self.params.tiers[-1][0]

    def raw_due(self, ts: int) -> int:
        """The watermark at which a raw event at ``ts`` leaves the raw region."""
        params = self.params
        g0 = params.tiers[0][0]
        return ts - ts % g0 + g0 + params.raw_ms

    def place_late(self, fs: list[Any], f: int, ts: int, v: Any, cf: int,
                   bounds: list[int]) -> None:
        """Apply an event older than the raw region to the slice that covers ts."""
        agg = self.plan.aggs[f]
        g = self.gran(ts, bounds)
        start = ts - ts % g
        end = start + g
        if end <= cf - self.plan.horizon[f]:
            self.counters["tail_writes" if self.plan.has_all[f] else "dropped_writes"] += 1
            self._to_tail(fs, f, agg.add(None, ts, v, end), end)
            return
        self.counters["late_writes"] += 1
        slices = fs[SLICES]
        i = bisect.bisect_left(slices, start, key=TS)
        if i < len(slices) and slices[i][0] == start:
            s = slices[i]
            slices[i] = (start, s[1], agg.add(s[2], ts, v, s[1]))
        elif slices:
            slices.insert(i, (start, end, agg.add(None, ts, v, end)))
        else:  # NO_SLICES
            fs[SLICES] = [(start, end, agg.add(None, ts, v, end))]

    def compact(self, p: Profile) -> list[tuple[int, list[Any] | None]]:
        """Compaction pass at watermark p.cf; returns ``(feature, appended)`` for each
        feature whose layout changed: ``appended`` is the list of new g0 slices when the
        only change was raw events folded into slices after every existing one (the
        usual pass: the slices before them are untouched), else None.

        Folds raw events older than the raw cut into g0 slices and truncates (or folds
        into the tail) slices ending at or before ``cf - horizon``. Slices are merged into
        a coarser tier (full rebuild) only when one lies past its tier's bound, which a
        couple of bisections detect: granularity never increases along the slice list.
        """
        cf = p.cf
        assert cf is not None
        raw_cut, bounds = self.cuts_memo.get(cf) or self.cuts(cf)
        g0 = self._g0
        changed: list[tuple[int, list[Any] | None]] = []
        due, feats, aggs = list(p.due), p.feats, self.plan.aggs  # p.due: a tuple, replaced
        for f, d in enumerate(p.due):  # the features due only (p.due: as the pass began)
            if d > cf:
                continue
            fs = feats[f]
            if fs is None:
                due[f] = FAR
                continue
            agg = aggs[f]
            slices = fs[SLICES]
            appended: list[Any] | None = None
            n = (bisect.bisect_left(fs, raw_cut, RAW, key=TS) - RAW
                 if len(fs) > RAW and fs[RAW][0] < raw_cut else 0)  # raw events to fold
            if n:
                folded = agg.slices_of(fs[RAW:RAW + n], g0)
                del fs[RAW:RAW + n]
                if type(folded[0][2]) is tuple:  # mean, last, distinct count
                    hold_young([s[2] for s in folded])
                if not slices:  # NO_SLICES
                    slices = fs[SLICES] = folded[:]
                    appended = folded
                elif folded[0][0] <= slices[-1][0]:
                    slices = fs[SLICES] = sorted(slices + folded, key=TS)  # stable: existing first
                else:
                    slices.extend(folded)
                    appended = folded
            trunc = cf - self.plan.horizon[f]
            work = bool(n)
            if slices and slices[0][0] < bounds[0] and self._misplaced(slices, bounds):
                self._rebuild(fs, f, bounds, trunc)
                slices = fs[SLICES]
                work = True
                appended = None
            if slices and slices[0][1] <= trunc:
                k = 0
                while k < len(slices) and slices[k][1] <= trunc:
                    self._to_tail(fs, f, slices[k][2], slices[k][1])
                    k += 1
                if k < len(slices):
                    del slices[:k]
                else:
                    slices = fs[SLICES] = NO_SLICES
                work = True
                appended = None
            if not work:
                due[f] = self.due(fs, f)
                continue
            if len(fs) == RAW and not fs[SLICES] and fs[TAIL] is None:  # nothing left
                p.feats[f] = None
                due[f] = FAR
                appended = None
            else:
                due[f] = self.due(fs, f)
            changed.append((f, appended))
        p.due = tuple(due)
        p.due_min = min(due)
        return changed

    def due(self, fs: list[Any], f: int) -> int:
        """Smallest watermark (multiple of g0) at which feature f's layout changes:
        the oldest raw event folds, the oldest slice is truncated, or the oldest slice of
        a tier crosses that tier's bound. Granularity never increases along the list."""
        slices = fs[SLICES]
        d = self.raw_due(fs[RAW][0]) if len(fs) > RAW else FAR
        if slices:
            first = slices[0]
            h = first[1] + self.plan.horizon[f]
            if h < d:
                d = h
            finest = first[1] - first[0] == self._g0  # every slice at g0: the oldest first
            st = first[0]
            for g, gn, span in self._crossings:
                if not finest:
                    idx = bisect.bisect_left(slices, -g, key=_neg_gran)  # first with gran <= g
                    if idx >= len(slices):
                        continue
                    st = slices[idx][0]
                b = st - st % gn + gn + span  # type: ignore[operator]
                if b < d:
                    d = b
        return d

    def _misplaced(self, slices: list[Any], bounds: list[int]) -> bool:
        """True if a slice older than tier bound i is finer than tier i+1's granularity."""
        tiers = self.params.tiers
        for i, b in enumerate(bounds):
            if slices[0][0] >= b:
                return False
            idx = bisect.bisect_left(slices, b, key=TS)
            s = slices[idx - 1]  # the newest (finest) slice starting before b
            if s[1] - s[0] < tiers[i + 1][0]:
                return True
        return False

    def _to_tail(self, fs: list[Any], f: int, acc: Any, end: int) -> None:
        """Fold a truncated slice (acc referenced at end) into the tail, or drop it."""
        if not self.plan.has_all[f]:
            return
        tail, tail_end = fs[TAIL], fs[TAIL_END]
        if tail is None:
            fs[TAIL], fs[TAIL_END] = acc, end
        else:
            r = max(end, tail_end)
            fs[TAIL], fs[TAIL_END] = self.plan.aggs[f].merge(tail, tail_end, acc, end, r), r

    def _rebuild(self, fs: list[Any], f: int, bounds: list[int], trunc: int) -> None:
        """Merge the slices older than the finest tier into the slice of their tier's
        granularity (or the tail, past ``trunc``); finest-tier slices are already right."""
        agg = self.plan.aggs[f]
        slices = fs[SLICES]
        n_old = bisect.bisect_left(slices, bounds[0], key=TS)
        tiers = self.params.tiers
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
                new[-1] = (start, end, agg.merge(prev[2], prev[1], acc, s[1], end))
            elif end == s[1]:  # acc is referenced at its coarse slice's end already
                new.append(s if start == s[0] else (start, end, acc))
            else:
                new.append((start, end, agg.merge(None, end, acc, s[1], end)))
        new.extend(slices[n_old:])
        fs[SLICES] = new or NO_SLICES
