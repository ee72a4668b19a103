"""The user-shard stage: everything keyed by user shard runs here, in event order.

One Bytewax key per user shard (``u000``..), each holding a ``UserShard``: the
joiner, the user's history, profiles (IPS: ``user`` and ``user_x_<attr>`` features),
MF user vectors, the item catalog (broadcast ``item`` events) and the serving
operator, so all user-side state of a user lives on one worker and snapshots as one
object. Input items are micro-batches ``(shard key, events, ingest wall ns)``; each
produces one ``ShardOutput`` dict of record lists (``examples``, ``late-labels``,
``recommendations``, ``item-updates``, ``counters``).

Order of work for one event (so nothing sees its own future):

* request: answered with the state before any later event;
* impression: features taken (profiles at ``ts``, item data from the newest
  snapshots), then joined;
* feedback: joined (an interaction's features are taken before it is applied), then
  profiles, history, MF and co-visitation pairs are updated.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from bytewax.operators import StatefulLogic

from models.mf import MFConfig, UserFactors
from models.sampling import NegativeSampler
from operators.events import Event, Feedback, Item, Request
from operators.serving import Server, ServingConfig, SnapshotViews, UserContext
from state.covis_view import SparseScores
from state.covisitation import CoVisConfig, CoVisitation
from state.embedding_table import keys_of
from state.hashing import stable_hash64
from state.join_state import JoinConfig, Joiner
from state.profiles import ProfileStore, stores_for
from state.user_history import UserHistory, lru_put

Record = dict[str, Any]
ShardOutput = dict[str, list[Any]]


class UserShard:
    """All user-side state of one shard; pure Python, driven by ``UserShardLogic``."""

    def __init__(self, join: JoinConfig, sampler: NegativeSampler, *,
                 features: list[dict[str, Any]] | None = None,
                 mf: MFConfig | None = None, covis: CoVisConfig | None = None,
                 serving: ServingConfig | None = None, views: SnapshotViews | None = None,
                 item_shard_of: Callable[[str], str] | None = None,
                 max_users: int = 1_000_000, covis_any: bool = False,
                 max_items: int = 1_000_000, hot_profiles: int = 10_000) -> None:
        self.shard = ""
        self.history = UserHistory(max_users=max_users)
        self.liked = UserHistory(max_users=max_users)
        """Each user's positives only (``history`` holds every interaction)."""
        self.joiner = Joiner(join, sampler, self.history, self.example_features)
        self.catalog: OrderedDict[str, dict[str, Any]] = OrderedDict()
        """Item attributes (+ ``available``), least recently updated or used first."""
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
        self.server = (Server(serving, views, item_shard_of)
                       if serving is not None and serving.enabled and views is not None
                       and item_shard_of is not None else None)
        if self.server is not None:
            self.server.features = self.item_features
            self.server.unavailable = self._unavailable
            duel = self.server.duel  # remembers each requesting user's last two top-k lists
            duel.max_users = min(duel.max_users, max_users)
        self.idle_flush_s = join.idle_flush_s
        self.requests = 0
        self._item_updates: list[tuple[Any, ...]] = []
        self._mf_pending: list[tuple[str, str, int, list[str]]] = []
        self._recs: list[Record] = []
        self._ingest_ns = 0

    # -- the batch ----------------------------------------------------------------
    def process(self, shard: str, events: list[Event], ingest_ns: int | None = None) -> ShardOutput:
        """Apply a micro-batch of shard ``shard`` in order; return its outputs."""
        self.shard = shard
        self._ingest_ns = ingest_ns or time.time_ns()
        if self.server is not None and events:
            # Impressions and MF see the same snapshots as requests, none newer than the
            # batch's first event (point in time).
            self.server.views.poll(min(e.ts for e in events))
        joiner = self.joiner
        for event in events:
            kind = event.type
            if kind == "impression":
                joiner.on_impression(event)
                self._profile(event)
                if self.item_profiles:
                    self._item_updates.append(("ev", event))
            elif kind == "feedback":
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
        joiner.advance()
        self._mf_steps()
        return self._drain()

    def _feedback(self, fb: Feedback) -> None:
        window = self.pairs.config.window if self.pairs is not None else 0
        recent = self.history.recent(fb.user_id, window + 1) if window else []
        self.joiner.on_feedback(fb)  # adds fb to the history after taking features
        self._profile(fb)
        updates = self._item_updates
        if self.item_profiles:
            updates.append(("ev", fb))
        positive = self.joiner.config.is_positive(fb.action, fb.value)
        updates.append(("fb", fb.item_id, fb.ts, positive))
        if self.pairs_any and recent:
            self._pairs("pair_any", recent, fb)
        if not positive:
            return
        if self.server is not None and fb.impression_id is None:
            self.server.duel.outcome(fb.user_id, fb.item_id)
        if self.users is not None:
            self._mf_pending.append((fb.user_id, fb.item_id, fb.ts, recent))
        if self.pairs is not None:
            self._pairs("pair", self.liked.recent(fb.user_id, window + 1), fb)
            self.liked.add(fb.user_id, fb.item_id, fb.ts)

    def _pairs(self, kind: str, recent: list[str], fb: Feedback) -> None:
        """Co-visitation pairs of ``fb``'s item with ``recent`` (newest first) as updates."""
        assert self.pairs is not None
        ts = fb.ts
        self._item_updates.extend((kind, a, b, w, ts) for a, b, w in self.pairs.pairs_for(
            [r for r in recent if r != fb.item_id], fb.item_id))

    def _mf_steps(self) -> None:
        """The user half of this batch's MF steps (BPR or ISGD), with item vectors from the
        newest index snapshot (or their deterministic initial vectors); the item half
        goes to the item shards as ``("mf", item, ts, user_vec, coef)`` updates."""
        pending, self._mf_pending = self._mf_pending, []
        if not pending or self.users is None:
            return
        users = [p[0] for p in pending]
        items = [p[1] for p in pending]
        ts = max(p[2] for p in pending)
        for user, _, t, recent in pending:
            if user not in self.users and recent:
                self.users.fold_in(user, self._item_vectors(recent), t)
        neg_ids = neg_vecs = None
        config = self.users.config
        if config.algorithm == "bpr":
            rng = np.random.default_rng(stable_hash64(f"{users[0]}|{items[0]}|{ts}"))
            pool = self._negative_pool()
            if not pool:
                return
            m = config.negatives
            neg_ids = [[pool[j] for j in rng.integers(0, len(pool), m).tolist()] for _ in items]
            flat = [j for negs in neg_ids for j in negs]
            neg_vecs = self._item_vectors(flat).reshape(len(items), m, config.dim)
        ids, user_vecs, coefs = self.users.step_batch(users, items, self._item_vectors(items), ts,
                                                      neg_ids, neg_vecs)
        for n, item in enumerate(ids):
            self._item_updates.append(("mf", item, ts, user_vecs[n],
                                       None if coefs is None else float(coefs[n])))

    def _negative_pool(self) -> list[str]:
        """Items to sample BPR negatives from: the newest index snapshot, else the catalog."""
        index = self.server.views.index if self.server is not None else None
        if index is not None and index.index is not None:
            return index.index.item_ids()
        return [i for i, attrs in self.catalog.items() if attrs.get("available", True)]

    def _item_vectors(self, items: list[str]) -> np.ndarray:
        vecs = self._initial_item_vectors(items)
        index = self.server.views.index if self.server is not None else None
        if index is not None and index.index is not None:
            found_vecs, found = index.vectors(items)
            vecs[found] = found_vecs[found]
        return vecs

    def _initial_item_vectors(self, items: list[str]) -> np.ndarray:
        """Items' deterministic initial MF vectors (user and item tables share init params)."""
        return self.users.table.initial_vectors(keys_of(items))

    def _request(self, req: Request) -> None:
        self.requests += 1
        if self.server is None:
            return
        self._recs.append(self.server.recommend(req, self.context(req.user_id, req.ts),
                                                self._ingest_ns))

    def _item(self, item: Item) -> None:
        lru_put(self.catalog, item.item_id, dict(item.attrs, available=item.available),
                self.max_items)
        self._item_updates.append(("item", item))

    def _remember_user(self, user_id: str, attrs: dict[str, Any]) -> None:
        lru_put(self.user_attrs, user_id, attrs, self.max_users)

    def _profile(self, event: Event) -> None:
        for store in self.profiles.values():
            store.apply(event, self._item_attrs)

    def _unavailable(self, item_id: str) -> bool:
        attrs = self.catalog.get(item_id)
        return attrs is not None and attrs.get("available", True) is False

    def _item_attrs(self, item_id: str) -> dict[str, Any] | None:
        """The item's attributes for the profiles of an interaction (marks it used)."""
        attrs = self.catalog.get(item_id)
        if attrs is not None:
            self.catalog.move_to_end(item_id)
        return attrs

    # -- features -------------------------------------------------------------------
    def context(self, user_id: str, ts_ms: int | None) -> UserContext:
        """The user's state for features: profile as of ``ts_ms`` (events before it)."""
        profile: dict[str, Any] = {}
        store = self.profiles.get("user")
        if store is not None:
            for name, value in store.query(user_id, _query_time(store, ts_ms)).items():
                profile[name] = _feature_value(name, value, ts_ms)
        for key, value in self.user_attrs.get(user_id, {}).items():
            profile[f"u:{key}"] = value
        vector = None
        if self.users is not None:
            vector = self.users.vector(user_id)
        recent = self.history.recent(user_id, 50)
        if vector is None and self.users is not None and recent:
            vector = self._item_vectors(recent[:20]).mean(axis=0)
        liked = self.liked.recent(user_id, 50) if self.pairs is not None else []
        return UserContext(user_id, recent, self.history.consumed(user_id), vector, profile, liked)

    def example_features(self, user_id: str, item_id: str, ts_ms: int) -> dict[str, Any]:
        """The joiner's hook: features known strictly before ``ts_ms`` (point in time)."""
        ctx = self.context(user_id, ts_ms)
        return {**ctx.profile, **self.item_features(ctx, [item_id], ts_ms)[0]}

    def item_features(self, ctx: UserContext, item_ids: list[str], ts_ms: int | None,
                      covis: dict[str, SparseScores] | None = None) -> list[dict[str, Any]]:
        """Per-item features (item attributes, user x item-attribute profiles, snapshot
        features), for each item; the same at impression time and at serving time."""
        extras = (Server.item_extras(self.server, ctx, item_ids, ts_ms or 0, covis)
                  if self.server is not None else [{} for _ in item_ids])
        crosses = [(kind[7:], store) for kind, store in self.profiles.items()
                   if kind.startswith("user_x_")]
        cross_cache: dict[tuple[str, str], dict[str, Any]] = {}
        for item, extra in zip(item_ids, extras, strict=True):
            attrs = self.catalog.get(item)
            if not attrs:
                continue
            for key, value in attrs.items():
                if key != "available" and not isinstance(value, dict):
                    extra[f"i:{key}"] = value
            for attr, store in crosses:
                value = attrs.get(attr)
                if isinstance(value, str):
                    feats = cross_cache.get((attr, value))
                    if feats is None:
                        at = _query_time(store, ts_ms)
                        feats = cross_cache[(attr, value)] = {
                            name: _feature_value(name, v, ts_ms)
                            for name, v in store.query((ctx.user_id, value), at).items()}
                    extra.update(feats)
        return extras

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
        out = asdict(self.joiner.counters)
        out["pending"] = len(self.joiner.pending)
        out["orphans"] = len(self.joiner.orphans)
        out["requests"] = self.requests
        if self.server is not None:
            duel = self.server.duel
            out["served_by_ranker"] = self.server.served_by["ranker"]
            out["served_by_retrieval"] = self.server.served_by["retrieval"]
            out["duel_outcomes"] = duel.outcomes
            out["duel_hits_ranker"] = duel.hits_ranker
            out["duel_hits_retrieval"] = duel.hits_retrieval
        return out

    def has_pending(self) -> bool:
        return bool(self.joiner.pending or self.joiner.orphans)

    def _drain(self) -> ShardOutput:
        examples, late = self.joiner.drain()
        out: ShardOutput = {}
        if examples:
            out["examples"] = examples
        if late:
            out["late-labels"] = late
        if self._recs:
            out["recommendations"], self._recs = self._recs, []
            costs = getattr(self.server, "costs", None)
            if costs:
                out["serving-cost"], self.server.costs = costs, []  # type: ignore[union-attr]
        if self._item_updates:
            out["item-updates"], self._item_updates = self._item_updates, []
        if out:
            out["counters"] = [{"shard": self.shard, "counters": self.counters(),
                                "table": self.table_counters()}]
        return out

    def table_counters(self) -> dict[str, int]:
        """Counters of the MF user table (admissions, evictions, rows; for metrics)."""
        if self.users is None:
            return {}
        stats = self.users.table.stats()
        return {k: int(stats[k]) for k in ("admitted", "rejected", "expired", "evicted", "rows")}


def _query_time(store: ProfileStore, ts_ms: int | None) -> int | None:
    """Query the current profile (fast path) unless events after ``ts_ms`` were applied.

    In order, the store's clock is at most ``ts_ms`` when an event is processed, so the
    current profile holds only earlier events (and same-millisecond ones); windows then
    end at the store clock instead of exactly at ``ts_ms``. After an out-of-order
    arrival the exact past query runs instead (events strictly before ``ts_ms``).
    """
    if ts_ms is None or store.now is None or store.now <= ts_ms:
        return None
    return ts_ms


def _feature_value(name: str, value: Any, ts_ms: int | None) -> Any:
    """Profile outputs as model features: timestamps become ages in seconds."""
    if name.endswith("_ts.all") and isinstance(value, int | float) and ts_ms is not None:
        return (ts_ms - value) / 1000.0
    return value


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


def route_events(events: list[Event], shards: int, shard_of: Callable[[str], int],
                 ingest_ns: int) -> list[tuple[str, tuple[str, list[Event], int]]]:
    """Split a micro-batch into per-user-shard batches, order kept within each shard.

    ``item`` events carry no user: they are broadcast to every shard (catalog).
    """
    buckets: dict[int, list[Event]] = {}
    for event in events:
        if isinstance(event, Item):
            for s in range(shards):
                buckets.setdefault(s, []).append(event)
        else:
            buckets.setdefault(shard_of(event.user_id), []).append(event)
    return [(shard_key(s), (shard_key(s), batch, ingest_ns)) for s, batch in buckets.items()]


def shard_key(index: int) -> str:
    """The Bytewax key of user shard ``index``."""
    return f"u{index:03d}"
