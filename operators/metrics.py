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

The stage emits a ``metrics`` record every ``metrics.interval_s`` of wall time and a
final one at end of input (also logged as the run summary). With ``metrics.port`` set
it serves the same figures in Prometheus text format on ``http://HOST:PORT/metrics``
(every sample labelled ``app``); see docs/operations.md for the list.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bytewax.operators import StatefulLogic

from events.model import Record
from operators.status import StatusLog
from state.settings import doc

logger = logging.getLogger(__name__)

TABLE_COUNTERS = ("admitted", "rejected", "expired", "evicted")
"""Embedding-table counters exported per table (user / item factors)."""

_LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


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
    port: int = doc("Serve Prometheus text format on this TCP port at /metrics; 0 = off.", 0)
    host: str = doc("Address the Prometheus endpoint binds to.", "0.0.0.0")
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
        self.max_event_ts: int | None = None
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
        """Fold one ``(kind, payload)`` item from a stage into the counters."""
        if kind == "parse":
            self.events_by_type.update(payload["events_by_type"])
            self.dead_by_reason.update(payload["dead_by_reason"])
            ts = payload.get("max_ts")
            if ts is not None and (self.max_event_ts is None or ts > self.max_event_ts):
                self.max_event_ts = ts
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
            "join": dict(self.join()),
            "tables": self.tables(),
            "snapshots": self.snapshot_ages(now),
            "serving_latency_ms": {"count": lat.count, "p50_le": lat.quantile(0.5),
                                   "p99_le": lat.quantile(0.99)},
            "max_event_ts": self.max_event_ts,
            "elapsed_s": round(elapsed, 3),
            "events_per_s": round(events_in / elapsed, 1),
            "rss_mb": round(rss, 1),
            "peak_rss_mb": round(peak, 1),
            "rss_start_mb": round(self.rss_start_mb, 1),
        }


def _labels(app: str, **labels: Any) -> str:
    parts = [f'app="{_escape(app)}"'] + [f'{k}="{_escape(str(v))}"' for k, v in labels.items()]
    return "{" + ",".join(parts) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def prometheus_text(state: MetricsState, now_s: float | None = None) -> str:
    """The state in Prometheus text exposition format (version 0.0.4)."""
    now_s = time.time() if now_s is None else now_s
    app = state.app
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str,
               samples: Iterable[tuple[dict[str, Any], float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{_labels(app, **labels)} {_number(value)}")

    family("streamrec_events_in_total", "counter", "Valid input events by type.",
           (({"type": t}, n) for t, n in sorted(state.events_by_type.items())))
    family("streamrec_dead_letters_total", "counter", "Rejected inputs by reason.",
           (({"reason": r}, n) for r, n in sorted(state.dead_by_reason.items())))
    family("streamrec_processing_errors_total", "counter",
           "Inputs a stage failed to apply (dead letters with reason processing_error).",
           (({"stage": st}, n) for st, n in sorted(state.processing_errors.items())))
    family("streamrec_outputs_total", "counter", "Records written by output topic.",
           (({"topic": t}, n) for t, n in sorted(state.outputs.items())))
    family("streamrec_examples_total", "counter", "Training examples by label.",
           (({"label": lb}, n) for lb, n in sorted(state.examples.items())))
    family("streamrec_examples_weight_total", "counter",
           "Summed example weights by label (downsampled negatives weigh 1/r).",
           (({"label": lb}, w) for lb, w in sorted(state.example_weight.items())))
    join = state.join()
    gauges = {"pending", "orphans"}
    for key in sorted(join):
        if key in gauges:
            family(f"streamrec_join_{key}", "gauge", f"Joiner state size: {key}.", [({}, join[key])])
        else:
            help_text = ("Join windows closed (impressions whose attribution window expired)."
                         if key == "windows_closed" else f"Joiner counter {key}.")
            family(f"streamrec_join_{key}_total", "counter", help_text, [({}, join[key])])
    tables = state.tables()
    for key in TABLE_COUNTERS:
        family(f"streamrec_table_{key}_total", "counter",
               f"Embedding-table IDs {key} (collisionless tables of MF factors).",
               (({"table": t}, c.get(key, 0)) for t, c in sorted(tables.items())))
    family("streamrec_table_rows", "gauge", "Embedding-table rows in use.",
           (({"table": t}, c.get("rows", 0)) for t, c in sorted(tables.items())))
    snaps = state.snapshot_ages(now_s)
    family("streamrec_snapshot_version", "gauge", "Newest published version per snapshot kind "
           "(ranker = serving-copy sync).", (({"kind": k}, s["version"]) for k, s in snaps.items()))
    family("streamrec_snapshot_event_time_seconds", "gauge",
           "Event time the newest snapshot reflects (epoch s).",
           (({"kind": k}, s["ts"] / 1000) for k, s in snaps.items()))
    family("streamrec_snapshot_age_seconds", "gauge", "Wall time since the newest snapshot "
           "was published (s).", (({"kind": k}, s["age_s"]) for k, s in snaps.items()))
    family("streamrec_freshness_lag_seconds", "gauge", "Event time between the newest event "
           "seen and what the newest snapshot reflects (s).",
           (({"kind": k}, s["freshness_lag_s"]) for k, s in snaps.items()
            if s["freshness_lag_s"] is not None))
    if state.max_event_ts is not None:
        family("streamrec_event_lag_seconds", "gauge",
               "Wall time now minus the newest event time seen (s; live streams: input lag).",
               [({}, round(now_s - state.max_event_ts / 1000, 3))])
    rss, peak = resident_mb()
    if not math.isnan(rss):
        family("process_resident_memory_bytes", "gauge", "Resident memory of the process "
               "serving this endpoint (bytes).", [({}, int(rss * 2**20))])
        family("streamrec_peak_resident_memory_bytes", "gauge", "Peak resident memory of "
               "that process since it started (bytes, VmHWM).", [({}, int(peak * 2**20))])
    lat = state.latency_ms
    name = "streamrec_serving_latency_seconds"
    lines.append(f"# HELP {name} Request ingest to recommendation emit (s).")
    lines.append(f"# TYPE {name} histogram")
    cumulative = 0
    for bound, n in zip([*lat.bounds, float("inf")], lat.counts, strict=True):
        cumulative += n
        le = "+Inf" if bound == float("inf") else repr(bound / 1000)
        lines.append(f"{name}_bucket{_labels(app, le=le)} {cumulative}")
    lines.append(f"{name}_sum{_labels(app)} {lat.sum / 1000!r}")
    lines.append(f"{name}_count{_labels(app)} {lat.count}")
    return "\n".join(lines) + "\n"


class MetricsServer:
    """A daemon HTTP thread serving ``render()`` at ``/metrics`` (Prometheus text format).

    One server per (host, port) in a process: asking again for a running one swaps its
    render function (a resumed stage takes over the endpoint).
    """

    _running: dict[tuple[str, int], MetricsServer] = {}
    _guard = threading.Lock()

    def __init__(self, host: str, port: int, render: Callable[[], str]) -> None:
        self.render = render
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = server.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("metrics http: " + fmt, *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="streamrec-metrics",
                                       daemon=True)
        self.thread.start()
        logger.info("metrics endpoint on http://%s:%d/metrics", host, self.address[1],
                    extra={"host": host, "port": self.address[1]})

    @classmethod
    def serve(cls, host: str, port: int, render: Callable[[], str]) -> MetricsServer:
        """The running server on ``(host, port)`` (now rendering ``render``), or a new one."""
        with cls._guard:
            server = cls._running.get((host, port))
            if server is None:
                server = cls._running[(host, port)] = cls(host, port, render)
            server.render = render
            return server

    def stop(self) -> None:
        """Stop serving and free the port."""
        with MetricsServer._guard:
            for key, server in list(MetricsServer._running.items()):
                if server is self:
                    del MetricsServer._running[key]
        self.httpd.shutdown()
        self.httpd.server_close()

    @classmethod
    def stop_all(cls) -> None:
        """Stop every server of this process (tests)."""
        for server in list(cls._running.values()):
            server.stop()


class MetricsLogic(StatefulLogic[tuple[str, Any], list[Record], MetricsState]):
    """Aggregates counters; emits periodically (wall clock) and a summary at EOF; serves
    Prometheus text when ``config.port`` is set."""

    def __init__(self, state: MetricsState, config: MetricsConfig | None = None,
                 status: StatusLog | None = None) -> None:
        self.state = state
        self.config = config or MetricsConfig()
        self.status = status
        self.interval_s = self.config.interval_s
        self._lock = threading.Lock()
        self._next = time.monotonic() + self.interval_s
        if self.config.port:
            MetricsServer.serve(self.config.host, self.config.port, self.render)

    def render(self) -> str:
        """Prometheus text of the current state (called from the HTTP thread)."""
        with self._lock:
            return prometheus_text(self.state)

    def on_item(self, value: tuple[str, Any]) -> tuple[list[list[Record]], bool]:
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
        if self.status is not None:
            self.status.tick(self.state.record)
        if time.monotonic() < self._next:
            return [], StatefulLogic.RETAIN
        self._next = time.monotonic() + self.interval_s
        with self._lock:
            return [[self.state.record()]], StatefulLogic.RETAIN

    def snapshot(self) -> MetricsState:
        return self.state
