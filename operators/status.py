"""What the main flow tells a person while it runs: one status line every few seconds and
a summary table at the end of input, both rendered from a ``metrics`` record
(:meth:`operators.metrics.MetricsState.record`).

The metrics stage calls :meth:`StatusLog.tick` on every item it folds in. Log records
carry the figures as an extra field too (``status`` / ``summary``), so
``log.format = "json"`` keeps them machine-readable; the text format shows the
readable message only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from events.model import Record

logger = logging.getLogger("streamrec.status")

PROGRESS_EVERY_S = 0.5
"""Wall time between calls of a progress callback (s): ``streamrec eval``'s bar."""


def human_duration(seconds: float) -> str:
    """``12.3 s``, ``35 min``, ``5.2 h`` or ``123 d``."""
    s = abs(seconds)
    if s < 120:
        text = f"{s:.1f} s"
    elif s < 2 * 3600:
        text = f"{s / 60:.0f} min"
    elif s < 2 * 86400:
        text = f"{s / 3600:.1f} h"
    else:
        text = f"{s / 86400:,.0f} d"
    return text if seconds >= 0 else f"-{text}"


def _snapshot_versions(record: Record) -> str:
    """``ranker v3, index v2, items v5 (4 shards)``: the newest version per kind (item
    tables, one kind per item shard, are grouped)."""
    groups: dict[str, list[int]] = {}
    for kind, snap in record.get("snapshots", {}).items():
        groups.setdefault(kind.split("-")[0], []).append(snap["version"])
    parts = []
    for kind, versions in sorted(groups.items()):
        part = f"{kind} v{max(versions)}"
        if len(versions) > 1:
            part += f" ({len(versions)} shards)"
        parts.append(part)
    return ", ".join(parts) or "none yet"


def _event_time(record: Record, now_s: float) -> str:
    ts = record.get("max_event_ts")
    if ts is None:
        return "event time -"
    when = datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"event time {when} (lag {human_duration(now_s - ts / 1000)})"


def status_line(record: Record, rate_now: float | None = None) -> str:
    """One line: events, events/s, requests answered, dead letters, event-time lag,
    snapshot versions."""
    now_s = record["ts"] / 1000
    rate = f"{record['events_per_s']:,.0f}/s avg"
    if rate_now is not None:
        rate = f"{rate_now:,.0f}/s now, {rate}"
    return (f"{record['events_in']:,} events ({rate}) | "
            f"{record.get('outputs', {}).get('recommendations', 0):,} requests answered | "
            f"{record['dead_letters']:,} dead letters | {_event_time(record, now_s)} | "
            f"snapshots {_snapshot_versions(record)}")


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def summary_table(record: Record) -> str:
    """The end-of-run summary as an aligned, multi-line table."""
    outputs = record.get("outputs", {})
    lat = record.get("serving_latency_ms", {})
    labels = record.get("examples_by_label", {})
    rows = [
        ("events in", f"{record['events_in']:,}",
         f"{record['events_per_s']:,.0f}/s over {human_duration(record['elapsed_s'])}; "
         + _counts(record.get("events_by_type", {}))),
        ("dead letters", f"{record['dead_letters']:,}", _counts(record.get("dead_by_reason", {}))),
        ("requests answered", f"{outputs.get('recommendations', 0):,}",
         f"ingest -> emit p50 <= {lat.get('p50_le')} ms, p99 <= {lat.get('p99_le')} ms"
         if lat.get("count") else ""),
        ("examples", f"{outputs.get('examples', 0):,}",
         ", ".join(f"label {k}: {v:,}" for k, v in sorted(labels.items()))),
        ("late labels", f"{outputs.get('late-labels', 0):,}", ""),
        ("snapshots", "", _snapshot_versions(record)),
        ("", "", _event_time(record, record["ts"] / 1000)),
        ("memory", f"{record.get('rss_mb')} MB", f"peak {record.get('peak_rss_mb')} MB"),
    ]
    width = max(len(r[0]) for r in rows)
    num = max(len(r[1]) for r in rows)
    lines = [f"streamrec summary (app {record.get('app')})"]
    lines += [f"  {a:<{width}}  {b:>{num}}  {c}".rstrip() for a, b, c in rows]
    lines.append("  (the full record: the metrics output, kind \"summary\"; or log.format = \"json\")")
    return "\n".join(lines)


class StatusLog:
    """Logs :func:`status_line` every ``every_s`` of wall time (0 = never) and feeds an
    optional ``on_progress(events_in)`` callback every :data:`PROGRESS_EVERY_S`."""

    def __init__(self, every_s: float, on_progress: Callable[[int], None] | None = None) -> None:
        self.every_s = every_s
        self.on_progress = on_progress
        now = time.monotonic()
        self._next_line = now + every_s
        self._next_progress = now
        self._last: tuple[float, int] | None = None

    def next_due_s(self) -> float | None:
        """Seconds until the next status line (None when off)."""
        if self.every_s <= 0:
            return None
        return max(0.0, self._next_line - time.monotonic())

    def tick(self, record_of: Callable[[], Record]) -> None:
        """Log and/or report progress when due; ``record_of()`` builds the record (called
        only then)."""
        now = time.monotonic()
        line_due = self.every_s > 0 and now >= self._next_line
        progress_due = self.on_progress is not None and now >= self._next_progress
        if not (line_due or progress_due):
            return
        record = record_of()
        if progress_due:
            self._next_progress = now + PROGRESS_EVERY_S
            self.on_progress(record["events_in"])  # type: ignore[misc]
        if line_due:
            self._next_line = now + self.every_s
            rate_now = None
            if self._last is not None and now > self._last[0]:
                rate_now = (record["events_in"] - self._last[1]) / (now - self._last[0])
            self._last = (now, record["events_in"])
            logger.info(status_line(record, rate_now), extra={"status": {
                k: record.get(k) for k in ("events_in", "events_per_s", "dead_letters",
                                           "max_event_ts", "outputs")}})

    def finish(self, record: Record) -> None:
        """The end of input: the last progress and the summary table."""
        if self.on_progress is not None:
            self.on_progress(record["events_in"])
        logger.info(summary_table(record), extra={"summary": record})
