"""Serving, ordering: the exploration slot (new items, probability, propensities).

The world and helpers: tests/serving_world.py.
"""

from __future__ import annotations

from serving_world import DAY, HOUR, NEW_ITEM, SEED, T0, World, ask, click, feed, ids, sources

from events.model import Feedback


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
    records = [ask(shard, "cold", request_id=f"p{n}") for n in range(200)]
    explored = sum(NEW_ITEM in ids(r) for r in records)
    assert 30 <= explored <= 90  # ~60 expected (deterministic per request id)
    # Logged propensities: the explored slot 0.3 / eligible new items (one here), the
    # ranked item it would replace 0.7, every other slot 1.
    for r in records:
        *rest, last = [i["propensity"] for i in r["items"]]
        assert rest == [1.0] * (len(r["items"]) - 1)
        assert last == (0.3 if r["items"][-1]["item_id"] == NEW_ITEM else 0.7)


# -------------------------------------------------------------------------------------
# The item side for real: item events -> user shard -> item shards -> tables -> serving
# -------------------------------------------------------------------------------------
