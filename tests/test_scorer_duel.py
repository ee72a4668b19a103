"""The serving scorer duel: the ranker serves only after its top k beat the retrieval
blend's on the users' next positives."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving_world import FAVOURITE, SEED, T0, World, ask, click, feed, ids

from events.model import Feedback
from models.pool_ranker import PoolRankerConfig
from operators.point_in_time import PointInTime
from operators.scorer_duel import CHALLENGER, RANKER, ScorerDuel, team_draft
from operators.serving import Server, ServingConfig


def test_auto_keeps_the_ranker_until_evidence_then_follows_the_better_list() -> None:
    duel = ScorerDuel(window=100, min_outcomes=10)
    assert duel.choice("auto") == "ranker" and duel.mode(False) == "interleave"  # undecided
    assert duel.choice("ranker") == "ranker" and duel.choice("retrieval") == "retrieval"
    for n in range(9):  # the blend's list holds every next positive, the ranker's none
        duel.record(f"u{n}", ["miss"], ["hit"])
        duel.outcome(f"u{n}", "hit")
    assert duel.outcomes == 9 and duel.choice("auto") == "ranker"  # too few outcomes
    duel.record("u9", ["miss"], ["hit"])
    duel.outcome("u9", "hit")
    assert duel.choice("auto") == "retrieval" and duel.mode(False) == "retrieval"
    for n in range(40):  # then the ranker is right and the blend wrong: the choice follows
        duel.record(f"v{n}", ["hit"], ["miss"])
        duel.outcome(f"v{n}", "hit")
    assert duel.choice("auto") == "ranker" and duel.mode(False) == "ranker"
    assert (duel.hits_ranker, duel.hits_retrieval, duel.outcomes) == (40, 10, 50)


def test_team_draft_interleaving_is_fair_complete_and_seeded() -> None:
    """Each team adds its best item not yet taken; the team with fewer picks goes first,
    a coin decides ties: both teams fill half of k, no item twice, and over many
    requests each team takes the top slot about half of the time."""
    ranker, other = [f"r{n}" for n in range(10)], [f"o{n}" for n in range(10)]
    items, teams = team_draft(ranker, other, 10, seed=1)
    assert len(items) == 10 and teams.count(RANKER) == teams.count(CHALLENGER) == 5
    assert [i for i, t in zip(items, teams, strict=True) if t == RANKER] == ranker[:5]
    assert (items, teams) == team_draft(ranker, other, 10, seed=1)  # deterministic
    first = sum(team_draft(ranker, other, 10, seed=s)[1][0] == RANKER for s in range(400))
    assert 150 < first < 250
    shared = ["a", "b", "c", "d"]
    items, teams = team_draft(shared, ["b", "a", "e", "f"], 4, seed=3)
    assert len(set(items)) == 4 and set(items) <= {"a", "b", "c", "d", "e", "f"}
    assert team_draft(["a"], ["a"], 10, seed=0)[0] == ["a"]  # both lists exhausted


def test_clicks_on_interleaved_lists_judge_but_never_hand_over_alone() -> None:
    """A click on an interleaved list credits the team that picked the item (once per
    item); clicks elsewhere judge nothing. Clicks for the challenger keep the lists
    interleaved (the ranker must win them back); a clear lead of the ranker's (one
    standard deviation) lets it serve alone, with the shadow sample still interleaved."""
    duel = ScorerDuel(window=100, min_outcomes=4)
    assert not duel.click("u", "x")  # no interleaved list
    duel.record_teams("u", ["x", "y"], [CHALLENGER, RANKER])
    assert duel.click("u", "x") and not duel.click("u", "x")  # a like after the click
    assert not duel.click("u", "z")  # not in the list
    for n in range(3):
        duel.record_teams(f"v{n}", ["x", "y"], [CHALLENGER, RANKER])
        duel.click(f"v{n}", "x")
    assert duel.decided and duel.clicks == 4 and duel.click_wins_challenger == 4
    assert duel.outcomes == duel.hits_retrieval == 0  # organic counts apart
    assert duel.choice("auto") == "ranker"  # clicks never make the challenger serve alone
    assert duel.mode(False) == "interleave"
    for n in range(10):
        duel.record_teams(f"w{n}", ["x", "y"], [CHALLENGER, RANKER])
        duel.click(f"w{n}", "y")
        if n == 5:  # 6 to 4: a lead within one standard deviation (sqrt 10) is no win
            assert duel.mode(False) == "interleave"
    assert duel.mode(False) == "ranker" and duel.mode(True) == "interleave"  # 10 to 4
    assert duel.decayed == [0.0, 0.0, 0.0]  # organic evidence apart
    duel.forget("w9")
    duel.record_teams("w9", ["x"], [RANKER])
    duel.forget("w9")
    assert not duel.click("w9", "x")


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


def test_recorded_lists_are_untracked_and_older_frozensets_still_match() -> None:
    """A recorded request's two top lists are tuples the collector untracks (kept for up
    to ``max_users`` users); recovery state of an earlier version (frozensets) scores an
    outcome alike."""
    import gc
    import pickle

    duel = ScorerDuel()
    duel.record("u", ["a", "b"], ["b", "c"])
    gc.collect()
    gc.collect()  # a tuple holding a new tuple: untracked one collection later
    assert not gc.is_tracked(duel.pending["u"])
    old = pickle.loads(pickle.dumps(duel))
    old.pending["u"] = (frozenset(["a", "b"]), frozenset(["b", "c"]))
    for d in (duel, old):
        d.outcome("u", "c")
    assert (duel.outcomes, duel.hits_ranker, duel.hits_retrieval) == (1, 0, 1)
    assert (old.outcomes, old.hits_ranker, old.hits_retrieval) == (1, 0, 1)


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
    # Undecided: the ranker's favourite and the challenger's best share the list.
    assert {FAVOURITE, "a31"} <= set(ids(first))
    assert shard.server.served_by == {"ranker": 0, "retrieval": 0, "pool": 0}
    assert shard.counters()["served_interleaved"] == 1
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


def test_once_the_lr_ranker_won_only_a_sample_is_shadow_scored_by_the_pool_ranker(
        tmp_path: Path) -> None:
    """Under ``auto`` with the LR ranker ahead on organic positives and on clicks of
    interleaved lists (the shard past ``scorer_min_outcomes`` organic positives), the pool
    ranker scores, and remembers the pool of, about ``scorer_shadow_rate`` of the
    requests (deterministic by request id: the same requests at any run); those are
    interleaved and recorded for the duel, the LR ranker serves the others alone and
    they leave no lists in the duel; at rate 1 every request is scored by both. Without
    any click (a rating log) the pool ranker still scores every request: its lists are
    all organic positives can bring it back by."""
    world = World(tmp_path)
    world.publish_all()
    sampled: dict[tuple[float, bool], set[int]] = {}
    for rate, clicks in ((0.2, True), (0.2, True), (1.0, True), (0.2, False)):
        shard = world.user_shard(scorer="auto", scorer_min_outcomes=1, scorer_shadow_rate=rate)
        server = shard.server
        server.duel.record("lead", ["hit"], ["miss"])
        server.outcome("lead", "hit")  # an organic positive for the LR ranker's list
        if clicks:
            server.duel.record_teams("lead", ["x"], [1])
            assert server.duel.click("lead", "x")  # a click on the LR ranker's pick
        assert server.duel.choice("auto") == "ranker" and server.duel.ranker_won_clicks()
        pools = server.pool.pending.pools
        scored = set()
        for n in range(300):
            ask(shard, f"v{n}", ts=T0 + n, request_id=f"req-{n}")
            if f"v{n}" in pools:
                scored.add(n)
                assert f"v{n}" in server.duel.pending  # both lists recorded
            else:
                assert f"v{n}" not in server.duel.pending
        interleaved = len(scored) if clicks else 0
        assert server.interleaved == interleaved
        assert server.served_by == {"ranker": 300 - interleaved, "retrieval": 0, "pool": 0}
        if (rate, clicks) in sampled:
            assert scored == sampled[rate, clicks]  # by request id
        sampled[rate, clicks] = scored
    assert 40 <= len(sampled[0.2, True]) <= 80
    assert len(sampled[1.0, True]) == len(sampled[0.2, False]) == 300


def _impression_click(user: str, item: str, ts: int) -> list:
    from events.model import Impression

    return [Impression(ts, f"imp-{user}-{item}-{ts}", user, item, position=0),
            Feedback(ts + 1, user, item, "click", impression_id=f"imp-{user}-{item}-{ts}")]


@pytest.mark.parametrize("winner", ["ranker", "challenger"])
def test_a_ranker_serves_alone_only_after_it_won_interleaved_clicks(tmp_path: Path,
                                                                    winner: str) -> None:
    """A new ranker copy does not take whole lists: its top k is interleaved with the
    pool ranker's until clicks on those lists judge. Users who click the ranker's picks
    let it serve alone; users who click the challenger's keep the lists interleaved."""
    world = World(tmp_path)
    world.publish_all()
    shard = world.user_shard(scorer="auto", scorer_min_outcomes=4, scorer_shadow_rate=0.0)
    duel = shard.server.duel
    for n in range(4):
        user, ts = f"c{n}", T0 + 100 * n
        feed(shard, [click(user, SEED, ts)])  # organic: seeds the co-visitation of a31
        record = ask(shard, user, ts=ts + 1)
        teams = duel.teams[user]
        assert set(teams.values()) == {1, 2} and len(record["items"]) == 10
        pick = next(i for i in ids(record) if teams[i] == (1 if winner == "ranker" else 2))
        feed(shard, _impression_click(user, pick, ts + 2))
    counters = shard.counters()
    assert counters["duel_clicks"] == 4 and counters["served_interleaved"] == 4
    assert shard.server.served_by == {"ranker": 0, "retrieval": 0, "pool": 0}
    ask(shard, "c9", ts=T0 + 1_000)
    if winner == "ranker":
        assert shard.server.served_by["ranker"] == 1
        assert shard.counters()["served_interleaved"] == 4
    else:
        assert shard.server.served_by == {"ranker": 0, "retrieval": 0, "pool": 0}
        assert shard.counters()["served_interleaved"] == 5
