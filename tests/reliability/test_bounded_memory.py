"""Bounded memory under ID churn (issue 9, point 4).

The real flow (``python -m bytewax.run``, one process) consumes a Kafka topic of the
real broker holding ``flows.memory.churn_blocks``: 300,000 distinct user and item IDs,
never repeated, a fifth of them seen and clicked (joiner, profiles, MF, co-visitation,
ranker, index), with capacities far below the number of IDs so that every bounded store
fills up and then evicts. The flow's own ``metrics`` records (every second) carry its
resident memory: the curve of RSS against events read is printed, and checked:

* the peak RSS (VmHWM) stays under the bound of docs/operations.md: the RSS when the
  flow started plus ``flows.memory.memory_bound`` of the capacities;
* memory plateaus: over the second half of the stream (once the stores are full) RSS
  grows by less than a quarter of what the first half added. Without the capacities the
  flow keeps ~1 KB per ID, so both checks fail (see ``test_the_bound_is_tight_enough``).

The 10-million-ID run of the issue is ``python bench/memory_churn.py`` (same stream,
named-pipe replay, about 15 minutes; figures in docs/operations.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from flows.broker import create_topics
from flows.config import load_config
from flows.evaluate import read_jsonl
from flows.memory import churn_blocks, memory_bound

from .flow_process import FlowProcess

N_IDS = 300_000
BLOCK_IDS = 10
"""New IDs per churn block, two of which interact: 20% of the IDs are seen and clicked."""

SMALL: dict[str, Any] = {
    "shards": {"users": 2, "items": 2, "max_users": 2_000, "max_items": 2_000,
               "hot_profiles": 200, "routing_cache": 20_000},
    "join": {"max_pending": 2_000, "max_orphans": 500},
    "items": {"max_items": 2_000,
              "covis": {"max_items": 2_000, "max_neighbors": 10},
              "mf": {"max_users": 2_000, "max_items": 2_000, "admit_threshold": 2}},
    "ranker": {"max_features": 20_000, "max_waiting": 5_000},
    "serving": {"pool": {"max_pending": 200}},
    "metrics": {"interval_s": 1.0},
}
"""Capacities ~100x below the IDs of the stream (per user shard 2,000 users, catalog
items and pending impressions; per item shard 2,000 items; 20,000 ranker weights)."""


def churn_topic(bootstrap: str, app: str, produce: Any) -> int:
    """Create ``app``'s topics and fill ``<app>.events`` with the churn stream; returns
    the number of events."""
    lines = [line for block in churn_blocks(N_IDS, BLOCK_IDS) for line in block]
    create_topics(bootstrap, [f"{app}.events"], 1)
    produce(bootstrap, f"{app}.events", lines, partition=0, timeout_s=300)
    return len(lines)


def run_flow(bootstrap: str, app: str, config: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Run the flow over the whole topic; returns the records of its metrics stage (the
    last one is the end-of-input summary; the ranker's records are left out)."""
    full = {**config, "app": app, "kafka": {"bootstrap": bootstrap},
            "inputs": [{"kind": "kafka", "topics": ["events"], "tail": False,
                        "batch_size": 1000}],
            "output": {"dir": str(out)}}
    FlowProcess(full, out.parent / f"{out.name}.log").start().wait(timeout_s=600)
    return [r for r in read_jsonl(out / "metrics.jsonl") if "rss_mb" in r]


def curve(records: list[dict[str, Any]], n_events: int) -> list[tuple[int, float]]:
    """``(IDs read, RSS MB)`` points of the metrics records, printed."""
    points = [(r["events_in"] * N_IDS // n_events, r["rss_mb"]) for r in records]
    for ids, rss in points:
        print(f"{ids:>9,} IDs  RSS {rss:7.1f} MB")
    return points


def plateau(points: list[tuple[int, float]]) -> tuple[float, float]:
    """RSS added over the first half of the stream, and over the second half (MB)."""
    start, mid = points[0][1], max(r for i, r in points if i <= N_IDS // 2)
    return mid - start, max(r for i, r in points if i >= N_IDS // 2) - mid


@pytest.mark.kafka
@pytest.mark.slow
def test_rss_stays_under_the_bound_set_by_capacities(kafka_broker, kafka_produce,
                                                     tmp_path) -> None:
    app = f"mem{time.monotonic_ns() % 10**9}"
    n_events = churn_topic(kafka_broker.bootstrap, app, kafka_produce)
    records = run_flow(kafka_broker.bootstrap, app, SMALL, tmp_path / "out")
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["events_in"] == n_events
    assert summary["dead_letters"] == 0
    # every kind of store saw IDs far beyond its capacity
    assert summary["events_by_type"]["user"] > 50 * SMALL["shards"]["max_users"]
    assert summary["events_by_type"]["item"] > 50 * SMALL["items"]["max_items"]
    assert summary["outputs"]["examples"] == summary["events_by_type"]["feedback"]
    assert summary["tables"]["item"]["evicted"] + summary["tables"]["item"]["rejected"] > 0

    points = curve(records, n_events)
    assert len(points) >= 5, "too few metrics records for a curve"
    bound = memory_bound(load_config(SMALL))
    limit = summary["rss_start_mb"] + bound["total_mb"]
    first, second = plateau(points)
    print(f"peak {summary['peak_rss_mb']} MB, bound {limit:.1f} MB (start "
          f"{summary['rss_start_mb']} + {bound['total_mb']:.1f}); growth first half "
          f"{first:.1f} MB, second half {second:.1f} MB")
    assert summary["peak_rss_mb"] <= limit
    assert second < 0.25 * first, "RSS still grows once every store is full"


def test_default_capacities_fit_the_machine_and_the_bound_is_logged(tmp_path, caplog) -> None:
    """Issue 19 point 6: the default config's bound was 959,336 MB; now it fits half of
    the 24 GB machine the README targets (the rest: the OS, Kafka client buffers, the
    process itself), and every flow logs its bound when it starts running."""
    from bytewax.testing import run_main

    from flows.recsys import build

    total = memory_bound(load_config())["total_mb"]
    assert total <= 12 * 1024
    (tmp_path / "empty.jsonl").write_bytes(b"")
    flow = build({"output": {"dir": str(tmp_path / "out")},
                  "inputs": [{"kind": "replay", "path": str(tmp_path / "empty.jsonl")}]})
    with caplog.at_level("INFO", logger="flows.recsys"):
        run_main(flow)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory bound:")]
    assert lines and f"memory bound: {total:,.0f} MB above the process at start" in lines[-1]
