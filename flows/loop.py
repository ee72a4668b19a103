"""Closed-loop demo: simulated users who act on the system's own recommendations.

``streamrec loop --config C`` (``flows.loop.run_loop``) is a user-simulator process
beside the flow (which runs with Kafka input and output):

1. it warms the system up with the simulator's own stream (the catalog as ``item``
   events, then requests, impressions and feedback of the simulator's logging policy);
2. then it sends ``request`` events for activity-weighted users to ``<app>.events``,
   reads ``<app>.recommendations``, shows each list to its user (``Simulator.respond``:
   impressions at positions 0.., clicks / likes / purchases drawn from the simulator's
   hidden tastes) and produces those events back, feedback when the loop's event clock
   reaches its time.

Every ``window`` answered requests it prints one JSON line of click-rate figures of the
served items (``ctr`` = clicks / impressions; ``expected_ctr`` = the mean true click
probability of the served items at their positions, the same figure without the noise of
the clicks drawn), so the demo shows the system learning from its own recommendations. :class:`ClosedLoop` holds the logic without Kafka.

Event time: the loop's clock starts where the warm-up ended and advances ``step_ms``
per request, so the flow's event-time schedules (item tables, index, ranker sync, join
windows) run ``rate * step_ms / 1000`` times faster than wall time. The simulated world
moves with that clock (``Simulator.advance`` before each request: gradual taste drift
``drift_per_day``, items added and retired, their ``item`` events sent with the
requests), driven by event time only, so a loop is deterministic for its seed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import orjson

from events.simulator import SimConfig, Simulator
from flows.config import Config

logger = logging.getLogger(__name__)

Event = dict[str, Any]


@dataclass
class LoopSettings:
    """The simulated users of a closed loop (wall time in s, event time in ms)."""

    seed: int = 0
    n_users: int = 2_000
    n_items: int = 1_000
    k: int = 10
    warmup_events: int = 3_000
    requests: int = 0  # 0 = endless
    rate: float = 40.0  # requests per wall second
    step_ms: int = 1_000  # event time between requests
    window: int = 200  # answered requests per reported window
    timeout_s: float = 30.0  # forget a request unanswered for this long (wall s)
    views_per_request: float = 0.0  # mean organic views (Poisson) the user makes before a request
    world: dict[str, Any] = field(default_factory=dict)  # other SimConfig fields (e.g. drift_at)


@dataclass
class Window:
    """Click-rate figures of the served items of ``requests`` answered requests."""

    index: int
    requests: int = 0
    empty: int = 0
    impressions: int = 0
    clicks: int = 0
    expected_clicks: float = 0.0
    lost: int = 0
    latency_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latency_ms)
        return {"window": self.index, "requests": self.requests, "empty": self.empty,
                "lost": self.lost,
                "impressions": self.impressions, "clicks": self.clicks,
                "ctr": round(self.clicks / self.impressions, 4) if self.impressions else None,
                "expected_ctr": (round(self.expected_clicks / self.impressions, 4)
                                 if self.impressions else None),
                "round_trip_ms_p50": round(lat[len(lat) // 2], 1) if lat else None}


class ClosedLoop:
    """The users' side of the loop (no Kafka): requests out, recommendations in, the
    resulting impressions and feedback out, in event-time order."""

    def __init__(self, settings: LoopSettings) -> None:
        self.settings = settings
        # The warm-up runs at the loop's pace (one request per step_ms of event time), so
        # it spans the flow's refresh intervals like the loop itself does.
        world = SimConfig(**{"n_users": settings.n_users, "n_items": settings.n_items,
                             "k": settings.k, "requests_per_s": 1000.0 / settings.step_ms,
                             **settings.world})
        self.sim = Simulator(world, seed=settings.seed, max_events=settings.warmup_events)
        self.rng = np.random.default_rng([settings.seed, 7])
        self.run_id = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:x}"
        self.clock_ms = self.sim.now_ms
        self.sent = 0
        self.pending: dict[str, tuple[str, float]] = {}  # request_id -> (user, wall sent)
        self._later: list[tuple[int, int, Event]] = []
        self._seq = itertools.count()
        self.windows = [Window(0)]

    def warmup(self) -> list[Event]:
        """The simulator's own stream: catalog, users, logged requests and feedback."""
        events = []
        while batch := self.sim.next_batch(10_000):
            events.extend(batch)
        if events:
            self.clock_ms = max(self.clock_ms, events[-1]["ts"])
        return events

    def requests(self, n: int) -> list[Event]:
        """``n`` new requests, ``step_ms`` of event time apart, plus feedback now due."""
        out = []
        for user in self.sim.draw_users(n, self.rng):
            self.clock_ms += self.settings.step_ms
            # The world moves with the loop's clock: gradual taste drift, catalogue churn.
            out.extend(self.sim.advance(self.clock_ms))
            rid = f"loop-{self.run_id}-{self.sent}"
            self.sent += 1
            self.pending[rid] = (user, time.monotonic())
            out.extend(self._due())
            if self.settings.views_per_request > 0:
                n_views = int(self.rng.poisson(self.settings.views_per_request))
                out.extend(self.sim.views(user, self.clock_ms - 1, n_views, self.rng))
            out.append({"type": "request", "ts": self.clock_ms, "request_id": rid,
                        "user_id": user, "k": self.settings.k})
        return out

    def respond(self, rec: dict[str, Any]) -> list[Event]:
        """Show one recommendation list to its user: impressions now, feedback later."""
        entry = self.pending.pop(rec.get("request_id", ""), None)
        if entry is None:
            return []  # not ours (another run, or the warm-up's requests)
        user, sent = entry
        window = self.windows[-1]
        window.requests += 1
        window.latency_ms.append((time.monotonic() - sent) * 1000)
        items, expected = [], 0.0
        for item in (i["item_id"] for i in rec.get("items", [])[: self.settings.k]):
            try:  # the hidden truth: P(click) of this item at the slot it is shown in
                expected += self.sim.click_probability(user, item, len(items), self.clock_ms)
            except KeyError:
                continue  # not an item of this world
            items.append(item)
        window.expected_clicks += expected
        if not items:
            window.empty += 1
        events = self.sim.respond(user, items, self.clock_ms, rec["request_id"]) if items else []
        for ev in events:
            if "impression_id" in ev:
                ev["impression_id"] = f"{self.run_id}-{ev['impression_id']}"
        window.impressions += sum(ev["type"] == "impression" for ev in events)
        window.clicks += sum(ev.get("action") == "click" for ev in events)
        if window.requests >= self.settings.window:
            self.windows.append(Window(window.index + 1))
        now = [ev for ev in events if ev["ts"] <= self.clock_ms]
        for ev in events:
            if ev["ts"] > self.clock_ms:
                heapq.heappush(self._later, (ev["ts"], next(self._seq), ev))
        return now

    def expire(self, max_age_s: float) -> int:
        """Forget requests unanswered for ``max_age_s`` wall seconds (flow down or lagging);
        returns how many (also counted as ``lost`` in the current window)."""
        cutoff = time.monotonic() - max_age_s
        old = [rid for rid, (_, sent) in self.pending.items() if sent < cutoff]
        for rid in old:
            del self.pending[rid]
        self.windows[-1].lost += len(old)
        return len(old)

    def _due(self) -> list[Event]:
        out = []
        while self._later and self._later[0][0] <= self.clock_ms:
            out.append(heapq.heappop(self._later)[2])
        return out

    def drain(self) -> list[Event]:
        """Every feedback event still scheduled (end of the loop)."""
        out = [e for _, _, e in sorted(self._later, key=lambda x: (x[0], x[1]))]
        self._later.clear()
        return out

    def finished_windows(self) -> list[dict[str, Any]]:
        """Summaries of the complete windows."""
        return [w.summary() for w in self.windows if w.requests >= self.settings.window]


def run_loop(config: Config, settings: LoopSettings, partitions: int = 4,
             on_window: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run the users' side against Kafka (topics of ``config.app``); return the windows.

    Creates the input and output topics (``partitions`` each) when missing. Stops after
    ``settings.requests`` requests once they are answered (or ``timeout_s`` passed);
    endless when ``requests`` is 0.
    """
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from flows.broker import create_topics
    from flows.recsys import OUTPUTS

    kafka = config.kafka
    events_topic, recs_topic = config.topic("events"), config.topic("recommendations")
    create_topics(kafka.bootstrap, [events_topic] + [config.topic(n) for n in OUTPUTS],
                  partitions, admin_config=kafka.client_settings("admin"))
    producer = KafkaProducer(**{"linger_ms": 5, "acks": "all", **kafka.client_settings("producer"),
                                "bootstrap_servers": kafka.bootstrap})
    consumer = KafkaConsumer(**{**kafka.client_settings("consumer"),
                                "bootstrap_servers": kafka.bootstrap,
                                "enable_auto_commit": False, "fetch_max_wait_ms": 50})
    tps = [TopicPartition(recs_topic, p) for p in sorted(consumer.partitions_for_topic(recs_topic))]
    consumer.assign(tps)
    consumer.seek_to_end(*tps)
    loop = ClosedLoop(settings)
    reported = 0

    def send(events: list[Event]) -> None:
        for ev in events:
            producer.send(events_topic, key=str(ev.get("user_id", "")).encode(),
                          value=orjson.dumps(ev))

    try:
        send(loop.warmup())
        producer.flush()
        logger.info("closed loop: warm-up sent; requests to %s, recommendations from %s",
                    events_topic, recs_topic, extra={"settings": asdict(settings)})
        start = time.monotonic()
        last_answer = last_expire = start
        while True:
            target = int((time.monotonic() - start) * settings.rate)
            if settings.requests:
                target = min(target, settings.requests)
            if target > loop.sent:
                send(loop.requests(target - loop.sent))
            polled = consumer.poll(timeout_ms=20, max_records=1000)
            for records in polled.values():
                for rec in records:
                    send(loop.respond(orjson.loads(rec.value)))
                    last_answer = time.monotonic()
            if loop.pending and time.monotonic() - last_expire > 1.0:
                last_expire = time.monotonic()
                if lost := loop.expire(settings.timeout_s):
                    logger.warning("closed loop: %d requests unanswered after %.0f s (is the "
                                   "flow running?)", lost, settings.timeout_s)
            windows = loop.finished_windows()
            for summary in windows[reported:]:
                (on_window or _print_window)(summary)
            reported = len(windows)
            done = settings.requests and loop.sent >= settings.requests
            if done and (not loop.pending or time.monotonic() - last_answer > settings.timeout_s):
                break
        send(loop.drain())
        producer.flush()
    finally:
        producer.close(timeout=5)
        consumer.close(autocommit=False)
    return loop.finished_windows()


def _print_window(summary: dict[str, Any]) -> None:
    print(orjson.dumps(summary).decode(), flush=True)
    if summary["ctr"] is not None:
        print(f"window {summary['window']}: ctr {summary['ctr']:.4f} over "
              f"{summary['impressions']} served items", file=sys.stderr, flush=True)
