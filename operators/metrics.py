"""The metrics stage: one key that aggregates counters from every stage.

Stages send ``(kind, payload)`` items: ``("parse", {...})`` per micro-batch,
``("shard", {"shard": key, ...counters})`` with cumulative shard counters and
``("outputs", {topic: records})``. The stage emits a ``metrics`` record every
``interval_s`` of wall time and a final one at end of input, which it also prints
as the run summary (stderr).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from bytewax.operators import StatefulLogic

Record = dict[str, Any]


class MetricsState:
    """Counters of a run: events by type, dead letters by reason, outputs by topic."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.events_by_type: Counter[str] = Counter()
        self.dead_by_reason: Counter[str] = Counter()
        self.outputs: Counter[str] = Counter()
        self.shards: dict[str, dict[str, int]] = {}
        self.started = time.time()

    def add(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "parse":
            self.events_by_type.update(payload["events_by_type"])
            self.dead_by_reason.update(payload["dead_by_reason"])
        elif kind == "shard":
            self.shards[payload["shard"]] = payload["counters"]
        elif kind == "outputs":
            self.outputs.update(payload)

    def record(self, final: bool = False) -> Record:
        """One ``metrics`` output record (wall time ``ts`` in ms)."""
        join: Counter[str] = Counter()
        for counters in self.shards.values():
            join.update(counters)
        events_in = sum(self.events_by_type.values()) + sum(self.dead_by_reason.values())
        elapsed = max(time.time() - self.started, 1e-9)
        return {
            "kind": "summary" if final else "periodic",
            "app": self.app,
            "ts": int(time.time() * 1000),
            "events_in": events_in,
            "events_by_type": dict(self.events_by_type),
            "dead_letters": sum(self.dead_by_reason.values()),
            "dead_by_reason": dict(self.dead_by_reason),
            "outputs": dict(self.outputs),
            "join": dict(join),
            "elapsed_s": round(elapsed, 3),
            "events_per_s": round(events_in / elapsed, 1),
        }


class MetricsLogic(StatefulLogic[tuple[str, dict[str, Any]], list[Record], MetricsState]):
    """Aggregates counters; emits periodically (wall clock) and a summary at EOF."""

    def __init__(self, state: MetricsState, interval_s: float = 10.0, print_summary: bool = True) -> None:
        self.state = state
        self.interval_s = interval_s
        self.print_summary = print_summary
        self._next = time.monotonic() + interval_s

    def on_item(self, value: tuple[str, dict[str, Any]]) -> tuple[list[list[Record]], bool]:
        self.state.add(*value)
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + self.interval_s
            return [[self.state.record()]], StatefulLogic.RETAIN
        return [], StatefulLogic.RETAIN

    def on_eof(self) -> tuple[list[list[Record]], bool]:
        record = self.state.record(final=True)
        if self.print_summary:
            print(f"streamrec summary: {orjson.dumps(record).decode()}", file=sys.stderr, flush=True)
        return [[record]], StatefulLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return datetime.now(UTC) + timedelta(seconds=self.interval_s)

    def on_notify(self) -> tuple[list[list[Record]], bool]:
        self._next = time.monotonic() + self.interval_s
        return [[self.state.record()]], StatefulLogic.RETAIN

    def snapshot(self) -> MetricsState:
        return self.state
