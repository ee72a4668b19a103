"""The user-shard stage: everything keyed by user shard runs here, in event order.

One Bytewax key per user shard (``u000``..), each holding a ``UserShard``: the
joiner, the user's history, profiles (IPS: ``user`` and ``user_x_<attr>`` features),
MF user vectors, the item catalog (broadcast ``item`` events) and the serving
operator, so all user-side state of a user lives on one worker and snapshots as one
object. Input items are micro-batches ``(shard key, events, ingest wall ns)``; each
produces one ``ShardOutput`` dict of record lists (``examples``, ``late-labels``,
``recommendations``, ``item-updates``, ``pool-pairs`` (to the central pool trainer),
``dead-letters``, ``counters``). An event whose
application raises becomes a ``processing_error`` dead letter and the batch goes on
(what it changed before failing stays).

Order of work for one event (so nothing sees its own future):

* request: answered with the state before any later event;
* impression: features taken (profiles at ``ts``, item data from the newest
  snapshots), then joined;
* feedback: joined (an interaction's features are taken before it is applied), then
  profiles, history, MF and co-visitation pairs are updated.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from bytewax.operators import StatefulLogic

from events.model import Event, Feedback, Impression, Item, Record, Request, processing_error
from models.mf import MFConfig, UserFactors
from operators.cold_start import backfill
from operators.example_codec import WIRE_ROWS
from operators.item_updates import (
    CatalogChange,
    CovisPairs,
    Interaction,
    ItemUpdate,
    MFStep,
    ProfileEvent,
)
from operators.placement import spread_key
from operators.point_in_time import CovisQuery, PointInTime
from operators.serving import Server, ServingConfig, repeat_blocked
from operators.snapshot_views import SnapshotViews
from state.bounded import lru_put, memo_put
from state.change_log import ChangeLogDict
from state.covisitation import CoVisConfig, CoVisitation
from state.hashing import stable_hash64
from state.item_table import category_of
from state.join_state import RECORD_ROWS, JoinConfig, Joiner
from state.profiles import ProfileStore, stores_for
from state.sampling import NegativeSampler
from state.user_history import UserHistory

ShardOutput = dict[str, list[Any]]


class UserShard:
    """All user-side state of one shard; pure Python, driven by ``UserShardLogic``."""

    item_updates = True
    """Make the ``Interaction`` and ``CatalogChange`` updates of feedback and ``item``
    events; False in a flow without an item side (``items.enabled`` false: nothing reads
    them). A class default, so shards resumed from older snapshots have it; the flow sets
    it from its config at every start."""

    _unmade = 0
    """Updates not made (``item_updates`` false) since the last drain: a batch that would
    have sent some sends the shard's counters as it did (``_drain``)."""

    def __init__(self, join: JoinConfig, sampler: NegativeSampler, *,
                 features: list[dict[str, Any]] | None = None,
                 mf: MFConfig | None = None, covis: CoVisConfig | None = None,
                 serving: ServingConfig | None = None, views: SnapshotViews | None = None,
                 item_shard_of: Callable[[str], str] | None = None,
                 max_users: int = 1_000_000, covis_any: bool = False,
                 max_items: int = 1_000_000, hot_profiles: int = 10_000,
                 wire_examples: bool = False) -> None:
        """``wire_examples``: write examples in their wire form (``pack_example``'s,
        built directly) instead of full records, when no stage of the flow reads the
        records (no in-flow trainer)."""
        self.shard = ""
        self.history = UserHistory(max_users=max_users)
        self.liked = UserHistory(max_users=max_users)
        """Each user's positives only (``history`` holds every interaction)."""
        self.finished = UserHistory(max_users=max_users)
        """Each user's items with a consuming action (``serving.consume_actions``)."""
        self.consume_actions = frozenset(serving.consume_actions if serving is not None else ())
        self.catalog: OrderedDict[str, dict[str, Any]] = ChangeLogDict()
        """Item attributes (+ ``available``), least recently updated or used first; its
        writes are logged (serving re-reads only the items written since)."""
        self.max_items = max_items
        self.user_attrs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.max_users = max_users
        specs = [f for f in (features or []) if f.get("entity") != "item"]
        self.profiles: dict[str, ProfileStore] = (
            stores_for(specs, max_entities=max_users, hot_capacity=hot_profiles)
            if specs else {})
        self.item_profiles = covis is not None and any(
            f.get("entity") == "item" for f in (features or []))
        """Send impressions and feedback to the item shards (item profiles live there)."""
        self.users = UserFactors(mf) if mf is not None else None
        self.pairs = CoVisitation(covis) if covis is not None else None
        self.pairs_any = covis_any and self.pairs is not None
        """Also emit "any interaction" co-visitation pairs (``pair_any``)."""
        serves = (serving is not None and serving.enabled and views is not None
                  and item_shard_of is not None)
        self.views = views if serves else None
        """The item side as of the batch's first event; polled once per batch."""
        self.context = PointInTime(
            history=self.history, liked=self.liked if self.pairs is not None else None,
            profiles=self.profiles, catalog=self.catalog, user_attrs=self.user_attrs,
            users=self.users, views=self.views, item_shard_of=item_shard_of,
            covis=CovisQuery(serving.recent_items, serving.covis_query_decay)
            if serving is not None else None, finished=self.finished)
        self.joiner = Joiner(join, sampler, self.context)
        self.write_wire(wire_examples)
        self.server = (Server(serving, self.context, max_users=max_users)
                       if serves and serving is not None else None)
        explore = getattr(self.server, "categories", None)
        if explore is not None and explore.bandit.config.ranker_feature:
            # the LR's ``category_posterior``: serving's and the examples' contexts read
            # the same posteriors (impressions are joined before they teach them)
            self.context.category_lifts = explore.bandit.lifts
        self.idle_flush_s = join.idle_flush_s
        self.requests = 0
        self.empty_answers = 0
        self.backfilled = 0
        self._item_updates: list[ItemUpdate] = []
        self._mf_pending: list[tuple[str, str, int, list[str]]] = []
        self._recs: list[Record] = []
        self._dead: list[Record] = []
        """Dead letters (``processing_error``) of events this shard failed to apply."""
        self._ingest_ns = 0

    def write_wire(self, wire: bool) -> None:
        """Write examples in their wire form (True) or as full records (False); the flow
        sets it from its config at every start, resumed state included (a resumed shard
        feeds whatever trainer the config has now)."""
        self.joiner.use_rows(WIRE_ROWS if wire else RECORD_ROWS)

    # -- the batch ----------------------------------------------------------------
    def process(self, shard: str, events: list[Event], ingest_ns: int | None = None) -> ShardOutput:
        """Apply a micro-batch of shard ``shard`` in order; return its outputs."""
        self.shard = shard
        self._ingest_ns = ingest_ns or time.time_ns()
        if self.views is not None and events:
            # Requests, impressions and MF all see the same snapshots, none newer than
            # the batch's first event (point in time).
            served = (self.views.table_map(), self.views.index.index)
            self.views.poll(min(e.ts for e in events))
            self.context.polled()
            if (self.views.table_map() is not served[0]
                    or self.views.index.index is not served[1]):
                # Deferred impression features read the versions being replaced: their
                # groups are detached from them (what they read captured, nothing
                # computed; PointInTime.release_frozen) and computed when their example
                # is written, at a click or at the window's close, as the others.
                self.context.release_frozen()
        if self.profiles or self.server is not None or self.item_profiles:
            for event in events:
                try:
                    self._apply(event)
                except Exception as err:  # one bad event must not stop the flow
                    self._dead.append(processing_error(f"user_shard {shard}", event, err))
        else:
            self._apply_runs(shard, events)
        self.joiner.advance()
        pending = self._mf_pending
        try:
            self._mf_steps()
        except Exception as err:
            self._dead.extend(processing_error(f"user_shard {shard} mf", {
                "user_id": user, "item_id": item, "ts": ts}, err) for user, item, ts, _ in pending)
        return self._drain()

    def _apply_runs(self, shard: str, events: list[Event]) -> None:
        """``_apply`` of each event in order, when an impression does nothing but join (no
        profiles, no serving, no item profiles): the impressions of one request in a row
        (same request, user and ``ts``) are joined as one run (``Joiner.on_impressions``)."""
        joiner, context = self.joiner, self.context
        i, n = 0, len(events)
        while i < n:
            event = events[i]
            j = i + 1
            # (type(e) is Impression: the class's "impression" type, without the generic
            # attribute lookup a class attribute of a slots instance takes per event)
            if type(event) is Impression and event.request_id is not None:
                rid, user, ts = event.request_id, event.user_id, event.ts
                while j < n:
                    nxt = events[j]
                    if (type(nxt) is not Impression or nxt.request_id != rid
                            or nxt.user_id != user or nxt.ts != ts):
                        break
                    j += 1
            if j - i > 1:
                run = events[i:j]
                context.group = rid
                try:
                    joiner.on_impressions(run)
                except Exception:  # nothing joined: one by one, the failing one dead-lettered
                    for imp in run:
                        self._apply_one(shard, imp)
            elif type(event) is Item:  # catalog updates in a row (a catalog load)
                while j < n and type(events[j]) is Item:
                    j += 1
                self._catalog_items(shard, events[i:j])
            else:
                self._apply_one(shard, event)
            i = j

    def _catalog_items(self, shard: str, items: list[Item]) -> None:
        """``_apply_one`` of each of a run of ``item`` events without its dispatch: the clock
        (``observe`` called only when it moves), then the catalog (``_item``). Every shard
        takes each ``item`` event: 8 shards apply a 1,000-item catalog as 8,000 events."""
        joiner, write = self.joiner, self._item
        for item in items:
            try:
                if joiner.max_ts_ms is None or item.ts > joiner.max_ts_ms:
                    joiner.observe(item.ts)
                write(item)
            except Exception as err:  # one bad event must not stop the flow
                self._dead.append(processing_error(f"user_shard {shard}", item, err))

    def _apply_one(self, shard: str, event: Event) -> None:
        try:
            self._apply(event)
        except Exception as err:  # one bad event must not stop the flow
            self._dead.append(processing_error(f"user_shard {shard}", event, err))

    def _apply(self, event: Event) -> None:
        """Apply one event (see the module docstring for the order of work)."""
        joiner = self.joiner
        context = self.context
        kind = event.type
        if kind == "impression":
            context.group = event.request_id  # its request's impressions share a context
            joiner.on_impression(event)
            if self.profiles:
                self._profile(event)
            if self.server is not None:
                self._category_event(event)
            if self.item_profiles:
                self._item_updates.append(ProfileEvent(event.item_id, event))
            return
        if kind != "item":
            context.forget(event.user_id)  # the user's state changes
        if kind == "feedback":
            context.group = event  # an interaction and its sampled negatives
            self._feedback(event)
        elif kind == "request":
            joiner.observe(event.ts)
            self._request(event)
            self._profile(event)
        elif kind == "item":
            joiner.observe(event.ts)
            self._item(event)
        else:
            joiner.observe(event.ts)
            self._remember_user(event.user_id, event.attrs)

    def _feedback(self, fb: Feedback) -> None:
        window = self.pairs.config.window if self.pairs is not None else 0
        recent = self.history.recent(fb.user_id, window + 1) if window else []
        self.joiner.on_feedback(fb)  # takes features first
        self.history.add(fb.user_id, fb.item_id, fb.ts)
        self._profile(fb)
        self._category_event(fb)
        if fb.action in self.consume_actions:
            self.finished.add(fb.user_id, fb.item_id, fb.ts)
        updates = self._item_updates
        if self.item_profiles:
            updates.append(ProfileEvent(fb.item_id, fb))
        positive = self.joiner.config.is_positive(fb.action, fb.value)
        if self.item_updates:
            updates.append(Interaction(fb.item_id, fb.ts, positive))
        else:
            self._unmade += 1
        if self.pairs_any and recent:
            self._pairs("any", recent, fb)
        if not positive:
            return
        if self.server is not None:  # organic positives and clicks teach the pool ranker
            self.server.pool_outcome(fb.user_id, fb.item_id, fb.ts)
        if self.server is not None and fb.impression_id is not None:
            self.server.click_outcome(fb.user_id, fb.item_id)  # judges interleaved lists
        if (self.server is not None and fb.impression_id is None
                and fb.action in self.joiner.config.positive):
            # The duel's outcomes are organic positive actions (a rating, a search click,
            # a purchase), not declared organic signals such as views: measured in the
            # closed loop (docs/evaluation.md), judging by the next view handed serving to
            # the blend, whose lists held fewer clicks.
            self.server.outcome(fb.user_id, fb.item_id)
        if self.users is not None:
            self._mf_pending.append((fb.user_id, fb.item_id, fb.ts, recent))
        if self.pairs is not None:
            self._pairs("liked", self.liked.recent(fb.user_id, window + 1), fb)
            self.liked.add(fb.user_id, fb.item_id, fb.ts)

    def _pairs(self, channel: str, recent: list[str], fb: Feedback) -> None:
        """Co-visitation pairs of ``fb``'s item with ``recent`` (newest first) as updates."""
        assert self.pairs is not None
        pairs = self.pairs.pairs_for([r for r in recent if r != fb.item_id], fb.item_id)
        if pairs:  # one message (its first pair's row is fb's item), split per item shard
            self._item_updates.append(CovisPairs(fb.item_id, pairs, fb.ts, channel))

    def _mf_steps(self) -> None:
        """The user half of this batch's MF steps (BPR or ISGD), with item vectors from the
        newest index snapshot (or their deterministic initial vectors); the item half
        goes to the item shards as ``MFStep`` updates."""
        pending, self._mf_pending = self._mf_pending, []
        if not pending or self.users is None:
            return
        users = [p[0] for p in pending]
        items = [p[1] for p in pending]
        ts = max(p[2] for p in pending)
        self.context.vectors_changed()
        for user in users:
            self.context.forget(user)  # its MF vector changes
        for user, _, t, recent in pending:
            if user not in self.users and recent:
                self.users.fold_in(user, self.context.item_vectors(recent), t)
        neg_ids = neg_vecs = None
        config = self.users.config
        if config.algorithm == "bpr":
            rng = np.random.default_rng(stable_hash64(f"{users[0]}|{items[0]}|{ts}"))
            pool = self.context.negative_pool()
            if not pool:
                return
            m = config.negatives
            neg_ids = [[pool[j] for j in rng.integers(0, len(pool), m).tolist()] for _ in items]
            # the positives' and the negatives' vectors in one read (row by row the same)
            vecs = self.context.item_vectors(items + [j for negs in neg_ids for j in negs])
            item_vecs, neg_vecs = vecs[:len(items)], vecs[len(items):].reshape(len(items), m, config.dim)
        else:
            item_vecs = self.context.item_vectors(items)
        ids, user_vecs, coefs = self.users.step_batch(users, items, item_vecs, ts, neg_ids, neg_vecs)
        updates = self._item_updates
        if coefs is None:
            updates += map(MFStep, ids, itertools.repeat(ts), user_vecs, itertools.repeat(None))
        else:  # (tolist: the float of each float32 coefficient, as float(coefs[n]))
            updates += map(MFStep, ids, itertools.repeat(ts), user_vecs, coefs.tolist())

    def _request(self, req: Request) -> None:
        self.requests += 1
        if self.server is None:
            return
        ctx = self.context.user(req.user_id, req.ts)
        record = self.server.recommend(req, ctx, self._ingest_ns)
        self.backfilled += backfill(record, req.k, self.catalog, self.joiner.popularity,
                                    repeat_blocked(self.server.config, ctx, req.ts),
                                    set(req.exclude))
        self.empty_answers += not record["items"]
        self._recs.append(record)

    def _item(self, item: Item) -> None:
        lru_put(self.catalog, item.item_id, catalog_attrs(item), self.max_items)
        if self.item_updates:
            self._item_updates.append(CatalogChange(item.item_id, item))
        else:
            self._unmade += 1

    def _remember_user(self, user_id: str, attrs: dict[str, Any]) -> None:
        lru_put(self.user_attrs, user_id, attrs, self.max_users)

    def _profile(self, event: Event) -> None:
        item_attrs = self._item_attrs
        for store in self.profiles.values():
            store.apply(event, item_attrs)

    def _category_event(self, event: Event) -> None:
        """Impressions and clicks teach serving's category posteriors (when enabled)."""
        explore = getattr(self.server, "categories", None)
        if explore is None:
            return
        attrs = self.catalog.get(event.item_id)
        category = category_of(attrs) if attrs is not None else None
        attrs = self.user_attrs.get(event.user_id)
        if event.type == "impression":
            explore.impression(event.user_id, event.item_id, category, event.position,
                               event.request_id, attrs, event.ts)
        else:
            explore.feedback(event.user_id, event.item_id, category, event.action,
                             event.impression_id, self.joiner.config.organic.get(event.action),
                             attrs)

    def _item_attrs(self, item_id: str) -> dict[str, Any] | None:
        """The item's attributes for the profiles of an interaction (marks it used)."""
        attrs = self.catalog.get(item_id)
        if attrs is not None:
            self.catalog.move_to_end(item_id)
        return attrs

    # -- lifecycle --------------------------------------------------------------------
    def idle(self, idle_s: float, now_ms: int | None = None) -> ShardOutput:
        """Wall-clock fallback for idle live streams: advance by ``idle_s`` seconds
        (only when event time tracks the wall clock ``now_ms``, epoch ms; see
        ``Joiner.advance_idle``)."""
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        self.joiner.advance_idle(int(idle_s * 1000), now)
        return self._drain()

    def flush(self) -> ShardOutput:
        """End of input: close every pending window."""
        self.joiner.flush()
        return self._drain()

    def counters(self) -> dict[str, int]:
        """This shard's joiner counters plus sizes of its pending state."""
        out = self.joiner.counters.as_dict()
        out["pending"] = self.joiner.pending_count()
        out["orphans"] = len(self.joiner.orphans)
        out["requests"] = self.requests
        out["empty_answers"] = self.empty_answers
        out["backfilled"] = self.backfilled
        if self.server is not None:
            out.update(self.server.counters())
        return out

    def has_pending(self) -> bool:
        return bool(self.joiner.pending_count() or self.joiner.orphans)

    def _drain(self) -> ShardOutput:
        examples, late = self.joiner.drain()
        counts = self.joiner.drain_counts()
        out: ShardOutput = {}
        if examples:
            out["examples"] = examples
            out["example-counts"] = counts  # type: ignore[assignment]
        if late:
            out["late-labels"] = late
        if self._recs:
            out["recommendations"], self._recs = self._recs, []
            costs = getattr(self.server, "costs", None)
            if costs:
                out["serving-cost"], self.server.costs = costs, []  # type: ignore[union-attr]
        pool = self.server.pool if self.server is not None else None
        if pool is not None and getattr(pool, "pairs", None):  # central training: to the pool trainer
            out["pool-pairs"] = pool.take_pairs()
        if self._item_updates:
            out["item-updates"], self._item_updates = self._item_updates, []
            out["batch"] = self._ingest_ns  # the source micro-batch (item shards publish per batch)
        if self._dead:
            out["dead-letters"], self._dead = self._dead, []
        if out or self._unmade:
            self._unmade = 0
            out["counters"] = [{"shard": self.shard, "counters": self.counters(),
                                "table": self.table_counters()}]
        return out

    def table_counters(self) -> dict[str, int]:
        """Counters of the MF user table (admissions, evictions, rows; for metrics)."""
        if self.users is None:
            return {}
        stats = self.users.table.stats()
        return {k: int(stats[k]) for k in ("admitted", "rejected", "expired", "evicted", "rows")}


class UserShardLogic(StatefulLogic[tuple[str, list[Event], int], ShardOutput, UserShard]):
    """Bytewax glue: batches in, outputs out, wall-clock idle fallback, flush at EOF."""

    def __init__(self, shard: UserShard) -> None:
        self.shard = shard
        self._last_input = time.monotonic()

    def on_item(self, value: tuple[str, list[Event], int]) -> tuple[list[ShardOutput], bool]:
        self._last_input = time.monotonic()
        out = self.shard.process(*value)
        return ([out] if out else []), StatefulLogic.RETAIN

    def on_notify(self) -> tuple[list[ShardOutput], bool]:
        idle = time.monotonic() - self._last_input
        if idle < self.shard.idle_flush_s:
            return [], StatefulLogic.RETAIN
        self._last_input = time.monotonic()
        out = self.shard.idle(idle)
        return ([out] if out else []), StatefulLogic.RETAIN

    def on_eof(self) -> tuple[list[ShardOutput], bool]:
        out = self.shard.flush()
        return ([out] if out else []), StatefulLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if not self.shard.has_pending():
            return None
        return datetime.now(UTC) + timedelta(seconds=self.shard.idle_flush_s)

    def snapshot(self) -> UserShard:
        return self.shard


_CATALOG_ATTRS: dict[int, tuple[Item, dict[str, Any]]] = {}
"""``catalog_attrs``' dicts by the ``item`` event's identity (the event held with it, so
its id is not reused while it is here); at most ``MAX_CATALOG_ATTRS``, cleared when full;
not part of any recovery state."""

MAX_CATALOG_ATTRS = 4_096


def catalog_attrs(item: Item) -> dict[str, Any]:
    """An ``item`` event's catalog entry: its attributes and ``available`` (a new dict,
    never modified once in a catalog). The user shards of a process receive each ``item``
    event as one object and share its entry: one dict per event instead of one per shard,
    and the shards' static-feature memos find another shard's results for it by identity
    (``operators.point_in_time``, ``_static_part``)."""
    found = _CATALOG_ATTRS.get(id(item))
    if found is not None and found[0] is item:
        return found[1]
    attrs = dict(item.attrs, available=item.available)
    memo_put(_CATALOG_ATTRS, id(item), (item, attrs), MAX_CATALOG_ATTRS)
    return attrs


def route_events(events: list[Event], shards: int, shard_of: Callable[[str], int],
                 ingest_ns: int, only: int | None = None
                 ) -> list[tuple[str, tuple[str, list[Event], int]]]:
    """Split a micro-batch into per-user-shard batches, order kept within each shard.

    ``item`` events carry no user: they are broadcast to every shard (catalog). A sharded
    replay partition's batch (``only``: its shard) is that shard's whole: its user events
    are its shard's (``operators.replay_shards``: a line goes to its user's partition, a
    shared line's user event is kept only there) and every partition has the ``item``
    events.
    """
    if only is not None:  # a sharded replay partition's batch: all its events are shard only's
        key = shard_key(only)
        return [(key, (key, events, ingest_ns))] if events else []
    buckets: dict[int, list[Event]] = {}
    everyone = range(shards)
    for event in events:
        if isinstance(event, Item):
            for s in everyone:
                buckets.setdefault(s, []).append(event)
        else:
            buckets.setdefault(shard_of(event.user_id), []).append(event)
    return [(shard_key(s), (shard_key(s), batch, ingest_ns)) for s, batch in buckets.items()]


def shard_key(index: int) -> str:
    """The Bytewax key of user shard ``index`` (``u<index>_<k>``: placed round robin over
    the workers, ``operators.placement``)."""
    return spread_key("u", index)
