"""Serving, scoring: the vectorised ranker path against River.

The world and helpers: tests/serving_world.py.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from serving_world import CATEGORY, DAY, ITEMS, SEED, T0, World, click, feed

from events.model import Event, Feedback, Impression, Item, Request
from operators.trainer import RankerConfig, Trainer


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
    feed(shard, [Item(T0 - 2 * DAY, item, {"category": CATEGORY[item], "brand": f"b{i % 3}",
                                           "price": 3.5 * i, "tags": ["x", f"t{i % 2}"]})
                 for i, item in enumerate(ITEMS[:30])])
    events: list[Event] = [Feedback(T0 + n, "u0", SEED, "click") for n in range(3)]
    ts = T0  # after the snapshots' time: impressions see them (point in time)
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
    seen = {k for e in examples for k in e["features"]}
    assert {"pop", "trend", "covis", "mf", "i:brand", "i:tags"} <= seen
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


def test_array_static_terms_follow_item_table_versions_within_1e_9(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the array path (``ItemRows`` slots) the static item terms come from each item
    table version's feature matrix (one product per ranker and table version) and the
    category codes, not from per-item feature dicts: after a new table version changes
    every item's profile and one item's category, the scores still equal River's on the
    full dicts within 1e-9, and only the item whose catalog attribute overrides a
    profile feature was summed through its dict. The catalog's own category overrides
    the table's."""
    from models.features import SERVING_POSITION, ranking_features_many
    from operators.linear_scorer import ColumnScorer, column_scorer, linear_scorer

    rng = random.Random(11)

    def profiles(scale: float) -> dict[str, dict[str, float]]:
        out = {item: {"i.clicks": scale * rng.uniform(0, 50), "i.ctr": rng.uniform(-1, 1)}
               for item in ITEMS[:35]}  # a35.. have no profile
        for item in ITEMS[:10]:
            out[item]["i:mood"] = rng.uniform(0, 5)
        out[ITEMS[1]]["i.ctr"] = float("nan")  # no value
        return out

    world.publish_tables(features=profiles(1.0))
    world.publish_index()
    trainer = Trainer(RankerConfig(kind="lr", delay_to_labels=False, sync_interval_ms=10**12,
                                   sync_every_examples=10**9, metrics_every_examples=10**9),
                      1.0, world.store)
    examples = []
    for n in range(2000):
        clicks, ctr, mood = rng.uniform(0, 150), rng.uniform(-1, 1), rng.uniform(0, 5)
        category, brand = rng.choice(["c0", "c1", "c2", "c3"]), rng.choice(["b0", "b1"])
        label = int(rng.random() < 0.1 + 0.002 * clicks + 0.2 * ctr + 0.05 * mood
                    + 0.2 * (category == "c0") + 0.1 * (brand == "b1"))
        examples.append({
            "example_id": f"e{n}", "ts": T0 - DAY + n, "user_id": f"t{n % 7}",
            "item_id": rng.choice(ITEMS), "label": label, "weight": 1.0, "position": 0,
            "context": {}, "features": {"i.clicks": clicks, "i.ctr": ctr, "i:mood": mood,
                                        "i:category": category, "i:brand": brand}})
    trainer.process(examples)
    trainer.sync()
    shard = world.user_shard()
    override = ITEMS[2]  # its catalog attribute "mood" overrides the profile's "i:mood"
    feed(shard, [Item(T0 - 2 * DAY, item, {"brand": f"b{i % 2}"}) for i, item in enumerate(ITEMS)]
         + [Item(T0 - 2 * DAY, override, {"brand": "b1", "mood": 0.5}),
            Item(T0 - 2 * DAY, ITEMS[3], {"category": "c0"})]  # the catalog's category wins
         + [click("u", SEED, T0 - 10_000)])
    server, context = shard.server, shard.context
    assert server is not None
    summed: list[str] = []
    exact_term = ColumnScorer._static_term

    def counted(self: ColumnScorer, item: str, *args: Any) -> Any:
        summed.append(item)
        return exact_term(self, item, *args)

    monkeypatch.setattr(ColumnScorer, "_static_term", counted)

    def compare(ts: int) -> np.ndarray:
        feed(shard, [Request(ts, f"poll{ts}", "nobody", 10)])  # loads the new snapshots
        ranker = server.views.ranker.current
        scorer = linear_scorer(ranker)
        assert scorer is not None
        items = ITEMS + ["unknown"]
        ctx = context.user("u", ts)
        covis = server.covis_channels(ctx, ts, 100)[1]
        space = server._space()
        cols = context.item_columns(ctx, items, ts, covis, rows=space.rows(items), space=space)
        assert cols.space is space
        fast = column_scorer(scorer).predict("u", ts, {}, SERVING_POSITION, ctx.profile, cols)
        extras = context.item_features(ctx, items, ts, covis)
        river = ranker.predict_many(ranking_features_many(
            "u", items, ts, {}, SERVING_POSITION, ctx.profile, extras))
        assert fast is not None
        np.testing.assert_allclose(fast, river, rtol=0, atol=1e-9)
        assert np.ptp(river) > 1e-3
        return fast

    first = compare(T0)
    assert set(summed) == {override}
    summed.clear()
    world.publish_tables(T0 + 1_000, features=profiles(3.0), **{ITEMS[4]: {"category": "c0"}})
    second = compare(T0 + 2_000)
    assert set(summed) == {override}, "only the overriding item is summed through its dict"
    assert np.abs(second - first)[:35].min() > 0, "every profiled item's score changed"
