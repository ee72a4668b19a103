"""Quiet, useful Kafka logs.

kafka-python logs every failed connection attempt (several ERROR and WARNING lines per
retry, many retries a second while a broker is down). :class:`KafkaRetrySummary`, a
filter on streamrec's log handler (``flows.logs.setup_logging``), turns them into one
line when the trouble starts and one line per ``interval_s`` while it lasts, naming the
broker, the failure and what streamrec is waiting for (registered by the waiting code
with :func:`waiting_for`). Nothing is dropped silently: every distinct failure is
named in the next summary with its count. (The start-up wait for a broker:
``flows.kafka_wait``.)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator

logger = logging.getLogger("streamrec.kafka")

SUMMARY_EVERY_S = 5.0
"""Wall time between summary lines while kafka-python keeps failing (s)."""

_ERROR = re.compile(r"(\w+(?:Error|Exception))(?::\s*([^()\n]*?))?\s*(?:\(backoff|\(|$)")
_BOOTSTRAP = re.compile(r"from \[([^\]]+)\]")


_waits: dict[int, tuple[str, str]] = {}
_waits_lock = threading.Lock()
_wait_ids = itertools.count()


@contextlib.contextmanager
def waiting_for(what: str, bootstrap: str | list[str]) -> Iterator[None]:
    """Name what the code in this block waits for from the brokers at ``bootstrap``
    (``partitions of shop.events``), for the summary lines of this process."""
    if not isinstance(bootstrap, str):
        bootstrap = ",".join(bootstrap)
    key = next(_wait_ids)
    with _waits_lock:
        _waits[key] = (what, bootstrap)
    try:
        yield
    finally:
        with _waits_lock:
            _waits.pop(key, None)


def _reason(message: str) -> str | None:
    """The failure a kafka-python message reports (``KafkaConnectionError: 111
    ECONNREFUSED``); None for a message that names no error (``Bootstrap bootstrap-0
    not ready; waiting 0.10 secs``)."""
    found = _ERROR.findall(message)
    if not found:
        return None
    name, detail = found[-1]
    detail = detail.strip()
    if detail.startswith(name):
        detail = detail[len(name):].lstrip(": ")
    return f"{name}: {detail}" if detail else name


class KafkaRetrySummary(logging.Filter):
    """Summarises kafka-python's WARNING/ERROR records (loggers ``kafka.*``): the first
    one of a bout passes as a one-line summary, the rest are counted and summarised
    every ``interval_s``; CRITICAL records pass unchanged."""

    def __init__(self, interval_s: float = SUMMARY_EVERY_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._reasons: Counter[str] = Counter()
        self._brokers: set[str] = set()
        self._bout_start: float | None = None
        self._last_seen = 0.0
        self._attempts = 0
        self._next = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name == "kafka" or record.name.startswith("kafka.")):
            return True
        if record.levelno >= logging.CRITICAL or record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        now = time.monotonic()
        with self._lock:
            if self._bout_start is None or now - self._last_seen > 3 * self.interval_s:
                self._bout_start, self._next = now, now  # a new bout: say so at once
                self._reasons.clear()
                self._brokers.clear()
            self._last_seen = now
            self._attempts += 1
            reason = _reason(message)
            if reason is not None:
                self._reasons[reason] += 1
            elif not self._reasons:
                self._reasons[re.sub(r"\d+(\.\d+)?", "N", message)[:160]] += 1
            self._brokers.update(b.strip(" '\"") for m in _BOOTSTRAP.findall(message)
                                 for b in m.split(","))
            if now < self._next:
                return False
            self._next = now + self.interval_s
            whats, brokers = _waiting()
            brokers = sorted(set(brokers) | self._brokers)
            since = now - self._bout_start
            failures = "; ".join(f"{r} (x{n})" if n > 1 else r
                                 for r, n in self._reasons.most_common(3))
            head = (f"cannot reach {', '.join(brokers) or 'the brokers'}" if since < 1e-3 else
                    f"still failing with {', '.join(brokers) or 'the brokers'} after "
                    f"{since:.0f} s, {self._attempts} kafka-python warnings since the last line")
            text = f"Kafka: {head}: {failures}"
            if whats:
                text += f"; waiting for {', '.join(whats)}"
            text += f" (retrying; one line every {self.interval_s:g} s)"
            self._reasons.clear()
            self._attempts = 0
        record.name, record.msg, record.args = logger.name, text, ()
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        record.kafka = {"brokers": brokers, "waiting_for": whats, "errors": failures}
        return True


def _waiting() -> tuple[list[str], list[str]]:
    """(what is waited for, the brokers asked) of the registered waits."""
    with _waits_lock:
        waits = list(_waits.values())
    whats = list(dict.fromkeys(w for w, _ in waits))
    brokers = [b for _, bs in waits for b in bs.split(",") if b]
    return whats, brokers
