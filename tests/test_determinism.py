"""Deterministic replays: two ``streamrec eval`` runs of the same log give the same
recommendations and report (docs/evaluation.md, "Protocols"), snapshots being read by event time."""

from __future__ import annotations

from pathlib import Path

from events.simulator import SimConfig, write_log
from flows.evaluate import evaluate, read_jsonl

TIMING_KEYS = {"events_per_s", "latency_ms_p50", "latency_ms_p99", "elapsed_s", "outputs_dir",
               "plots", "serving_cpu_ms_p50", "serving_cpu_ms_p99", "serving_cpu_ms_mean",
               "queue_ms_p50", "queue_ms_p99", "peak_rss_mb", "outputs_mb"}
"""Wall-clock, CPU-time and memory figures: they measure the machine, not the answers
(``outputs_mb`` too: the outputs carry each answer's wall-clock ``latency_ms`` and the
metrics' timings, whose digits vary; it flipped 1.0 / 1.1 between two runs)."""

# Short event-time schedules, so that a few-second log publishes many item tables,
# index versions and ranker copies that requests then read.
CONFIG = {
    "shards": {"users": 3, "items": 2},
    "join": {"window_ms": {"click": 2_000}, "default_window_ms": 2_000,
             "wait_ms_override": 2_000, "allowed_lateness_ms": 500},
    "items": {"refresh_interval_ms": 500},
    "index": {"refresh_interval_ms": 1_000},
    "ranker": {"sync_interval_ms": 1_000},
    # The pool ranker orders requests early and the central pool trainer publishes often.
    "serving": {"scorer_min_outcomes": 1, "pool": {"sync_every_pairs": 5}},
}


def _recommendations(out: Path) -> list[tuple]:
    return [(r["request_id"], r["model_version"], r["index_version"],
             tuple((i["item_id"], i["score"], i["source"]) for i in r["items"]))
            for r in read_jsonl(out / "recommendations.jsonl")]


def test_two_evals_of_a_log_give_identical_recommendations_and_report(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    write_log(log, 6_000, seed=3, config=SimConfig(n_users=150, n_items=120,
                                                   requests_per_s=40.0))
    runs = []
    for n in (1, 2):
        config = {**CONFIG, "inputs": [{"kind": "replay", "path": str(log), "batch_size": 150}]}
        report = evaluate(log, tmp_path / f"r{n}.json", config=config,
                          out_dir=tmp_path / f"out{n}", plots=False)
        report["config"]["output"].pop("dir")  # out1 / out2
        runs.append(({k: v for k, v in report.items() if k not in TIMING_KEYS},
                     _recommendations(tmp_path / f"out{n}")))
    (report1, recs1), (report2, recs2) = runs
    assert len(recs1) > 100
    # The run read several versions of every kind of snapshot while serving.
    assert len({r[1] for r in recs1}) > 3 and len({r[2] for r in recs1}) > 3
    # ... and the pool ranker ordered requests with several central copies (read by
    # event time like the others).
    assert report1["scorers"]["served_by_pool"] > 100
    pool_copies = [m for m in read_jsonl(tmp_path / "out1" / "snapshots.jsonl")
                   if m["kind"] == "pool-ranker"]
    assert len(pool_copies) > 3
    assert recs1 == recs2
    assert report1 == report2
