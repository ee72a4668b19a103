"""bench/latency.py: the co-partitioned events topic puts each user's events in the
partition read by the worker that runs the user's shard."""

from __future__ import annotations

from typing import Any

import pytest
from bench_module import load_bench

from flows.config import load_config
from operators.placement import worker_of
from operators.user_shard import shard_key
from state.hashing import ShardOf


def _bench() -> Any:
    return load_bench("latency")


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_co_partition_sends_a_user_to_the_partition_of_its_shard_s_worker(workers: int) -> None:
    partition_of = _bench().co_partition_of(workers)
    shard_of = ShardOf(load_config(None).shards.users)
    users = [f"u{i}" for i in range(500)] + list(range(50))
    # Bytewax runs partition p of a source on worker p (round robin in name order) and
    # user shard j on worker j mod W (operators.placement): the same worker
    assert all(partition_of(u) == worker_of(shard_key(shard_of(str(u))), workers)
               for u in users)
    assert set(map(partition_of, users)) == set(range(workers))


def test_by_window_splits_the_live_phase_by_send_time() -> None:
    """``by_window``: each request in the window of its send time (from the first send),
    unanswered ones left out, and each process group's CPU per wall second over each
    window, the last one closed by the end mark."""
    sent = {"a": 100.0, "b": 105.0, "c": 112.0, "lost": 113.0}
    received = {"a": (100.05, 3.0), "b": (105.25, 5.0), "c": (112.1, 4.0)}
    marks = [(0.0, {"flow": 1.0, "broker": 0.0}), (10.0, {"flow": 8.0, "broker": 1.0}),
             (16.0, {"flow": 12.5, "broker": 4.0})]
    rows = _bench().by_window(sent, received, marks)
    assert [r["from_s"] for r in rows] == [0, 10]
    assert rows[0]["rt_p50_ms"] == 150.0 and rows[0]["inflow_p99_ms"] == 5.0
    assert rows[1] == {"from_s": 10, "rt_p50_ms": 100.0, "rt_p99_ms": 100.0,
                       "inflow_p50_ms": 4.0, "inflow_p99_ms": 4.0, "flow_cpu_per_s": 0.75,
                       "broker_cpu_per_s": 0.5}
    assert rows[0]["flow_cpu_per_s"] == 0.7 and rows[0]["broker_cpu_per_s"] == 0.1


def test_cpu_mark_reads_each_group_s_processes() -> None:
    """``cpu_mark``: this process's CPU seconds for a group holding its pid, 0 for a
    group whose process cannot be read."""
    import os
    import time

    bench = _bench()
    t0 = time.process_time()
    elapsed, cpu = bench.cpu_mark(3.0, {"client": [os.getpid()], "gone": [0]})
    assert elapsed == 3.0 and cpu["gone"] == 0.0
    assert abs(cpu["client"] - t0) < 0.1


def test_span_p50_by_window_groups_each_span_by_send_time() -> None:
    """``span_p50_by_window``: per span (a column per ``SPANS`` name), the median of the
    requests sent in each 10 s window, windows in time order."""
    import numpy as np

    bench = _bench()
    n = len(bench.SPANS)
    spans = np.asarray([[1.0] * n, [3.0] * n, [10.0] + [2.0] * (n - 1), [20.0] * n])
    sent_ms = np.asarray([0.0, 9_999.0, 10_000.0, 25_000.0])
    p50 = bench.span_p50_by_window(spans, sent_ms)
    assert list(p50) == list(bench.SPANS)
    assert p50["to_flow"] == [2.0, 10.0, 20.0]
    assert p50[bench.SPANS[-1]] == [2.0, 2.0, 20.0]
