"""The serving scorer duel: the ranker serves only after its top k beat the retrieval
blend's on the users' next positives."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving_world import FAVOURITE, SEED, T0, World, ask, click, feed, ids

from events.model import Feedback
from models.pool_ranker import PoolRankerConfig
from operators.point_in_time import PointInTime
from operators.scorer_duel import ScorerDuel
from operators.serving import Server, ServingConfig


def test_auto_keeps_the_ranker_until_evidence_then_follows_the_better_list() -> None:
    duel = ScorerDuel(window=100, min_outcomes=10)
    assert duel.choice("auto") == "ranker"
    assert duel.choice("ranker") == "ranker" and duel.choice("retrieval") == "retrieval"
    for n in range(9):  # the blend's list holds every next positive, the ranker's none
        duel.record(f"u{n}", ["miss"], ["hit"])
        duel.outcome(f"u{n}", "hit")
    assert duel.outcomes == 9 and duel.choice("auto") == "ranker"  # too few outcomes
    duel.record("u9", ["miss"], ["hit"])
    duel.outcome("u9", "hit")
    assert duel.choice("auto") == "retrieval"
    for n in range(40):  # then the ranker is right and the blend wrong: the choice follows
        duel.record(f"v{n}", ["hit"], ["miss"])
        duel.outcome(f"v{n}", "hit")
    assert duel.choice("auto") == "ranker"
    assert (duel.hits_ranker, duel.hits_retrieval, duel.outcomes) == (40, 10, 50)


def test_only_the_latest_request_and_first_positive_count() -> None:
    duel = ScorerDuel(max_users=2)
    duel.outcome("u", "x")  # no request: nothing to score
    duel.record("u", ["a"], ["b"])
    duel.record("u", ["x"], ["b"])  # replaces the older request
    duel.outcome("u", "x")
    duel.outcome("u", "x")  # a second positive after one request counts once
    assert (duel.outcomes, duel.hits_ranker, duel.hits_retrieval) == (1, 1, 0)
    for user in ("a", "b", "c"):
        duel.record(user, ["x"], ["x"])
    assert list(duel.pending) == ["b", "c"]  # bounded: the oldest user forgotten


def test_unknown_scorer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="serving.scorer"):
        Server(ServingConfig(scorer="best"), PointInTime(views=object(), item_shard_of=str))  # type: ignore[arg-type]


@pytest.mark.parametrize("pool", [True, False])
def test_user_shard_hands_over_to_the_blend_on_organic_evidence(tmp_path: Path, pool: bool) -> None:
    """Users keep rating an item the co-visitation blend ranks first and the ranker does
    not: ``auto`` serves the ranker until the evidence, then the pool ranker (which
    starts as the blend order), or the blend itself when the pool ranker is off. Clicks
    on served impressions are no evidence."""
    world = World(tmp_path)
    world.publish_all()
    shard = world.user_shard(scorer="auto", scorer_min_outcomes=5,
                             pool=PoolRankerConfig(enabled=pool))
    challenger = "pool" if pool else "retrieval"
    feed(shard, [click("c0", SEED, T0 - 10)])  # a30 -> a31 is the strongest co-visitation
    first = ask(shard, "c0", ts=T0)
    assert ids(first)[0] == FAVOURITE
    assert shard.server.served_by == {"ranker": 1, "retrieval": 0, "pool": 0}
    feed(shard, [Feedback(T0 + 1, "c0", "a31", "click", "imp-1")])  # a served impression
    assert shard.counters()["duel_outcomes"] == 0
    for n in range(1, 6):
        user = f"c{n}"
        feed(shard, [click(user, SEED, T0 + 10 * n)])
        ask(shard, user, ts=T0 + 10 * n + 1)
        feed(shard, [click(user, "a31", T0 + 10 * n + 2)])  # organic: no impression id
    counters = shard.counters()
    assert counters["duel_outcomes"] == 5 and counters["duel_hits_retrieval"] == 5
    assert counters["duel_hits_ranker"] < 5
    feed(shard, [click("c9", SEED, T0 + 99)])
    last = ask(shard, "c9", ts=T0 + 100)
    assert ids(last)[0] == "a31" and shard.server.served_by[challenger] == 1


def test_once_the_blend_leads_only_a_sample_is_shadow_scored(tmp_path: Path) -> None:
    """Under ``auto`` with the blend ahead, the ranker scores about
    ``scorer_shadow_rate`` of the requests (deterministic by request id); the other
    requests leave no stale lists in the duel; at rate 1 every request is scored."""
    world = World(tmp_path)
    world.publish_all()
    counts, shards = {}, {}
    for rate in (0.2, 1.0):
        shard = world.user_shard(scorer="auto", scorer_min_outcomes=1, scorer_shadow_rate=rate)
        duel = shard.server.duel
        duel.record("lead", ["miss"], ["hit"])
        shard.server.outcome("lead", "hit")  # an organic positive: the duel's outcome
        assert duel.choice("auto") == "retrieval"
        recorded = 0
        for n in range(300):
            ask(shard, f"v{n}", ts=T0 + n, request_id=f"req-{n}")
            recorded += f"v{n}" in duel.pending
        assert shard.server.served_by == {"ranker": 0, "retrieval": 0, "pool": 300}
        counts[rate], shards[rate] = recorded, shard
    assert 40 <= counts[0.2] <= 80 and counts[1.0] == 300
    duel = shards[0.2].server.duel
    unsampled = next(n for n in range(300) if f"v{n}" not in duel.pending)
    duel.record("w", ["a"], ["b"])  # an older request of w's
    ask(shards[0.2], "w", ts=T0 + 1_000, request_id=f"req-{unsampled}")
    assert "w" not in duel.pending  # its next positive is not matched to the old lists
