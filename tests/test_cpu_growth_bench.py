"""bench/cpu_growth.py: per-window stage CPU of a live-sized replay."""

from __future__ import annotations

import gc
import sys

import orjson
from bench_module import load_bench

from operators.user_shard import UserShard


def test_replay_times_each_window_and_restores_the_stages() -> None:
    growth = load_bench("cpu_growth")
    common = load_bench("common")
    log = common.simulated_log(3_000, 0)
    process = UserShard.process
    thresholds, switch = gc.get_threshold(), sys.getswitchinterval()
    try:
        windows = growth.replay(log, 3_000, batch_size=70, window=1_000, freeze_at=1_000)
    finally:
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(switch)
        gc.unfreeze()
    assert UserShard.process is process  # the timing wrappers are removed
    assert [w["events"] for w in windows] == [1_000, 2_000, 3_000]
    with log.open("rb") as f:
        requests = sum(orjson.loads(line)["type"] == "request" for line in f if line.strip())
    assert sum(w["requests"] for w in windows) == requests > 0
    for w in windows:
        assert w["user"] > 0 and w["parse"] > 0
        assert w["serve"] <= w["request"] <= w["user"]  # nested stages: inclusive figures
