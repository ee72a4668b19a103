"""The ``category`` retrieval source (operators/category_items.py, CategoryExplore.retrieve):
each category's best items by click rate from the item tables, retrieved for the user's
categories of highest posterior mean; through a real ``UserShard`` (tests/serving_world.py)
it brings a favoured category's items the other sources miss into the lists."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from serving_world import CATEGORY, ITEMS, T0, World, ask, feed

from events.model import Feedback, Impression, Item
from flows.config import ConfigError, load_config
from models.category_bandit import CategoryExploreConfig
from operators.category_explore import CategoryExplore
from operators.category_items import CategoryItems, merge_categories, table_categories
from state.covisitation import CoVisConfig, CoVisitation
from state.item_table import CatalogEntry, ItemTable

RATE = ("item.clicks.1d", "item.impressions.1d")


def table(shard: str, items: dict[str, tuple[str, float, float]],
          unavailable: tuple[str, ...] = ()) -> ItemTable:
    """A table of ``items``: id -> (category, clicks, impressions); impressions 0 means
    no profile (never shown)."""
    return ItemTable(shard, T0, CoVisitation(CoVisConfig()),
                     catalog={i: CatalogEntry(c, i not in unavailable, T0) for i, (c, _, _) in items.items()},
                     features={i: dict(zip(RATE, (k, n), strict=True))
                               for i, (_, k, n) in items.items() if n > 0})


def test_each_categorys_best_items_by_click_rate_over_the_categorys() -> None:
    """Best lift first; an item never shown has the category's rate (lift 1), so it comes
    before the known below-average items; unavailable items are left out; only the
    ``retrieve_per_category`` best are kept; the result is memoised on the table."""
    t = table("i000", {
        "good": ("a", 30.0, 100.0), "poor": ("a", 1.0, 100.0), "new": ("a", 0.0, 0.0),
        "avg": ("a", 10.0, 100.0), "gone": ("a", 90.0, 100.0), "b1": ("b", 5.0, 100.0),
    }, unavailable=("gone",))
    config = CategoryExploreConfig(retrieve_per_category=3)
    lists = table_categories(t, config)
    assert lists["a"].items == ["good", "new", "avg"]
    assert lists["a"].lift[1] == pytest.approx(1.0)
    assert lists["a"].lift[0] > 1.5 > 1.0 > lists["a"].lift[2] - 0.2
    assert (lists["a"].clicks, lists["a"].shown) == (41.0, 300.0)  # every available item
    assert list(lists) == ["a", "b"]  # the most clicked category first
    assert table_categories(t, config) is lists
    few = table_categories(t, CategoryExploreConfig(retrieve_per_category=3, max_categories=1))
    assert list(few) == ["a"]


def test_tables_merge_into_one_list_per_category() -> None:
    """Items of a category spread over two item shards: the merged list holds the best of
    both by the lift against the summed category rate."""
    config = CategoryExploreConfig(retrieve_per_category=2)
    one = table("i000", {"x1": ("a", 20.0, 100.0), "x2": ("a", 2.0, 100.0)})
    two = table("i001", {"y1": ("a", 30.0, 100.0), "y2": ("a", 1.0, 100.0),
                         "z1": ("b", 1.0, 10.0)})
    merged = merge_categories([table_categories(one, config), table_categories(two, config)],
                              config)
    assert merged["a"].items == ["y1", "x1"]
    assert (merged["a"].clicks, merged["a"].shown) == (53.0, 400.0)
    finder = CategoryItems(config)
    assert finder.lists([one, two])["a"].items == ["y1", "x1"]
    assert finder.lists([one, two]) is finder.lists([one, two])  # cached per set of tables
    assert pickle.loads(pickle.dumps(finder)).lists([one])["a"].items == ["x1", "x2"]


def test_retrieval_follows_the_users_posterior_and_skips_users_without_impressions() -> None:
    config = CategoryExploreConfig(retrieve_per_category=2)
    lists = CategoryItems(config).lists([table("i000", {
        f"{c}{n}": (c, 5.0 + n, 100.0) for c in "abcd" for n in range(4)})])
    explore = CategoryExplore(config)
    assert explore.retrieve("u", 4, lists) == ([], pytest.approx(np.zeros(0)))
    for rep in range(6):  # shown every category, clicks only d
        for pos, cat in enumerate("abcd"):
            explore.impression("u", f"{cat}0", cat, pos, f"r{rep}")
        explore.feedback("u", "d0", "d", "click", f"i{rep}")
    items, scores = explore.retrieve("u", 4, lists)
    assert items[:2] == ["d3", "d2"]  # the favoured category's best items first
    assert len(items) == 4 and len(scores) == 4 and scores[0] > scores[2]
    assert explore.retrieve("u", 0, lists)[0] == []


def test_the_category_source_brings_the_favoured_categorys_items_into_the_lists(
        world: World) -> None:
    """Through the shard: the other sources retrieve five popular items only (one c3);
    a user who clicks c3 gets c3 items the other sources never retrieved, the best by the
    tables' click rates first; without the source (the control) the list holds fewer c3
    items and not the best one; a user without impressions gets no category candidates."""
    rates = {item: {RATE[0]: 2.0, RATE[1]: 100.0} for item in ITEMS}
    rates["a39"][RATE[0]] = 40.0  # the best c3 item, least popular
    world.publish_tables(features=rates)
    world.publish_index()
    world.publish_ranker()
    sources = {"ann": 0, "covis": 0, "trending": 0, "popular": 5}
    explore = CategoryExploreConfig(enabled=True)
    shard = world.user_shard(category_explore=explore, sources={**sources, "category": 20})
    plain = world.user_shard(category_explore=explore, sources={**sources, "category": 0})
    c3 = [i for i in ITEMS if CATEGORY[i] == "c3"]
    events = []
    for rep in range(4):
        ts = T0 - 600_000 + rep * 1000
        for pos, item in enumerate(c3[:2] + ITEMS[:4]):
            events.append(Impression(ts, f"i:fan:{rep}:{pos}", "fan", item, f"r:fan:{rep}", pos))
        events.append(Feedback(ts + 10, "fan", c3[0], "click", f"i:fan:{rep}:0"))
    for s in (shard, plain):
        feed(s, [Item(T0 - 3_600_000, item, {"category": CATEGORY[item]}) for item in ITEMS])
        feed(s, events)
    got = ask(shard, "fan", ts=T0 + 10, request_id="q:fan")["items"]
    ids = [i["item_id"] for i in got]
    assert "a39" in ids and sum(CATEGORY[i] == "c3" for i in ids) >= 3
    assert any("category" in i["source"] for i in got)
    control = [i["item_id"] for i in ask(plain, "fan", ts=T0 + 10, request_id="q:fan")["items"]]
    assert "a39" not in control  # the other sources (and the backfill) miss it
    assert sum(CATEGORY[i] == "c3" for i in control) < sum(CATEGORY[i] == "c3" for i in ids)
    cold = ask(shard, "cold", ts=T0 + 10, request_id="q:cold")["items"]
    assert not any("category" in i["source"] for i in cold)


def test_config_values_are_validated() -> None:
    for key in ("retrieve_per_category", "max_categories"):
        with pytest.raises(ConfigError, match=f"serving.category_explore.{key}"):
            load_config({"serving": {"category_explore": {key: 0}}})


def test_the_memory_bound_counts_the_category_lists() -> None:
    """One merged copy per user shard (with its items' rows, ``CategoryItems.rows``) and
    one memo per loaded item table, each at most ``max_categories`` lists of
    ``retrieve_per_category`` items; nothing without the source."""
    from flows.memory import ALLOCATOR_OVERHEAD, BYTES, memory_bound

    explore = {"max_categories": 300, "retrieve_per_category": 5}
    on = load_config({"serving": {"category_explore": explore}})
    off = load_config({"serving": {"category_explore": explore, "sources": {"category": 0}}})
    added = memory_bound(on)["total_mb"] - memory_bound(off)["total_mb"]
    per_copy = 300 * (BYTES["category_list"] + 5 * BYTES["category_item"])
    copies = on.shards.users + on.shards.items
    rows = on.shards.users * 300 * 5 * BYTES["category_row"]
    assert added == pytest.approx((copies * per_copy + rows) * ALLOCATOR_OVERHEAD / 2**20)
