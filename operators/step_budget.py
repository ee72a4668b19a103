"""Deferrable work bounded between two polls of the live source, per worker thread.

A Bytewax worker runs one step after another: it polls its inputs, then runs every
step of the flow on what arrived. A request that reaches the broker while the worker is
busy waits for the whole step before its batch is even read (``to_flow`` in
``bench/latency.py``), so work that no answer waits for, such as applying item updates,
lengthens every round trip that arrives meanwhile. Such work can be split: a stage
queues its input and works only while this step's budget lasts, and asks to be called
again at once (``notify_at``); the worker then polls its sources before it goes on.

``source_polled()`` is called by a live source partition (``operators.kafka_io``) each
time Bytewax polls it, which starts a new step on that thread; ``left_s(budget_ms)``
says how much deferrable work this step still allows, and ``charge(s)`` counts what a
stage used. Each Bytewax worker is one thread, so the clock is per thread, and a thread
that never polled a live source (replays, the simulator) defers nothing (``polls()``
is 0), which keeps replays deterministic. Used by ``operators.item_shard``.
"""

from __future__ import annotations

import threading
import time


class _StepClock(threading.local):
    def __init__(self) -> None:
        self.polls = 0
        """Polls of a live source on this thread so far."""
        self.spent_s = 0.0
        """Deferrable work charged since the last poll (s)."""


_clock = _StepClock()


def source_polled() -> None:
    """A live source was polled on this thread: a new step, with a whole budget."""
    _clock.polls += 1
    _clock.spent_s = 0.0


def polls() -> int:
    """Polls of a live source on this thread so far (0: no live source polls here, so
    nothing is deferred)."""
    return _clock.polls


def left_s(budget_ms: float) -> float:
    """Seconds of deferrable work this step still allows on this thread (<= 0: none)."""
    return budget_ms / 1e3 - _clock.spent_s


def charge(seconds: float) -> None:
    """Count ``seconds`` of deferrable work against this step's budget."""
    _clock.spent_s += seconds


def now() -> float:
    """The clock budgets are measured with (s)."""
    return time.perf_counter()
