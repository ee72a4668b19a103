"""The online joiner of one user shard: impressions + feedback -> labelled examples.

Monolith's joiner, in event time. Rules (docs/architecture.md repeats them):

* An impression waits ``wait_ms_override`` (or, when 0, ``max(window_ms over positive
  actions)``) after its ``ts``. The
  shard's watermark is ``max ts seen - allowed_lateness_ms``; a window closes when
  the watermark passes its deadline (or at end of input, or when pending state is
  full: oldest deadline first, counted as ``forced_closes``).
* Feedback for a pending impression within that action's window is recorded in
  ``labels`` (action -> value). The first *positive* feedback (action listed in
  ``positive`` with value >= its threshold) emits the positive example at once with
  every label recorded so far. Feedback after that emission is not a second
  example: it goes out as a ``late-labels`` record with reason ``after_emission``.
* A window that closes without positive feedback emits a negative example (labels
  may hold non-positive actions), kept or dropped by the negative sampler.
* Feedback arriving before its impression waits (``orphans``) until the impression
  arrives or the watermark passes ``feedback ts + allowed_lateness_ms``; an orphan
  that never matches goes out as a late label with reason ``no_impression``.
* Feedback for an impression whose window closed: late label ``after_window``;
  feedback outside that action's own window while the impression still waits:
  late label ``outside_window``. Late labels are never counted as examples.
* Duplicates: an impression id seen before (pending or emitted within
  ``dedup_horizon_ms``) and a repeated (impression id, action) are ignored, counted.
* Feedback without ``impression_id`` is an interaction: positive -> a positive
  example plus ``interaction_negatives`` negatives sampled by popularity among items
  the user has not interacted with (weight 1, never downsampled); non-positive -> a
  negative example subject to downsampling.

Example ids are deterministic (``imp:<impression_id>``, ``int:<hash>``,
``neg:<hash>:<j>``), so replays and at-least-once recovery produce the same ids.
"""

from __future__ import annotations

import heapq
import itertools
import operator
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from events.model import Record
from state.hashing import stable_hash64
from state.pending import DECIDED, EMITTED, KEPT, ClosedIds, PendingColumns, PendingView
from state.popularity import PopularityCounter
from state.sampling import NegativeSampler
from state.settings import doc
from state.user_history import UserHistory

if TYPE_CHECKING:
    from events.model import Feedback, Impression


class JoinContext(Protocol):
    """What the joiner reads of its shard at an event's time (it never writes it)."""

    def example_features(self, user_id: str, item_id: str, ts_ms: int) -> dict[str, Any]:
        """Features of (user, item) known strictly before ``ts_ms`` (epoch ms)."""
        ...

    def consumed(self, user_id: str) -> Container[str]:
        """Items the user interacted with (sampled negatives avoid them)."""
        ...


class DeferringContext(JoinContext, Protocol):
    """A ``JoinContext`` that can also defer an impression's features."""

    def deferred_features(self, user_id: str, item_id: str, ts_ms: int) -> Any:
        """A token for what ``example_features`` would return now, computed by
        ``resolve_all`` (the joiner defers every impression: most negatives are dropped
        by the sampler and need features only if clicked, and the rest are computed
        together with the other pending impressions of their request). A tuple, never a
        dict or a list (computed features): the joiner tells them apart by type."""
        ...

    def resolve_all(self, deferred: list[Any], wire: bool = False) -> list[Any]:
        """The features of each token, in order (dicts at example precision,
        ``float32_features``, computed together); ``wire``: their wire value (a list,
        ``operators.example_codec``) instead where it can, for rows written in the wire
        form."""
        ...


class HistoryContext:
    """A ``JoinContext`` without features: consumed items from a ``UserHistory`` that the
    caller updates after each event (standalone joiners: tests, benches, synthetic data)."""

    def __init__(self, history: UserHistory | None = None) -> None:
        self.history = history if history is not None else UserHistory()

    def example_features(self, user_id: str, item_id: str, ts_ms: int) -> dict[str, Any]:
        return {}

    def consumed(self, user_id: str) -> Container[str]:
        return self.history.consumed(user_id)


@dataclass
class JoinConfig:
    """The online joiner: impressions + feedback -> labelled examples."""

    window_ms: dict[str, int] = doc(
        "Attribution window per action (ms): how long after an impression that action counts.",
        factory=lambda: {"click": 600_000, "like": 1_800_000, "purchase": 3_600_000},
    )
    default_window_ms: int = doc("Attribution window for actions not in window_ms (ms).", 600_000)
    wait_ms_override: int = doc(
        "How long an impression waits for positive feedback before it leaves as a negative "
        "(ms); 0 = the longest window of a positive action. Feedback arriving later, even "
        "within its action's own window, goes to late-labels (after_window).", 600_000)
    allowed_lateness_ms: int = doc("Watermark = max event time seen minus this (ms).", 30_000)
    idle_flush_s: float = doc(
        "Wall-clock fallback: when a shard saw no event for this long (s), its watermark "
        "advances by the idle wall time so windows of an idle live stream still close. Only "
        "for live streams: the shard's newest event time must have been within "
        "allowed_lateness_ms of the wall clock when its last event arrived (a replayed or "
        "backlogged stream that stalls, e.g. in a broker outage, keeps event time).",
        10.0,
    )
    positive: dict[str, float] = doc(
        "Actions that make an example positive, each with the minimum feedback value that "
        "counts (click 0 = any click; rating 4 = rating >= 4; dwell 30 = 30 s).",
        factory=lambda: {"click": 0.0, "like": 0.0, "purchase": 0.0, "share": 0.0, "rating": 4.0},
    )
    organic: dict[str, float] = doc(
        "Organic signals: actions (views, add-to-cart, plays, ...) that reveal taste without "
        "making an impression positive on their own terms, each with the weight of its "
        "positive example. They count as positive interactions: examples for the ranker, MF, "
        "co-visitation, popularity, profiles. Empty = organic actions are only history.",
        factory=lambda: {"view": 0.3, "add_to_cart": 0.6, "play": 0.6})
    max_pending: int = doc("Pending impressions per user shard; the oldest close first beyond it.", 50_000)
    max_orphans: int = doc("Feedback waiting for its impression, per user shard.", 20_000)
    dedup_horizon_ms: int = doc("How long closed impression ids are remembered for dedup (ms).", 86_400_000)
    interaction_negatives: int = doc("Negatives sampled per positive organic interaction.", 4)
    popularity_pool: int = doc("Items in each shard's popularity pool for sampled negatives.", 5_000)

    def window_for(self, action: str) -> int:
        """Attribution window of an action (ms)."""
        return self.window_ms.get(action, self.default_window_ms)

    def wait_ms(self) -> int:
        """How long an impression waits (ms): ``wait_ms_override``, or the longest window
        of a positive action when that is 0."""
        if self.wait_ms_override > 0:
            return self.wait_ms_override
        return max((self.window_for(a) for a in self.positive), default=self.default_window_ms)

    def is_positive(self, action: str, value: float) -> bool:
        """A positive action at or above its threshold, or a declared organic signal."""
        threshold = self.positive.get(action)
        if threshold is None:
            return action in self.organic
        return value >= threshold

    def weight_of(self, action: str) -> float:
        """Example weight of a positive organic interaction of ``action``."""
        return 1.0 if action in self.positive else self.organic.get(action, 1.0)


@dataclass(slots=True)
class Example:
    """A labelled training example, built here and nowhere else; leaves the joiner as its
    ``record()`` (the ``examples`` output, docs/architecture.md "Example record")."""

    example_id: str
    """``imp:<impression_id>``, ``int:<hash>`` or ``neg:<hash>:<j>``: deterministic."""
    ts: int
    """Event time of the impression or interaction (ms)."""
    user_id: str
    item_id: str
    label: int
    labels: dict[str, float]
    """Every action joined to the impression, with its value."""
    weight: float
    """1/r for a kept downsampled negative, the action's weight for organic signals."""
    features: dict[str, Any]
    """Point-in-time features taken at the impression (or interaction), floats at float32
    precision (``float32_features``: the trainer in the flow and the readers of the
    wire form see the same numbers)."""
    source: str
    """``impression``, ``interaction`` or ``sampled``."""
    position: int = -1
    request_id: str | None = None
    impression_id: str | None = None
    context: dict[str, Any] = field(default_factory=dict)

    def record(self) -> Record:
        """The output record (a dict, keys in this order; ``impression_record`` builds
        the same row for an impression's example without the object)."""
        return {"example_id": self.example_id, "ts": self.ts, "user_id": self.user_id,
                "item_id": self.item_id, "label": self.label, "labels": self.labels,
                "weight": self.weight, "position": self.position,
                "request_id": self.request_id, "impression_id": self.impression_id,
                "context": self.context, "features": self.features, "source": self.source}


def impression_record(imp: Impression, label: int, labels: dict[str, float], weight: float,
                      features: dict[str, Any]) -> Record:
    """``Example(f"imp:{impression_id}", ..., source="impression").record()`` of an
    impression's example, built as the dict directly (one per impression: the object
    cost as much as the row)."""
    return {"example_id": f"imp:{imp.impression_id}", "ts": imp.ts, "user_id": imp.user_id,
            "item_id": imp.item_id, "label": label, "labels": labels, "weight": weight,
            "position": imp.position, "request_id": imp.request_id,
            "impression_id": imp.impression_id, "context": imp.context, "features": features,
            "source": "impression"}


def _as_is(record: Record) -> Record:
    return record


def impression_records(imps: list[Impression], labels: list[dict[str, float]], label: int,
                       weight: float, features: list[Any]) -> list[Record]:
    """``impression_record`` of each impression (with its labels, copied, and features),
    all with ``label`` and ``weight``: the rows of windows that close together."""
    return [impression_record(imp, label, dict(lab) if lab else {}, weight, feats)
            for imp, lab, feats in zip(imps, labels, features, strict=True)]


@dataclass(frozen=True)
class RowForm:
    """How a joiner writes its examples: ``impression`` builds an impression's row from
    its parts (``impression_record`` by default), ``record`` turns any other example's
    record into its row (as it is by default). The flow passes the wire form
    (``operators.example_codec.WIRE_ROWS``) when no stage reads the full record (no
    in-flow trainer): each row is then built once, not built and packed."""

    impression: Callable[[Impression, int, dict[str, float], float, Any], Record] = (
        impression_record)
    record: Callable[[Record], Record] = _as_is
    impressions: Callable[[list[Impression], list[dict[str, float]], int, float, list[Any]],
                          list[Record]] = impression_records
    """The rows of many impressions with one label and weight (``impression_records``'
    shape): the windows that close together, built in one pass."""
    unwire: Callable[[Any], dict[str, Any]] | None = None
    """The features dict of a wire value (``wire`` forms): pending features computed in
    this form are turned back into dicts when the joiner is given a form without it
    (``Joiner.use_rows``: a resumed flow whose config now has an in-flow trainer)."""
    wire: bool = False
    """Deferred features are resolved straight to their wire value where they can
    (``DeferringContext.resolve_all(wire=True)``): ``impression`` takes a list then."""


RECORD_ROWS = RowForm()
"""Full example records (``Example.record()``), the default."""


@dataclass(slots=True)
class JoinCounters:
    """Monotonic counters of one shard's joiner."""

    impressions: int = 0
    feedback: int = 0
    positives: int = 0
    negatives_kept: int = 0
    negatives_dropped: int = 0
    sampled_negatives: int = 0
    late_labels: int = 0
    dup_impressions: int = 0
    dup_feedback: int = 0
    windows_closed: int = 0
    forced_closes: int = 0
    orphans_expired: int = 0
    orphans_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name (``dataclasses.asdict`` without its deep copy: every
        micro-batch's output carries them)."""
        return {name: getattr(self, name) for name in self.__slots__}


def float32_features(features: dict[str, Any]) -> dict[str, Any]:
    """``features`` with every non-integer float rounded to 8 significant digits (float32
    precision: relative change <= 5e-8, below what a model learns from; the wire form
    writes such numbers in at most 10-14 characters instead of 17-19). A new dict, same
    key order."""
    out = {}
    for name, value in features.items():
        if type(value) is float and not value.is_integer():
            value = float(f"{value:.8g}")
        out[name] = value
    return out


_LABEL_KEYS = ("0", "1")
"""``str(label)`` of the two labels (the metrics' keys)."""

_EXACT_SUM = float(2 ** 53)
"""Integer-valued float sums up to here are exact (``Joiner._count``)."""

_LATE_LABEL_FIELDS = ("ts", "user_id", "item_id", "action", "value", "impression_id")


def popularity_draws(rng: np.random.Generator, probs: np.ndarray, size: int) -> list[int]:
    """``rng.choice(len(probs), size, replace=True, p=probs).tolist()`` (the same draws
    and the same state of ``rng`` after: numpy's own steps for a ``p`` with replacement,
    cumulative sums searched with uniform draws) without its checks of ``p``, a third of
    its cost; ``probs`` must be a probability vector (``PopularityCounter.arrays``)."""
    cdf = probs.cumsum()
    cdf /= cdf[-1]
    return cdf.searchsorted(rng.random(size), side="right").tolist()  # type: ignore[no-any-return]


def column_of(column: list[Any], rows: list[int]) -> list[Any]:
    """``[column[row] for row in rows]``, gathered in C (``operator.itemgetter``)."""
    if len(rows) > 1:
        return list(operator.itemgetter(*rows)(column))
    return [column[rows[0]]] if rows else []


def _interaction_id(fb: Feedback) -> str:
    return format(stable_hash64(f"{fb.user_id}\x1f{fb.item_id}\x1f{fb.action}\x1f{fb.ts}"), "016x")


class Joiner:
    """Join state of one user shard. Feed events in arrival order; collect records.

    ``on_impression``/``on_feedback`` append outputs to ``self.examples`` and
    ``self.late_labels``; the caller drains them with ``drain()``. Times are event
    time in epoch ms. Pending impressions are held as columns (``state.pending``).
    """

    def __init__(self, config: JoinConfig, sampler: NegativeSampler,
                 context: JoinContext | None = None, rows: RowForm = RECORD_ROWS) -> None:
        self.config = config
        self.rows = rows
        """The form of the examples it writes (full records unless the flow asks)."""
        self.sampler = sampler
        self.context: JoinContext = context if context is not None else HistoryContext()
        self._defer: Callable[[str, str, int], Any] | None = getattr(
            self.context, "deferred_features", None)
        """The context's ``deferred_features`` when it has one (``DeferringContext``):
        used for every impression."""
        self._resolve_all: Callable[..., list[Any]] | None = getattr(
            self.context, "resolve_all", None)
        """The context's ``resolve_all``: deferred features computed together."""
        self.wait_ms = config.wait_ms()
        self._pending = PendingColumns()
        self._deadlines: list[int] = []
        """A heap of the distinct deadlines of pending impressions (ms)."""
        self._due: dict[int, list[str]] = {}
        """Impression ids by deadline (a request's impressions share one: one heap entry
        for all of them); a deadline's ids close in id order."""
        self.orphans: OrderedDict[str, list[Feedback]] = OrderedDict()
        self.closed_ids = ClosedIds()
        """Closed impression ids and interaction keys (dedup), forgotten after the horizon."""
        self.popularity = PopularityCounter(capacity=config.popularity_pool)
        self.max_ts_ms: int | None = None
        self.counters = JoinCounters()
        self.examples: list[Record] = []
        self.late_labels: list[Record] = []
        self.by_label: dict[str, list[float]] = {}
        """``[count, weight sum]`` of the examples since the last drain by label (``"0"``,
        ``"1"``), summed in emission order: the metrics read it instead of the rows."""

    def use_rows(self, rows: RowForm) -> None:
        """Write examples in the form ``rows`` from now on; pending features computed in
        a wire form this one does not write are turned back into dicts (exactly:
        ``RowForm.unwire``)."""
        old = self.rows
        if old.wire and old.unwire is not None and not rows.wire:
            features = self._pending.features
            for row in self._pending.rows.values():
                if type(features[row]) is list:
                    features[row] = old.unwire(features[row])
        self.rows = rows

    @property
    def pending(self) -> PendingView:
        """Pending impressions by id (read-only ``PendingEntry`` copies of their rows)."""
        return self._pending.view()

    def pending_count(self) -> int:
        """How many impressions wait."""
        return len(self._pending.rows)

    def __getstate__(self) -> dict[str, Any]:
        """Recovery state: deferred features computed first (their tokens read snapshot
        objects that are not recovery state), so the columns hold plain values."""
        self.resolve_deferred()
        state = self.__dict__.copy()
        state.pop("_defer", None)  # bound methods of the context: rebound on load
        state.pop("_resolve_all", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("by_label", {})  # state of older versions
        if not isinstance(self.closed_ids, ClosedIds):  # an OrderedDict before joiner5
            self.closed_ids = ClosedIds(self.closed_ids.items())
        self._defer = getattr(self.context, "deferred_features", None)
        self._resolve_all = getattr(self.context, "resolve_all", None)

    # -- time -------------------------------------------------------------------
    @property
    def watermark_ms(self) -> int | None:
        """Max event time seen minus the allowed lateness (ms); None before any event."""
        if self.max_ts_ms is None:
            return None
        return self.max_ts_ms - self.config.allowed_lateness_ms

    def observe(self, ts_ms: int) -> None:
        """Advance the shard's event clock with any event's ``ts`` (ms); windows (and
        orphans) the new watermark passes close at once, before the event is applied,
        so results never depend on where micro-batches begin and end."""
        if self.max_ts_ms is None or ts_ms > self.max_ts_ms:
            self.max_ts_ms = ts_ms
            self.advance()

    # -- inputs -----------------------------------------------------------------
    def on_impression(self, imp: Impression) -> None:
        """Start waiting for feedback on an impression (idempotent by impression_id)."""
        ts = imp.ts
        if self.max_ts_ms is None or ts > self.max_ts_ms:  # observe(ts), inline
            self.max_ts_ms = ts
            self.advance()
        iid = imp.impression_id
        pending = self._pending
        if iid in pending.rows or iid in self.closed_ids:
            self.counters.dup_impressions += 1
            return
        self.counters.impressions += 1
        if self._defer is not None:  # computed at a click, at the window's close or when
            # the snapshots move (all pending ones at once), exactly as they are now
            features = self._defer(imp.user_id, imp.item_id, ts)
        else:
            features = float32_features(
                self.context.example_features(imp.user_id, imp.item_id, ts))
        deadline = ts + self.wait_ms
        free = pending.free
        if free:  # pending.add(imp, deadline, features, 0), inline
            row = free.pop()
            pending.impression[row] = imp
            pending.deadline[row] = deadline
            pending.features[row] = features
            pending.flags[row] = 0
            pending.rows[iid] = row
        else:
            row = pending.add(imp, deadline, features, 0)
        due = self._due.get(deadline)
        if due is None:
            self._due[deadline] = [iid]
            heapq.heappush(self._deadlines, deadline)
        else:
            due.append(iid)
        if self.orphans:
            for fb in self.orphans.pop(iid, ()):
                self._apply(row, fb)
        if len(pending.rows) > self.config.max_pending:
            self._close_oldest(len(pending.rows) - self.config.max_pending)

    def on_impressions(self, run: list[Impression]) -> None:
        """``on_impression`` of each impression of ``run`` in order: one request's impressions
        (same user, ``ts`` and request; the context's ``group`` set to the request), taken
        as one run: one clock step, one ``deferred_run`` call for their features, one
        deadline entry. Anything unusual (duplicate ids, waiting orphans, a pending bound
        the run would pass, no deferring context) takes the one-by-one path. Raises before
        any change but the clock's (the caller may then apply the run one by one)."""
        ts = run[0].ts
        if self.max_ts_ms is None or ts > self.max_ts_ms:  # observe(ts), inline
            self.max_ts_ms = ts
            self.advance()
        pending = self._pending
        rows, closed = pending.rows, self.closed_ids
        ids = [imp.impression_id for imp in run]
        defer_run = getattr(self.context, "deferred_run", None)
        if (self.orphans or defer_run is None or len(rows) + len(run) > self.config.max_pending
                or len(set(ids)) != len(ids) or not rows.keys().isdisjoint(ids)
                or not closed.at.keys().isdisjoint(ids)):
            for imp in run:
                self.on_impression(imp)
            return
        items = [imp.item_id for imp in run]
        features_run = getattr(self.context, "features_run", None)
        marks: list[int] | None = None  # None: every one 0
        # Those whose example is sure to be written (kept negatives, or clicked) are computed
        # now, while what they read is in the CPU's caches (ten minutes later, at the close,
        # it no longer is): the same values (a token reads only what was taken); the others
        # stay deferred (needed only if clicked). Computed before any change.
        if self.sampler.rate >= 1.0 and features_run is not None:  # every one kept
            tokens = features_run(run[0].user_id, items, ts, self.rows.wire)
        else:
            tokens = defer_run(run[0].user_id, items, ts)
            if self._resolve_all is not None and self.sampler.rate >= 1.0:
                tokens = self._resolve_all(tokens, self.rows.wire)
            elif self._resolve_all is not None:  # decisions kept in the flags: not hashed again
                keeps = self.sampler.keep_impressions(ids)
                marks = [DECIDED | KEPT if keep else DECIDED for keep in keeps]
                if True in keeps:
                    kept = list(itertools.compress(range(len(tokens)), keeps))
                    for j, value in zip(kept, self._resolve_all([tokens[j] for j in kept],
                                                                self.rows.wire), strict=True):
                        tokens[j] = value
        self.counters.impressions += len(run)
        deadline = ts + self.wait_ms
        flags_of: Iterable[int] = itertools.repeat(0, len(run)) if marks is None else marks
        free = pending.free
        if not free:  # no row to reuse: the columns extended at once
            pending.extend(run, ids, deadline, tokens, flags_of)
        else:
            impression, deadlines, features, flags = (pending.impression, pending.deadline,
                                                      pending.features, pending.flags)
            for imp, iid, token, mark in zip(run, ids, tokens, flags_of, strict=True):
                if free:  # pending.add(imp, deadline, token, mark), inline
                    row = free.pop()
                    impression[row] = imp
                    deadlines[row] = deadline
                    features[row] = token
                    flags[row] = mark
                    rows[iid] = row
                else:
                    pending.add(imp, deadline, token, mark)
        due = self._due.get(deadline)
        if due is None:
            self._due[deadline] = ids
            heapq.heappush(self._deadlines, deadline)
        else:
            due.extend(ids)

    def on_feedback(self, fb: Feedback) -> None:
        """Attach feedback to its impression, or treat it as an organic interaction."""
        self.observe(fb.ts)
        self.counters.feedback += 1
        if fb.impression_id is None:
            self._interaction(fb)
        else:
            row = self._pending.rows.get(fb.impression_id)
            if row is not None:
                self._apply(row, fb)
            elif fb.impression_id in self.closed_ids:
                self._late(fb, "after_window")
            else:
                self._orphan(fb)
        if self.config.is_positive(fb.action, fb.value):
            self.popularity.add(fb.item_id, fb.ts)

    def resolve_deferred(self, stale: Callable[[Any], bool] | None = None) -> int:
        """Compute the deferred features of pending impressions now, all at once when the
        context can (``DeferringContext.resolve_all``); returns how many were computed.

        ``stale`` None: every one (their snapshot versions are being released). Else only
        those whose example is sure to be written (negatives the sampler keeps) and those
        for which ``stale(token)`` is true; the others (dropped unless clicked) stay
        deferred: most never need their features."""
        pending = self._pending
        features, impression = pending.features, pending.impression
        rows = [row for row in pending.rows.values()
                if type(features[row]) is tuple]  # tokens (dicts, wire lists: computed)
        if stale is not None and rows:
            keeps = self.sampler.keep_impressions(
                [impression[row].impression_id for row in rows])  # type: ignore[union-attr]
            rows = [row for row, keep in zip(rows, keeps, strict=True)
                    if keep or stale(features[row])]
        if rows and self._resolve_all is not None:
            for row, value in zip(rows, self._resolve_all([features[r] for r in rows]),
                                  strict=True):
                features[row] = value
        return len(rows)

    def advance(self) -> None:
        """Close every window whose deadline the watermark has passed; expire orphans;
        forget closed ids past the dedup horizon (or beyond the bound).

        Runs at every step of the clock (nearly every event), and usually finds nothing
        due: each part is called only when its own first entry is due (the same checks
        each makes first, without its call)."""
        if self.max_ts_ms is None:
            return
        config = self.config
        watermark = self.max_ts_ms - config.allowed_lateness_ms
        heap = self._deadlines
        if heap and heap[0] <= watermark:
            self._close_until(watermark)
        if self.orphans:
            self._expire_orphans(watermark)
        closed = self.closed_ids
        order, horizon = closed.order, watermark - config.dedup_horizon_ms
        limit = 4 * config.max_pending  # closed ids held at most
        if order and (len(closed.at) > limit or closed.at.get(order[0], horizon) <= horizon):
            closed.forget(horizon, limit)

    def advance_idle(self, idle_ms: int, now_ms: int) -> bool:
        """Wall-clock fallback: move the clock ``idle_ms`` forward and close windows,
        when the stream is live: the newest event time was within the allowed lateness
        of the wall clock ``now_ms - idle_ms`` at which the last event arrived (epoch
        ms). Returns whether it advanced.

        A replayed log (event time far behind the wall clock) or a backlog that stalls
        (broker outage, slow producer) is not idle in event time: closing its windows
        by wall time would turn feedback that is still coming into late labels.
        """
        if self.max_ts_ms is None or idle_ms <= 0:
            return False
        if self.max_ts_ms < now_ms - idle_ms - self.config.allowed_lateness_ms:
            return False
        self.max_ts_ms += idle_ms
        self.advance()
        return True

    def flush(self) -> None:
        """End of input: close every window and release every orphan."""
        self._close_until(None)
        for iid in list(self.orphans):
            for fb in self.orphans.pop(iid):
                self.counters.orphans_expired += 1
                self._late(fb, "no_impression")

    def drain(self) -> tuple[list[Record], list[Record]]:
        """Take the examples and late labels produced since the last drain (their counts by
        label: ``drain_counts``)."""
        out = (self.examples, self.late_labels)
        self.examples, self.late_labels = [], []
        return out

    def drain_counts(self) -> dict[str, list[float]]:
        """Take ``by_label`` of the examples produced since the last call."""
        out, self.by_label = self.by_label, {}
        return out

    def _count(self, label: int, weight: float, n: int = 1) -> None:
        """Count ``n`` examples of ``label`` with ``weight`` each in ``by_label`` (the
        weights added one at a time, as a pass over the rows adds them)."""
        acc = self.by_label.get(_LABEL_KEYS[label])
        if acc is None:
            acc = self.by_label[_LABEL_KEYS[label]] = [0, 0.0]
        acc[0] += n
        total = acc[1]
        if (type(weight) is float and weight.is_integer() and total.is_integer()
                and abs(total) + n * abs(weight) <= _EXACT_SUM):  # every partial sum exact
            total += n * weight
        else:
            for _ in itertools.repeat(None, n):
                total += weight
        acc[1] = total

    # -- internals --------------------------------------------------------------
    def _apply(self, row: int, fb: Feedback) -> None:
        pending = self._pending
        imp = pending.impression[row]
        assert imp is not None
        if fb.user_id != imp.user_id or fb.item_id != imp.item_id:
            self._late(fb, "mismatch")
            return
        labels = pending.labels[row]
        if fb.action in labels:
            self.counters.dup_feedback += 1
            return
        if fb.ts - imp.ts > self.config.window_for(fb.action):
            self._late(fb, "outside_window")
            return
        if not labels:  # the shared empty dict (or, after a resume, a copy that
            labels = pending.labels[row] = {}  # pickling may have shared among rows)
        labels[fb.action] = fb.value
        if pending.flags[row] & EMITTED:
            self._late(fb, "after_emission")
        elif self.config.is_positive(fb.action, fb.value):
            pending.flags[row] |= EMITTED
            self.counters.positives += 1
            features = pending.features[row]
            pending.features[row] = None  # not needed again: later feedback is late
            if type(features) is not dict and self._resolve_all is not None:
                features = self._resolve_all([features], self.rows.wire)[0]
            self._emit(imp, labels, features, 1, 1.0)

    def _orphan(self, fb: Feedback) -> None:
        waiting = self.orphans.get(fb.impression_id)
        if waiting is None:
            waiting = self.orphans[fb.impression_id] = []
        elif any(w.action == fb.action for w in waiting):
            self.counters.dup_feedback += 1
            return
        waiting.append(fb)
        while len(self.orphans) > self.config.max_orphans:
            _, dropped = self.orphans.popitem(last=False)
            for old in dropped:
                self.counters.orphans_dropped += 1
                self._late(old, "no_impression")

    def _expire_orphans(self, watermark: int) -> None:
        lateness = self.config.allowed_lateness_ms
        while self.orphans:
            iid, waiting = next(iter(self.orphans.items()))
            if waiting[0].ts + lateness > watermark:
                break
            del self.orphans[iid]
            for fb in waiting:
                self.counters.orphans_expired += 1
                self._late(fb, "no_impression")

    def _close_until(self, watermark: int | None) -> None:
        heap, due, rows = self._deadlines, self._due, self._pending.rows
        closing: list[int] = []
        ids: list[str] = []
        deadlines: list[int] = []
        pop, gone = rows.pop, itertools.repeat(None)
        while heap and (watermark is None or heap[0] <= watermark):
            deadline = heapq.heappop(heap)
            those = sorted(due.pop(deadline))
            got = list(map(pop, those, gone))  # pop in C
            if None in got:  # not pending (never the case: a deadline lists pending ids)
                those = [iid for iid, row in zip(those, got, strict=True) if row is not None]
                got = [row for row in got if row is not None]
            closing += got
            ids += those
            deadlines += itertools.repeat(deadline, len(those))
        if closing:
            self._close(closing, ids, deadlines)

    def _close_oldest(self, n: int) -> None:
        heap, due, rows = self._deadlines, self._due, self._pending.rows
        closing: list[int] = []
        closed: list[str] = []
        deadlines: list[int] = []
        while len(closing) < n and heap:
            deadline = heap[0]
            ids = due[deadline]
            ids.sort()
            i = 0
            while i < len(ids) and len(closing) < n:
                row = rows.pop(ids[i], None)
                if row is not None:
                    closing.append(row)
                    closed.append(ids[i])
                    deadlines.append(deadline)
                i += 1
            del ids[:i]
            if not ids:
                del due[heapq.heappop(heap)]
        self.counters.forced_closes += len(closing)
        self._close(closing, closed, deadlines)

    def _close(self, closing: list[int], ids: list[str], deadlines: list[int]) -> None:
        """Close these windows (rows already out of ``rows``, in deadline order; ``ids``
        and ``deadlines`` theirs, from the deadline lists: not read again from the rows):
        each not yet emitted leaves as a negative if the sampler keeps it. The deferred
        features of the kept ones are computed together (``DeferringContext.resolve_all``:
        one feature call per request instead of one per impression; the same values;
        straight to the wire value when the rows are wire rows) and their rows built in
        one pass (``RowForm.impressions``). The rows are then released."""
        pending = self._pending
        counters = self.counters
        self.closed_ids.add_many(ids, deadlines)
        marks = column_of(pending.flags, closing)
        if any([mark & EMITTED for mark in set(marks)]):  # some emitted: not negatives
            waiting = [j for j, mark in enumerate(marks) if not mark & EMITTED]
            rows = [closing[j] for j in waiting]
            ids = [ids[j] for j in waiting]
            marks = [marks[j] for j in waiting]
        else:
            rows = closing
        counters.windows_closed += len(closing)
        if self.sampler.rate < 1.0:
            keeps: list[Any] = [mark & KEPT for mark in marks]  # decided at the intake (0: dropped)
            if not all([mark & DECIDED for mark in set(marks)]):  # the others hashed now, once
                undecided = [j for j, mark in enumerate(marks) if not mark & DECIDED]
                for j, keep in zip(undecided, self.sampler.keep_impressions(
                        [ids[j] for j in undecided]), strict=True):
                    keeps[j] = keep
            counters.negatives_dropped += keeps.count(False)
            if False in keeps:
                rows = list(itertools.compress(rows, keeps))
        if rows:
            counters.negatives_kept += len(rows)
            features = column_of(pending.features, rows)
            if self._resolve_all is not None and tuple in set(map(type, features)):
                features = self._resolve_all(features, self.rows.wire)  # computed as they are
            weight = self.sampler.weight
            self.examples.extend(self.rows.impressions(
                column_of(pending.impression, rows), column_of(pending.labels, rows), 0,  # type: ignore[arg-type]
                weight, features))
            self._count(0, weight, len(rows))
        pending.release(closing)

    def _emit(self, imp: Impression, labels: dict[str, float], features: Any, label: int,
              weight: float) -> None:
        """An impression's example row; ``features`` a dict, or its wire value (a list)
        when the rows are wire rows."""
        self.examples.append(self.rows.impression(imp, label, dict(labels) if labels else {},
                                                  weight, features))
        self._count(label, weight)

    def _late(self, fb: Feedback, reason: str) -> None:
        self.counters.late_labels += 1
        record = {name: getattr(fb, name) for name in _LATE_LABEL_FIELDS}
        record["reason"] = reason
        if fb.impression_id is not None:
            record["example_id"] = f"imp:{fb.impression_id}"
        self.late_labels.append(record)

    def _interaction(self, fb: Feedback) -> None:
        """An organic interaction: its example (a positive, or a negative the sampler
        keeps) and a positive's sampled negatives, their features taken in one call
        (``_features_of``); a dropped negative takes none."""
        key = _interaction_id(fb)
        if key in self.closed_ids:
            self.counters.dup_feedback += 1
            return
        self.closed_ids.add(key, fb.ts)
        positive = self.config.is_positive(fb.action, fb.value)
        example_id = f"int:{key}"
        weight = 1.0
        if positive:
            self.counters.positives += 1
            weight = self.config.weight_of(fb.action)
        elif self.sampler.keep(example_id):
            self.counters.negatives_kept += 1
            weight = self.sampler.weight
        else:
            self.counters.negatives_dropped += 1
            return
        chosen = self._sample_negatives(fb, key) if positive else []
        features = self._features_of(fb, [fb.item_id, *chosen])
        self.examples.append(self.rows.record(Example(
            example_id, fb.ts, fb.user_id, fb.item_id, int(positive), {fb.action: fb.value},
            weight, features[0], "interaction", context=fb.context).record()))
        self._count(int(positive), weight)
        negative_weight = self.config.weight_of(fb.action)  # as much negative as positive evidence
        for j, (item, taken) in enumerate(zip(chosen, features[1:], strict=True)):
            self.counters.sampled_negatives += 1
            self.examples.append(self.rows.record(Example(
                f"neg:{key}:{j}", fb.ts, fb.user_id, item, 0, {}, negative_weight,
                taken, "sampled", context=fb.context).record()))
            self._count(0, negative_weight)

    def _features_of(self, fb: Feedback, items: list[str]) -> list[dict[str, Any]]:
        """``example_features`` of ``fb``'s user and each of ``items`` at ``fb.ts``, at
        example precision (``float32_features``): one call for all when the context can
        (``PointInTime.features_run``, as for a request's impressions: the user context,
        the co-visitation seeds' rows and the snapshots read once, the profile rounded
        once, each item's static features from the memo; the same dicts, bit for bit,
        as one call per item)."""
        run = getattr(self.context, "features_run", None)
        if run is not None:
            return run(fb.user_id, items, fb.ts)  # type: ignore[no-any-return]
        return [float32_features(self.context.example_features(fb.user_id, item, fb.ts))
                for item in items]

    def _sample_negatives(self, fb: Feedback, key: str) -> list[str]:
        """Up to ``interaction_negatives`` items drawn by popularity for a positive
        interaction: not its item, none the user interacted with, no repeats."""
        n = self.config.interaction_negatives
        ids, probs = self.popularity.arrays()
        if n <= 0 or not ids:
            return []
        consumed = self.context.consumed(fb.user_id)
        rng = np.random.default_rng(stable_hash64(key))
        chosen: list[str] = []
        for j in popularity_draws(rng, probs, min(len(ids), 4 * n)):
            item = ids[j]
            if item != fb.item_id and item not in consumed and item not in chosen:
                chosen.append(item)
                if len(chosen) == n:
                    break
        return chosen
