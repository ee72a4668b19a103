"""Serving, business-rule hooks: each stage's hook sees its candidates and can change them.

The world and helpers: tests/serving_world.py.
"""

from __future__ import annotations

import pytest
from serving_world import (
    BOOSTED,
    CATEGORY,
    HOOK_CALLS,
    NEW_ITEM,
    SEED,
    T0,
    World,
    ask,
    clear_hook_calls,
    click,
    feed,
    hook,
    ids,
    sources,
)

from operators.serving import load_hook


@pytest.fixture(autouse=True)
def _no_hook_calls_yet() -> None:
    clear_hook_calls()


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
