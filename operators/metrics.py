"""The metrics stage: one key that aggregates counters from every stage.

Stages send ``(kind, payload)`` items:

* ``("parse", {"events_by_type", "dead_by_reason", "max_ts"})`` per micro-batch;
* ``("shard", {"shard": key, "counters": {...}, "table": {...}})`` cumulative user-shard
  counters (joiner counters, pending sizes, requests) and its MF user-table counters;
* ``("outputs", {topic: records})``, ``("examples", {label: [count, weight]})``,
  ``("latency", [ms, ...])`` serving latencies of a batch of recommendations;
* ``("snapshots", [manifest, ...])`` every published snapshot (ranker sync, item
  tables with their embedding-table counters, index);
* ``("errors", {stage: n})`` inputs a stateful stage failed to apply (dead-lettered as
  ``processing_error``; counted apart from ``dead_by_reason``, which counts raw inputs).

* ``("serving_cost", [(cpu_ms, queue_ms), ...])`` per answered request;
* ``("parse", {..., "offsets": {"topic#p": (next, end)}})`` Kafka read positions;
* ``("items", [(kind, payload), ...])`` several of the above from one stage output,
  folded in their order (one item, so one pickle and one stage call, per user-shard
  output instead of ~6: in a cluster they cross to the metrics stage's process).

The stage emits a ``metrics`` record every ``metrics.interval_s`` of wall time and a
final one at end of input (also logged as the run summary). With ``metrics.port`` set
the flow serves the same figures through prometheus_client on
``http://HOST:PORT/metrics`` and liveness on ``/healthz`` (``operators/prometheus.py``;
every streamrec sample labelled ``app``); see docs/operations.md for the list.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bytewax.operators import StatefulLogic

from events.model import Record
from operators import health
from operators.status import StatusLog
from state.settings import doc

logger = logging.getLogger(__name__)

TABLE_COUNTERS = ("admitted", "rejected", "expired", "evicted")
"""Embedding-table counters exported per table (user / item factors)."""

_LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
_CPU_BUCKETS_MS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200)


def resident_mb() -> tuple[float, float]:
    """``(now, peak)`` resident set size of this process, MB (Linux ``/proc/self/status``:
    ``VmRSS``, ``VmHWM``); ``(nan, nan)`` where that file does not exist."""
    found: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    found[line[:5]] = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return found.get("VmRSS", float("nan")), found.get("VmHWM", float("nan"))


@dataclass
class MetricsConfig:
    """Metrics: the ``metrics`` output records and the Prometheus endpoint."""

    interval_s: float = doc("Wall time between periodic metrics records (s).", 10.0)
    port: int = doc("Serve Prometheus metrics on this TCP port at /metrics (and liveness at "
                    "/healthz); 0 = off.", 0)
    host: str = doc("Address the metrics endpoint binds to (0.0.0.0: every interface, e.g. "
                    "in a container).", "127.0.0.1")
    max_threads: int = doc("Requests the metrics endpoint serves at once; more are refused.", 4)
    request_timeout_s: float = doc("Socket timeout of one metrics request (s).", 5.0)
    health_stall_s: float = doc("/healthz answers 503 when no input partition or metrics "
                                "stage of the process made progress for this long (s).", 60.0)
    latency_buckets_ms: list[float] = doc(
        "Upper bounds of the serving-latency histogram buckets (ms).",
        factory=lambda: [float(b) for b in _LATENCY_BUCKETS_MS])


class Histogram:
    """Cumulative-bucket histogram (Prometheus style): counts per upper bound, sum, count."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = sorted(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, values: Iterable[float]) -> None:
        for v in values:
            self.counts[bisect.bisect_left(self.bounds, v)] += 1
            self.sum += v
            self.count += 1

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (None when empty)."""
        if not self.count:
            return None
        rank, seen = q * self.count, 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            seen += n
            if seen >= rank:
                return bound
        return float("inf")


class MetricsState:
    """Everything the metrics stage knows about a run (picklable: Bytewax state)."""

    def __init__(self, app: str, latency_buckets_ms: Iterable[float] = _LATENCY_BUCKETS_MS) -> None:
        self.app = app
        self.events_by_type: Counter[str] = Counter()
        self.dead_by_reason: Counter[str] = Counter()
        self.processing_errors: Counter[str] = Counter()
        self.outputs: Counter[str] = Counter()
        self.examples: Counter[str] = Counter()
        self.example_weight: Counter[str] = Counter()
        self.shards: dict[str, dict[str, int]] = {}
        self.user_tables: dict[str, dict[str, int]] = {}
        self.item_tables: dict[str, dict[str, int]] = {}
        self.snapshots: dict[str, Record] = {}
        self.latency_ms = Histogram(latency_buckets_ms)
        self.serving_cpu_ms = Histogram(_CPU_BUCKETS_MS)
        self.queue_ms = Histogram(latency_buckets_ms)
        self.max_event_ts: int | None = None
        self.consumer: dict[str, tuple[int, int]] = {}
        """Kafka partition ("topic#p") -> (next offset to read, end offset) of the last
        batch read from it."""
        self.started = time.time()
        self.rss_start_mb = resident_mb()[0]
        """RSS (MB) of this process when the stage started or resumed, before the flow's
        tables filled up: the base of the bound of docs/operations.md, "Bounded memory"."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Resume (Bytewax recovery), filling fields a snapshot of an older version lacks;
        ``rss_start_mb`` is this process's."""
        self.__init__(state.get("app", "streamrec"))  # type: ignore[misc]
        self.__dict__.update({k: v for k, v in state.items() if k != "rss_start_mb"})

    def add(self, kind: str, payload: Any) -> None:
        """Fold one ``(kind, payload)`` item from a stage into the counters (``start``,
        sent once when the flow starts, and unknown kinds add nothing; ``items``: a list
        of such items, folded in order)."""
        if kind == "items":
            for item in payload:
                self.add(*item)
        elif kind == "parse":
            self.events_by_type.update(payload["events_by_type"])
            self.dead_by_reason.update(payload["dead_by_reason"])
            ts = payload.get("max_ts")
            if ts is not None and (self.max_event_ts is None or ts > self.max_event_ts):
                self.max_event_ts = ts
            if payload.get("offsets"):
                self.consumer.update(payload["offsets"])
        elif kind == "errors":
            self.processing_errors.update(payload)
        elif kind == "shard":
            self.shards[payload["shard"]] = payload["counters"]
            self.user_tables[payload["shard"]] = payload.get("table", {})
        elif kind == "outputs":
            self.outputs.update(payload)
        elif kind == "examples":
            for label, (n, weight) in payload.items():
                self.examples[label] += n
                self.example_weight[label] += weight
        elif kind == "latency":
            self.latency_ms.observe(payload)
        elif kind == "serving_cost":
            self.serving_cpu_ms.observe(cpu for cpu, _ in payload)
            self.queue_ms.observe(queue for _, queue in payload)
        elif kind == "snapshots":
            for manifest in payload:
                self.snapshots[manifest["kind"]] = manifest
                table = manifest.get("counts", {}).get("table")
                if table is not None:
                    self.item_tables[manifest["kind"]] = table

    # -- derived figures ----------------------------------------------------------------
    def join(self) -> Counter[str]:
        """User-shard counters (joiner, requests) summed over shards."""
        out: Counter[str] = Counter()
        for counters in self.shards.values():
            out.update(counters)
        return out

    def tables(self) -> dict[str, dict[str, int]]:
        """Embedding-table counters and rows, summed per table (``user``, ``item``)."""
        out = {}
        for name, per_shard in (("user", self.user_tables), ("item", self.item_tables)):
            total: Counter[str] = Counter()
            for table in per_shard.values():
                total.update({k: v for k, v in table.items() if k in (*TABLE_COUNTERS, "rows")})
            if total:
                out[name] = dict(total)
        return out

    def snapshot_ages(self, now_s: float) -> dict[str, Record]:
        """Per snapshot kind: version, event time, wall age (s) and freshness lag (s): how
        far the newest event seen is ahead of the event time the snapshot reflects."""
        out = {}
        for kind, m in sorted(self.snapshots.items()):
            lag = (self.max_event_ts - m["ts"]) / 1000 if self.max_event_ts is not None else None
            out[kind] = {"version": m["version"], "ts": m["ts"],
                         "age_s": round(now_s - m["created_ms"] / 1000, 3),
                         "freshness_lag_s": lag}
        return out

    def record(self, final: bool = False) -> Record:
        """One ``metrics`` output record (wall time ``ts`` in ms)."""
        now = time.time()
        events_in = sum(self.events_by_type.values()) + sum(self.dead_by_reason.values())
        elapsed = max(now - self.started, 1e-9)
        lat = self.latency_ms
        rss, peak = resident_mb()
        return {
            "kind": "summary" if final else "periodic",
            "app": self.app,
            "ts": int(now * 1000),
            "events_in": events_in,
            "events_by_type": dict(self.events_by_type),
            "dead_letters": sum(self.dead_by_reason.values()),
            "dead_by_reason": dict(self.dead_by_reason),
            "processing_errors": dict(self.processing_errors),
            "outputs": dict(self.outputs),
            "examples_by_label": dict(self.examples),
            "examples_weight_by_label": {k: round(v, 3) for k, v in self.example_weight.items()},
            "join": dict(self.join()),
            "tables": self.tables(),
            "snapshots": self.snapshot_ages(now),
            "serving_latency_ms": {"count": lat.count, "p50_le": lat.quantile(0.5),
                                   "p99_le": lat.quantile(0.99)},
            "serving_cpu_ms": {"count": self.serving_cpu_ms.count,
                               "p50_le": self.serving_cpu_ms.quantile(0.5),
                               "p99_le": self.serving_cpu_ms.quantile(0.99)},
            "queue_ms": {"count": self.queue_ms.count, "p50_le": self.queue_ms.quantile(0.5),
                         "p99_le": self.queue_ms.quantile(0.99)},
            "max_event_ts": self.max_event_ts,
            "consumer_lag": {part: end - pos for part, (pos, end) in sorted(self.consumer.items())},
            "elapsed_s": round(elapsed, 3),
            "events_per_s": round(events_in / elapsed, 1),
            "rss_mb": round(rss, 1),
            "peak_rss_mb": round(peak, 1),
            "rss_start_mb": round(self.rss_start_mb, 1),
        }


class MetricsLogic(StatefulLogic[tuple[str, Any], list[Record], MetricsState]):
    """Aggregates counters; emits periodically (wall clock) and a summary at EOF; serves
    Prometheus text when ``config.port`` is set."""

    def __init__(self, state: MetricsState, config: MetricsConfig | None = None,
                 status: StatusLog | None = None,
                 on_start: Callable[[], Any] | None = None) -> None:
        """``on_start``: called once here, when the stage starts (e.g. to log the memory
        bound)."""
        if on_start is not None:
            on_start()
        self.state = state
        self.config = config or MetricsConfig()
        self.status = status
        self.interval_s = self.config.interval_s
        self._lock = threading.Lock()
        self._next = time.monotonic() + self.interval_s
        if self.config.port:
            from operators.prometheus import MetricsServer

            MetricsServer.serve(self.config, self.state, self._lock)

    def on_item(self, value: tuple[str, Any]) -> tuple[list[list[Record]], bool]:
        health.beat()
        with self._lock:
            self.state.add(*value)
        if self.status is not None:
            self.status.tick(self.state.record)
        if time.monotonic() >= self._next:
            return self.on_notify()
        return [], StatefulLogic.RETAIN

    def on_eof(self) -> tuple[list[list[Record]], bool]:
        with self._lock:
            record = self.state.record(final=True)
        if self.status is not None:
            self.status.finish(record)
        else:
            logger.info("streamrec summary", extra={"summary": record})
        return [[record]], StatefulLogic.RETAIN

    def notify_at(self) -> datetime | None:
        waits = [max(0.0, self._next - time.monotonic())]
        status_due = self.status.next_due_s() if self.status is not None else None
        if status_due is not None:
            waits.append(status_due)
        return datetime.now(UTC) + timedelta(seconds=min(waits))

    def on_notify(self) -> tuple[list[list[Record]], bool]:
        health.beat()
        if self.status is not None:
            self.status.tick(self.state.record)
        if time.monotonic() < self._next:
            return [], StatefulLogic.RETAIN
        self._next = time.monotonic() + self.interval_s
        with self._lock:
            return [[self.state.record()]], StatefulLogic.RETAIN

    def snapshot(self) -> MetricsState:
        return self.state
