"""Serving, filtering: consumed items and the repeat policy, unavailable items (table and catalog), the request's exclude, randomised invariants.

The world and helpers: tests/serving_world.py.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from serving_world import (
    DAY,
    FAVOURITE,
    HOUR,
    ITEMS,
    NEW_ITEM,
    SEED,
    T0,
    TRENDING,
    ItemSide,
    World,
    ask,
    assert_record_shape,
    bootstrap,
    bootstrap_events,
    click,
    feed,
    ids,
    sources,
    warm_up,
)

from events.model import Event, Feedback, Item, Request


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
    shard = world.user_shard(repeat="never")
    feed(shard, [click("control", SEED, T0 - 10_000), click("user", SEED, T0 - 10_000)])
    control = ask(shard, "control", k=10)
    assert set(ids(control)[:4]) == set(targets), "control: targets are recommended otherwise"
    assert "covis" in sources(control)["a31"] and "trending" in sources(control)[TRENDING[0]]

    feed(shard, [feedback("user", item, T0 - 5_000 + n) for n, item in enumerate(targets)])
    record = ask(shard, "user", k=10)
    assert not set(targets) & set(ids(record))
    assert SEED not in ids(record)
    assert ids(record) == [i for i in ids(ask(shard, "control", k=20)) if i not in targets][:10]


@pytest.mark.parametrize("repeat, blocked", [
    ("not-consumed", {"bought", "rated"}),  # default: clicked / viewed items may come back
    ("never", {"clicked", "viewed", "bought", "rated"}),
    ("allow", set()),
    ("cooldown", {"viewed", "bought", "rated"}),  # the click is older than the cool-down
])
def test_repeat_policy(world: World, repeat: str, blocked: set[str]) -> None:
    world.publish_tables()
    world.publish_index()
    targets = {"clicked": FAVOURITE, "viewed": TRENDING[0], "bought": "a31", "rated": ITEMS[0]}
    world.publish_ranker(favourites=tuple(targets.values()))
    shard = world.user_shard(repeat=repeat, repeat_cooldown_ms=60_000)
    feed(shard, [click("user", SEED, T0 - 100_000),
                 Feedback(T0 - 90_000, "user", targets["clicked"], "click"),
                 Feedback(T0 - 5_000, "user", targets["viewed"], "view"),
                 Feedback(T0 - 5_000, "user", targets["bought"], "purchase"),
                 Feedback(T0 - 5_000, "user", targets["rated"], "rating", None, 5.0)])
    served = set(ids(ask(shard, "user", k=10)))
    assert {name for name, item in targets.items() if item not in served} == blocked


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


def test_item_event_unavailable_is_filtered_once_its_table_is_published(world: World) -> None:
    shard = world.user_shard(new_item_ms=HOUR, exploration=1.0)
    side = ItemSide(world.store)
    bootstrap(shard, side)
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
    bootstrap(shard, side)
    assert "b00" in ids(ask(shard, "cold", k=10, request_id="b"))
    # The user shard has seen the item event; the item shard has not published yet.
    out = feed(shard, [Item(T0 - 1_000, "b00", {"category": "c0"}, available=False),
                       Request(T0, "same-batch", "cold", 10)])
    assert shard.catalog["b00"]["available"] is False
    assert "b00" not in ids(out["recommendations"][0])
    assert "b00" not in ids(ask(shard, "cold", k=10, request_id="next-batch"))


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
    boot = bootstrap_events()
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
                # Filters drop only what they must: every known item left is eligible
                # (popular ones retrieved, the rest from the catalog: cold start).
                eligible = set(items) - forbidden
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
