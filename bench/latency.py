"""Request latency through Kafka: a client at a fixed wall rate against the running flow.

The zero-config flow (ranker, item side, serving with ``scorer = auto``) runs as its own
process (``python -m bytewax.run``) on a local Tansu broker (``flows.broker``), reading
``<app>.events`` and writing every output to Kafka. After a warm-up backfill (simulated
events as fast as the flow takes them, so the ranker, index and item tables exist), the
client sends, for ``--seconds`` of wall time, ``--requests-per-s`` requests beside
``--events-per-s`` other simulated events (impressions, feedback, items, users), every
event stamped with the wall clock, and reads ``<app>.recommendations``:

* round trip: from just before the client's ``send`` of a request to the moment its
  recommendation is consumed (kafka-python on both sides, ``fetch_max_wait_ms`` 10);
* in flow: the record's own ``latency_ms`` (ingest at parse -> answer).

The rivals printed beside it: the same run's round trip with the consumers' old
500 ms fetch wait (``--compare-fetch-wait``), and with snapshot versions loaded inside
the user shards' poll as before background loading (``--compare-sync-load``: the batch
waits for verify + load), and with the Kafka sinks waiting for every acknowledgement
in each ``write_batch`` as before (``--compare-sink-flush``; now they wait at the end
of each epoch), and with every snapshot version (item tables, index, ranker copies)
made durable on the worker thread as before (``--compare-sync-write``: its fsyncs and
renames stall the requests behind it; now a writer thread does them); each is off by
default (each adds a run). Item tables are published every 60 s of event time
(``items.refresh_interval_ms``), so a live phase of ``--seconds 70`` or more holds at
least one round of publications.

Also from Bytewax's own step timers (its dataflow API, scraped before and after the live
phase): ``sink_write_share`` (the worker's wall time in the output sinks' ``write_batch``:
send, flush, wait for acknowledgements), ``sink_write_ms_per_call`` and the same for the
user shards, with ``step_seconds`` per step.
Loopback only; the run is bounded in count and time. Ends with one JSON line:
``rt_p50_ms``, ``rt_p90_ms``, ``rt_p99_ms``, ``inflow_p50_ms``, ``inflow_p90_ms``,
``inflow_p99_ms``, ``requests``, ``answered``, ``requests_per_s``, ``events_per_s``.

Usage: ``python bench/latency.py [--seconds 30] [--requests-per-s 100] [--events-per-s 2000]
[--compare-sync-load] [--compare-sink-flush] [--compare-sync-write] [--compare-fetch-wait]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from events.simulator import SimConfig, Simulator
from flows.broker import LocalBroker, create_topics, free_port
from flows.recsys import OUTPUTS

from common import ROOT

APP = "latbench"
WARMUP_EVENTS = 20_000
SIM_EVENTS_PER_S = 24  # the zero-config world's event-time pace (2 requests/s, ~12 events each)


def world(now_ms: int, n: int, seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(warm-up events ending about now, live events) of the zero-config world: the
    live part without the simulator's requests (the client sends its own)."""
    span_ms = WARMUP_EVENTS * 1000 // SIM_EVENTS_PER_S
    sim = Simulator(SimConfig(n_users=2_000, n_items=1_000, requests_per_s=2.0,
                              start_ts_ms=now_ms - span_ms), seed=seed,
                    max_events=WARMUP_EVENTS + n)
    events = list(sim)
    warm = events[:WARMUP_EVENTS]
    live = [e for e in events[WARMUP_EVENTS:] if e["type"] != "request"]
    return warm, live


def rival_flow(path: str, sync_load: bool = False, flush_each_batch: bool = False,
               sync_write: bool = False) -> Any:
    """The flow as it was before this bench's last changes, for the rivals: snapshot
    views loading new versions inside the poll (the batch waits for verify + load)
    and/or Kafka sinks waiting for every acknowledgement in each ``write_batch`` and/or
    snapshot versions made durable inside ``write`` (on the worker thread). Entry
    point ``python -m bytewax.run "bench/latency.py:rival_flow('config.json', ...)"``."""
    from flows.recsys import build
    from operators import kafka_sink, snapshot_views
    from state.snapshot_store import SnapshotStore

    if sync_write:
        write = SnapshotStore.write

        def write_durable(self: Any, *args: Any, **kwargs: Any) -> Any:
            manifest = write(self, *args, **kwargs)
            self.flush()
            return manifest

        SnapshotStore.write = write_durable  # type: ignore[method-assign]

    if sync_load:
        init = snapshot_views.SnapshotViews.__init__

        def synchronous(self: Any, store: Any, item_shards: list[str], poll_ms: int,
                        background: bool | None = None) -> None:
            init(self, store, item_shards, poll_ms, background=False)

        snapshot_views.SnapshotViews.__init__ = synchronous  # type: ignore[method-assign]
    if flush_each_batch:
        partition = kafka_sink._KafkaSinkPartition
        write = partition.write_batch

        def write_and_wait(self: Any, items: list[Any]) -> None:
            write(self, items)
            self.settle()

        partition.write_batch = write_and_wait  # type: ignore[method-assign]
    return build(path)


def start_flow(bootstrap: str, out: Path, fetch_wait_ms: int, api_port: int,
               rival: tuple[bool, bool, bool] = (False, False, False)) -> subprocess.Popen[bytes]:
    config = {
        "app": APP,
        "inputs": [{"kind": "kafka", "topics": ["events"]}],
        "kafka": {"bootstrap": bootstrap, "consumer": {"fetch_max_wait_ms": fetch_wait_ms}},
        "output": {"kind": "kafka", "dir": str(out)},
        "snapshots": {"dir": str(out / "snapshots")},
        "metrics": {"port": 0},
    }
    path = out / "config.json"
    path.write_bytes(orjson.dumps(config))
    log = (out / "flow.log").open("ab")
    # cwd: the run's temp dir (the dataflow API writes dataflow.json there)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BYTEWAX_DATAFLOW_API_ENABLED": "true",
           "BYTEWAX_DATAFLOW_API_PORT": str(api_port),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                         if p)}
    entry = (f"{Path(__file__).resolve()}:rival_flow('{path}', {rival[0]}, {rival[1]}, {rival[2]})"
             if any(rival)
             else f"flows.recsys:build('{path}')")
    return subprocess.Popen([sys.executable, "-m", "bytewax.run", entry],
                            cwd=out, env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


STEP_TIMES = {
    "sinks": ("bytewax_out_part_write_batch_duration_seconds", ".out_"),
    "user_shard": ("bytewax_stateful_batch_on_batch_duration_seconds", ".user_shard."),
    "item_shard": ("bytewax_stateful_batch_on_batch_duration_seconds", ".item_shard."),
    "ranker": ("bytewax_stateful_batch_on_batch_duration_seconds", ".ranker."),
    "index": ("bytewax_stateful_batch_on_batch_duration_seconds", ".index."),
}
"""Bytewax's own step timers (its dataflow API, docs/operations.md) summed per group:
(histogram family, substring of the step id)."""


def step_seconds(api_port: int) -> dict[str, tuple[float, float]]:
    """(seconds, calls) per ``STEP_TIMES`` group and per output step (``out_<name>``),
    scraped from the flow's dataflow API; {} when it does not answer."""
    import re
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    line = re.compile(r'^(\w+)_(sum|count)\{([^}]*)\}\s+(\S+)$')
    out: dict[str, list[float]] = {}
    for raw in text.splitlines():
        m = line.match(raw)
        if not m:
            continue
        family, part, labels, value = m.groups()
        step = re.search(r'step_id="([^"]*)"', labels)
        if step is None:
            continue
        groups = [g for g, (fam, sub) in STEP_TIMES.items() if fam == family and sub in step[1]]
        if family == STEP_TIMES["sinks"][0]:
            groups.append(step[1].split(".")[1])
        for g in groups:
            acc = out.setdefault(g, [0.0, 0.0])
            acc[0 if part == "sum" else 1] += float(value)
    return {g: (v[0], v[1]) for g, v in out.items()}


class Receiver(threading.Thread):
    """Consumes the recommendations topic; records each request's receipt time."""

    def __init__(self, bootstrap: str, fetch_wait_ms: int) -> None:
        super().__init__(daemon=True)
        topic = f"{APP}.recommendations"
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                      fetch_max_wait_ms=fetch_wait_ms)
        self.consumer.assign([TopicPartition(topic, 0)])
        self.received: dict[str, tuple[float, float]] = {}
        """request_id -> (receipt wall time s, in-flow latency_ms)."""
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for records in self.consumer.poll(timeout_ms=20).values():
                now = time.time()
                for rec in records:
                    r = orjson.loads(rec.value)
                    self.received[r["request_id"]] = (now, r["latency_ms"])
        self.consumer.close()

    def wait_for(self, request_id: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while request_id not in self.received:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


def run(seconds: float, requests_per_s: float, events_per_s: float,
        fetch_wait_ms: int, rival: tuple[bool, bool, bool] = (False, False, False)
        ) -> dict[str, Any]:
    """``rival``: (snapshots loaded inside the poll, sinks waiting for acks per batch,
    snapshots made durable on the worker thread)."""
    """One measured run on a fresh broker and flow; the figures of its live phase."""
    out = Path(tempfile.mkdtemp(prefix="streamrec-latency-"))
    now_ms = int(time.time() * 1000)
    n_live = int(seconds * events_per_s) + 1
    warm, live = world(now_ms, int(n_live * 1.2))
    users = [e["user_id"] for e in warm if e["type"] == "request"]
    with LocalBroker() as broker:
        bootstrap = broker.bootstrap
        create_topics(bootstrap, [f"{APP}.events"] + [f"{APP}.{n}" for n in OUTPUTS], 1)
        api_port = free_port()
        flow = start_flow(bootstrap, out, fetch_wait_ms, api_port, rival)
        receiver = Receiver(bootstrap, fetch_wait_ms)
        receiver.start()
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
        topic = f"{APP}.events"

        def send(event: dict[str, Any]) -> None:
            producer.send(topic, key=str(event.get("user_id", "")).encode(),
                          value=orjson.dumps(event))

        try:
            for event in warm:
                send(event)
            marker = {"type": "request", "ts": now_ms, "request_id": "warm-up-done",
                      "user_id": users[-1]}
            send(marker)
            producer.flush()
            if not receiver.wait_for("warm-up-done", 600):
                raise RuntimeError("the flow did not take the warm-up in 600 s:\n"
                                   + (out / "flow.log").read_text()[-3000:])
            steps0 = step_seconds(api_port)
            sent: dict[str, float] = {}
            tick = 0.01  # the client's schedule: every 10 ms, what is due by then
            start = time.monotonic()
            n_req = n_ev = 0
            while (elapsed := time.monotonic() - start) < seconds:
                due_req = int(elapsed * requests_per_s) + 1
                due_ev = min(int(elapsed * events_per_s) + 1, len(live))
                ts = int(time.time() * 1000)
                while n_ev < due_ev:
                    send({**live[n_ev], "ts": ts})
                    n_ev += 1
                while n_req < due_req:
                    rid = f"lat-{n_req}"
                    request = {"type": "request", "ts": ts, "request_id": rid,
                               "user_id": users[n_req % len(users)], "k": 10}
                    sent[rid] = time.time()
                    send(request)
                    n_req += 1
                producer.flush()
                time.sleep(max(0.0, start + elapsed + tick - time.monotonic()))
            wall = time.monotonic() - start
            steps1 = step_seconds(api_port)
            deadline = time.monotonic() + 30
            while len([r for r in sent if r in receiver.received]) < len(sent) and (
                    time.monotonic() < deadline):
                time.sleep(0.1)
        finally:
            receiver.stop.set()
            receiver.join(timeout=5)
            producer.close()
            flow.kill()
            flow.wait(timeout=30)
            shutil.rmtree(out, ignore_errors=True)
    got = [(receiver.received[r][0] - t) * 1000 for r, t in sent.items() if r in receiver.received]
    inflow = [receiver.received[r][1] for r in sent if r in receiver.received]
    rt, fl = np.asarray(got), np.asarray(inflow)

    def pct(a: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(a, q)), 1) if a.size else None

    steps = {g: (steps1[g][0] - steps0.get(g, (0.0, 0.0))[0],
                 steps1[g][1] - steps0.get(g, (0.0, 0.0))[1]) for g in steps1}
    sink_s, sink_calls = steps.get("sinks", (0.0, 0.0))
    user_s, user_calls = steps.get("user_shard", (0.0, 0.0))
    return {
        "rt_p50_ms": pct(rt, 50), "rt_p90_ms": pct(rt, 90), "rt_p99_ms": pct(rt, 99),
        "inflow_p50_ms": pct(fl, 50), "inflow_p90_ms": pct(fl, 90), "inflow_p99_ms": pct(fl, 99),
        "requests": len(sent), "answered": len(got),
        "requests_per_s": round(n_req / wall, 1), "events_per_s": round(n_ev / wall, 1),
        # the worker's wall time in the sinks' write_batch (send + flush + acks) and in
        # the user shards, over the live phase (Bytewax's own step timers)
        "sink_write_share": round(sink_s / wall, 4) if steps else None,
        "sink_write_ms_per_call": round(1e3 * sink_s / sink_calls, 2) if sink_calls else None,
        "sink_write_calls_per_s": round(sink_calls / wall, 1) if steps else None,
        "user_shard_share": round(user_s / wall, 4) if steps else None,
        "user_shard_ms_per_call": round(1e3 * user_s / user_calls, 2) if user_calls else None,
        "step_seconds": {g: round(v[0], 3) for g, v in sorted(steps.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--requests-per-s", type=float, default=100.0)
    parser.add_argument("--events-per-s", type=float, default=2_000.0)
    parser.add_argument("--compare-fetch-wait", action="store_true",
                        help="also run with kafka-python's default 500 ms fetch wait")
    parser.add_argument("--compare-sync-load", action="store_true",
                        help="also run with snapshot versions loaded inside the poll (the "
                             "batch waits for them), as before background loading")
    parser.add_argument("--compare-sync-write", action="store_true",
                        help="also run with every snapshot version made durable (fsyncs, "
                             "renames) on the worker thread, as before the writer thread")
    parser.add_argument("--compare-sink-flush", action="store_true",
                        help="also run with the Kafka sinks waiting for every acknowledgement "
                             "in each write_batch, as before")
    args = parser.parse_args()
    figures = run(args.seconds, args.requests_per_s, args.events_per_s, 10)
    if args.compare_sync_write:  # right after, on the same machine load
        durable = run(args.seconds, args.requests_per_s, args.events_per_s, 10,
                      rival=(False, False, True))
    print(f"fetch wait 10 ms: {args.requests_per_s:g} requests/s beside "
          f"{args.events_per_s:g} events/s for {args.seconds:g} s: {figures}")
    if args.compare_fetch_wait:
        old = run(args.seconds, args.requests_per_s, args.events_per_s, 500)
        print(f"fetch wait 500 ms (kafka-python default): {old}")
        figures["rt_p99_ms_fetch_wait_500"] = old["rt_p99_ms"]
    if args.compare_sync_load:
        sync = run(args.seconds, args.requests_per_s, args.events_per_s, 10,
                   rival=(True, False, False))
        print(f"snapshots loaded inside the poll (before background loading): {sync}")
        for key in ("rt_p50_ms", "rt_p99_ms", "inflow_p50_ms", "inflow_p99_ms"):
            figures[f"{key}_sync_load"] = sync[key]
    if args.compare_sink_flush:
        flush = run(args.seconds, args.requests_per_s, args.events_per_s, 10,
                    rival=(False, True, False))
        print(f"sinks waiting for acknowledgements in every write_batch (before): {flush}")
        for key in ("rt_p50_ms", "rt_p99_ms", "inflow_p50_ms", "inflow_p99_ms",
                    "sink_write_share", "sink_write_ms_per_call"):
            figures[f"{key}_flush_each_batch"] = flush[key]
    if args.compare_sync_write:
        print(f"snapshot versions made durable on the worker thread (before): {durable}")
        for key in ("rt_p50_ms", "rt_p90_ms", "rt_p99_ms", "inflow_p50_ms", "inflow_p90_ms",
                    "inflow_p99_ms"):
            figures[f"{key}_sync_write"] = durable[key]
    print(orjson.dumps(figures).decode())


if __name__ == "__main__":
    main()
