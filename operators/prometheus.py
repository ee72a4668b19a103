"""The metrics endpoint on prometheus_client: ``/metrics`` and ``/healthz``.

* :class:`StreamrecCollector` — a prometheus_client custom collector over the metrics
  stage's :class:`~operators.metrics.MetricsState` (the cross-worker aggregate: every
  stage sends its counts to that one key), families named by stage: ``streamrec_input_``
  / ``streamrec_kafka_`` (input, parse), ``streamrec_join_`` (joiner),
  ``streamrec_examples_``, ``streamrec_serving_`` (requests, scorers, latency, CPU,
  queueing), ``streamrec_duel_`` (scorer duel), ``streamrec_table_``,
  ``streamrec_snapshot_``, ``streamrec_outputs_``. Every sample has the label ``app``.
* :class:`MetricsServer` — one HTTP server per (host, port) in a process, serving a
  registry with that collector plus prometheus_client's process, platform and GC
  collectors (``process_resident_memory_bytes``, ``process_cpu_seconds_total``, ...)
  in the format the scraper asks for (text 0.0.4 or OpenMetrics), and ``/healthz``
  (``operators.health``: 200 while workers make progress, 503 when stalled). It binds
  ``metrics.host`` (127.0.0.1 by default), serves at most ``metrics.max_threads``
  requests at once (others are closed at once) and times a request out after
  ``metrics.request_timeout_s``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from operators import health
from operators.metrics import TABLE_COUNTERS, Histogram, MetricsConfig, MetricsState, resident_mb

logger = logging.getLogger(__name__)

SERVING_COUNTERS = {"requests": "requests"}
"""User-shard counters of the serving stage (name in the shard -> streamrec_serving_<name>)."""
SCORER_COUNTERS = {"served_by_ranker": "ranker", "served_by_retrieval": "retrieval",
                   "served_by_pool": "pool", "served_interleaved": "interleaved"}
"""Requests served per scorer (``interleaved``: both, team-draft):
streamrec_serving_served_total{scorer}."""
DUEL_HITS = {"duel_hits_ranker": "ranker", "duel_hits_retrieval": "retrieval"}
"""Scorer-duel hits per scorer: streamrec_duel_hits_total{scorer}."""
DUEL_CLICK_WINS = {"duel_click_wins_ranker": "ranker", "duel_click_wins_challenger": "challenger"}
"""Clicks on interleaved lists per team: streamrec_duel_click_wins_total{scorer}."""
JOIN_GAUGES = ("pending", "orphans", "pool_pending")


class StreamrecCollector(Collector):
    """Metric families of a :class:`MetricsState` (None: nothing yet), read under ``lock``."""

    def __init__(self, state: MetricsState | None = None, lock: Any = None) -> None:
        self.state = state
        self.lock = lock or threading.Lock()

    def collect(self) -> Iterator[Metric]:
        state = self.state
        if state is None:
            return
        with self.lock:
            families = list(_families(state, time.time()))
        yield from families


def _counter(name: str, doc: str, labels: list[str], rows: Any) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=["app", *labels])
    for values, value in rows:
        fam.add_metric(list(values), value)
    return fam


def _gauge(name: str, doc: str, labels: list[str], rows: Any) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc, labels=["app", *labels])
    for values, value in rows:
        fam.add_metric(list(values), value)
    return fam


def _histogram(name: str, doc: str, app: str, hist: Histogram, scale: float) -> HistogramMetricFamily:
    """A histogram in seconds from one in ms (``scale`` = 1/1000)."""
    fam = HistogramMetricFamily(name, doc, labels=["app"])
    buckets, cumulative = [], 0
    for bound, n in zip([*hist.bounds, math.inf], hist.counts, strict=True):
        cumulative += n
        buckets.append(("+Inf" if bound == math.inf else repr(bound * scale), cumulative))
    fam.add_metric([app], buckets, hist.sum * scale)
    return fam


def _families(state: MetricsState, now_s: float) -> Iterator[Metric]:
    app = state.app
    # -- input and parse
    yield _counter("streamrec_events_in", "Valid input events by type.", ["type"],
                   (((app, t), n) for t, n in sorted(state.events_by_type.items())))
    yield _counter("streamrec_dead_letters", "Rejected inputs by reason.", ["reason"],
                   (((app, r), n) for r, n in sorted(state.dead_by_reason.items())))
    yield _counter("streamrec_processing_errors", "Inputs a stage failed to apply (dead "
                   "letters with reason processing_error).", ["stage"],
                   (((app, st), n) for st, n in sorted(state.processing_errors.items())))
    consumer = sorted(state.consumer.items())
    yield _gauge("streamrec_kafka_consumer_lag", "Messages of the partition not read yet: end "
                 "offset (high watermark of the last fetch) minus the next offset to read.",
                 ["topic", "partition"],
                 (((app, *part.rsplit("#", 1)), end - pos) for part, (pos, end) in consumer))
    yield _gauge("streamrec_kafka_consumer_offset", "Next offset the flow reads per partition.",
                 ["topic", "partition"],
                 (((app, *part.rsplit("#", 1)), pos) for part, (pos, _) in consumer))
    if state.max_event_ts is not None:
        yield _gauge("streamrec_event_lag_seconds", "Wall time now minus the newest event time "
                     "seen (s; live streams: input lag).", [],
                     [((app,), round(now_s - state.max_event_ts / 1000, 3))])
    # -- outputs and examples
    yield _counter("streamrec_outputs", "Records written by output topic.", ["topic"],
                   (((app, t), n) for t, n in sorted(state.outputs.items())))
    yield _counter("streamrec_examples", "Training examples by label.", ["label"],
                   (((app, lb), n) for lb, n in sorted(state.examples.items())))
    yield _counter("streamrec_examples_weight", "Summed example weights by label "
                   "(downsampled negatives weigh 1/r).", ["label"],
                   (((app, lb), w) for lb, w in sorted(state.example_weight.items())))
    # -- user shards: joiner, serving, duel
    counters = state.join()
    special = {*SERVING_COUNTERS, *SCORER_COUNTERS, *DUEL_HITS, *DUEL_CLICK_WINS,
               "duel_outcomes", "duel_clicks", "served_by_category_sampling", *JOIN_GAUGES}
    for key in sorted(k for k in counters if k not in special):
        doc = ("Join windows closed (impressions whose attribution window expired)."
               if key == "windows_closed" else f"Joiner counter {key}.")
        yield _counter(f"streamrec_join_{key}", doc, [], [((app,), counters[key])])
    for key in JOIN_GAUGES:
        if key in counters:
            yield _gauge(f"streamrec_join_{key}", f"Joiner state size: {key}.", [],
                         [((app,), counters[key])])
    for key, name in SERVING_COUNTERS.items():
        yield _counter(f"streamrec_serving_{name}", "Requests received by the serving stage.",
                       [], [((app,), counters.get(key, 0))])
    yield _counter("streamrec_serving_category_sampled", "Lists ordered by Thompson sampling "
                   "across categories (serving.category_explore).", [],
                   [((app,), counters.get("served_by_category_sampling", 0))])
    yield _counter("streamrec_serving_served", "Requests answered, by the scorer that ordered "
                   "the list.", ["scorer"],
                   (((app, s), counters.get(k, 0)) for k, s in SCORER_COUNTERS.items()))
    yield _counter("streamrec_duel_outcomes", "Scorer duel: outcomes (a user's next organic "
                   "positive after a request).", [], [((app,), counters.get("duel_outcomes", 0))])
    yield _counter("streamrec_duel_hits", "Scorer duel: outcomes each scorer's top k held.",
                   ["scorer"], (((app, s), counters.get(k, 0)) for k, s in DUEL_HITS.items()))
    yield _counter("streamrec_duel_clicks", "Scorer duel: clicks on interleaved lists.", [],
                   [((app,), counters.get("duel_clicks", 0))])
    yield _counter("streamrec_duel_click_wins", "Scorer duel: clicks on interleaved lists by "
                   "the team (scorer) that picked the item.", ["scorer"],
                   (((app, s), counters.get(k, 0)) for k, s in DUEL_CLICK_WINS.items()))
    yield _histogram("streamrec_serving_latency_seconds", "Request ingest to recommendation "
                     "emit (s).", app, state.latency_ms, 1e-3)
    yield _histogram("streamrec_serving_cpu_seconds", "CPU time of the serving call of one "
                     "request (s): the cost of serving.", app, state.serving_cpu_ms, 1e-3)
    yield _histogram("streamrec_serving_queue_seconds", "Latency minus the serving call's wall "
                     "time (s): waiting in the flow.", app, state.queue_ms, 1e-3)
    # -- item side: tables and snapshots
    tables = state.tables()
    for key in TABLE_COUNTERS:
        yield _counter(f"streamrec_table_{key}", f"Embedding-table IDs {key} (collisionless "
                       "tables of MF factors).", ["table"],
                       (((app, t), c.get(key, 0)) for t, c in sorted(tables.items())))
    yield _gauge("streamrec_table_rows", "Embedding-table rows in use.", ["table"],
                 (((app, t), c.get("rows", 0)) for t, c in sorted(tables.items())))
    snaps = state.snapshot_ages(now_s)
    yield _gauge("streamrec_snapshot_version", "Newest published version per snapshot kind "
                 "(ranker = serving-copy sync).", ["kind"],
                 (((app, k), s["version"]) for k, s in snaps.items()))
    yield _gauge("streamrec_snapshot_event_time_seconds", "Event time the newest snapshot "
                 "reflects (epoch s).", ["kind"], (((app, k), s["ts"] / 1000) for k, s in snaps.items()))
    yield _gauge("streamrec_snapshot_age_seconds", "Wall time since the newest snapshot was "
                 "published (s).", ["kind"], (((app, k), s["age_s"]) for k, s in snaps.items()))
    yield _gauge("streamrec_freshness_lag_seconds", "Event time between the newest event seen "
                 "and what the newest snapshot reflects (s).", ["kind"],
                 (((app, k), s["freshness_lag_s"]) for k, s in snaps.items()
                  if s["freshness_lag_s"] is not None))
    peak = resident_mb()[1]
    if not math.isnan(peak):
        yield _gauge("streamrec_peak_resident_memory_bytes", "Peak resident memory of the "
                     "process serving this endpoint since it started (bytes, VmHWM).", [],
                     [((app,), int(peak * 2**20))])


class _BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most ``max_threads`` requests in flight; a connection
    beyond that is closed at once (the scraper retries at its next interval)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, max_threads: int) -> None:
        self._slots = threading.BoundedSemaphore(max(1, max_threads))
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsServer:
    """``/metrics`` (prometheus_client exposition of :attr:`registry`) and ``/healthz``.

    One server per (host, port) in a process: asking again for a running one attaches the
    given state (a metrics stage starting or resuming takes over the endpoint).
    """

    _running: dict[tuple[str, int], MetricsServer] = {}
    _guard = threading.Lock()

    def __init__(self, config: MetricsConfig) -> None:
        self.config = config
        self.collector = StreamrecCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        for make in (ProcessCollector, PlatformCollector, GCCollector):
            make(registry=self.registry)
        self.registry.register(self.collector)
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = config.request_timeout_s

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?")[0]
                if path in ("/metrics", "/"):
                    encoder, content_type = choose_encoder(self.headers.get("Accept"))
                    self._send(200, content_type, encoder(server.registry))
                elif path == "/healthz":
                    ok, details = health.status(server.config.health_stall_s)
                    details["app"] = server.collector.state.app if server.collector.state else None
                    self._send(200 if ok else 503, "application/json", orjson.dumps(details))
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("metrics http: " + fmt, *args)

        self.httpd = _BoundedServer((config.host, config.port), Handler, config.max_threads)
        self.address = self.httpd.server_address
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="streamrec-metrics",
                                       daemon=True)
        self.thread.start()
        logger.info("metrics endpoint on http://%s:%d/metrics (health: /healthz)", config.host,
                    self.address[1], extra={"host": config.host, "port": self.address[1]})

    @classmethod
    def serve(cls, config: MetricsConfig, state: MetricsState | None = None,
              lock: Any = None) -> MetricsServer | None:
        """The running server on ``(config.host, config.port)`` or a new one, now showing
        ``state`` (if given); None when the port is taken by another process (logged)."""
        with cls._guard:
            key = (config.host, config.port)
            server = cls._running.get(key)
            if server is None:
                try:
                    server = cls._running[key] = cls(config)
                except OSError as err:
                    logger.warning("metrics endpoint %s:%d not started: %s (another process of "
                                   "this flow on the host? give each its own metrics.port)",
                                   config.host, config.port, err)
                    return None
            if state is not None:
                server.collector.state = state
                server.collector.lock = lock or threading.Lock()
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
