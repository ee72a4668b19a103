"""The pool ranker (models/pool_ranker.py) and its place in serving (operators/serving.py)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from serving_world import SEED, T0, World, ask, click, feed, ids

from events.model import Feedback
from models.pool_ranker import PendingPools, PoolModel, PoolRanker, PoolRankerConfig

NAMES = ["blend", "long_liked", "pop"]  # synthetic: long_liked is the taste, pop noise


def synthetic_pools(seed: int, rounds: int, size: int = 40):
    """Pools where the blend only weakly predicts the next positive and a hidden
    'taste' column predicts it strongly: (user, items, x, target) per round."""
    rng = np.random.default_rng(seed)
    for n in range(rounds):
        x = rng.normal(size=(size, 3))
        x[:, 0] = np.sort(rng.random(size))[::-1]  # blend, best first
        logits = 0.5 * x[:, 0] + 2.5 * x[:, 1]
        p = np.exp(logits - logits.max())
        target = int(rng.choice(size, p=p / p.sum()))
        yield f"u{n % 50}", [f"i{n}-{j}" for j in range(size)], x, target


def hr_at_10(model: PoolModel, seed: int, rounds: int, learn: bool = True) -> tuple[float, float]:
    """HR@10 on the first and the last quarter of a prequential run (answer, then learn)."""
    hits = []
    for n, (user, items, x, target) in enumerate(synthetic_pools(seed, rounds)):
        p = model.serve(user, items, x, T0 + n)
        hits.append(target in np.argsort(-p, kind="stable")[:10])
        if learn:
            model.outcome(user, items[target], T0 + n + 1)
    q = rounds // 4
    return float(np.mean(hits[:q])), float(np.mean(hits[-q:]))


def config(**kw) -> PoolRankerConfig:
    """Per-shard training: these tests drive one model (the central trainer's tests are
    tests/test_pool_trainer.py)."""
    return PoolRankerConfig(**{"features": NAMES, "training": "shard", **kw})


def test_learning_from_next_positives_raises_hr_above_the_starting_blend_order() -> None:
    _, last = hr_at_10(PoolModel(config()), seed=1, rounds=2_000)
    _, frozen = hr_at_10(PoolModel(config()), seed=1, rounds=2_000, learn=False)
    # Without learning it stays the blend order; learning finds the taste column.
    assert last > frozen + 0.2
    model = PoolModel(config())
    hr_at_10(model, seed=1, rounds=2_000)
    w = model.ranker.weights()
    assert w["long_liked"] > 1.0 and abs(w["pop"]) < 0.5 * w["long_liked"]
    assert model.learned == model.outcomes == 2_000


def test_starts_as_the_blend_order() -> None:
    model = PoolModel(config())
    user, items, x, _ = next(synthetic_pools(3, 1))
    p = model.serve(user, items, x, T0)
    assert np.argsort(-p, kind="stable").tolist() == list(range(len(items)))


def test_state_is_equal_after_a_pickle_round_trip_and_learns_on_identically() -> None:
    model = PoolModel(config(max_pending=20))
    hr_at_10(model, seed=2, rounds=300)
    pools = list(synthetic_pools(4, 100))
    for n, (user, items, x, _) in enumerate(pools[:30]):
        model.serve(user, items, x, T0 + 10_000 + n)  # pending pools without outcomes
    copy = pickle.loads(pickle.dumps(model))
    assert np.array_equal(copy.ranker.w, model.ranker.w)
    assert np.array_equal(copy.ranker.g2, model.ranker.g2)
    assert np.array_equal(copy.ranker.var, model.ranker.var)
    assert list(copy.pending.pools) == list(model.pending.pools)
    for a, b in zip(copy.pending.pools.values(), model.pending.pools.values(), strict=True):
        assert a.items == b.items and np.array_equal(a.x, b.x) and a.ts == b.ts
    for m in (model, copy):
        for n, (user, items, x, target) in enumerate(pools[30:]):
            m.serve(user, items, x, T0 + 20_000 + n)
            m.outcome(user, items[target], T0 + 20_000 + n)
    assert np.array_equal(copy.ranker.w, model.ranker.w)
    assert copy.counters() == model.counters()


def test_pending_pools_are_bounded_expire_and_learn_each_target_once() -> None:
    pending = PendingPools(capacity=3, ttl_ms=1_000)
    x = np.arange(12, dtype=float).reshape(4, 3)
    for n in range(5):
        pending.put(f"u{n}", ["a", "b", "c", "d"], x, T0)
    assert list(pending.pools) == ["u2", "u3", "u4"] and pending.dropped_full == 2
    pending.put("u2", ["a", "b", "c", "d"], x, T0)  # one pool per user, now the newest
    assert list(pending.pools) == ["u3", "u4", "u2"] and len(pending) == 3
    taken = pending.take("u3", "b", T0 + 10)
    assert taken is not None and taken[1] == 1 and np.array_equal(taken[0], x)
    assert pending.take("u3", "b", T0 + 11) is None  # the same click twice teaches once
    again = pending.take("u3", "d", T0 + 12)  # a second click: among the rest
    assert again is not None and again[1] == 2 and np.array_equal(again[0], x[[0, 2, 3]])
    assert pending.take("u4", "a", T0 + 1_001) is None  # stale
    assert "u4" not in pending.pools and pending.dropped_stale == 1
    assert pending.take("u2", "zz", T0) is None and "u2" in pending.pools


def test_serving_learns_on_the_user_shard_and_serves_the_pool_order(tmp_path: Path) -> None:
    """With ``training = "shard"`` the pool ranker orders and each user's next positive
    in the served pool teaches the shard's own model; its scores are P(c | pool)."""
    world = World(tmp_path)
    world.publish_all()
    shard = world.user_shard(scorer="pool", pool=PoolRankerConfig(training="shard"))
    feed(shard, [click("c0", SEED, T0 - 10)])
    first = ask(shard, "c0", ts=T0)
    assert ids(first)[0] == "a31"  # the blend's order (a30 -> a31 strongest)
    assert sum(i["score"] for i in first["items"]) <= 1.0 + 1e-6
    assert shard.server.served_by == {"ranker": 0, "retrieval": 0, "pool": 1}
    assert "c0" in shard.server.pool.pending.pools
    feed(shard, [click("c0", ids(first)[5], T0 + 1)])
    counters = shard.counters()
    assert counters["pool_learned"] == 1 and counters["served_by_pool"] == 1
    assert shard.server.pool.ranker.updates == 1
    restored = pickle.loads(pickle.dumps(shard))
    assert np.array_equal(restored.server.pool.ranker.w, shard.server.pool.ranker.w)


def test_retrieval_scorer_leaves_the_pool_ranker_out(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.publish_all()
    shard = world.user_shard(scorer="retrieval")
    feed(shard, [click("c0", SEED, T0 - 10)])
    ask(shard, "c0", ts=T0)
    assert shard.server.served_by == {"ranker": 0, "retrieval": 1, "pool": 0}
    assert not shard.server.pool.pending.pools


def test_unknown_feature_is_refused() -> None:
    with pytest.raises(ValueError, match="features: unknown"):
        PoolModel(PoolRankerConfig(features=["blend", "nope"]))


@pytest.mark.parametrize("before", [True, False])
def test_before_the_first_ranker_copy(tmp_path: Path, before: bool) -> None:
    """``auto`` with no LR copy yet: the pool ranker orders (``serve_before_ranker``) or
    the blend does; the pool ranker learns from the request either way."""
    world = World(tmp_path)
    world.publish_tables()
    world.publish_index()
    shard = world.user_shard(scorer="auto", scorer_min_outcomes=1,
                             pool=PoolRankerConfig(serve_before_ranker=before))
    feed(shard, [click("c0", SEED, T0 - 10)])
    record = ask(shard, "c0", ts=T0)
    assert ids(record)[0] == "a31"
    served = "pool" if before else "retrieval"
    assert shard.server.served_by == {"ranker": 0, "retrieval": 0, "pool": 0, served: 1}
    assert (sum(i["score"] for i in record["items"]) <= 1.0 + 1e-6) == before
    assert "c0" in shard.server.pool.pending.pools


def test_pool_ranker_scores_only_requests_it_could_serve_or_be_judged_on(tmp_path: Path) -> None:
    """Under ``auto`` the pool ranker computes its features and remembers a pool only when
    it could order the request or be judged on it: not before the first LR copy (the
    blend serves, nothing to judge), on every request while the duel is undecided (the
    lists are interleaved), only on the shadow sample once the LR ranker won the clicks
    (also after the shard saw ``scorer_min_outcomes`` organic positives), and on every
    request again once the organic positives favour it (the duel may hand it whole
    lists)."""
    from events.model import Impression

    world = World(tmp_path)
    world.publish_tables()
    world.publish_index()
    shard = world.user_shard(scorer="auto", scorer_min_outcomes=2, scorer_shadow_rate=0.0)
    pools = shard.server.pool.pending.pools
    ask(shard, "c0", ts=T0)
    assert not pools  # no LR copy: the blend serves
    world.publish_ranker()
    for n in range(2):  # undecided: interleaved, the pool ranker scores; clicks judge
        user, ts = f"u{n}", T0 + 10 * n
        record = ask(shard, user, ts=ts)
        assert user in pools
        teams = shard.server.duel.teams[user]
        pick = next(i for i in ids(record) if teams[i] == 1)  # the LR ranker's pick
        feed(shard, [Impression(ts + 1, f"imp{n}", user, pick, position=0),
                     Feedback(ts + 2, user, pick, "click", impression_id=f"imp{n}")])
    ask(shard, "c1", ts=T0 + 50)
    assert shard.server.served_by["ranker"] == 1 and "c1" not in pools  # the LR won
    feed(shard, [click("c2", SEED, T0 + 60), click("c2", "a20", T0 + 61)])  # organic
    assert shard.server.organic_positives == 2
    ask(shard, "c2", ts=T0 + 70)
    assert "c2" not in pools and shard.server.served_by["ranker"] == 2  # still the LR's
    shard.server.duel.record("c3", ["miss"], ["hit"])
    shard.server.outcome("c3", "hit")  # an organic positive for the challenger's list
    assert shard.server.duel.choice("auto") == "retrieval"
    ask(shard, "c4", ts=T0 + 80)
    assert "c4" in pools


def test_rank_features_are_the_pool_relative_order_of_each_column() -> None:
    ranker = PoolRanker(NAMES, ranks=True)
    x = np.array([[0.9, 5.0, 1.0], [0.5, 7.0, 1.0], [0.1, 6.0, 3.0]])
    z = ranker.expand(x)
    assert np.array_equal(z[:, :3], x)
    # 0 for the pool's largest value; ties in row order.
    assert np.allclose(z[:, 3:] * 3, [[0, 2, 1], [1, 0, 2], [2, 1, 0]])
    # Starting weights: the blend order, whatever the ranks.
    assert np.argsort(-ranker.probabilities(x), kind="stable").tolist() == [0, 1, 2]
    assert set(ranker.weights()) == {*NAMES, *(f"rank:{n}" for n in NAMES)}


def test_rank_features_learn_what_one_global_scale_cannot() -> None:
    """The target is the pool's best on a column whose level varies wildly from pool to
    pool (a per-user scale): its rank finds it, its raw value much less."""
    rng = np.random.default_rng(0)

    def hr(ranks: bool) -> float:
        model = PoolModel(config(rank_features=ranks))
        hits = []
        for n in range(1_500):
            x = rng.normal(size=(30, 3))
            x[:, 0] = np.sort(rng.random(30))[::-1]
            x[:, 1] = np.exp(rng.normal(0, 3)) * rng.random(30)  # scale differs per pool
            target = int(np.argmax(x[:, 1])) if rng.random() < 0.5 else int(rng.integers(30))
            items = [f"i{n}-{j}" for j in range(30)]
            p = model.serve("u", items, x, T0 + n)
            hits.append(target in np.argsort(-p, kind="stable")[:3])
            model.outcome("u", items[target], T0 + n)
        return float(np.mean(hits[-500:]))

    assert hr(True) > hr(False) + 0.1


@pytest.mark.parametrize("ranks", [False, True])
def test_observe_learn_is_observe_then_learn_bit_for_bit(ranks: bool) -> None:
    # The central trainer's step per pair expands the pool once for both halves.
    one, two = PoolRanker(NAMES, 0.1, ranks=ranks), PoolRanker(NAMES, 0.1, ranks=ranks)
    for _, _, x, target in synthetic_pools(3, 200, size=30):
        x = x.astype(np.float32)
        one.observe(x)
        one.learn(x, target)
        two.observe_learn(x, target)
    small = np.ones((1, 3), np.float32)  # a pool of one row: learned, not observed
    one.observe(small)
    one.learn(small, 0)
    two.observe_learn(small, 0)
    for name in ("w", "g2", "mean", "var"):
        assert getattr(one, name).tobytes() == getattr(two, name).tobytes()
    assert (one.pools, one.updates) == (two.pools, two.updates)
