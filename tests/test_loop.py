"""The closed loop without Docker: the flow (Kafka in and out) beside `streamrec loop`'s
simulated users, against the local broker; the served items' click rate must rise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.config import load_config
from flows.loop import ClosedLoop, LoopSettings, run_loop

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "docker" / "streamrec.toml"


def test_closed_loop_logic_without_kafka() -> None:
    loop = ClosedLoop(LoopSettings(seed=1, n_users=50, n_items=40, warmup_events=500, window=2))
    warm = loop.warmup()
    assert len(warm) == 500 and {"item", "request", "impression"} <= {e["type"] for e in warm}
    requests = loop.requests(3)
    assert [e["type"] for e in requests] == ["request"] * 3
    assert [e["ts"] for e in requests] == [warm[-1]["ts"] + 1000 * i for i in (1, 2, 3)]
    # Not our request (e.g. one of the warm-up's): ignored.
    assert loop.respond({"request_id": "r1-0", "items": [{"item_id": "i1"}]}) == []
    shown = loop.respond({"request_id": requests[0]["request_id"],
                          "items": [{"item_id": f"i{n}"} for n in range(10)] + [{"item_id": "x"}]})
    impressions = [e for e in shown if e["type"] == "impression"]
    assert [e["item_id"] for e in impressions] == [f"i{n}" for n in range(10)]
    assert all(e["user_id"] == requests[0]["user_id"] for e in impressions)
    assert all(e["impression_id"].startswith(loop.run_id) for e in impressions)
    loop.respond({"request_id": requests[1]["request_id"], "items": []})
    [window] = loop.finished_windows()
    assert window["requests"] == 2 and window["empty"] == 1 and window["impressions"] == 10
    assert 0 < window["expected_ctr"] < 1
    loop.requests(2)
    assert len(loop.pending) == 3  # requests[2] and the two new ones
    assert loop.expire(60.0) == 0 and loop.expire(0.0) == 3 and not loop.pending
    assert loop.windows[-1].lost == 3
    later = loop.requests(10) + loop.drain()  # the clicks arrive after their impressions
    clicks = [e for e in later if e["type"] == "feedback"]
    assert all(e["ts"] > impressions[0]["ts"] for e in clicks)
    assert len([e for e in clicks if e["action"] == "click"]) == window["clicks"]


def test_the_world_moves_with_the_loop_clock() -> None:
    """Gradual drift and catalogue churn apply while the loop runs (the simulator's clock
    follows the loop's), deterministically for a seed."""
    world = {"drift_per_day": 24.0, "items_added_per_hour": 360.0,
             "items_retired_per_hour": 360.0}

    def run() -> tuple[list[float], list[dict], list[float]]:
        loop = ClosedLoop(LoopSettings(seed=3, n_users=50, n_items=40, warmup_events=300,
                                       world=world))
        loop.run_id = "t"
        loop.warmup()
        pairs = [(f"u{u}", f"i{i}") for u in range(0, 50, 7) for i in range(0, 40, 9)]
        before = [loop.sim.click_probability(u, i, 0, loop.clock_ms) for u, i in pairs]
        events = loop.requests(600)  # ten minutes of event time
        after = [loop.sim.click_probability(u, i, 0, loop.clock_ms) for u, i in pairs]
        return before, events, after

    before, events, after = run()
    assert sum(abs(a - b) for a, b in zip(before, after, strict=True)) > 0.1 * sum(before)
    items = [e for e in events if e["type"] == "item"]
    assert any(e["available"] for e in items) and any(not e["available"] for e in items)
    ts = [e["ts"] for e in events]
    assert ts == sorted(ts)
    assert run() == (before, events, after)


@pytest.mark.kafka
@pytest.mark.slow
def test_closed_loop_click_rate_rises(kafka_broker, tmp_path) -> None:
    app = f"loop{os.getpid()}"
    env = {**os.environ, "STREAMREC__APP": app,
           "STREAMREC__KAFKA__BOOTSTRAP": kafka_broker.bootstrap,
           "STREAMREC__METRICS__PORT": "0",
           "STREAMREC__SNAPSHOTS__DIR": str(tmp_path / "snapshots")}
    flow = subprocess.Popen([sys.executable, "-m", "bytewax.run",
                             f"flows.recsys:build('{DEMO_CONFIG}')"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "flow.log").open("wb"))
    try:
        config = load_config(DEMO_CONFIG, environ=env)
        windows = run_loop(config, LoopSettings(seed=0, requests=3000, rate=50, window=500),
                           on_window=lambda w: print(w, flush=True))
    finally:
        flow.terminate()
        flow.wait(timeout=30)
    log = (tmp_path / "flow.log").read_text()
    assert len(windows) >= 5, (windows, log[-3000:])
    first, later = windows[0], windows[2:]
    assert first["impressions"] > 3000, first
    mean_ctr = sum(w["clicks"] for w in later) / sum(w["impressions"] for w in later)
    mean_expected = sum(w["expected_ctr"] for w in later) / len(later)
    print(f"first window ctr {first['ctr']} (expected {first['expected_ctr']}), "
          f"later windows ctr {mean_ctr:.4f} (expected {mean_expected:.4f})")
    # Measured: +31% (0.0467 -> 0.0612); a system that does not learn from the loop goes
    # down instead (-26% measured with a retrieval-only scorer), so 10% separates them.
    assert mean_expected > 1.10 * first["expected_ctr"], windows
    assert mean_ctr > first["ctr"], windows
    assert (tmp_path / "snapshots" / app).is_dir()
