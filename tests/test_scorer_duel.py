"""The serving scorer duel: the ranker serves only after its top k beat the retrieval
blend's on the users' next positives."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_serving import FAVOURITE, T0, World, ask, click, feed, ids

from operators.scorer_duel import ScorerDuel
from operators.serving import Server, ServingConfig


def test_auto_waits_for_evidence_then_follows_the_better_list() -> None:
    duel = ScorerDuel(window=100, min_outcomes=10)
    assert duel.choice("auto") == "retrieval"
    assert duel.choice("ranker") == "ranker" and duel.choice("retrieval") == "retrieval"
    for n in range(9):  # the ranker's list holds every next positive, retrieval's none
        duel.record(f"u{n}", ["hit"], ["miss"])
        duel.outcome(f"u{n}", "hit")
    assert duel.outcomes == 9 and duel.choice("auto") == "retrieval"  # too few outcomes
    duel.record("u9", ["hit"], ["miss"])
    duel.outcome("u9", "hit")
    assert duel.choice("auto") == "ranker"
    for n in range(40):  # then retrieval is right and the ranker wrong: the choice follows
        duel.record(f"v{n}", ["miss"], ["hit"])
        duel.outcome(f"v{n}", "hit")
    assert duel.choice("auto") == "retrieval"
    assert (duel.hits_ranker, duel.hits_retrieval, duel.outcomes) == (10, 40, 50)


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
        Server(ServingConfig(scorer="best"), None, str)  # type: ignore[arg-type]


def test_user_shard_serves_retrieval_until_the_ranker_wins(tmp_path: Path) -> None:
    """Users keep consuming the ranker's favourite right after each request: the ranker's
    list held it, the co-visitation list did not, so ``auto`` hands over to the ranker."""
    world = World(tmp_path)
    world.publish_all()
    shard = world.user_shard(scorer="auto", scorer_min_outcomes=5)
    first = ask(shard, "c0", ts=T0)
    assert shard.server.served_by == {"ranker": 0, "retrieval": 1}
    feed(shard, [click("c0", FAVOURITE, T0 + 1)])
    for n in range(1, 6):
        ask(shard, f"c{n}", ts=T0 + 10 * n)
        feed(shard, [click(f"c{n}", FAVOURITE, T0 + 10 * n + 1)])
    counters = shard.counters()
    assert counters["duel_outcomes"] == 6 and counters["duel_hits_ranker"] == 6
    last = ask(shard, "c9", ts=T0 + 100)
    # c5 (after 5 outcomes) and c9 were served by the ranker
    assert ids(last)[0] == FAVOURITE and shard.server.served_by == {"ranker": 2, "retrieval": 5}
    assert ids(first)[0] != FAVOURITE  # the retrieval order served before
