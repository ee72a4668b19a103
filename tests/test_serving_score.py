"""Serving, scoring: the vectorised ranker path against River.

The world and helpers: tests/serving_world.py.
"""

from __future__ import annotations

import random

import numpy as np
from serving_world import CATEGORY, DAY, ITEMS, SEED, T0, World, feed

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
