"""Tests of the seeded synthetic event simulator (events/simulator.py)."""

from __future__ import annotations

import gzip
import math
import pickle
from collections import Counter
from typing import Any

import orjson
import pytest

from events.simulator import DEFAULT_START_TS_MS, SimConfig, Simulator, write_log

N = 20_000

# Required fields (name -> accepted types) per event type, docs/events.md.
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "impression": {"ts": (int,), "impression_id": (str,), "user_id": (str,), "item_id": (str,),
                   "request_id": (str,), "position": (int,), "context": (dict,)},
    "feedback": {"ts": (int,), "user_id": (str,), "item_id": (str,), "action": (str,),
                 "value": (float,)},
    "request": {"ts": (int,), "request_id": (str,), "user_id": (str,), "k": (int,),
                "context": (dict,)},
    "item": {"ts": (int,), "item_id": (str,), "attrs": (dict,), "available": (bool,)},
    "user": {"ts": (int,), "user_id": (str,), "attrs": (dict,)},
}

CHURN = SimConfig(n_items=60, items_added_per_hour=3600.0, items_retired_per_hour=3600.0)


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    return Simulator(seed=7, max_events=N).next_batch(N)


def _ctr_with_horizon(sim: Simulator, n_imp_events: int) -> tuple[int, int, dict[int, list[int]]]:
    """Impressions in the first ``n_imp_events`` events and their clicks (followed until
    every click delay has surely passed). Returns (impressions, clicks, per-position)."""
    first = sim.next_batch(n_imp_events)
    imps = {e["impression_id"]: e for e in first if e["type"] == "impression"}
    horizon = max(e["ts"] for e in imps.values()) + 120_000
    clicked: set[str] = set()
    batch = first
    while batch:
        for e in batch:
            if e["type"] == "feedback" and e["action"] == "click" and e.get("impression_id") in imps:
                clicked.add(e["impression_id"])
        if batch[-1]["ts"] > horizon:
            break
        batch = sim.next_batch(5000)
    per_pos: dict[int, list[int]] = {}
    for iid, e in imps.items():
        c = per_pos.setdefault(e["position"], [0, 0])
        c[0] += 1
        c[1] += iid in clicked
    return len(imps), len(clicked), per_pos


def test_same_seed_identical_different_seed_differs() -> None:
    a = Simulator(seed=1).next_batch(3000)
    b = Simulator(seed=1).next_batch(3000)
    c = Simulator(seed=2).next_batch(3000)
    assert a == b
    assert a != c
    # Different seeds also give different requests, not only different IDs.
    users_a = [e["user_id"] for e in a if e["type"] == "request"]
    users_c = [e["user_id"] for e in c if e["type"] == "request"]
    assert users_a != users_c


def test_batch_sizes_do_not_change_the_stream() -> None:
    ref = Simulator(seed=3).next_batch(5000)
    sim = Simulator(seed=3)
    got: list[dict[str, Any]] = []
    for n in (1, 7, 500, 1, 2491, 2000):
        got.extend(sim.next_batch(n))
    assert got == ref
    it = iter(Simulator(seed=3))
    assert [next(it) for _ in range(5000)] == ref


@pytest.mark.parametrize("at", [1, 4_999, 5_000, 12_345])
def test_snapshot_restore_continues_identically(at: int) -> None:
    cfg = SimConfig(drift_per_day=50.0, drift_step_s=5.0, items_added_per_hour=900.0,
                    items_retired_per_hour=900.0, drift_at=DEFAULT_START_TS_MS + 10_000)
    reference = Simulator(cfg, seed=11).next_batch(at + 2000)
    sim = Simulator(cfg, seed=11)
    head = sim.next_batch(at)
    state = sim.snapshot()
    blob = pickle.dumps(state)
    # The live simulator (and a consumer mutating its events) must not affect the snapshot.
    for e in sim.next_batch(2000):
        e["ts"] = -1
    restored = Simulator.restore(pickle.loads(blob))
    assert head + restored.next_batch(2000) == reference
    # Restoring the same snapshot twice gives the same continuation.
    assert Simulator.restore(state).next_batch(2000) == reference[at:]


def test_snapshot_restore_during_iteration() -> None:
    reference = Simulator(seed=5).next_batch(6000)
    sim = Simulator(seed=5)
    it = iter(sim)
    head = [next(it) for _ in range(3333)]
    restored = Simulator.restore(sim.snapshot())
    it2 = iter(restored)
    mid = [next(it2) for _ in range(1000)]
    assert head + mid + restored.next_batch(1667) == reference


def test_snapshot_does_not_replay_history() -> None:
    sim = Simulator(seed=2)
    sim.next_batch(5_000)
    small = len(pickle.dumps(sim.snapshot()))
    sim.next_batch(100_000)
    big = len(pickle.dumps(sim.snapshot()))
    assert big < 1.5 * small + 50_000
    assert big < 1_000_000


def test_ts_non_decreasing_integer_ms(events: list[dict[str, Any]]) -> None:
    ts = [e["ts"] for e in events]
    assert all(type(t) is int for t in ts)
    assert all(a <= b for a, b in zip(ts, ts[1:], strict=False))
    assert ts[0] >= DEFAULT_START_TS_MS
    churn = Simulator(CHURN, seed=1).next_batch(N)
    ts = [e["ts"] for e in churn]
    assert all(a <= b for a, b in zip(ts, ts[1:], strict=False))


def test_every_type_with_required_fields(events: list[dict[str, Any]]) -> None:
    counts = Counter(e["type"] for e in events)
    assert set(counts) == set(SCHEMA), counts
    for e in events:
        for name, types in SCHEMA[e["type"]].items():
            assert name in e, (name, e)
            assert type(e[name]) in types, (name, e)
        assert e["ts"] >= DEFAULT_START_TS_MS
    fb = [e for e in events if e["type"] == "feedback"]
    actions = Counter(e["action"] for e in fb)
    assert {"click", "like", "dwell", "rating"} <= set(actions), actions
    organic = [e for e in fb if "impression_id" not in e]
    assert 0 < len(organic) < 0.2 * len(fb)
    assert all(type(e["impression_id"]) is str for e in fb if "impression_id" in e)
    for e in events:
        if e["type"] == "item":
            assert e["item_id"].startswith("i")
            assert e["attrs"]["category"].startswith("c")
            assert type(e["attrs"]["price"]) is float and e["attrs"]["price"] > 0
        elif e["type"] == "user":
            assert e["user_id"].startswith("u")
            assert set(e["attrs"]) == {"age_bucket", "country"}
        elif e["type"] == "request":
            assert e["k"] == 10 and e["request_id"].startswith("r")
        elif e["type"] == "impression":
            assert e["impression_id"].startswith("imp") and 0 <= e["position"] < 10
        elif e["action"] == "dwell":
            assert e["value"] >= 1.0
        elif e["action"] == "rating":
            assert 1.0 <= e["value"] <= 5.0
    # Events are JSON-serialisable as they are.
    assert orjson.loads(orjson.dumps(events[:100])) == events[:100]


def test_user_event_precedes_user_activity(events: list[dict[str, Any]]) -> None:
    # Many organic interactions: organic users must be announced before they act too.
    organic = Simulator(SimConfig(organic_per_request=0.5), seed=8).next_batch(N)
    announced: set[str] = set()
    for e in events + [{"type": "reset"}] + organic:
        if e["type"] == "reset":
            announced = set()
        elif e["type"] == "user":
            assert e["user_id"] not in announced, "user announced twice"
            announced.add(e["user_id"])
        elif e["type"] in ("request", "impression", "feedback"):
            assert e["user_id"] in announced, e


def test_requests_and_impressions_consistent(events: list[dict[str, Any]]) -> None:
    requests = {e["request_id"]: e for e in events if e["type"] == "request"}
    slates: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        if e["type"] == "impression":
            req = requests[e["request_id"]]
            assert req["user_id"] == e["user_id"] and req["ts"] <= e["ts"]
            slates.setdefault(e["request_id"], []).append(e)
    for rid, imps in slates.items():
        if len(imps) == 10:  # the last request may be cut by max_events
            assert [e["position"] for e in imps] == list(range(10))
            assert len({e["item_id"] for e in imps}) == 10, rid


@pytest.mark.parametrize("target", [0.015, 0.03, 0.045])
def test_global_click_rate_matches_target(target: float) -> None:
    sim = Simulator(SimConfig(target_ctr=target), seed=13)
    n_imp, n_click, _ = _ctr_with_horizon(sim, 40_000)
    ctr = n_click / n_imp
    assert 0.01 <= ctr <= 0.05
    assert abs(ctr - target) <= 0.3 * target, (ctr, target)


def test_position_bias() -> None:
    _, _, per_pos = _ctr_with_horizon(Simulator(seed=17), 60_000)
    ctr = {p: c / n for p, (n, c) in per_pos.items()}
    assert ctr[0] > ctr[9]
    assert ctr[0] > 2 * ctr[9]
    assert ctr[0] > ctr[5]


def test_feedback_refers_to_earlier_impression(events: list[dict[str, Any]]) -> None:
    seen: dict[str, dict[str, Any]] = {}
    checked = 0
    for e in events:
        if e["type"] == "impression":
            seen[e["impression_id"]] = e
        elif e["type"] == "feedback" and "impression_id" in e:
            imp = seen.get(e["impression_id"])
            assert imp is not None, e
            assert (imp["user_id"], imp["item_id"]) == (e["user_id"], e["item_id"])
            assert imp["ts"] < e["ts"]
            checked += 1
    assert checked > 100
    # like / purchase / dwell follow a click of the same impression.
    clicked: set[str] = set()
    for e in events:
        if e["type"] == "feedback" and "impression_id" in e:
            if e["action"] == "click":
                clicked.add(e["impression_id"])
            else:
                assert e["impression_id"] in clicked, e


def test_item_churn_announced_and_retired_never_shown() -> None:
    events = Simulator(CHURN, seed=19).next_batch(N)
    announced: set[str] = set()
    retired: set[str] = set()
    shown_after_retire = []
    for e in events:
        if e["type"] == "item":
            if e["available"]:
                announced.add(e["item_id"])
            else:
                assert e["item_id"] in announced
                retired.add(e["item_id"])
        elif e["type"] == "impression":
            assert e["item_id"] in announced, e
            if e["item_id"] in retired:
                shown_after_retire.append(e)
        elif e["type"] == "feedback" and "impression_id" not in e:
            assert e["item_id"] in announced and e["item_id"] not in retired
    assert len(retired) >= 5
    assert len(announced) >= 60 + 5  # new items appeared
    new_shown = {e["item_id"] for e in events if e["type"] == "impression"
                 and int(e["item_id"][1:]) >= 60}
    assert new_shown, "new items are never shown"
    assert shown_after_retire == []


def test_gradual_drift_changes_click_probabilities() -> None:
    pairs = [(f"u{u}", f"i{i}") for u in range(0, 200, 7) for i in range(0, 100, 9)]

    def probs(sim: Simulator) -> list[float]:
        return [sim.click_probability(u, i, 0, sim.now_ms) for u, i in pairs]

    for rate, expect_change in ((24.0, True), (0.0, False)):
        cfg = SimConfig(requests_per_s=1.0, drift_per_day=rate, items_added_per_hour=0.0,
                        items_retired_per_hour=0.0)
        sim = Simulator(cfg, seed=23)
        before = probs(sim)
        sim.next_batch(N)  # about half an hour of event time
        after = probs(sim)
        diff = sum(abs(a - b) for a, b in zip(before, after, strict=True)) / len(pairs)
        mean = sum(before) / len(pairs)
        if expect_change:
            assert diff > 0.2 * mean, (diff, mean)
        else:
            assert diff == 0.0


def test_abrupt_drift_at() -> None:
    at = DEFAULT_START_TS_MS + 20_000
    cfg = SimConfig(drift_at=at, drift_per_day=0.0)
    sim = Simulator(cfg, seed=29)
    pre = [sim.click_probability(f"u{u}", f"i{i}", 0, at - 1) for u in range(50) for i in range(50)]
    post = [sim.click_probability(f"u{u}", f"i{i}", 0, at) for u in range(50) for i in range(50)]
    assert sum(abs(a - b) for a, b in zip(pre, post, strict=True)) / len(pre) > 0.01
    events = sim.next_batch(80_000)
    assert events[-1]["ts"] > at + 90_000
    # The stream after drift_at follows the shifted tastes: the post-shift truth
    # explains the clicks after drift_at better than the pre-shift truth.
    clicks = {e["impression_id"] for e in events if e["type"] == "feedback"
              and e["action"] == "click" and "impression_id" in e}
    ll_pre = ll_post = 0.0
    last = events[-1]["ts"] - 40_000
    for e in events:
        if e["type"] == "impression" and at <= e["ts"] <= last:
            y = e["impression_id"] in clicks
            for ts, acc in ((at - 1, "pre"), (at, "post")):
                p = sim.click_probability(e["user_id"], e["item_id"], e["position"], ts)
                ll = math.log(p if y else 1.0 - p)
                if acc == "pre":
                    ll_pre += ll
                else:
                    ll_post += ll
    assert ll_post > ll_pre + 20, (ll_post, ll_pre)
    # Without drift_at the two regimes are the same.
    frozen = Simulator(SimConfig(drift_per_day=0.0), seed=29)
    assert frozen.click_probability("u1", "i2", 0, at - 1) == frozen.click_probability("u1", "i2", 0, at)


def test_hidden_truth_matches_observed_clicks() -> None:
    sim = Simulator(SimConfig(drift_per_day=0.0, items_added_per_hour=0.0,
                              items_retired_per_hour=0.0), seed=31)
    first = sim.next_batch(40_000)
    imps = [e for e in first if e["type"] == "impression"]
    expected = sum(sim.click_probability(e["user_id"], e["item_id"], e["position"], e["ts"])
                   for e in imps)
    observed = 0
    ids = {e["impression_id"] for e in imps}
    horizon = imps[-1]["ts"] + 120_000
    batch = first
    while batch and batch[0]["ts"] <= horizon:
        observed += sum(1 for e in batch if e["type"] == "feedback" and e["action"] == "click"
                        and e.get("impression_id") in ids)
        batch = sim.next_batch(5000)
    assert abs(observed - expected) < 4 * math.sqrt(expected), (observed, expected)


def test_max_events_exact() -> None:
    sim = Simulator(seed=37, max_events=12_345)
    got: list[dict[str, Any]] = []
    while batch := sim.next_batch(1000):
        got.extend(batch)
    assert len(got) == 12_345
    assert sim.next_batch(10) == []
    assert got == Simulator(seed=37).next_batch(12_345)  # prefix of the endless stream
    assert len(list(Simulator(seed=37, max_events=777))) == 777
    assert list(Simulator(seed=37, max_events=0)) == []
    restored = Simulator.restore(Simulator(seed=37, max_events=100).snapshot())
    assert len(restored.next_batch(1000)) == 100


def test_respond_closed_loop() -> None:
    sim = Simulator(seed=41)
    ref = Simulator(seed=41).next_batch(3000)
    head = sim.next_batch(1000)
    ts = sim.now_ms
    items = [f"i{i}" for i in range(10)]
    out = []
    for n in range(300):
        out.extend(sim.respond(f"u{n % 50}", items, ts + n, f"req-{n}"))
    assert head + sim.next_batch(2000) == ref  # respond does not change the stream
    imps = [e for e in out if e["type"] == "impression"]
    assert len(imps) == 3000
    assert [e["position"] for e in imps[:10]] == list(range(10))
    by_id = {e["impression_id"]: e for e in imps}
    fb = [e for e in out if e["type"] == "feedback"]
    assert fb, "no clicks at all in 3000 served impressions"
    for e in fb:
        imp = by_id[e["impression_id"]]
        assert (imp["user_id"], imp["item_id"]) == (e["user_id"], e["item_id"])
        assert e["ts"] > imp["ts"]
    assert all(e["impression_id"] not in {x.get("impression_id") for x in ref} for e in imps[:20])
    with pytest.raises(KeyError):
        sim.respond("u1", ["nope"], ts, "r")
    for bad_user, bad_item in (("u999999", "i1"), ("u01", "i1"), ("u1", "i01"), ("x1", "i1")):
        with pytest.raises(KeyError):
            sim.click_probability(bad_user, bad_item, 0, ts)


@pytest.mark.parametrize("name", ["log.jsonl", "log.jsonl.gz"])
def test_write_log(tmp_path: Any, name: str) -> None:
    path = tmp_path / name
    assert write_log(path, 2500, seed=43) == 2500
    if name.endswith(".gz"):
        with gzip.open(path) as fh:
            raw = fh.read()
    else:
        raw = path.read_bytes()
    lines = raw.splitlines()
    assert len(lines) == 2500
    assert [orjson.loads(x) for x in lines] == Simulator(seed=43).next_batch(2500)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        Simulator(SimConfig(target_ctr=0.0))
    with pytest.raises(ValueError):
        Simulator(SimConfig(n_items=5, k=10))
    with pytest.raises(ValueError):
        Simulator(max_events=-1)


def test_slot_truth_ranks_the_users_categories_and_gives_the_item_bias() -> None:
    """``slot_truth``: the favourite category ranks 0 (items there are the likeliest
    clicks), the bias is the item's own term of the click model."""
    sim = Simulator(SimConfig(n_users=40, n_items=200, drift_per_day=0.0, position_bias_eta=0.0),
                    seed=3)
    top_p: list[float] = []
    rest_p: list[float] = []
    for u in range(40):
        user = f"u{u}"
        truth = {f"i{i}": sim.slot_truth(user, f"i{i}", 0) for i in range(200)}
        assert min(rank for rank, _ in truth.values()) == 0
        top = [sim.click_probability(user, i, 0, 0) for i, (r, _) in truth.items() if r == 0]
        rest = [sim.click_probability(user, i, 0, 0) for i, (r, _) in truth.items() if r >= 3]
        assert sum(top) / len(top) > sum(rest) / len(rest)
        top_p += top
        rest_p += rest
    assert sum(top_p) / len(top_p) > 3 * sum(rest_p) / len(rest_p)
    i = sim._item_index("i5")
    assert sim.slot_truth("u0", "i5", 0)[1] == pytest.approx(float(sim._item_bias(i)))
