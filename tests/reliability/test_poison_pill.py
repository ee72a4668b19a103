"""No poison pill (issue 19, point 1): no valid event can stop the flow.

* Time decay is total: every decayed count (item tables, co-visitation, popularity,
  profiles) is finite for any two ``ts`` the parser accepts (1970..2100); before,
  an event ~256 days older than the newest item table raised ``OverflowError``.
* An exception while a stateful stage applies one event turns that event into a
  ``processing_error`` dead letter (stage and exception text) and the flow goes on.

The flow test runs the real flow as a process with Bytewax recovery on a log whose
events are spread over the whole accepted range in random order, plus requests of one
user that a serving hook refuses: the run ends cleanly, a restart on the same recovery
directory ends cleanly too (no crash loop), and only the refused requests are dead
letters.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import orjson

from events.model import MAX_TS_MS, Feedback, Request, User
from flows.evaluate import read_jsonl
from operators.user_shard import UserShard
from state.covisitation import CoVisConfig, CoVisitation, decayed
from state.feature_spec import parse_features
from state.item_table import ItemTable
from state.join_state import JoinConfig
from state.popularity import PopularityCounter
from state.profiles import ProfileStore
from state.sampling import NegativeSampler

from .flow_process import FlowProcess, init_recovery, simulated_log
from .poison_hook import POISON_USER

EXTREMES = [0, 1, 86_400_000, 1_767_225_600_000, MAX_TS_MS - 1, MAX_TS_MS]


def _finite(x: float) -> bool:
    return math.isfinite(x) and x >= 0.0


def test_decay_is_finite_for_any_pair_of_accepted_times() -> None:
    covis = CoVisitation(CoVisConfig(half_life_ms=3_600_000))
    for then in EXTREMES:
        table = ItemTable("i000", then, covis)
        for now in EXTREMES:
            assert _finite(table.decay_factor("popular", now))
            assert _finite(table.decay_factor("trending", now))
            assert _finite(decayed(1.0, then, now, 3_600_000))
    for first in EXTREMES:
        c = CoVisitation(CoVisConfig(half_life_ms=3_600_000))
        pop = PopularityCounter(10, 3_600_000)
        for ts in random.Random(first).sample(EXTREMES, len(EXTREMES)):
            c.add([("a", "b", 1.0)], ts)
            pop.add("a", ts)
            table = ItemTable("i000", ts, c)
            for now in EXTREMES:
                assert _finite(table.covis_factor(now))
                assert all(_finite(v) for v in pop.scores(now).values())
                assert all(_finite(w) for _, w in c.neighbors("a", 5, now))
    store = ProfileStore(parse_features([{
        "name": "clicks", "entity": "user", "filter": {"type": "feedback"},
        "aggregate": "decay_sum", "half_life": "1h", "windows": ["1d", "all"]}]), "user")
    for ts in [MAX_TS_MS, 0, 1_767_225_600_000, 1]:
        store.apply(Feedback(ts, "u", "a", "click"))
        for at in (None, *EXTREMES):
            for name, value in store.query("u", at).items():
                assert _finite(value), (ts, at, name, value)


def test_a_failing_event_is_a_dead_letter_and_the_batch_goes_on(monkeypatch) -> None:
    shard = UserShard(JoinConfig(), NegativeSampler(1.0, 0))
    real = shard._remember_user

    def remember(user_id: str, attrs: dict) -> None:
        if user_id == POISON_USER:
            raise ValueError("cannot remember")
        real(user_id, attrs)

    monkeypatch.setattr(shard, "_remember_user", remember)
    ts = 1_767_225_600_000
    out = shard.process("u000", [User(ts, "a"), User(ts + 1, POISON_USER), User(ts + 2, "b"),
                                 Request(ts + 3, "r1", "a")])
    [dead] = out["dead-letters"]
    assert dead["reason"] == "processing_error" and dead["stage"] == "user_shard u000"
    assert dead["error"] == "ValueError: cannot remember"
    assert orjson.loads(dead["raw"]) == {"type": "user", "ts": ts + 1, "user_id": POISON_USER,
                                         "attrs": {}}
    assert list(shard.user_attrs) == ["a", "b"] and shard.requests == 1


def _spread_log(path: Path, n: int, seed: int) -> list[bytes]:
    """A simulated log whose events get ts drawn uniformly over 1970..2100, shuffled, plus
    requests of the poison user."""
    rng = random.Random(seed)
    events = [orjson.loads(line) for line in simulated_log(path, n, seed=seed)]
    for e in events:
        e["ts"] = rng.randrange(0, MAX_TS_MS + 1)
    events += [{"type": "request", "ts": rng.randrange(0, MAX_TS_MS + 1),
                "request_id": f"poison-{i}", "user_id": POISON_USER} for i in range(3)]
    rng.shuffle(events)
    lines = [orjson.dumps(e) for e in events]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return lines


def test_events_over_1970_to_2100_in_random_order_never_stop_the_flow(tmp_path) -> None:
    lines = _spread_log(tmp_path / "log.jsonl", 4_000, seed=11)
    out = tmp_path / "out"
    config = {
        "inputs": [{"kind": "replay", "path": str(tmp_path / "log.jsonl"), "batch_size": 100}],
        "output": {"dir": str(out)},
        "snapshots": {"dir": str(tmp_path / "store")},
        "shards": {"users": 3, "items": 2},
        "parse": {"min_ts_ms": 0, "max_future_skew_ms": MAX_TS_MS},
        "serving": {"poll_ms": 0,
                    "hooks": {"after_retrieval": "tests.reliability.poison_hook:refuse_poison"}},
        "ranker": {"sync_interval_ms": 30 * 86_400_000},
        "items": {"refresh_interval_ms": 30 * 86_400_000},
        "index": {"refresh_interval_ms": 30 * 86_400_000},
    }
    db = init_recovery(tmp_path / "recovery")
    for run in range(2):  # the second run resumes at the end: it must end cleanly too
        flow = FlowProcess(config, tmp_path / f"flow{run}.log", recovery=db).start()
        flow.wait(240)
        log = flow.tail(1_000_000)
        # the only tracebacks are those of the refused requests, logged as dead letters
        assert log.count("Traceback") == log.count("failed on an input") == (3 if run == 0 else 0)
    dead = read_jsonl(out / "dead-letters.jsonl")
    assert sorted(orjson.loads(d["raw"])["request_id"] for d in dead) == [
        "poison-0", "poison-1", "poison-2"]
    for d in dead:
        assert d["reason"] == "processing_error" and d["stage"].startswith("user_shard u")
        assert d["error"] == f"RuntimeError: hook refuses {POISON_USER}"
    summary = [m for m in read_jsonl(out / "metrics.jsonl") if m["kind"] == "summary"][-1]
    assert summary["events_in"] == len(lines) and summary["dead_letters"] == 0
    assert summary["processing_errors"] == {"user_shard": 3}
    recs = read_jsonl(out / "recommendations.jsonl")
    requests = sum(1 for line in lines if b'"type":"request"' in line)
    assert len(recs) == requests - 3 and len({r["request_id"] for r in recs}) == len(recs)
