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
The round trip broken into consecutive spans per request (``SPANS``; the flow process
is traced by ``trace``: its Kafka source batches, its recommendations producer's
acknowledgements, its GC pauses and its stage calls of 5 ms or more): p50/p90/p99 of
each and its mean over the slowest 1% (``span_<name>_ms``), each one's p50 per 10 s of
the live phase (``span_p50_by_window_ms``: which span grows through a run), the GC
pauses of the flow and of the client (``gc_*``), and what the slowest 1% overlapped
(``tail_overlap_ms``: GC pauses, stage calls, the snapshot loader thread).
``--compare-runtime`` adds a run with the process settings before ``flows/runtime.py``
(``*_old_runtime``).
``--processes N`` runs the flow as N processes (``-i/-a``, as ``bench/scaleout.py``
does) over an events topic of N partitions keyed by user id (each process reads one;
the user shards' events cross between them as Bytewax routes them), and
``--compare-processes N`` adds a run with N processes right after the first, at the
same rates (``*_processes_N``); ``flow_cpu_per_s`` is the flow processes' CPU seconds
per second of the live phase (near the process count: the flow is saturated, queueing
sets the figures). ``--co-partition`` sends each user event to the partition read by
the worker of its user shard (``co_partition_of``), so requests do not cross processes
on their way in; ``--compare-co-partition`` adds a run with the other partitioning.
Loopback only; the run is bounded in count and time. Ends with one JSON line:
``rt_p50_ms``, ``rt_p90_ms``, ``rt_p99_ms``, ``inflow_p50_ms``, ``inflow_p90_ms``,
``inflow_p99_ms``, ``requests``, ``answered``, ``requests_per_s``, ``events_per_s``,
``processes``, ``flow_cpu_per_s``, then the step timers, the spans and the GC figures above;
``by_window``: per 10 s of the live phase, the round trip and in-flow p50 / p99 and the
CPU per second of the flow, of the local broker and of this client (whether the latency
grows within a run, and whose CPU grows with it); ``broker_cpu_per_s`` and
``client_cpu_per_s`` the same over the whole live phase.

The local broker's cost grows with its log; a real Kafka broker's does not. This
Tansu build's ``memory://`` storage lists every record batch stored in a partition on
each fetch that returns records (~0.7 us of broker CPU per stored batch per fetch on
this machine: 0.9 ms per produce + fetch round at 100 stored batches, 12 ms at 16,000;
``bench/broker_growth.py``), and the live phase stores ~100 batches a second in the
events partition (one per 10 ms tick of the client) and up to as many in the
recommendations partition (one per write of the flow's sink holding answers). So at a
constant traffic the broker's CPU per second climbs through a run (~0.1 -> ~0.5 of a
core over 70 s) and lengthens ``to_flow`` and ``client_fetch`` while the flow's own CPU
stays flat. Nothing here can bound it: the build ignores the topic settings
``retention.ms``, ``retention.bytes``, ``segment.bytes`` (DescribeConfigs answers none)
and does not implement DeleteRecords (the request panics in the broker and drops the
connection).
Read ``by_window``'s ``broker_cpu_per_s`` beside the round trip: a growth that follows
it is the test broker's, not the flow's. ``--bootstrap HOST:PORT`` runs against another
broker instead (a Kafka broker, whose fetch finds its offset through an index), on
topics of a fresh app name, without the broker's CPU.

Usage: ``python bench/latency.py [--seconds 30] [--requests-per-s 100] [--events-per-s 2000]
[--compare-runtime] [--compare-batch-size N] [--compare-sync-load] [--compare-sink-flush] [--compare-sync-write]
[--compare-fetch-wait] [--processes N] [--compare-processes N] [--co-partition]
[--compare-co-partition] [--bootstrap HOST:PORT]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import itertools
import os
import re
import shutil
import subprocess
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

from common import flow_process_args, gc_pause_hook, root_pythonpath

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


def trace(path: str) -> None:
    """Stamp, in the flow process, the moments the flow's own records cannot carry:
    a line per Kafka source batch (``src <wall ns> <first offset> <next offset>
    <partition>``), per acknowledged recommendation (``ack <wall ns> <offset>``, from the sink producer's
    sender thread) and per GC pause of 1 ms or more (``gc <start ns> <duration ns>
    <generation>``), line-buffered into ``path``; and each recommendation carries its
    batch's ingest wall time (``trace_ingest_ns``, the ``ingest_ns`` its ``latency_ms``
    counts from). The spans of a round trip are read from these (``spans``)."""
    import gc
    import threading as th

    from operators import kafka_io, kafka_sink, serving

    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process's life
    lock = th.Lock()

    def line(text: str) -> None:
        with lock:
            out.write(text + "\n")

    next_batch = kafka_io._KafkaSourcePartition._next_batch

    def traced_next_batch(self: Any) -> Any:
        first = self._offset
        batch = next_batch(self)
        if batch and first is not None:
            line(f"src {time.time_ns()} {first} {self._offset} {self._tp.partition}")
        return batch

    kafka_io._KafkaSourcePartition._next_batch = traced_next_batch  # type: ignore[method-assign]

    recommend = serving.Server.recommend

    def traced_recommend(self: Any, request: Any, ctx: Any, ingest_ns: int) -> Any:
        record = recommend(self, request, ctx, ingest_ns)
        record["trace_ingest_ns"] = ingest_ns
        return record

    serving.Server.recommend = traced_recommend  # type: ignore[method-assign]

    send = kafka_sink._KafkaSinkPartition._send

    def traced_send(self: Any, records: list[Any]) -> Any:
        before = len(self._in_flight)
        unsent = send(self, records)
        if self._topic.endswith(".recommendations"):
            for _, fut in self._in_flight[before:]:
                fut.add_callback(lambda md: line(f"ack {time.time_ns()} {md.offset}"))
        return unsent

    kafka_sink._KafkaSinkPartition._send = traced_send  # type: ignore[method-assign]

    from operators import index_builder, item_shard, metrics, snapshot_views, trainer, user_shard

    def timed(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.time_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                if (dur := time.time_ns() - t0) >= 5_000_000:
                    line(f"step {t0} {dur} {name}")
        return call

    for name, cls, method in (
            ("user_shard", user_shard.UserShardLogic, "on_item"),
            ("item_shard", item_shard.ItemShardLogic, "on_item"),
            ("index", index_builder.IndexBuilderLogic, "on_item"),
            ("trainer", trainer.TrainerLogic, "on_item"),
            ("metrics", metrics.MetricsLogic, "on_item"),
            ("loader_thread", snapshot_views.SnapshotViews, "_prepare_round")):
        setattr(cls, method, timed(name, getattr(cls, method)))

    def pause(generation: int, start: int, dur: int) -> None:
        if dur >= 1_000_000:
            line(f"gc {start} {dur} {generation}")

    gc.callbacks.append(gc_pause_hook(pause, time.time_ns))


def rival_flow(path: str, sync_load: bool = False, flush_each_batch: bool = False,
               sync_write: bool = False, trace_path: str = "") -> Any:
    """The flow, traced (``trace``) into ``trace_path`` when given, and for the rivals as
    it was before this bench's last changes: snapshot
    views loading new versions inside the poll (the batch waits for verify + load)
    and/or Kafka sinks waiting for every acknowledgement in each ``write_batch`` and/or
    snapshot versions made durable inside ``write`` (on the worker thread). Entry
    point ``python -m bytewax.run "bench/latency.py:rival_flow('config.json', ...)"``."""
    from flows.recsys import build
    from operators import kafka_sink, snapshot_views
    from state.snapshot_store import SnapshotStore

    if trace_path:
        trace(trace_path)

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


OLD_RUNTIME = {"gc_threshold": [50_000, 20, 100], "gc_freeze_when_caught_up": False,
               "switch_interval_ms": 5.0}
"""The process settings before ``flows.runtime`` (``--compare-runtime``): GC thresholds,
no freeze once caught up, Python's default GIL switch interval."""


def start_flow(bootstrap: str, out: Path, fetch_wait_ms: int, api_ports: list[int],
               rival: tuple[bool, bool, bool] = (False, False, False),
               overrides: dict[str, Any] | None = None, app: str = APP
               ) -> list[subprocess.Popen[bytes]]:
    """The flow of ``app`` as ``len(api_ports)`` processes (``-i/-a`` when more than one,
    as ``bench/scaleout.py`` runs them), each with its own dataflow API port; their logs
    go to ``flow.log`` (one file, lines appended by each)."""
    config = {
        "app": app,
        "inputs": [{"kind": "kafka", "topics": ["events"]}],
        "kafka": {"bootstrap": bootstrap, "consumer": {"fetch_max_wait_ms": fetch_wait_ms}},
        "output": {"kind": "kafka", "dir": str(out)},
        "snapshots": {"dir": str(out / "snapshots")},
        "metrics": {"port": 0},
        **(overrides or {}),
    }
    path = out / "config.json"
    path.write_bytes(orjson.dumps(config))
    entry = (f"{Path(__file__).resolve()}:rival_flow('{path}', {rival[0]}, {rival[1]}, "
             f"{rival[2]}, '{out / 'trace.txt'}')")
    addresses = [f"127.0.0.1:{free_port()}" for _ in api_ports]
    procs = []
    for i, api_port in enumerate(api_ports):
        log = (out / "flow.log").open("ab")
        # cwd: the run's temp dir (the dataflow API writes dataflow.json there)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "BYTEWAX_DATAFLOW_API_ENABLED": "true",
               "BYTEWAX_DATAFLOW_API_PORT": str(api_port),
               "PYTHONPATH": root_pythonpath()}
        args = flow_process_args(entry, i, addresses)
        procs.append(subprocess.Popen(args, cwd=out, env=env, stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


STEP_TIMES = {
    "sinks": ("bytewax_out_part_write_batch_duration_seconds", ".out_"),
    "user_shard": ("bytewax_stateful_batch_on_batch_duration_seconds", ".user_shard."),
    "item_shard": ("bytewax_stateful_batch_on_batch_duration_seconds", ".item_shard."),
    "ranker": ("bytewax_stateful_batch_on_batch_duration_seconds", ".ranker."),
    "index": ("bytewax_stateful_batch_on_batch_duration_seconds", ".index."),
}
"""Bytewax's own step timers (its dataflow API, docs/operations.md) summed per group:
(histogram family, substring of the step id)."""


def step_seconds(api_ports: list[int]) -> dict[str, tuple[float, float]]:
    """(seconds, calls) per ``STEP_TIMES`` group and per output step (``out_<name>``),
    scraped from the flow processes' dataflow APIs and summed over them; {} when none
    answers."""
    import urllib.request

    line = re.compile(r'^(\w+)_(sum|count)\{([^}]*)\}\s+(\S+)$')
    out: dict[str, list[float]] = {}
    for api_port in api_ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            continue
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

    def __init__(self, bootstrap: str, fetch_wait_ms: int, app: str = APP) -> None:
        super().__init__(daemon=True)
        topic = f"{app}.recommendations"
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                      fetch_max_wait_ms=fetch_wait_ms)
        self.consumer.assign([TopicPartition(topic, 0)])
        self.received: dict[str, tuple[float, float]] = {}
        """request_id -> (receipt wall time s, in-flow latency_ms)."""
        self.traced: dict[str, tuple[int, int, int]] = {}
        """request_id -> (the flow's ingest wall ns, the answer's CreateTime ms: when the
        flow's sink handed it to its producer, its offset)."""
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for records in self.consumer.poll(timeout_ms=20).values():
                now = time.time()
                for rec in records:
                    r = orjson.loads(rec.value)
                    self.received[r["request_id"]] = (now, r["latency_ms"])
                    if "trace_ingest_ns" in r:
                        self.traced[r["request_id"]] = (r["trace_ingest_ns"], rec.timestamp,
                                                        rec.offset)
        self.consumer.close()

    def wait_for(self, request_id: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while request_id not in self.received:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


SPANS = ("to_flow", "to_parse", "in_flow", "to_sink", "answer_ack", "client_fetch")
"""The consecutive spans of a round trip, each ending where the next begins:
client send -> the flow's Kafka source returns the batch holding the request
(``to_flow``: the client's producer, the broker's append, the flow's fetch and how
often Bytewax polls the source) -> the batch's parse (``to_parse``, the flow's
``ingest_ns``) -> the answer (``in_flow``, the record's ``latency_ms``) -> the flow's
sink hands it to its producer (``to_sink``: the record's CreateTime, ms) -> the
broker's acknowledgement reaches the flow's producer (``answer_ack``) -> the client
consumes it (``client_fetch``). ``request_ack`` (send -> the broker's acknowledgement
seen by the client) splits ``to_flow``: the client's producer and the broker's append."""


def spans(sent: dict[str, float], acks: dict[str, tuple[float, int, int]], receiver: Receiver,
          trace_lines: list[str], client_gc: list[tuple[int, int]],
          live: tuple[int, int]) -> dict[str, Any]:
    """Per span (``SPANS``, ``request_ack``), ms: p50/p90/p99 over the traced requests and
    the mean over the slowest 1% of round trips (``tail_mean``: what the p99 is made of);
    GC pauses of the flow and of the client over the live phase (``live``, wall ns) and
    the share of the slowest 1% whose flow span (source -> sink) or client span
    (acknowledged answer -> receipt) a pause overlapped; the source's batches per second
    and records per batch."""
    src_t, src_first, src_next, flow_ack, flow_gc = [], [], [], {}, []
    by_part: dict[int, list[int]] = {}
    """Events partition -> positions of its source batches in ``src_*`` (offset order)."""
    by_gen: dict[str, list[float]] = {}
    stalls: dict[str, list[tuple[float, float]]] = {}
    """Flow calls of 5 ms or more by stage (wall ms intervals)."""
    for raw in trace_lines:
        kind, *f = raw.split()
        if kind == "src":
            by_part.setdefault(int(f[3]) if len(f) > 3 else 0, []).append(len(src_t))
            src_t.append(int(f[0]))
            src_first.append(int(f[1]))
            src_next.append(int(f[2]))
        elif kind == "ack":
            flow_ack[int(f[1])] = int(f[0])
        elif kind == "step":
            stalls.setdefault(f[2], []).append((int(f[0]) / 1e6, (int(f[0]) + int(f[1])) / 1e6))
        elif kind == "gc":
            flow_gc.append((int(f[0]), int(f[1])))
            if live[0] <= int(f[0]) <= live[1]:
                by_gen.setdefault(f"gen{f[2]}", []).append(int(f[1]) / 1e6)
    nexts = {part: np.asarray([src_next[j] for j in rows]) for part, rows in by_part.items()}
    rows: list[list[float]] = []
    windows: list[tuple[float, ...]] = []
    for rid, t0 in sent.items():
        if rid not in receiver.traced or rid not in acks:
            continue
        recv_s = receiver.received[rid][0]
        ingest_ns, emit_ms, out_offset = receiver.traced[rid]
        ack_s, offset, partition = acks[rid]
        if partition not in nexts:
            continue
        k = int(np.searchsorted(nexts[partition], offset, side="right"))
        if k >= len(nexts[partition]):
            continue
        i = by_part[partition][k]
        if src_first[i] > offset or out_offset not in flow_ack:
            continue
        src_ns, back_ns = src_t[i], flow_ack[out_offset]
        answer_ms = ingest_ns / 1e6 + receiver.received[rid][1]
        marks = [t0 * 1e3, src_ns / 1e6, ingest_ns / 1e6, answer_ms, float(emit_ms),
                 back_ns / 1e6, recv_s * 1e3]
        rows.append([b - a for a, b in zip(marks, marks[1:], strict=False)]
                    + [(ack_s - t0) * 1e3, (recv_s - t0) * 1e3])
        windows.append((src_ns / 1e6, float(emit_ms), back_ns / 1e6, recv_s * 1e3, t0 * 1e3))
    if not rows:
        return {}
    a = np.asarray(rows)
    rt = a[:, -1]
    tail = rt >= np.percentile(rt, 99)
    out: dict[str, Any] = {"traced": len(rows)}
    for j, name in enumerate((*SPANS, "request_ack")):
        col = a[:, j]
        out[f"span_{name}_ms"] = {
            "p50": round(float(np.percentile(col, 50)), 1),
            "p90": round(float(np.percentile(col, 90)), 1),
            "p99": round(float(np.percentile(col, 99)), 1),
            "tail_mean": round(float(col[tail].mean()), 1)}
    out["span_p50_by_window_ms"] = span_p50_by_window(
        a[:, :-2], np.asarray([w[4] for w in windows]) - 1e3 * min(sent.values()))

    def in_live(pauses: list[tuple[int, int]]) -> list[tuple[float, float]]:
        return [(s / 1e6, (s + d) / 1e6) for s, d in pauses if live[0] <= s <= live[1]]

    def overlapped(pauses: list[tuple[float, float]], lo: float, hi: float) -> bool:
        return any(s < hi and e > lo for s, e in pauses)

    tail_windows = [w for w, t in zip(windows, tail, strict=True) if t]
    for who, pauses, pick in (("flow", in_live(flow_gc), lambda w: (w[0], w[1])),
                              ("client", in_live(client_gc), lambda w: (w[2], w[3]))):
        lengths = [e - s for s, e in pauses]
        out[f"gc_{who}_pauses"] = len(pauses)
        out[f"gc_{who}_max_ms"] = round(max(lengths, default=0.0), 1)
        out[f"gc_{who}_total_ms"] = round(sum(lengths), 1)
        out[f"gc_{who}_tail_share"] = round(
            sum(overlapped(pauses, *pick(w)) for w in tail_windows) / max(len(tail_windows), 1), 3)
    # What the slowest 1% waited for: per cause, the mean overlap (ms) of its stalls
    # (GC pauses, stage calls of 5 ms or more, the loader thread) with a tail request's
    # whole round trip.
    stalls["gc_flow"] = in_live(flow_gc)
    stalls["gc_client"] = in_live(client_gc)
    rt_windows = [(w[4], w[3]) for w, t in zip(windows, tail, strict=True) if t]

    def overlap(pauses: list[tuple[float, float]], lo: float, hi: float) -> float:
        return sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in pauses)

    lo_ms, hi_ms = live[0] / 1e6, live[1] / 1e6
    out["stage_calls_over_5ms"] = {
        cause: {"calls": len(v), "max_ms": round(max(e - b for b, e in v), 1),
                "total_ms": round(sum(e - b for b, e in v), 1)}
        for cause, v in sorted((c, [w for w in v if lo_ms <= w[0] <= hi_ms])
                               for c, v in stalls.items() if not c.startswith("gc_"))
        if v}
    out["tail_overlap_ms"] = {
        cause: round(sum(overlap(v, *w) for w in rt_windows) / max(len(rt_windows), 1), 1)
        for cause, v in sorted(stalls.items())}
    out["gc_flow_ms_by_gen"] = {g: {"pauses": len(v), "max": round(max(v), 1),
                                    "total": round(sum(v), 1)} for g, v in sorted(by_gen.items())}
    live_src = [(t, n - f) for t, f, n in zip(src_t, src_first, src_next, strict=True)
                if live[0] <= t <= live[1]]
    seconds = (live[1] - live[0]) / 1e9
    out["source_batches_per_s"] = round(len(live_src) / seconds, 1)
    out["source_records_per_batch"] = round(
        sum(n for _, n in live_src) / max(len(live_src), 1), 1)
    return out


def span_p50_by_window(spans_ms: np.ndarray, sent_ms: np.ndarray) -> dict[str, list[float]]:
    """Per span (``SPANS``: the columns of ``spans_ms``, a row per traced request), the
    p50 (ms) of the requests sent in each ``WINDOW_S`` of the live phase (``sent_ms``:
    each row's send time from the first send); which span grows through a run."""
    window = (sent_ms // (WINDOW_S * 1e3)).astype(int)
    return {name: [round(float(np.percentile(spans_ms[window == w, j], 50)), 1)
                   for w in np.unique(window)]
            for j, name in enumerate(SPANS)}


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by the processes ``pids`` (Linux
    ``/proc``; 0 where it cannot be read)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


WINDOW_S = 10
"""The live phase's windows of ``by_window`` (s)."""

CpuMark = tuple[float, dict[str, float]]
"""(elapsed s of the live phase, CPU s used so far by each process group: ``flow``,
``broker``, ``client``), taken at the start of each window and at the end."""


def cpu_mark(elapsed_s: float, groups: dict[str, list[int]]) -> CpuMark:
    """The CPU seconds used so far by each group of processes (``_cpu_s``)."""
    return elapsed_s, {name: _cpu_s(pids) for name, pids in groups.items()}


def by_window(sent: dict[str, float], received: dict[str, tuple[float, float]],
              cpu_marks: list[CpuMark]) -> list[dict[str, Any]]:
    """Per ``WINDOW_S`` of the live phase (by send time): round trip and in-flow p50 /
    p99 (ms) of the requests sent in it, and each process group's CPU per wall second
    over it (``<group>_cpu_per_s`` from ``cpu_marks``: the flow's, the local broker's,
    the client's)."""
    if not sent:
        return []
    t0 = min(sent.values())
    rows: dict[int, tuple[list[float], list[float]]] = {}
    for rid, t in sent.items():
        if rid in received:
            rt, inflow = rows.setdefault(int((t - t0) // WINDOW_S), ([], []))
            rt.append((received[rid][0] - t) * 1000)
            inflow.append(received[rid][1])
    cpu = [{f"{name}_cpu_per_s": round((c1[name] - c0[name]) / (e1 - e0), 3) for name in c0}
           for (e0, c0), (e1, c1) in itertools.pairwise(cpu_marks)]
    return [{"from_s": w * WINDOW_S,
             "rt_p50_ms": round(float(np.percentile(rt, 50)), 1),
             "rt_p99_ms": round(float(np.percentile(rt, 99)), 1),
             "inflow_p50_ms": round(float(np.percentile(inflow, 50)), 1),
             "inflow_p99_ms": round(float(np.percentile(inflow, 99)), 1),
             **(cpu[w] if w < len(cpu) else {})}
            for w, (rt, inflow) in sorted(rows.items())]


def co_partition_of(partitions: int) -> Any:
    """``user id -> events partition`` that keeps a user's events in the process of the
    user's shard: ``shard_of(user_id) mod partitions`` with the flow's ``shards.users``
    (zero-config or environment). With one partition per worker (``W`` dividing 12),
    partition ``p`` is read by worker ``p`` (Bytewax places a source's partitions round
    robin in name order, ``topic#0``.. for up to 10) and user shard ``j`` runs on worker
    ``j mod W`` (``operators.placement``), so a user event never crosses processes on its
    way to its shard."""
    from flows.config import load_config
    from state.hashing import ShardOf

    shard_of = ShardOf(load_config(None).shards.users)
    return lambda user_id: shard_of(str(user_id)) % partitions


def run(seconds: float, requests_per_s: float, events_per_s: float,
        fetch_wait_ms: int, rival: tuple[bool, bool, bool] = (False, False, False),
        overrides: dict[str, Any] | None = None, processes: int = 1,
        co_partition: bool = False, bootstrap: str | None = None) -> dict[str, Any]:
    """One measured run on a fresh local broker and flow (``bootstrap``: on that broker
    instead, with topics of a fresh app name); the figures of its live phase.
    ``rival``: (snapshots loaded inside the poll, sinks waiting for acks per batch,
    snapshots made durable on the worker thread); ``overrides``: config sections;
    ``processes``: flow processes, with as many partitions of the events topic (keyed
    by user id), one per process (Bytewax places them round robin); ``co_partition``:
    a user event goes to partition ``shard_of(user_id) mod processes`` instead, the
    partition read by the worker that runs the user's shard (``co_partition_of``)."""
    out = Path(tempfile.mkdtemp(prefix="streamrec-latency-"))
    now_ms = int(time.time() * 1000)
    n_live = int(seconds * events_per_s) + 1
    warm, live = world(now_ms, int(n_live * 1.2))
    users = [e["user_id"] for e in warm if e["type"] == "request"]
    app = APP if bootstrap is None else f"{APP}-{os.getpid()}-{now_ms}"
    with contextlib.nullcontext(None) if bootstrap else LocalBroker() as broker:
        bootstrap = bootstrap or broker.bootstrap
        create_topics(bootstrap, f"{app}.events", processes)
        create_topics(bootstrap, [f"{app}.{n}" for n in OUTPUTS], 1)
        api_ports = [free_port() for _ in range(processes)]
        flows = start_flow(bootstrap, out, fetch_wait_ms, api_ports, rival, overrides, app)
        receiver = Receiver(bootstrap, fetch_wait_ms, app)
        receiver.start()
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks=1)
        topic = f"{app}.events"

        partition_of = co_partition_of(processes) if co_partition and processes > 1 else None

        def send(event: dict[str, Any]) -> Any:
            user = event.get("user_id")
            return producer.send(topic, key=str(user or "").encode(), value=orjson.dumps(event),
                                 partition=partition_of(user) if partition_of and user else None)

        acks: dict[str, tuple[float, int, int]] = {}
        """request_id -> (wall s the client's producer saw the broker's acknowledgement,
        the request's offset and partition)."""
        client_gc: list[tuple[int, int]] = []

        def client_pause(generation: int, start: int, dur: int) -> None:
            if dur >= 1_000_000:
                client_gc.append((start, dur))
        on_gc = gc_pause_hook(client_pause, time.time_ns)

        try:
            for event in warm:
                send(event)
            for part in range(processes):  # one marker behind each partition's backlog
                marker = {"type": "request", "ts": now_ms, "request_id": f"warm-up-done-{part}",
                          "user_id": users[-1]}
                producer.send(topic, value=orjson.dumps(marker), partition=part)
            producer.flush()
            for part in range(processes):
                if not receiver.wait_for(f"warm-up-done-{part}", 600):
                    raise RuntimeError("the flow did not take the warm-up in 600 s:\n"
                                       + (out / "flow.log").read_text()[-3000:])
            steps0 = step_seconds(api_ports)
            pids = {"flow": [f.pid for f in flows], "client": [os.getpid()],
                    **({"broker": [broker.pid or 0]} if broker else {})}
            live_from = time.time_ns()
            gc.callbacks.append(on_gc)
            sent: dict[str, float] = {}
            tick = 0.01  # the client's schedule: every 10 ms, what is due by then
            start = time.monotonic()
            n_req = n_ev = 0
            cpu_marks = [cpu_mark(0.0, pids)]  # every WINDOW_S, and at the end
            while (elapsed := time.monotonic() - start) < seconds:
                if elapsed >= WINDOW_S * len(cpu_marks):
                    cpu_marks.append(cpu_mark(elapsed, pids))
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
                    send(request).add_callback(
                        lambda md, rid=rid: acks.__setitem__(rid, (time.time(), md.offset,
                                                                md.partition)))
                    n_req += 1
                producer.flush()
                time.sleep(max(0.0, start + elapsed + tick - time.monotonic()))
            wall = time.monotonic() - start
            live_to = time.time_ns()
            cpu_marks.append(cpu_mark(wall, pids))
            steps1 = step_seconds(api_ports)
            deadline = time.monotonic() + 30
            while len([r for r in sent if r in receiver.received]) < len(sent) and (
                    time.monotonic() < deadline):
                time.sleep(0.1)
        finally:
            if on_gc in gc.callbacks:
                gc.callbacks.remove(on_gc)
            receiver.stop.set()
            receiver.join(timeout=5)
            producer.close()
            for flow in flows:
                flow.kill()
            for flow in flows:
                flow.wait(timeout=30)
            trace_lines = ((out / "trace.txt").read_text().splitlines()
                           if (out / "trace.txt").exists() else [])
            froze = re.findall(r"gc: froze ([\d,]+) objects .* in (\d+) ms",
                               (out / "flow.log").read_text(errors="replace"))
            shutil.rmtree(out, ignore_errors=True)
    got = [(receiver.received[r][0] - t) * 1000 for r, t in sent.items() if r in receiver.received]
    inflow = [receiver.received[r][1] for r in sent if r in receiver.received]
    rt, fl = np.asarray(got), np.asarray(inflow)

    def pct(a: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(a, q)), 1) if a.size else None

    steps = {g: (steps1[g][0] - steps0.get(g, (0.0, 0.0))[0],
                 steps1[g][1] - steps0.get(g, (0.0, 0.0))[1]) for g in steps1}
    cpu_per_s = {name: round((cpu_marks[-1][1][name] - cpu0) / wall, 3)
                 for name, cpu0 in cpu_marks[0][1].items()}
    sink_s, sink_calls = steps.get("sinks", (0.0, 0.0))
    user_s, user_calls = steps.get("user_shard", (0.0, 0.0))
    return {
        "rt_p50_ms": pct(rt, 50), "rt_p90_ms": pct(rt, 90), "rt_p99_ms": pct(rt, 99),
        # per WINDOW_S of the live phase: does the latency grow with the run?
        "by_window": by_window(sent, receiver.received, cpu_marks),
        "inflow_p50_ms": pct(fl, 50), "inflow_p90_ms": pct(fl, 90), "inflow_p99_ms": pct(fl, 99),
        "requests": len(sent), "answered": len(got),
        "requests_per_s": round(n_req / wall, 1), "events_per_s": round(n_ev / wall, 1),
        "processes": processes,
        # the flow processes' CPU over the live phase, per wall second (summed over
        # processes: 1.0 is one core busy; near the process count, the flow is saturated)
        "flow_cpu_per_s": cpu_per_s["flow"],
        # the local broker's and this client's CPU over the live phase, per wall second
        # (the broker's grows through a run: its fetches list every stored batch)
        "broker_cpu_per_s": cpu_per_s.get("broker"), "client_cpu_per_s": cpu_per_s["client"],
        # the worker's wall time in the sinks' write_batch (send + flush + acks) and in
        # the user shards, over the live phase (Bytewax's own step timers)
        "sink_write_share": round(sink_s / wall, 4) if steps else None,
        "sink_write_ms_per_call": round(1e3 * sink_s / sink_calls, 2) if sink_calls else None,
        "sink_write_calls_per_s": round(sink_calls / wall, 1) if steps else None,
        "user_shard_share": round(user_s / wall, 4) if steps else None,
        "user_shard_ms_per_call": round(1e3 * user_s / user_calls, 2) if user_calls else None,
        "step_seconds": {g: round(v[0], 3) for g, v in sorted(steps.items())},
        **spans(sent, acks, receiver, trace_lines, client_gc, (live_from, live_to)),
        # the flow's one freeze once its input caught up (runtime.gc_freeze_when_caught_up)
        "gc_frozen_objects": int(froze[-1][0].replace(",", "")) if froze else 0,
        "gc_freeze_pause_ms": int(froze[-1][1]) if froze else None,
    }


def print_spans(title: str, figures: dict[str, Any]) -> None:
    """The round trip's breakdown as a table (ms)."""
    print(f"{title}: round trip p50/p90/p99 {figures['rt_p50_ms']} / {figures['rt_p90_ms']} / "
          f"{figures['rt_p99_ms']} ms, in flow {figures['inflow_p50_ms']} / "
          f"{figures['inflow_p90_ms']} / {figures['inflow_p99_ms']} ms")
    print(f"  {'span (ms)':<14}{'p50':>8}{'p90':>8}{'p99':>8}{'slowest 1%':>12}")
    for name in (*SPANS, "request_ack"):
        v = figures.get(f"span_{name}_ms")
        if v:
            print(f"  {name:<14}{v['p50']:>8}{v['p90']:>8}{v['p99']:>8}{v['tail_mean']:>12}")
    print(f"  GC pauses >= 1 ms in the flow: {figures.get('gc_flow_ms_by_gen')}; the slowest "
          f"1% overlapped (mean ms): {figures.get('tail_overlap_ms')}")
    print(f"  stage calls of 5 ms or more: {figures.get('stage_calls_over_5ms')}")
    print(f"  span p50 per {WINDOW_S} s (ms): {figures.get('span_p50_by_window_ms')}")


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
    parser.add_argument("--compare-runtime", action="store_true",
                        help="also run with the process settings before flows/runtime.py "
                             "(GC thresholds 50000/20/100, no freeze once caught up, GIL "
                             "switch interval 5 ms)")
    parser.add_argument("--compare-batch-size", type=int, default=0, metavar="N",
                        help="also run with the Kafka input's inputs[].batch_size = N "
                             "(default 1000): micro-batches bounded tighter")
    parser.add_argument("--processes", type=int, default=1,
                        help="flow processes (-i/-a), with as many partitions of the events "
                             "topic (default 1)")
    parser.add_argument("--compare-processes", type=int, default=0, metavar="N",
                        help="also run the flow as N processes right after, at the same "
                             "rates (keys *_processes_N)")
    parser.add_argument("--co-partition", action="store_true",
                        help="with several processes, send each user event to partition "
                             "shard_of(user_id) mod N (the partition read by the worker of "
                             "its user shard) instead of Kafka's hash of the user id")
    parser.add_argument("--compare-co-partition", action="store_true",
                        help="also run with the other partitioning right after (keys "
                             "*_co_partition or *_keyed)")
    parser.add_argument("--bootstrap", metavar="HOST:PORT",
                        help="run against this broker (e.g. Kafka) instead of a fresh local "
                             "Tansu one, on topics of a fresh app name (no broker CPU "
                             "figures)")
    args = parser.parse_args()
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    measure = functools.partial(run, processes=args.processes, co_partition=args.co_partition,
                                bootstrap=args.bootstrap)
    figures = measure(args.seconds, args.requests_per_s, args.events_per_s, 10)
    print_spans("this flow", figures)
    if args.compare_batch_size:  # right after, on the same machine load
        small = measure(args.seconds, args.requests_per_s, args.events_per_s, 10, overrides={
            "inputs": [{"kind": "kafka", "topics": ["events"],
                        "batch_size": args.compare_batch_size}]})
        print_spans(f"batch_size {args.compare_batch_size}", small)
        for key in ("rt_p50_ms", "rt_p90_ms", "rt_p99_ms", "inflow_p50_ms", "inflow_p90_ms",
                    "inflow_p99_ms", "user_shard_share"):
            figures[f"{key}_batch_{args.compare_batch_size}"] = small.get(key)
    if args.compare_processes:  # right after, on the same machine load
        other = run(args.seconds, args.requests_per_s, args.events_per_s, 10,
                    processes=args.compare_processes, co_partition=args.co_partition,
                    bootstrap=args.bootstrap)
        print_spans(f"{args.compare_processes} processes", other)
        for key in ("rt_p50_ms", "rt_p90_ms", "rt_p99_ms", "inflow_p50_ms", "inflow_p90_ms",
                    "inflow_p99_ms", "answered", "flow_cpu_per_s", "source_records_per_batch"):
            figures[f"{key}_processes_{args.compare_processes}"] = other.get(key)
    if args.compare_co_partition:  # right after, on the same machine load
        other = measure(args.seconds, args.requests_per_s, args.events_per_s, 10,
                        co_partition=not args.co_partition)
        label = "keyed" if args.co_partition else "co_partition"
        print_spans(label, other)
        for key in ("rt_p50_ms", "rt_p90_ms", "rt_p99_ms", "inflow_p50_ms", "inflow_p90_ms",
                    "inflow_p99_ms", "answered", "flow_cpu_per_s", "span_in_flow_ms",
                    "span_to_sink_ms"):
            figures[f"{key}_{label}"] = other.get(key)
    if args.compare_runtime:  # right after, on the same machine load
        old_gc = measure(args.seconds, args.requests_per_s, args.events_per_s, 10,
                     overrides={"runtime": OLD_RUNTIME})
        print_spans("runtime as before (GC 50000/20/100, no freeze, switch 5 ms)", old_gc)
        for key in ("rt_p50_ms", "rt_p90_ms", "rt_p99_ms", "inflow_p50_ms", "inflow_p90_ms",
                    "inflow_p99_ms", "gc_flow_max_ms", "gc_flow_total_ms"):
            figures[f"{key}_old_runtime"] = old_gc.get(key)
    if args.compare_sync_write:  # right after, on the same machine load
        durable = measure(args.seconds, args.requests_per_s, args.events_per_s, 10,
                      rival=(False, False, True))
    print(f"fetch wait 10 ms: {args.requests_per_s:g} requests/s beside "
          f"{args.events_per_s:g} events/s for {args.seconds:g} s: {figures}")
    if args.compare_fetch_wait:
        old = measure(args.seconds, args.requests_per_s, args.events_per_s, 500)
        print(f"fetch wait 500 ms (kafka-python default): {old}")
        figures["rt_p99_ms_fetch_wait_500"] = old["rt_p99_ms"]
    if args.compare_sync_load:
        sync = measure(args.seconds, args.requests_per_s, args.events_per_s, 10,
                   rival=(True, False, False))
        print(f"snapshots loaded inside the poll (before background loading): {sync}")
        for key in ("rt_p50_ms", "rt_p99_ms", "inflow_p50_ms", "inflow_p99_ms"):
            figures[f"{key}_sync_load"] = sync[key]
    if args.compare_sink_flush:
        flush = measure(args.seconds, args.requests_per_s, args.events_per_s, 10,
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
