"""Liveness of this process's dataflow: heartbeats for ``/healthz``.

Every input partition beats each time Bytewax asks it for a batch (it does so
continuously while the worker runs, also when no data arrives), and so does the
metrics stage on every item and notification. A worker stuck in an operator stops
asking its inputs, so the beats stop. Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import time

_STARTED = time.monotonic()
_last_beat: float | None = None


def restart() -> None:
    """A dataflow is being built in this process: forget earlier beats (an earlier flow
    of the same process, e.g. in tests) and start the start-up grace period now."""
    global _STARTED, _last_beat
    _STARTED = time.monotonic()
    _last_beat = None


def beat() -> None:
    """Record that a worker of this process made progress now."""
    global _last_beat
    _last_beat = time.monotonic()


def last_beat_age_s() -> float | None:
    """Seconds since the last beat (None: no beat yet)."""
    return None if _last_beat is None else time.monotonic() - _last_beat


def uptime_s() -> float:
    """Seconds since this module was imported or the last ``restart`` (the flow's start)."""
    return time.monotonic() - _STARTED


def status(stall_s: float) -> tuple[bool, dict[str, object]]:
    """``(healthy, details)``: healthy when the last beat is at most ``stall_s`` old, or
    no beat came yet and the process is younger than ``stall_s`` (starting up)."""
    age = last_beat_age_s()
    if age is None:
        ok = uptime_s() <= stall_s
        state = "starting" if ok else "stalled"
    else:
        ok = age <= stall_s
        state = "ok" if ok else "stalled"
    return ok, {"status": state, "last_beat_age_s": None if age is None else round(age, 3),
                "uptime_s": round(uptime_s(), 3), "stall_s": stall_s}
