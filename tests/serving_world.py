"""Serving on the user shard, end to end against real components.

Every serving test (tests/test_serving_*.py) drives a real ``operators.user_shard.UserShard`` (built like
``flows.recsys.build`` builds it) with typed events, and reads real snapshots from a
real ``SnapshotStore`` in ``tmp_path``: item tables (``ItemTable.save``), an hnswlib
index (``IndexBuilder.publish``) and a serving ranker (``Trainer.sync``). Some tests
run the item side too (``ItemShard`` fed with the user shard's ``item-updates``).

``ServingConfig(poll_ms=0)`` everywhere: every micro-batch picks up new snapshots.
Each filter test first shows that the item *would* be recommended without the rule
(a control), so it fails if the rule is broken.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

from events.model import Event, Feedback, Item, Request
from flows.config import load_config
from models.category_bandit import CategoryExploreConfig
from models.mf import MFConfig
from operators.index_builder import IndexStage
from operators.item_shard import ItemsConfig, ItemShard, item_shard_key, route_updates
from operators.serving import Candidate, ServingConfig
from operators.snapshot_views import SnapshotViews
from operators.trainer import RankerConfig, Trainer
from operators.user_shard import UserShard
from state.covisitation import CoVisConfig, CoVisitation
from state.hashing import shard_of
from state.item_index import IndexBuilder, IndexConfig
from state.item_table import CatalogEntry, ItemTable
from state.join_state import JoinConfig
from state.sampling import NegativeSampler
from state.snapshot_store import Manifest, SnapshotStore

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000
DAY = 24 * HOUR
DIM = 8
N_ITEM_SHARDS = 2
ITEM_KEYS = [item_shard_key(i) for i in range(N_ITEM_SHARDS)]
SHARD = "u000"

ITEMS = [f"a{i:02d}" for i in range(40)]
CATEGORY = {item: f"c{i % 4}" for i, item in enumerate(ITEMS)}
TRENDING = ITEMS[20:30]  # a20 trends most
SEED = "a30"  # co-visitation seed: a30 -> a31 (strongest), a32, a33
COVIS = [(SEED, "a31", 5.0), (SEED, "a32", 3.0), (SEED, "a33", 1.0)]
FAVOURITE = "a05"  # the trained ranker's clear favourite
NEW_ITEM = "n01"  # first seen an hour before T0, never interacted, in no retrieval source

RECORD_KEYS = {"request_id", "user_id", "ts", "items", "model_version", "index_version",
               "latency_ms"}
ITEM_KEYS_OUT = {"item_id", "score", "source", "propensity"}


def item_shard_of(item_id: str) -> str:
    return item_shard_key(shard_of(item_id, N_ITEM_SHARDS))


# -------------------------------------------------------------------------------------
# Business-rule hooks (ServingConfig.hooks points at this module: f"{__name__}:name")
# -------------------------------------------------------------------------------------

HOOK_CALLS: dict[str, list[list[Candidate]]] = {}
BOOSTED = "a39"  # least popular, not trending: never in a cold user's top 10 on its own


def _seen(stage: str, cands: list[Candidate]) -> None:
    HOOK_CALLS.setdefault(stage, []).append(
        [Candidate(c.item_id, list(c.sources), dict(c.scores), c.score, c.category) for c in cands])


def drop_category_c1(request: Request, cands: list[Candidate]) -> list[Candidate]:
    _seen("after_retrieval", cands)
    return [c for c in cands if c.category != "c1"]


def boost_one_item(request: Request, cands: list[Candidate]) -> list[Candidate]:
    _seen("after_scoring", cands)
    for c in cands:
        if c.item_id == BOOSTED:
            c.score = 1e6
    return cands


def reverse_order(request: Request, cands: list[Candidate]) -> list[Candidate]:
    _seen("after_ordering", cands)
    return list(reversed(cands))


def hook(name: str) -> str:
    return f"{__name__}:{name}"


def clear_hook_calls() -> None:
    """Forget the hooks' calls (each hook test starts from none)."""
    HOOK_CALLS.clear()


# -------------------------------------------------------------------------------------
# The world: a snapshot store with item tables, an index and a ranker
# -------------------------------------------------------------------------------------


class World:
    """Nearline state published into a real snapshot store, plus user-shard factories."""

    def __init__(self, root: Path) -> None:
        self.store = SnapshotStore(root / "snapshots")
        self.catalog = {item: CatalogEntry(CATEGORY[item], True, T0 - 30 * DAY) for item in ITEMS}
        self.catalog[NEW_ITEM] = CatalogEntry("c1", True, T0 - HOUR)
        self.popular = {item: float(100 - i) for i, item in enumerate(ITEMS)}  # a00 most popular
        self.trending = {item: float(50 - j) for j, item in enumerate(TRENDING)}
        rng = np.random.default_rng(7)
        self.vectors = {item: rng.normal(size=DIM).astype(np.float32) for item in ITEMS}

    # -- publishing ---------------------------------------------------------------------
    def publish_tables(self, ts: int = T0 - 60_000,
                       features: dict[str, dict[str, float]] | None = None,
                       **catalog_changes: dict[str, Any]) -> dict[str, Manifest]:
        """One ItemTable per item shard, written with ``store.write(f"items-{shard}", ...)``.

        ``features``: item profile features per item (``ItemTable.features``).
        ``catalog_changes``: item -> CatalogEntry field overrides (e.g. available=False).
        """
        for item, change in catalog_changes.items():
            entry = self.catalog[item]
            self.catalog[item] = CatalogEntry(change.get("category", entry.category),
                                              change.get("available", entry.available),
                                              change.get("first_seen_ms", entry.first_seen_ms))
        manifests = {}
        for shard in ITEM_KEYS:
            mine = lambda item, shard=shard: item_shard_of(item) == shard  # noqa: E731
            covis = CoVisitation(CoVisConfig())
            covis.add([p for p in COVIS if mine(p[0])], ts)
            table = ItemTable(
                shard, ts, covis,
                popular={i: s for i, s in self.popular.items() if mine(i)},
                trending={i: s for i, s in self.trending.items() if mine(i)},
                catalog={i: e for i, e in self.catalog.items() if mine(i)},
                features={i: f for i, f in (features or {}).items() if mine(i)},
            )
            manifests[shard] = self.store.write(f"items-{shard}", "npz", table.save, ts)
        return manifests

    def publish_index(self, ts: int = T0 - 60_000) -> Manifest:
        builder = IndexBuilder(IndexConfig(dim=DIM, threads=1))
        builder.upsert(list(self.vectors), np.stack(list(self.vectors.values())))
        return builder.publish(self.store, ts)

    def publish_ranker(self, ts: int = T0 - 60_000, favourites: tuple[str, ...] = (FAVOURITE,)
                       ) -> Manifest:
        """A real LR serving copy (``Trainer.sync``) with a known order: the ``favourites``
        (always clicked) first, then the other items in catalog order (item j was shown
        and not clicked j + 1 times, so later items score lower)."""
        trainer = Trainer(RankerConfig(kind="lr", delay_to_labels=False, sync_interval_ms=10**12,
                                       sync_every_examples=10**9, metrics_every_examples=10**9),
                          1.0, self.store)
        shows = [(item, 1 + j) for j, item in enumerate(ITEMS) if item not in favourites]
        shows += [(item, 20) for item in favourites]
        examples = []
        for rep in range(max(n for _, n in shows)):
            for item, n in shows:
                if rep < n:
                    examples.append({
                        "example_id": f"imp:{rep}:{item}", "ts": ts - 100_000 + len(examples),
                        "user_id": f"t{rep % 7}", "item_id": item,
                        "label": int(item in favourites), "weight": 1.0, "position": 0,
                        "context": {}, "features": {}})
        trainer.process(examples)
        return trainer.sync()

    def publish_all(self) -> None:
        self.publish_tables()
        self.publish_index()
        self.publish_ranker()

    # -- the user shard ---------------------------------------------------------------
    def user_shard(self, **serving: Any) -> UserShard:
        """A UserShard wired like ``flows.recsys.user_shard_builder``."""
        serving.setdefault("poll_ms", 0)
        serving.setdefault("scorer", "ranker")  # these tests pin the ranker; the duel has its own
        serving.setdefault("repeat", "never")  # the consumed filter; test_repeat_policy the others
        # The scorer's order (category sampling re-orders once a user has impressions or
        # organic signals): tests/test_category_explore.py turns it on.
        serving.setdefault("category_explore", CategoryExploreConfig(enabled=False))
        config = ServingConfig(**serving)
        defaults = load_config(None)
        return UserShard(
            JoinConfig(), NegativeSampler(1.0, 0), features=defaults.features,
            mf=MFConfig(dim=DIM), covis=CoVisConfig(), serving=config,
            views=SnapshotViews(self.store, ITEM_KEYS, config.poll_ms),
            item_shard_of=item_shard_of)


def feed(shard: UserShard, events: list[Event]) -> dict[str, list[Any]]:
    return shard.process(SHARD, events, time.time_ns())


def ask(shard: UserShard, user: str, ts: int = T0, k: int = 10, exclude: list[str] | None = None,
        request_id: str | None = None, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """One request through ``UserShard.process``; its one recommendations record."""
    req = Request(ts, request_id or f"r:{user}:{ts}:{k}", user, k, context or {}, list(exclude or []))
    out = feed(shard, [req])
    [record] = out["recommendations"]
    return record


def ids(record: dict[str, Any]) -> list[str]:
    return [i["item_id"] for i in record["items"]]


def sources(record: dict[str, Any]) -> dict[str, str]:
    return {i["item_id"]: i["source"] for i in record["items"]}


def warm_up(shard: UserShard) -> None:
    """Serve one request for an unrelated user, so the shard has read the snapshots
    before the test's own events (the MF user half and impression features use them)."""
    ask(shard, "warm-up-user", ts=T0 - DAY, request_id="warm-up")


def click(user: str, item: str, ts: int) -> Feedback:
    return Feedback(ts, user, item, "click")


def assert_record_shape(record: dict[str, Any], request: Request) -> None:
    """docs/events.md, outputs: request_id, user_id, ts, items[{item_id, score, source}],
    model_version, index_version, latency_ms - exactly these keys."""
    assert set(record) == RECORD_KEYS
    assert record["request_id"] == request.request_id
    assert record["user_id"] == request.user_id
    assert record["ts"] == request.ts and isinstance(record["ts"], int)
    assert isinstance(record["items"], list)
    assert len(record["items"]) <= request.k
    for item in record["items"]:
        assert set(item) == ITEM_KEYS_OUT
        assert isinstance(item["item_id"], str) and item["item_id"]
        assert isinstance(item["score"], float) and np.isfinite(item["score"])
        assert isinstance(item["source"], str) and item["source"]
    assert len(set(ids(record))) == len(record["items"]), "duplicate items"
    for key in ("model_version", "index_version"):
        assert record[key] is None or (isinstance(record[key], int) and record[key] >= 1)
    assert isinstance(record["latency_ms"], float | int) and record["latency_ms"] >= 0
    assert json.loads(json.dumps(record)) == record  # plain JSON, no numpy scalars


# -------------------------------------------------------------------------------------
# Output record
# -------------------------------------------------------------------------------------


class ItemSide:
    """Real item shards and index stage fed with a user shard's ``item-updates``."""

    def __init__(self, store: SnapshotStore) -> None:
        config = ItemsConfig(refresh_interval_ms=10**12, mf={"dim": DIM})
        self.shards = {key: ItemShard(config, store) for key in ITEM_KEYS}
        self.index = IndexStage(IndexConfig(refresh_interval_ms=10**12), DIM, store)

    def apply(self, out: dict[str, list[Any]]) -> None:
        """Route updates as the flow does; publish every changed table and the index."""
        for key, updates in route_updates(out.get("item-updates", []), item_shard_of).items():
            shard = self.shards[key]
            for change in shard.process(key, updates).get("index", []):
                self.index.add(change)
            if shard.dirty:
                shard.publish()
        if self.index.pending:
            self.index.refresh()


def bootstrap_events(n_items: int = 30) -> list[Event]:
    """Catalog events and organic clicks: item b<i> is clicked by users p0..p<n_items-i-1>."""
    events: list[Event] = [Item(T0 - DAY, f"b{i:02d}", {"category": f"c{i % 3}"})
                           for i in range(n_items)]
    ts = T0 - DAY + 1_000
    for i in range(n_items):
        for u in range(n_items - i):
            ts += 10
            events.append(Feedback(ts, f"p{u}", f"b{i:02d}", "click"))
    return events


def bootstrap(shard: UserShard, side: ItemSide) -> None:
    side.apply(feed(shard, bootstrap_events()))


class TypeSpy(pickle.Pickler):
    """Pickles like Bytewax's recovery does and records the class of every object."""

    def __init__(self, file: Any) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.types: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        self.types.add(type(obj).__name__)
        return NotImplemented
