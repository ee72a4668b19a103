"""Snapshot integrity (issue 9, point 6): a truncated or altered snapshot file is refused
with a clear error, and serving keeps the previous version (also after a crash and a
recovery resume).

The store-level tests drive ``state.snapshot_store`` directly. The flow-level test runs
the real flow (``python -m bytewax.run``, Kafka in and out on the real broker, Bytewax
recovery on), lets it publish real ranker, index and item-table snapshots, then writes
a newer version of each kind into its store and damages the file (truncated, or one
byte flipped), and asks for recommendations: before the damage, after it, after a
kill -9 and restart with the same recovery directory, and after the flow has published
good versions again.
"""

from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from flows.broker import create_topics
from flows.recsys import OUTPUTS
from operators.item_shard import item_shard_key
from state.hashing import shard_of
from state.snapshot_store import Manifest, SnapshotReader, SnapshotStore

from .flow_process import FlowProcess, Follower, init_recovery, simulated_log, wait_until


def damage(store: SnapshotStore, manifest: Manifest, how: str) -> None:
    """Truncate the manifest's file to half, or flip one byte in its middle."""
    path = store.root / manifest["path"]
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        altered = bytearray(data)
        altered[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(altered))


def read_bytes(path: Path) -> bytes:
    return path.read_bytes()


# -------------------------------------------------------------------------------------
# The store's readers
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("how", "message"), [("truncate", "(truncated)"), ("alter", "(altered)")])
def test_damaged_version_refused_once_with_a_clear_error(tmp_path, caplog, how, message) -> None:
    store = SnapshotStore(tmp_path)
    store.write_bytes("ranker", "bin", b"good " * 100, ts=1)
    reader = SnapshotReader(store, "ranker", read_bytes)
    assert reader.refresh() and reader.version == 1
    damage(store, store.write_bytes("ranker", "bin", b"newer " * 100, ts=2), how)
    with caplog.at_level(logging.ERROR, logger="state.snapshot_store"):
        for _ in range(5):  # serving polls the store over and over
            assert not reader.refresh()
    assert reader.current == b"good " * 100 and reader.version == 1
    [record] = caplog.records  # logged once, not at every poll
    text = record.getMessage()
    assert "snapshot ranker v2 refused, keeping v1" in text and message in text
    assert "ranker/v0000000002.bin" in text and reader.refused == 1
    # Once the file is put right, the version is verified again and taken.
    (store.root / "ranker" / "v0000000002.bin").write_bytes(b"newer " * 100)
    assert reader.refresh() and reader.version == 2


def test_new_reader_falls_back_to_the_newest_version_that_verifies(tmp_path) -> None:
    """A process that starts while LATEST is damaged serves the version before it."""
    store = SnapshotStore(tmp_path)
    for n in (1, 2, 3):
        store.write_bytes("ranker", "bin", b"version %d" % n, ts=n)
    damage(store, store.latest("ranker"), "truncate")
    reader = SnapshotReader(store, "ranker", read_bytes)
    assert reader.refresh() and reader.version == 2 and reader.current == b"version 2"
    assert reader.refused == 1 and "truncated" in reader.last_error
    store.write_bytes("ranker", "bin", b"version 4", ts=4)
    assert reader.refresh() and reader.version == 4


def test_resumed_reader_serves_what_it_served(tmp_path) -> None:
    """Recovery pickles the reader as its manifest; unpickling reloads that version (and
    verifies it again) even though the store's LATEST is damaged."""
    store = SnapshotStore(tmp_path)
    store.write_bytes("ranker", "bin", b"version 1", ts=1)
    store.write_bytes("ranker", "bin", b"version 2", ts=2)
    reader = SnapshotReader(store, "ranker", read_bytes)
    assert reader.offer(store.manifests("ranker")[-1]) and reader.version == 1
    damage(store, store.write_bytes("ranker", "bin", b"version 3", ts=3), "alter")
    state = pickle.dumps(reader)
    assert b"version 1" not in state  # the manifest, not the snapshot
    resumed = pickle.loads(state)
    assert resumed.version == 1 and resumed.current == b"version 1"
    assert resumed.refresh() and resumed.version == 2  # the newer good one, not v3
    assert not resumed.refresh() and resumed.version == 2
    # Resumed in a new process (no loaded snapshots cached) after its version was altered:
    # refused too, and the newest version that verifies is served instead.
    damage(store, store.manifests("ranker")[1], "alter")
    state = pickle.dumps(resumed)
    SnapshotReader._cache.clear()
    again = pickle.loads(state)
    assert again.version is None and "altered" in again.last_error
    assert again.refresh() and again.version == 1


# -------------------------------------------------------------------------------------
# The real flow
# -------------------------------------------------------------------------------------

SHARDS = 4
KINDS = {"ranker": "truncate", "index": "alter", f"items-{item_shard_key(0)}": "truncate",
         f"items-{item_shard_key(1)}": "alter"}


def flow_config(app: str, bootstrap: str, store: Path) -> dict[str, Any]:
    return {
        "app": app,
        "kafka": {"bootstrap": bootstrap},
        "inputs": [{"kind": "kafka", "topics": ["events"], "tail": True, "batch_size": 250}],
        "output": {"kind": "kafka"},
        "snapshots": {"dir": str(store)},
        "shards": {"users": SHARDS, "items": 2},
        # Short event-time intervals so a short log publishes every kind; no wall-clock
        # window closing, so an idle flow publishes nothing while the test damages files.
        "join": {"wait_ms_override": 60_000, "idle_flush_s": 3600.0},
        "ranker": {"sync_interval_ms": 60_000},
        "index": {"refresh_interval_ms": 60_000},
        "items": {"refresh_interval_ms": 30_000},
        # One scorer: under "auto" an undecided duel interleaves with coins drawn from the
        # request id, so two probes would differ by their ids, not by their snapshots.
        "serving": {"poll_ms": 0, "scorer": "ranker"},
    }


@pytest.mark.kafka
@pytest.mark.slow
def test_flow_keeps_serving_the_previous_version_of_damaged_snapshots(
        kafka_broker, kafka_produce, tmp_path) -> None:
    bootstrap = kafka_broker.bootstrap
    app = f"integrity{time.monotonic_ns() % 10**9}"
    create_topics(bootstrap, [f"{app}.events"] + [f"{app}.{name}" for name in OUTPUTS], 1)
    lines = simulated_log(tmp_path / "log.jsonl", 10_000, seed=5, requests_per_s=1.0,
                          n_users=300, n_items=200)
    warmup, later = lines[:6000], lines[6000:]
    warm_ts, last_ts = (max(orjson.loads(v)["ts"] for v in part) for part in (warmup, later))
    # Cold probe users of one user shard: the same answer for each, given the same snapshots.
    probes = [u for u in (f"probe-{n}" for n in range(200)) if shard_of(u, SHARDS) == 0][:4]

    def produce(values: list[bytes]) -> None:
        kafka_produce(bootstrap, f"{app}.events", values, partition=0, timeout_s=60)

    def probe(n: int, ts: int) -> dict[str, Any]:
        rid = f"probe-{n}-{time.monotonic_ns()}"
        produce([orjson.dumps({"type": "request", "ts": ts, "request_id": rid,
                               "user_id": probes[n], "k": 10})])
        return recs.wait_for(lambda r: r["request_id"] == rid, 60, alive=flow)

    def versions(rec: dict[str, Any]) -> tuple[int | None, int | None]:
        return rec["model_version"], rec["index_version"]

    def ids(rec: dict[str, Any]) -> list[str]:
        return [i["item_id"] for i in rec["items"]]

    def newest(kind: str) -> int:
        return max((m["version"] for m in snaps.poll() if m["kind"] == kind), default=0)

    db = init_recovery(tmp_path / "recovery")
    config = flow_config(app, bootstrap, tmp_path / "store")
    store = SnapshotStore(tmp_path / "store" / app)
    recs = Follower(bootstrap, f"{app}.recommendations")
    snaps = Follower(bootstrap, f"{app}.snapshots")
    flow = FlowProcess(config, tmp_path / "flow-1.log", recovery=db).start()
    try:
        produce(warmup)
        n_requests = sum(1 for v in warmup if b'"type":"request"' in v)
        quiet = {"count": -1, "since": time.monotonic()}

        def settled() -> bool:
            """Every warm-up request answered, every kind published, no new snapshot
            for 3 s (the item side and the ranker lag the user shards)."""
            count = len(snaps.poll())
            if count != quiet["count"]:
                quiet.update(count=count, since=time.monotonic())
            return (len(recs.poll()) >= n_requests and all(newest(k) for k in KINDS)
                    and time.monotonic() - quiet["since"] >= 3.0)

        wait_until(settled, 90, "the warm-up log served and every kind published", alive=flow)
        before = probe(0, warm_ts)  # warm_ts: a probe must not move the shard's clock
        good = {kind: newest(kind) for kind in KINDS}
        assert versions(before) == (good["ranker"], good["index"]) and len(ids(before)) == 10

        # A newer version of every kind, damaged on disk after it was written. (Its content
        # differs from the current version's: readers share loaded snapshots by sha256.)
        for kind, how in KINDS.items():
            latest = store.latest(kind)
            assert latest["version"] == good[kind]
            data = store.verified_path(latest).read_bytes() + b"\0"
            damage(store, store.write_bytes(kind, latest["path"].rsplit(".", 1)[1], data,
                                            latest["ts"]), how)
        after = probe(1, warm_ts)
        assert versions(after) == versions(before) and ids(after) == ids(before)
        log = flow.tail(200_000)
        for kind, how in KINDS.items():
            expected = "(truncated)" if how == "truncate" else "(altered)"
            assert any(f"snapshot {kind} v{good[kind] + 1} refused, keeping v{good[kind]}" in line
                       and expected in line for line in log.splitlines()), (kind, log[-3000:])

        # kill -9 while the damaged versions are the store's LATEST; resume from recovery.
        time.sleep(3)  # the probes' epoch reaches a recovery snapshot
        flow.kill9()
        flow = FlowProcess(config, tmp_path / "flow-2.log", recovery=db).start()
        resumed = probe(2, warm_ts)
        assert versions(resumed) == versions(before) and ids(resumed) == ids(before)

        # New events: the flow publishes good versions again and serving takes them.
        produce(later)
        wait_until(lambda: all(newest(k) > good[k] + 1 for k in KINDS), 90,
                   "new versions of every kind", alive=flow)
        # Live polling loads new versions on a background thread and installs them at a
        # later batch: probe until an answer carries the newest versions.
        probed: dict[str, Any] = {}

        def serves_newest() -> bool:
            probed["rec"] = probe(3, last_ts)
            return versions(probed["rec"]) == (newest("ranker"), newest("index"))

        wait_until(serves_newest, 60, "serving on the newest versions", alive=flow)
        fresh = probed["rec"]
        print(f"served (model, index) versions {versions(before)} before, {versions(after)} with "
              f"damaged v+1 files, {versions(resumed)} after kill -9 and resume, "
              f"{versions(fresh)} once new versions were published")
    finally:
        flow.stop()
        recs.close()
        snaps.close()
