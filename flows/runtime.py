"""The flow process's runtime: its garbage collector (thresholds, one freeze once live
input caught up) and the GIL switch interval.

A CPython collection stops the worker thread for as long as it scans its generation,
and every request in flight waits (``python bench/latency.py``: pauses of 0.3-1.2 s wall
time under load before the freeze below, overlapping most of the slowest 1% of round
trips). Two settings bound it:

* ``runtime.gc_threshold``: a pause scans the generation's objects, so the young
  thresholds bound the pause, but a young collection run in the middle of a batch also
  promotes the batch's temporaries, which are then scanned again: (50,000, 20, 100)
  halved the GC time of (10,000, 10, 100) and had shorter pauses with the freeze below
  (``bench/latency.py`` at 30 requests/s beside 600 events/s, 2 rounds: total 116-128
  vs 200-430 ms in 20 s, longest 54-66 vs 84-195 ms); CPython's default (700, 10, 10)
  re-scans long-lived state often (~25% of the joiner path).
* ``runtime.gc_freeze_when_caught_up``: the state a flow builds while it reads a backlog (or
  unpickles on resume) lives for the whole run; the first time a Kafka input partition
  reads to the end of its log, a full collection runs once (cyclic garbage made so far
  is freed, not kept) and ``gc.freeze()`` moves everything still alive to the permanent
  generation, which collections never scan again. Objects made later are collected as
  usual; one frozen now that later ends up in a reference cycle is not freed (objects
  freed by their reference count, most of them, are), so the freeze is done once per
  partition, not periodically (a partition catching up after another pays a collection
  of what was made since the last freeze only: frozen objects are not scanned).

The worker thread holds the GIL while it computes; the other threads of the process
(each Kafka output's producer sender thread, the snapshot loader and writer threads)
need it at every step of their I/O and wait up to the switch interval for it (Python's
default 5 ms). An answer handed to the recommendations producer waits for it at least
twice before the broker acknowledges it: ``switch_interval_ms`` 1 cut a producer's
send -> acknowledgement beside a busy thread from p50 6.4-6.9 ms to 2.3-2.4 ms.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from dataclasses import dataclass

from state.settings import doc

log = logging.getLogger(__name__)

GC_THRESHOLD = (50_000, 20, 100)
"""Default CPython GC thresholds of flow processes (``runtime.gc_threshold``)."""


@dataclass
class RuntimeConfig:
    """The flow process's interpreter: garbage collection (its pauses stall every request)
    and the GIL switch interval."""

    gc_threshold: list[int] = doc(
        "gc.set_threshold of the flow process: [gen0 allocations, gen0 collections per gen1, "
        "gen1 collections per full one]. The young pauses grow with the first two, and "
        "lower ones re-scan more of a batch's temporaries; CPython's default (700, 10, 10) "
        "re-scans long-lived state often (~25% of the joiner path). docs/architecture.md, "
        "batches and latency.",
        factory=lambda: list(GC_THRESHOLD))
    gc_freeze_when_caught_up: bool = doc(
        "The first time each Kafka input partition reads to the end of its log: one full "
        "collection, then gc.freeze(): the state built from the backlog (or resumed) is "
        "never scanned again.", True)
    switch_interval_ms: float = doc(
        "sys.setswitchinterval of the flow process (ms): how long a thread waiting for the "
        "GIL (Kafka producers' sender threads, snapshot loader and writer) waits while the "
        "worker computes (Python's default: 5).", 1.0)

    def __post_init__(self) -> None:
        if len(self.gc_threshold) != 3 or any(t < 0 for t in self.gc_threshold):
            raise ValueError(f"runtime.gc_threshold: expected 3 integers >= 0, got "
                             f"{self.gc_threshold}")
        if not self.switch_interval_ms > 0:
            raise ValueError(f"runtime.switch_interval_ms: must be > 0, got "
                             f"{self.switch_interval_ms}")


def apply(config: RuntimeConfig) -> None:
    """Set this process's GC thresholds and GIL switch interval from ``config``."""
    gc.set_threshold(*config.gc_threshold)
    sys.setswitchinterval(config.switch_interval_ms / 1e3)


_freeze_lock = threading.Lock()


def freeze_now(reason: str) -> float:
    """One full collection, then ``gc.freeze()`` of everything alive; logs the objects
    frozen and the pause; returns the pause (ms)."""
    with _freeze_lock:
        t0 = time.perf_counter()
        collected = gc.collect()
        gc.freeze()
        pause_ms = (time.perf_counter() - t0) * 1e3
    log.info("gc: froze %s objects (%s): a full collection (%d freed) in %.0f ms; "
             "later collections skip them", f"{gc.get_freeze_count():,}", reason, collected,
             pause_ms, extra={"gc_frozen": gc.get_freeze_count(), "gc_pause_ms": round(pause_ms, 1)})
    return pause_ms
