"""Serving, retrieval: record shape, versions, cold users and cold starts, trending and popular across tables, impression features from the snapshots.

The world and helpers: tests/serving_world.py.
"""

from __future__ import annotations

import pytest
from serving_world import (
    CATEGORY,
    FAVOURITE,
    ITEMS,
    SEED,
    T0,
    TRENDING,
    ItemSide,
    World,
    ask,
    assert_record_shape,
    bootstrap,
    click,
    feed,
    ids,
    sources,
    warm_up,
)

from events.model import EventParser, Feedback, Impression, Item, Request
from state.join_state import float32_features


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
        # Cold start: the one known item (catalog), unless the user consumed it.
        assert record["items"] == ([] if user == "warm" else
                                   [{"item_id": "a01", "score": 0.0, "source": "catalog",
                                     "propensity": 1.0}])
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


def test_impression_features_use_the_snapshots_before_any_request(world: World) -> None:
    world.publish_all()
    shard = world.user_shard()
    out = feed(shard, [Impression(T0, "imp1", "u", "a20"),
                       Feedback(T0 + 1, "u", "a20", "click", "imp1")])
    [example] = out["examples"]
    assert example["features"].get("i:category") == CATEGORY["a20"]
    [table] = [t for t in shard.server.views.loaded_tables() if "a20" in t.popular]

    def popular_at(ts: int) -> float:  # the table's count decayed to the impression time,
        # at the float32 precision examples keep (state.join_state.float32_features)
        return float32_features({"pop": world.popular["a20"] * table.decay_factor("popular", ts)})["pop"]

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


def test_popularity_of_tables_published_at_different_times_is_comparable(world: World) -> None:
    shard = world.user_shard()
    side = ItemSide(world.store)
    bootstrap(shard, side)  # all clicks within seconds: b00 > b01 > ... by click count
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
