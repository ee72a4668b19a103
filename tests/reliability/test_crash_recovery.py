"""Crash recovery (issue 9, point 1): kill -9 the flow mid-topic, restart it, lose nothing.

Two runs of the real flow (``python -m bytewax.run``) consume the same simulated log
from a Kafka topic of the real broker (Tansu) and write every output to Kafka:

* a reference run, uninterrupted;
* a crash run with Bytewax recovery (``python -m bytewax.recovery DB 1``, then
  ``-r DB -s 1 -b 10``), killed with SIGKILL once about a third of its examples are
  out, then started again with the same recovery directory and left to finish.

Checked: the crash run's examples are exactly the reference run's (ids, users, items,
labels, weights); records written twice carry the same deterministic id and content
and are exactly the tail of what the killed process wrote after its last recovery
snapshot (a few seconds of output, not the whole run); every request is answered; the
event counters, the ranker (examples learned), the item tables and the index (final
counts) and the user profiles (profile features of every example) resumed from their
snapshots instead of starting over.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from flows.broker import create_topics
from flows.recsys import OUTPUTS
from operators.example_codec import unpack_example
from operators.item_shard import item_shard_key
from state.item_table import ItemTable
from state.snapshot_store import SnapshotStore

from .flow_process import FlowProcess, Follower, init_recovery, simulated_log, wait_until

N_EVENTS = 15_000
SNAPSHOT_S = 1
KILL_AT = 0.35
"""Kill once this share of the reference run's examples is out."""


def flow_config(app: str, bootstrap: str, store: Path) -> dict[str, Any]:
    return {
        "app": app,
        "kafka": {"bootstrap": bootstrap},
        "inputs": [{"kind": "kafka", "topics": ["events"], "tail": False, "batch_size": 250}],
        "output": {"kind": "kafka"},
        "snapshots": {"dir": str(store)},
        "shards": {"users": 4, "items": 2},
        "sampler": {"negative_rate": 0.5},
        "ranker": {"sync_interval_ms": 120_000},
        "index": {"refresh_interval_ms": 120_000},
        # ISGD (positives only): BPR draws its negatives from whichever index snapshot
        # serving has loaded (wall time), so which items get vectors differs between any
        # two runs; with ISGD the item tables' counts and the index size are exact.
        "items": {"mf": {"algorithm": "isgd"}},
    }


def setup_app(bootstrap: str, app: str, lines: list[bytes], produce: Any) -> None:
    create_topics(bootstrap, [f"{app}.events"] + [f"{app}.{name}" for name in OUTPUTS], 1)
    keys = [str(orjson.loads(v).get("user_id", "")).encode() or None for v in lines]
    produce(bootstrap, f"{app}.events", lines, keys=keys, partition=0, timeout_s=120)


def decoded(records: list[Any]) -> list[dict[str, Any]]:
    """The records' values; examples unpacked from their wire form (others as they are)."""
    return [unpack_example(orjson.loads(r.value)) for r in records]


def last_manifests(snapshots: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for m in snapshots:
        if m["kind"] not in out or m["version"] > out[m["kind"]]["version"]:
            out[m["kind"]] = m
    return out


def load_table(root: Path, manifest: dict[str, Any]) -> ItemTable:
    return ItemTable.load(SnapshotStore(root).verified_path(manifest))


def example_key(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e["example_id"], e["user_id"], e["item_id"], e["label"], e["weight"])


def profile_features(e: dict[str, Any]) -> dict[str, Any]:
    """The example's features that come from the user shard's profiles."""
    return {k: v for k, v in e["features"].items() if k.startswith(("user.", "user_x_"))}


def test_every_stage_state_snapshots_and_resumes(tmp_path) -> None:
    """Fast, in process, no Kafka: with recovery on, every stage's state is pickled each
    epoch (a lambda anywhere in it fails the run), and a second run on the same recovery
    directory unpickles it all and resumes at the end of the log: nothing is emitted
    twice (file outputs are truncated to the last snapshot)."""
    from datetime import timedelta

    from bytewax.recovery import RecoveryConfig
    from bytewax.testing import run_main

    from flows.evaluate import read_jsonl
    from flows.recsys import build

    simulated_log(tmp_path / "log.jsonl", 3_000, seed=2, requests_per_s=1.0)
    db = init_recovery(tmp_path / "recovery")
    config = {"inputs": [{"kind": "replay", "path": str(tmp_path / "log.jsonl"),
                          "batch_size": 200}],
              "output": {"dir": str(tmp_path / "out")}, "serving": {"poll_ms": 0}}
    for _ in range(2):
        run_main(build(config), epoch_interval=timedelta(0), recovery_config=RecoveryConfig(db))
        examples = read_jsonl(tmp_path / "out" / "examples.jsonl")
        recs = read_jsonl(tmp_path / "out" / "recommendations.jsonl")
        assert examples and recs
        assert len({e["example_id"] for e in examples}) == len(examples)
        assert len({r["request_id"] for r in recs}) == len(recs)


@pytest.mark.kafka
@pytest.mark.slow
def test_kill9_mid_topic_then_resume_loses_nothing(kafka_broker, kafka_produce, kafka_read_records,
                                                   tmp_path) -> None:
    bootstrap = kafka_broker.bootstrap
    lines = simulated_log(tmp_path / "log.jsonl", N_EVENTS, seed=11, requests_per_s=1.0,
                          n_users=500, n_items=300, organic_per_request=0.1)
    n_requests = sum(1 for v in lines if b'"type":"request"' in v)
    suffix = f"{time.monotonic_ns() % 10**9}"
    ref_app, crash_app = f"ref{suffix}", f"crash{suffix}"
    for app in (ref_app, crash_app):
        setup_app(bootstrap, app, lines, kafka_produce)

    def read(app: str, name: str, **kw: Any) -> list[Any]:
        return kafka_read_records(bootstrap, f"{app}.{name}", timeout_s=60, **kw)

    # -- the reference run ----------------------------------------------------------------
    ref_flow = FlowProcess(flow_config(ref_app, bootstrap, tmp_path / "store"), tmp_path / "ref.log")
    ref_s = ref_flow.start().wait(timeout_s=180)
    ref = decoded(read(ref_app, "examples"))
    assert len(ref) > 3000 and len({e["example_id"] for e in ref}) == len(ref)

    # -- the crash run: killed mid-topic, restarted with the same recovery directory ------
    db = init_recovery(tmp_path / "recovery")
    config = flow_config(crash_app, bootstrap, tmp_path / "store")
    first = FlowProcess(config, tmp_path / "crash-1.log", recovery=db, snapshot_s=SNAPSHOT_S)
    first.start()
    watch = Follower(bootstrap, f"{crash_app}.examples")
    try:
        wait_until(lambda: len(watch.poll()) >= KILL_AT * len(ref), 120,
                   "the first third of the examples", every_s=0.05, alive=first)
    finally:
        watch.close()
        first.stop()  # kill -9 (SIGKILL: no flush, no final snapshot)
    killed_ms = time.time() * 1000
    assert first.proc is not None and first.proc.returncode == -9
    pre = decoded(read(crash_app, "examples"))
    assert KILL_AT * len(ref) <= len(pre) < 0.9 * len(ref), "the kill must land mid-topic"
    assert not any(m["kind"] == "summary" for m in decoded(read(crash_app, "metrics")))

    second = FlowProcess(config, tmp_path / "crash-2.log", recovery=db, snapshot_s=SNAPSHOT_S)
    resumed_s = second.start().wait(timeout_s=180)
    records = read(crash_app, "examples")
    crash = decoded(records)

    # Every example of the uninterrupted run, and nothing else.
    assert {example_key(e) for e in crash} == {example_key(e) for e in ref}
    # Duplicates carry the same id and the same content.
    keys_by_id: dict[str, set[tuple[Any, ...]]] = {}
    for e in crash:
        keys_by_id.setdefault(e["example_id"], set()).add(example_key(e))
    assert all(len(keys) == 1 for keys in keys_by_id.values())
    counts = Counter(e["example_id"] for e in crash)
    dups = {i for i, c in counts.items() if c > 1}
    assert all(counts[i] == 2 for i in dups)
    # The duplicates are exactly the tail the killed process wrote after its last recovery
    # snapshot: every pre-kill record from the first duplicate on is written again.
    pre_ids = [e["example_id"] for e in pre]
    tail_start = next((n for n, i in enumerate(pre_ids) if i in dups), len(pre_ids))
    assert set(pre_ids[tail_start:]) == dups
    tail_ms = [r.timestamp for r in records[tail_start:len(pre)]]
    window_s = (killed_ms - min(tail_ms)) / 1000 if tail_ms else 0.0
    print(f"reference run {ref_s:.1f} s, {len(ref)} examples; killed after {len(pre)} examples; "
          f"resumed run {resumed_s:.1f} s; duplicates {len(dups)} "
          f"({len(dups) / len(ref):.1%}), written in the last {window_s:.2f} s before the kill "
          f"(snapshot interval {SNAPSHOT_S} s)")
    assert len(dups) < 0.25 * len(ref)
    assert window_s <= SNAPSHOT_S + 4.0

    # Every request answered (some twice, same id).
    recs = {r["request_id"] for r in decoded(read(crash_app, "recommendations"))}
    assert recs == {r["request_id"] for r in decoded(read(ref_app, "recommendations"))}
    assert len(recs) == n_requests
    assert not read(crash_app, "dead-letters")

    # State resumed from the recovery snapshots, not from scratch.
    ref_metrics, crash_metrics = decoded(read(ref_app, "metrics")), decoded(read(crash_app, "metrics"))
    [summary] = [m for m in crash_metrics if m["kind"] == "summary"]
    assert summary["events_in"] == len(lines)
    assert summary["outputs"]["examples"] == len(ref)
    [ref_ranker] = [m for m in ref_metrics if m["kind"] == "ranker_final"]
    [crash_ranker] = [m for m in crash_metrics if m["kind"] == "ranker_final"]
    assert (crash_ranker["count"], crash_ranker["weight"]) == (ref_ranker["count"], ref_ranker["weight"])
    # Exact counts above; the AUC only close: with Kafka input the snapshots that feed
    # example features are polled by wall time, so two uninterrupted runs differ too
    # (by ~0.01 measured since the ui.* and deferred features).
    assert crash_ranker["auc"] == pytest.approx(ref_ranker["auc"], abs=0.03)
    ref_snap = last_manifests(decoded(read(ref_app, "snapshots")))
    crash_snap = last_manifests(decoded(read(crash_app, "snapshots")))
    items = [f"items-{item_shard_key(i)}" for i in range(2)]
    assert set(crash_snap) == set(ref_snap) == {"ranker", "pool-ranker", "index", *items}
    assert crash_snap["ranker"]["counts"] == ref_snap["ranker"]["counts"]
    for kind in (*items, "index"):
        assert crash_snap[kind]["counts"] == ref_snap[kind]["counts"], kind
    for kind in items:
        ref_table = load_table(tmp_path / "store" / ref_app, ref_snap[kind])
        table = load_table(tmp_path / "store" / crash_app, crash_snap[kind])
        assert table.catalog == ref_table.catalog, kind
        assert table.popular == pytest.approx(ref_table.popular, rel=1e-9), kind
        assert table.liked_counts == pytest.approx(ref_table.liked_counts, rel=1e-9), kind
    ref_profiles = {e["example_id"]: profile_features(e) for e in ref}
    assert all(ref_profiles[e["example_id"]] == profile_features(e) for e in crash)
    assert any(profile_features(e) for e in crash[len(pre):])
