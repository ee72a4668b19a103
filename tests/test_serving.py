"""Serving on the user shard, end to end against real components.

Every test drives a real ``operators.user_shard.UserShard`` (built like
``flows.recsys.build`` builds it) with typed events, and reads real snapshots from a
real ``SnapshotStore`` in ``tmp_path``: item tables (``ItemTable.save``), an hnswlib
index (``IndexBuilder.publish``) and a serving ranker (``Trainer.sync``). Some tests
run the item side too (``ItemShard`` fed with the user shard's ``item-updates``).

``ServingConfig(poll_ms=0)`` everywhere: every micro-batch picks up new snapshots.
Each filter test first shows that the item *would* be recommended without the rule
(a control), so it fails if the rule is broken.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from events.model import Event, EventParser, Feedback, Impression, Item, Request
from flows.config import load_config
from models.mf import MFConfig
from models.ranker_io import load_ranker_file, save_ranker
from operators.index_builder import IndexStage
from operators.item_shard import ItemsConfig, ItemShard, item_shard_key, route_updates
from operators.serving import Candidate, ServingConfig, load_hook
from operators.snapshot_views import SnapshotViews
from operators.trainer import RankerConfig, Trainer
from operators.user_shard import UserShard
from state.covisitation import CoVisConfig, CoVisitation
from state.hashing import shard_of
from state.item_index import IndexBuilder, IndexConfig
from state.item_table import CatalogEntry, ItemTable
from state.join_state import JoinConfig
from state.sampling import NegativeSampler
from state.snapshot_store import Manifest, SnapshotStore, sha256_file

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
ITEM_KEYS_OUT = {"item_id", "score", "source"}


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


@pytest.fixture(autouse=True)
def _clear_hook_calls() -> None:
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
    def publish_tables(self, ts: int = T0 - 60_000, **catalog_changes: dict[str, Any]
                       ) -> dict[str, Manifest]:
        """One ItemTable per item shard, written with ``store.write(f"items-{shard}", ...)``.

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
        config = ServingConfig(**serving)
        defaults = load_config(None)
        return UserShard(
            JoinConfig(), NegativeSampler(1.0, 0), features=defaults.features,
            mf=MFConfig(dim=DIM), covis=CoVisConfig(), serving=config,
            views=SnapshotViews(self.store, ITEM_KEYS, config.poll_ms),
            item_shard_of=item_shard_of)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


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
    """DESIGN section 1: request_id, user_id, ts, items[{item_id, score, source}],
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


def test_record_shape_matches_design(world: World) -> None:
    world.publish_all()
    shard = world.user_shard()
    feed(shard, [click("u1", SEED, T0 - 5_000)])
    raw = {"type": "request", "ts": T0, "request_id": "req-1", "user_id": "u1", "k": 7,
           "context": {"device": "ios"}, "exclude": ["a00"]}
    [request], dead, *_ = EventParser().parse_batch([raw])
    assert not dead
    out = feed(shard, [request])
    [record] = out["recommendations"]
    assert_record_shape(record, request)
    assert len(record["items"]) == 7
    assert record["model_version"] == 1 and record["index_version"] == 1
    assert all(0.0 <= i["score"] <= 1.0 for i in record["items"])  # ranker probabilities
    scores = [i["score"] for i in record["items"]]
    assert scores == sorted(scores, reverse=True)  # no diversity/exploration: best first
    # Sources name the retrieval sources ('+'-joined).
    known = {"ann", "covis", "trending", "popular", "explore"}
    assert all(set(s.split("+")) <= known for s in sources(record).values())


def test_versions_equal_loaded_snapshots(world: World) -> None:
    world.publish_tables()
    shard = world.user_shard()
    first = ask(shard, "u1", request_id="r1")
    assert (first["model_version"], first["index_version"]) == (None, None)

    ranker = world.publish_ranker()
    index = world.publish_index()
    second = ask(shard, "u1", request_id="r2")
    assert second["model_version"] == ranker["version"] == 1
    assert second["index_version"] == index["version"] == 1

    world.publish_ranker(favourites=("a07",))
    world.publish_ranker(favourites=("a07",))
    world.publish_index()
    third = ask(shard, "u1", request_id="r3")
    assert third["model_version"] == world.store.latest("ranker")["version"] == 3
    assert third["index_version"] == world.store.latest("index")["version"] == 2
    views = shard.server.views
    assert third["model_version"] == views.ranker.version
    assert third["index_version"] == views.index.version
    # The newer ranker is what scores: a07 is its favourite.
    assert ids(third)[0] == "a07" and ids(second)[0] == FAVOURITE

    # New item-table versions are served too (they carry no version in the record).
    assert sources(ask(shard, "u1", k=40, request_id="r4"))["a39"] == "popular"
    world.trending["a39"] = 1e6
    world.publish_tables()
    assert sources(ask(shard, "u1", k=40, request_id="r5"))["a39"] == "trending+popular"


def test_request_before_any_snapshot_gets_a_valid_answer(world: World) -> None:
    shard = world.user_shard(exploration=1.0, diversity=0.3)
    # A warm user (history, MF vector, co-visitation seeds) and a cold one.
    feed(shard, [Item(T0 - 9_000, "a01", {"category": "c1"}),
                 Impression(T0 - 8_000, "imp1", "warm", "a01"),
                 Feedback(T0 - 7_000, "warm", "a01", "click", "imp1"),
                 Feedback(T0 - 6_000, "warm", "a02", "rating", None, 5.0)])
    for user in ("warm", "cold"):
        req = Request(T0, f"r-{user}", user, 10, {}, ["a03"])
        [record] = feed(shard, [req])["recommendations"]
        assert_record_shape(record, req)
        assert record["items"] == []
        assert record["model_version"] is None and record["index_version"] is None

    # Only item tables so far: popular/trending answers, still no versions.
    world.publish_tables()
    record = ask(shard, "cold", request_id="r-tables")
    assert len(record["items"]) == 10
    assert record["model_version"] is None and record["index_version"] is None
    # Everything published: picked up by the very next batch (poll_ms=0).
    world.publish_index()
    world.publish_ranker()
    record = ask(shard, "warm", request_id="r-all")
    assert record["model_version"] == 1 and record["index_version"] == 1


# -------------------------------------------------------------------------------------
# Filters
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize("feedback", [
    lambda user, item, ts: Feedback(ts, user, item, "click"),                  # positive
    lambda user, item, ts: Feedback(ts, user, item, "rating", None, 1.0),      # negative rating
    lambda user, item, ts: Feedback(ts, user, item, "dwell", None, 0.5),       # not an action of join.positive
    lambda user, item, ts: Feedback(ts, user, item, "skip", "imp-unknown"),    # orphan (no impression)
], ids=["click", "rating-1", "dwell", "orphan-skip"])
def test_consumed_items_are_never_recommended(world: World, feedback: Any) -> None:
    # Targets, each retrieved by a different source, all favoured by the ranker: the top
    # trending item, the top co-visitation neighbour of the seed, the top popular item.
    targets = [FAVOURITE, TRENDING[0], "a31", ITEMS[0]]
    world.publish_tables()
    world.publish_index()
    world.publish_ranker(favourites=tuple(targets))
    shard = world.user_shard()
    feed(shard, [click("control", SEED, T0 - 10_000), click("user", SEED, T0 - 10_000)])
    control = ask(shard, "control", k=10)
    assert set(ids(control)[:4]) == set(targets), "control: targets are recommended otherwise"
    assert "covis" in sources(control)["a31"] and "trending" in sources(control)[TRENDING[0]]

    feed(shard, [feedback("user", item, T0 - 5_000 + n) for n, item in enumerate(targets)])
    record = ask(shard, "user", k=10)
    assert not set(targets) & set(ids(record))
    assert SEED not in ids(record)
    assert ids(record) == [i for i in ids(ask(shard, "control", k=20)) if i not in targets][:10]


def test_consumed_filter_applies_to_ann_candidates(world: World) -> None:
    world.publish_tables()
    world.publish_index()
    shard = world.user_shard(sources={"ann": 10})
    warm_up(shard)
    feed(shard, [click("u", "a10", T0 - 60_000)])
    # Let the user consume their own nearest neighbours (raw ANN over their vector).
    vector = shard.context.user("u", T0 - 50_000).vector
    nearest = [i for i, _ in shard.server.views.index.query(vector, 5)]
    feed(shard, [click("u", item, T0 - 50_000 + n) for n, item in enumerate(nearest)])
    vector = shard.context.user("u", T0).vector
    raw = [i for i, _ in shard.server.views.index.query(vector, 10)]
    consumed = set(nearest) | {"a10"}
    assert consumed & set(raw), "control: ANN retrieves consumed items"
    record = ask(shard, "u", k=10)
    assert record["items"] and all(s == "ann" for s in sources(record).values())
    assert not consumed & set(ids(record))
    assert set(ids(record)) == set(raw) - consumed


def test_same_batch_feedback_is_consumed_before_the_request(world: World) -> None:
    world.publish_tables()
    shard = world.user_shard()
    assert TRENDING[0] in ids(ask(shard, "u", ts=T0 - 1))
    out = feed(shard, [Feedback(T0, "u", TRENDING[0], "like"),
                       Request(T0 + 1, "r-same-batch", "u", 10)])
    [record] = out["recommendations"]
    assert TRENDING[0] not in ids(record)


def test_unavailable_items_are_never_recommended(world: World) -> None:
    world.publish_tables()
    world.publish_index()
    shard = world.user_shard(exploration=1.0)
    warm_up(shard)
    feed(shard, [click("u", SEED, T0 - 10_000)])
    vector = shard.context.user("u", T0).vector
    ann_top = next(i for i, _ in shard.server.views.index.query(vector, 10)
                   if i not in {SEED, FAVOURITE, TRENDING[0], "a31", ITEMS[0]})
    targets = [FAVOURITE, TRENDING[0], "a31", ITEMS[0], ann_top]
    world.publish_ranker(favourites=tuple(targets))
    control = ask(shard, "u", k=10, request_id="control")
    assert set(ids(control)[:5]) == set(targets), "control: targets are recommended otherwise"
    assert "ann" in sources(control)[ann_top] and "covis" in sources(control)["a31"]
    assert ids(control)[-1] == NEW_ITEM and "explore" in sources(control)[NEW_ITEM]

    world.publish_tables(**{item: {"available": False} for item in [*targets, NEW_ITEM]})
    for n in range(5):
        record = ask(shard, "u", k=10, request_id=f"r{n}")
        assert not {*targets, NEW_ITEM} & set(ids(record))
        assert len(record["items"]) == 10
    # Back in the catalog: served again.
    world.publish_tables(**{item: {"available": True} for item in [*targets, NEW_ITEM]})
    assert ids(ask(shard, "u", k=10, request_id="control")) == ids(control)


def test_request_exclude_is_respected(world: World) -> None:
    world.publish_all()
    shard = world.user_shard(exploration=1.0)
    feed(shard, [click("u", SEED, T0 - 10_000)])
    control = ask(shard, "u", k=12, request_id="same-id")
    assert len(control["items"]) == 12
    excluded = [*ids(control)[:6], NEW_ITEM, "not-an-item"]
    assert NEW_ITEM in ids(control)
    record = ask(shard, "u", k=12, exclude=excluded, request_id="same-id")
    assert not set(excluded) & set(ids(record))
    assert len(record["items"]) == 12  # refilled from the rest
    assert set(ids(control)[6:11]) <= set(ids(record))


# -------------------------------------------------------------------------------------
# Business-rule hooks
# -------------------------------------------------------------------------------------


def test_hook_after_retrieval_sees_filtered_candidates_and_drops_items(world: World) -> None:
    world.publish_all()
    shard = world.user_shard(hooks={"after_retrieval": hook("drop_category_c1")})
    feed(shard, [click("u", SEED, T0 - 10_000), click("u", "a01", T0 - 9_000)])
    record = ask(shard, "u", k=15, exclude=["a05", "a21"])
    [seen] = HOOK_CALLS["after_retrieval"]
    seen_ids = {c.item_id for c in seen}
    # Runs after retrieval and the built-in filters: nothing consumed or excluded, and
    # categories are attached; before scoring (all scores 0).
    assert not {SEED, "a01", "a05", "a21"} & seen_ids
    assert any(c.category == "c1" for c in seen), "the hook had c1 items to drop"
    assert {"ann", "covis", "trending", "popular"} <= {s for c in seen for s in c.sources}
    assert all(c.score == 0.0 for c in seen)
    assert len(record["items"]) == 15
    assert all(CATEGORY[i] != "c1" for i in ids(record))


def test_hook_after_scoring_sees_scores_and_changes_the_order(world: World) -> None:
    world.publish_all()
    plain = ask(world.user_shard(), "cold", k=10)
    assert BOOSTED not in ids(plain)
    shard = world.user_shard(hooks={"after_scoring": hook("boost_one_item")})
    record = ask(shard, "cold", k=10)
    [seen] = HOOK_CALLS["after_scoring"]
    assert any(c.score > 0 for c in seen) and all(0 <= c.score <= 1 for c in seen)  # scored
    assert BOOSTED in {c.item_id for c in seen}
    # Applied before ordering: the boosted item is ordered first.
    assert ids(record)[0] == BOOSTED and record["items"][0]["score"] == 1e6
    assert ids(record)[1:] == ids(plain)[:9]


def test_hook_after_ordering_gets_the_final_list(world: World) -> None:
    world.publish_all()
    shard = world.user_shard(exploration=1.0, hooks={"after_ordering": hook("reverse_order")})
    record = ask(shard, "cold", k=6)
    [seen] = HOOK_CALLS["after_ordering"]
    assert len(seen) == 6
    assert "explore" in seen[-1].sources  # after the exploration slot was filled
    assert [c.score for c in seen[:-1]] == sorted((c.score for c in seen[:-1]), reverse=True)
    assert ids(record) == [c.item_id for c in reversed(seen)]


def test_all_three_hooks_run_once_per_request_in_order(world: World) -> None:
    world.publish_all()
    shard = world.user_shard(hooks={"after_retrieval": hook("drop_category_c1"),
                                    "after_scoring": hook("boost_one_item"),
                                    "after_ordering": hook("reverse_order")})
    record = ask(shard, "cold", k=5)
    assert {k: len(v) for k, v in HOOK_CALLS.items()} == {
        "after_retrieval": 1, "after_scoring": 1, "after_ordering": 1}
    after_ret = {c.item_id for c in HOOK_CALLS["after_scoring"][0]}
    assert all(CATEGORY.get(i) != "c1" for i in after_ret)  # scoring saw the hook's output
    assert ids(record)[-1] == BOOSTED  # boosted first, then reversed


def test_bad_hook_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="module:function"):
        load_hook("no_colon")
    with pytest.raises(AttributeError):
        load_hook(hook("no_such_function"))


def test_exploration_respects_after_retrieval_hook(world: World) -> None:
    world.publish_all()  # NEW_ITEM is in category c1
    shard = world.user_shard(exploration=1.0, hooks={"after_retrieval": hook("drop_category_c1")})
    record = ask(shard, "cold", k=10)
    assert HOOK_CALLS["after_retrieval"], "the hook ran"
    assert NEW_ITEM not in ids(record), sources(record)
    assert all(world.catalog[i].category != "c1" for i in ids(record))


def test_impression_features_use_the_snapshots_before_any_request(world: World) -> None:
    world.publish_all()
    shard = world.user_shard()
    out = feed(shard, [Impression(T0, "imp1", "u", "a20"),
                       Feedback(T0 + 1, "u", "a20", "click", "imp1")])
    [example] = out["examples"]
    assert example["features"].get("i:category") == CATEGORY["a20"]
    [table] = [t for t in shard.server.views.loaded_tables() if "a20" in t.popular]

    def popular_at(ts: int) -> float:  # the table's count decayed to the impression time
        return world.popular["a20"] * table.decay_factor("popular", ts)

    assert example["features"].get("pop") == popular_at(T0)
    # What the same shard computes once a request made it read the snapshots:
    warm_up(shard)
    out = feed(shard, [Impression(T0 + 2, "imp2", "u", "a20"),
                       Feedback(T0 + 3, "u", "a20", "click", "imp2")])
    assert out["examples"][0]["features"]["pop"] == popular_at(T0 + 2)


# -------------------------------------------------------------------------------------
# Cold users and exploration
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_ranker", [False, True], ids=["blended", "ranker"])
@pytest.mark.parametrize("k", [1, 10, 25])
def test_cold_user_gets_k_trending_or_popular_items(world: World, k: int,
                                                    with_ranker: bool) -> None:
    world.publish_tables()
    world.publish_index()
    if with_ranker:
        world.publish_ranker()
    record = ask(world.user_shard(), "nobody", k=k)
    assert len(record["items"]) == k
    for source in sources(record).values():
        assert set(source.split("+")) <= {"trending", "popular"}, source
    if not with_ranker:  # blended retrieval score: trending first, then popularity
        expected = (TRENDING + [i for i in ITEMS if i not in TRENDING])[:k]
        assert ids(record) == expected
    else:
        assert ids(record)[0] == FAVOURITE
        assert record["model_version"] == 1


def test_new_item_surfaces_through_exploration(world: World) -> None:
    world.publish_all()
    plain = world.user_shard()
    explore = world.user_shard(exploration=1.0)
    for shard in (plain, explore):
        feed(shard, [click("u", SEED, T0 - 10_000)])
    assert NEW_ITEM not in ids(ask(plain, "u", k=10)) + ids(ask(plain, "cold", k=10))
    for user in ("u", "cold"):
        for k in (1, 5, 10):
            record = ask(explore, user, k=k)
            assert len(record["items"]) == k
            assert ids(record)[-1] == NEW_ITEM  # the last slot
            assert "explore" in sources(record)[NEW_ITEM]
            assert sum("explore" in s for s in sources(record).values()) == 1


def test_exploration_only_picks_new_available_unseen_items(world: World) -> None:
    world.publish_all()
    shard = world.user_shard(exploration=1.0, new_item_ms=DAY)
    # Too old to be new: never explored.
    world.publish_tables(**{NEW_ITEM: {"first_seen_ms": T0 - 2 * DAY}})
    assert NEW_ITEM not in ids(ask(shard, "cold", request_id="old"))
    world.publish_tables(**{NEW_ITEM: {"first_seen_ms": T0 - HOUR}})
    assert NEW_ITEM in ids(ask(shard, "cold", request_id="new"))
    # Excluded or consumed new items are never explored.
    assert NEW_ITEM not in ids(ask(shard, "cold", exclude=[NEW_ITEM], request_id="ex"))
    feed(shard, [Feedback(T0 - 1, "cold", NEW_ITEM, "dwell", None, 1.0)])
    record = ask(shard, "cold", request_id="consumed")
    assert NEW_ITEM not in ids(record)
    assert not any("explore" in s for s in sources(record).values())  # no other new item


def test_exploration_probability_is_respected(world: World) -> None:
    world.publish_all()
    shard = world.user_shard(exploration=0.3)
    explored = sum(NEW_ITEM in ids(ask(shard, "cold", request_id=f"p{n}")) for n in range(200))
    assert 30 <= explored <= 90  # ~60 expected (deterministic per request id)


# -------------------------------------------------------------------------------------
# The item side for real: item events -> user shard -> item shards -> tables -> serving
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


def _bootstrap_events(n_items: int = 30) -> list[Event]:
    """Catalog events and organic clicks: item b<i> is clicked by users p0..p<n_items-i-1>."""
    events: list[Event] = [Item(T0 - DAY, f"b{i:02d}", {"category": f"c{i % 3}"})
                           for i in range(n_items)]
    ts = T0 - DAY + 1_000
    for i in range(n_items):
        for u in range(n_items - i):
            ts += 10
            events.append(Feedback(ts, f"p{u}", f"b{i:02d}", "click"))
    return events


def _bootstrap(shard: UserShard, side: ItemSide) -> None:
    side.apply(feed(shard, _bootstrap_events()))


def test_item_event_unavailable_is_filtered_once_its_table_is_published(world: World) -> None:
    shard = world.user_shard(new_item_ms=HOUR, exploration=1.0)
    side = ItemSide(world.store)
    _bootstrap(shard, side)
    before = ask(shard, "cold", k=10, request_id="b")
    assert "b00" in ids(before) and before["index_version"] is not None

    side.apply(feed(shard, [Item(T0 - 1_000, "b00", {"category": "c0"}, available=False)]))
    after = ask(shard, "cold", k=30, request_id="a")
    assert "b00" not in ids(after) and len(after["items"]) == 29
    # Still retrieved (popularity is kept in the table): the filter is what drops it.
    assert any("b00" in table.popular for table in shard.server.views.loaded_tables())
    warm = ask(shard, "p1", k=30, request_id="w")  # ANN and co-visitation users too
    assert "b00" not in ids(warm) and warm["items"]

    # A brand-new item (catalog event only) surfaces through the exploration slot.
    side.apply(feed(shard, [Item(T0 - 500, "fresh", {"category": "c9"})]))
    record = ask(shard, "cold", k=10, request_id="f")
    assert ids(record)[-1] == "fresh" and "explore" in sources(record)["fresh"]


def test_item_event_unavailable_is_filtered_before_the_next_table(world: World) -> None:
    shard = world.user_shard()
    side = ItemSide(world.store)
    _bootstrap(shard, side)
    assert "b00" in ids(ask(shard, "cold", k=10, request_id="b"))
    # The user shard has seen the item event; the item shard has not published yet.
    out = feed(shard, [Item(T0 - 1_000, "b00", {"category": "c0"}, available=False),
                       Request(T0, "same-batch", "cold", 10)])
    assert shard.catalog["b00"]["available"] is False
    assert "b00" not in ids(out["recommendations"][0])
    assert "b00" not in ids(ask(shard, "cold", k=10, request_id="next-batch"))


def test_popularity_of_tables_published_at_different_times_is_comparable(world: World) -> None:
    shard = world.user_shard()
    side = ItemSide(world.store)
    _bootstrap(shard, side)  # all clicks within seconds: b00 > b01 > ... by click count
    expected = [f"b{i:02d}" for i in range(10)]
    assert ids(ask(shard, "cold", k=10, request_id="before")) == expected
    # One shard republishes a day later (a catalog event for one of its items only).
    side.apply(feed(shard, [Item(T0, "b00", {"category": "c0"})]))
    after = ask(shard, "cold", k=10, request_id="after")
    assert sorted(r.version for r in shard.server.views.tables.values()) == [1, 2]
    assert ids(after) == expected


# -------------------------------------------------------------------------------------
# Property: over many random requests, never an excluded, consumed or unavailable item
# -------------------------------------------------------------------------------------


def test_random_requests_never_return_excluded_consumed_or_unavailable_items(world: World) -> None:
    rng = random.Random(20260101)
    configs = {
        "plain": {},
        "diverse": {"diversity": 0.3, "exploration": 0.5},
        "explore": {"exploration": 1.0, "new_item_ms": 2 * HOUR},
    }
    shards = {name: world.user_shard(**cfg) for name, cfg in configs.items()}
    side = ItemSide(world.store)  # fed by the "plain" shard; every shard reads its snapshots
    world.publish_ranker(ts=T0 - DAY)
    boot = _bootstrap_events()
    for name, shard in shards.items():
        out = feed(shard, boot)
        if name == "plain":
            side.apply(out)

    items = [f"b{i:02d}" for i in range(30)]
    users = [f"p{u}" for u in range(12)] + ["q1", "q2", "q3"]
    consumed = {u: {f"b{i:02d}" for i in range(30) if u.startswith("p") and int(u[1:]) < 30 - i}
                for u in users}
    available = dict.fromkeys(items, True)
    last_recs: dict[str, list[str]] = {u: [] for u in users}
    ts = T0
    checked = violations_possible = 0
    for round_ in range(25):
        # Batch A: availability changes and new items (through the real item side).
        ts += 60_000
        changes: list[Event] = []
        for item in rng.sample(items, 3):
            available[item] = rng.random() < 0.6
            category = f"c{int(item[1:]) % 3}" if item.startswith("b") else "c7"
            changes.append(Item(ts, item, {"category": category}, available[item]))
        if round_ % 5 == 0:
            new = f"new{round_:02d}"
            items.append(new)
            available[new] = True
            changes.append(Item(ts, new, {"category": "c7"}))
        outs = {name: feed(shard, changes) for name, shard in shards.items()}
        side.apply(outs["plain"])
        # Batch B: feedback on recommended items and requests, interleaved.
        batch: list[Event] = []
        consumed_at: dict[str, set[str]] = {}
        for n in range(12):
            ts += 100
            user = rng.choice(users)
            if rng.random() < 0.4 and last_recs[user]:
                item = rng.choice(last_recs[user])
                action = rng.choice([("click", 1.0), ("rating", float(rng.randint(1, 5))),
                                     ("dwell", 3.0), ("skip", 1.0)])
                batch.append(Feedback(ts, user, item, action[0], None, action[1]))
                consumed[user].add(item)
            pool = last_recs[user] + rng.sample(items, 3)
            exclude = rng.sample(pool, min(len(pool), rng.randint(0, 6)))
            batch.append(Request(ts + 1, f"r{round_}-{n}", user, rng.randint(1, 20), {}, exclude))
            consumed_at[batch[-1].request_id] = set(consumed[user])  # as of this request
        for name, shard in shards.items():
            out = feed(shard, batch)
            requests = [e for e in batch if isinstance(e, Request)]
            assert len(out["recommendations"]) == len(requests)
            for req, rec in zip(requests, out["recommendations"], strict=True):
                assert_record_shape(rec, req)
                got = set(ids(rec))
                forbidden = set(req.exclude) | consumed_at[req.request_id] | {
                    i for i, ok in available.items() if not ok}
                violations_possible += bool(forbidden & set(last_recs[req.user_id]))
                assert not got & set(req.exclude), (name, req, rec)
                assert not got & consumed_at[req.request_id], (name, req, rec)
                assert not {i for i in got if not available.get(i, True)}, (name, req, rec)
                # Filters drop only what they must: every popular item left is eligible.
                eligible = set(items[:30]) - forbidden
                if name == "plain":
                    assert len(got) == min(req.k, len(eligible)), (name, req, rec)
                else:
                    assert len(got) >= min(req.k, len(eligible)), (name, req, rec)
                if name == "plain":
                    last_recs[req.user_id] = ids(rec)
                checked += 1
    assert checked == 3 * 25 * 12
    assert violations_possible > 50  # the filters had real work to do


# -------------------------------------------------------------------------------------
# Tampered and refused snapshots keep the previous version serving
# -------------------------------------------------------------------------------------


def _tamper(store: SnapshotStore, manifest: Manifest) -> None:
    path = store.root / manifest["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_snapshots_keep_the_previous_version_serving(world: World) -> None:
    world.publish_all()
    shard = world.user_shard()
    feed(shard, [click("u", SEED, T0 - 10_000)])
    v1 = ask(shard, "u", k=10, request_id="v1")
    assert (v1["model_version"], v1["index_version"]) == (1, 1)
    assert ids(v1)[:2] == [FAVOURITE, ITEMS[0]]

    # v2 of everything (new content), each altered after it was announced.
    _tamper(world.store, world.publish_ranker(favourites=("a07",)))
    world.vectors = {item: -v for item, v in world.vectors.items()}
    _tamper(world.store, world.publish_index())
    world.popular = {item: s + 0.5 for item, s in world.popular.items()}
    for manifest in world.publish_tables(**{ITEMS[0]: {"available": False}}).values():
        _tamper(world.store, manifest)
    for _ in range(3):
        record = ask(shard, "u", k=10, request_id="v1")
        assert (record["model_version"], record["index_version"]) == (1, 1)
        assert ids(record) == ids(v1)  # same ranker, index and tables as before
    views = shard.server.views
    assert views.ranker.refused >= 1 and "sha256" in views.ranker.last_error
    assert views.index.refused >= 1 and "sha256" in views.index.last_error
    assert all(r.refused >= 1 and r.version == 1 for r in views.tables.values())

    # The next good versions are picked up.
    world.publish_ranker(favourites=("a07",))
    world.publish_index()
    world.publish_tables()
    record = ask(shard, "u", k=10, request_id="v3")
    assert (record["model_version"], record["index_version"]) == (3, 3)
    assert ids(record)[0] == "a07" and ITEMS[0] not in ids(record)


def test_resumed_shard_serves_the_same_answer(world: World) -> None:
    world.publish_all()
    shard = world.user_shard(exploration=1.0)
    feed(shard, [click("u", SEED, T0 - 10_000)])
    before = ask(shard, "u", k=10, request_id="r")
    resumed: UserShard = pickle.loads(pickle.dumps(shard))  # what recovery does
    assert ask(resumed, "u", k=10, request_id="r") == {**before, "latency_ms": ANY_LATENCY}


class _TypeSpy(pickle.Pickler):
    """Pickles like Bytewax's recovery does and records the class of every object."""

    def __init__(self, file: Any) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.types: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        self.types.add(type(obj).__name__)
        return NotImplemented


def test_recovery_state_holds_no_snapshot_objects(world: World) -> None:
    """Snapshots are reloaded from the store on resume; the user shard's recovery state
    (pickled every epoch) must not embed item tables, the index or the ranker."""
    for n in range(5_000):  # a catalog big enough to show in the state's size
        world.catalog[f"z{n}"] = CatalogEntry("c9", True, T0 - 30 * DAY)
        world.popular[f"z{n}"] = 1.0 / (n + 1)
    world.publish_all()
    shard = world.user_shard(exploration=0.5, diversity=0.2)
    feed(shard, [click("u", SEED, T0 - 10_000)])
    before = len(pickle.dumps(shard, protocol=pickle.HIGHEST_PROTOCOL))
    for n in range(5):
        ask(shard, "u", k=10, request_id=f"s{n}")
        ask(shard, "cold", k=10, request_id=f"c{n}")
    spy = _TypeSpy(io.BytesIO())
    spy.dump(shard)
    assert not {"ItemTable", "ItemIndex", "Index", "Ranker", "LinearScorer"} & spy.types
    after = len(pickle.dumps(shard, protocol=pickle.HIGHEST_PROTOCOL))
    assert after < before + 50_000, (before, after)


class _AnyLatency:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, float | int) and other >= 0


ANY_LATENCY = _AnyLatency()


def test_tampered_snapshots_keep_the_previous_version_after_resume(world: World) -> None:
    world.publish_all()
    shard = world.user_shard()
    feed(shard, [click("u", SEED, T0 - 10_000)])
    before = ask(shard, "u", k=10, request_id="v1")
    _tamper(world.store, world.publish_ranker(favourites=("a07",)))
    world.vectors = {item: -v for item, v in world.vectors.items()}
    _tamper(world.store, world.publish_index())
    world.popular = {item: s + 0.5 for item, s in world.popular.items()}
    for manifest in world.publish_tables().values():
        _tamper(world.store, manifest)
    assert ids(ask(shard, "u", k=10, request_id="v1")) == ids(before)
    resumed: UserShard = pickle.loads(pickle.dumps(shard))  # what recovery does
    after = ask(resumed, "u", k=10, request_id="v1")
    assert (after["model_version"], after["index_version"]) == (1, 1)
    assert ids(after) == ids(before)


def test_snapshot_outside_the_store_is_refused(world: World, tmp_path: Path) -> None:
    world.publish_all()
    shard = world.user_shard()
    assert ask(shard, "cold", request_id="a")["model_version"] == 1
    # A well-formed ranker file with a matching sha256, but outside the store root.
    outside = tmp_path / "outside.npz"
    ranker = load_ranker_file(world.store.root / world.store.latest("ranker")["path"])
    ranker.n_learned += 1  # another version (the same bytes would be the verified v1)
    save_ranker(ranker, outside)
    manifest = {**world.store.latest("ranker"), "version": 2, "path": "../outside.npz",
                "sha256": sha256_file(outside)}
    (world.store.root / "ranker" / "LATEST").write_text(json.dumps(manifest))
    record = ask(shard, "cold", request_id="b")
    assert record["model_version"] == 1
    assert "outside the snapshot store" in shard.server.views.ranker.last_error


def test_tampered_first_snapshot_serves_without_it(world: World) -> None:
    world.publish_tables()
    _tamper(world.store, world.publish_ranker())
    _tamper(world.store, world.publish_index())
    shard = world.user_shard()
    feed(shard, [click("u", SEED, T0 - 10_000)])
    req = Request(T0, "r", "u", 10)
    [record] = feed(shard, [req])["recommendations"]
    assert_record_shape(record, req)
    assert record["model_version"] is None and record["index_version"] is None
    assert len(record["items"]) == 10  # tables still serve (covis, trending, popular)


def test_vectorised_ranker_scores_equal_river_within_1e_9(world: World) -> None:
    """The ranker's scores through ``ColumnScorer`` (item columns, memoised static terms,
    numpy) equal River's ``predict_many`` on the full feature dicts within 1e-9, for a
    ranker trained on the shard's own example features (profiles, user x category
    profiles, item attributes incl. numbers and lists, popularity, co-visitation, MF)."""
    from models.features import SERVING_POSITION, ranking_features_many
    from operators.linear_scorer import column_scorer, linear_scorer

    world.publish_tables()
    world.publish_index()
    shard = world.user_shard()
    rng = random.Random(5)
    events: list[Event] = [Item(T0 - 2 * DAY, item, {"category": CATEGORY[item], "brand": f"b{i % 3}",
                                                     "price": 3.5 * i, "tags": ["x", f"t{i % 2}"]})
                           for i, item in enumerate(ITEMS[:30])]
    ts = T0 - DAY
    for n in range(600):
        ts += 1_000
        user, item = f"u{rng.randrange(12)}", rng.choice(ITEMS)
        events.append(Impression(ts, f"i{n}", user, item, f"r{n}", rng.randrange(5), {"device": "web"}))
        if rng.random() < 0.4:
            events.append(Feedback(ts + 10, user, item, rng.choice(["click", "like"]), f"i{n}"))
    examples = feed(shard, events).get("examples", [])
    # The windows close: the negatives.
    examples += feed(shard, [Request(ts + DAY, "flush", "nobody", 10)]).get("examples", [])
    assert 0.2 < np.mean([e["label"] for e in examples]) < 0.6
    assert any("covis" in e["features"] and "i:brand" in e["features"] for e in examples)
    trainer = Trainer(RankerConfig(kind="lr", delay_to_labels=False, sync_interval_ms=10**12,
                                   sync_every_examples=10**9, metrics_every_examples=10**9),
                      1.0, world.store)
    trainer.process(examples)
    trainer.sync()
    feed(shard, [Request(ts + DAY, "poll", "nobody", 10)])
    server, context = shard.server, shard.context
    assert server is not None
    ranker = server.views.ranker.current
    scorer = linear_scorer(ranker)
    assert scorer is not None
    compared = 0
    for user in [f"u{j}" for j in range(12)]:
        ctx = context.user(user, ts + DAY)
        items = ITEMS + ["unknown"]
        covis = server.covis_channels(ctx, ts + DAY, 100)[1]
        cols = context.item_columns(ctx, items, ts + DAY, covis)
        fast = column_scorer(scorer).predict(user, ts + DAY, {"device": "web"}, SERVING_POSITION,
                                             ctx.profile, cols)
        extras = context.item_features(ctx, items, ts + DAY, covis)
        river = ranker.predict_many(ranking_features_many(
            user, items, ts + DAY, {"device": "web"}, SERVING_POSITION, ctx.profile, extras))
        assert fast is not None
        np.testing.assert_allclose(fast, river, rtol=0, atol=1e-9)
        compared += len(items)
    assert compared == 12 * 41 and np.ptp(river) > 1e-3  # scores differ between items
