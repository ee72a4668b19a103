"""The flow process's garbage collector: its thresholds, and one freeze once live input caught up.

A CPython collection stops the worker thread for as long as it scans its generation,
and every request in flight waits (``python bench/latency.py``: a young-generation
pause of up to 0.2-1.2 s wall time under load with thresholds of (50,000, 20, 100),
overlapping most of the slowest 1% of round trips). Two settings bound it:

* ``gc.threshold``: a pause scans the generation's objects, so the young thresholds
  bound the pause (gen0 ~ its allocations, gen1 ~ gen0 x gen1), while every object is
  still scanned once per generation it passes through; the full collection also waits
  until the long-lived objects grew by 25% since the last one (CPython's own rule).
* ``gc.freeze_when_caught_up``: the state a flow builds while it reads a backlog (or
  unpickles on resume) lives for the whole run; the first time a Kafka input partition
  reads to the end of its log, a full collection runs once (cyclic garbage made so far
  is freed, not kept) and ``gc.freeze()`` moves everything still alive to the permanent
  generation, which collections never scan again. Objects made later are collected as
  usual; one frozen now that later ends up in a reference cycle is not freed (objects
  freed by their reference count, most of them, are), so the freeze is done once per
  partition, not periodically.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass

from state.settings import doc

log = logging.getLogger(__name__)

GC_THRESHOLD = (10_000, 10, 100)
"""Default CPython GC thresholds of flow processes (``gc.threshold``)."""


@dataclass
class GcConfig:
    """CPython garbage collection in the flow process (its pauses stall every request)."""

    threshold: list[int] = doc(
        "gc.set_threshold of the flow process: [gen0 allocations, gen0 collections per gen1, "
        "gen1 collections per full one]. The young pauses grow with the first two; "
        "CPython's default (700, 10, 10) re-scans long-lived state often (~25% of the "
        "joiner path). docs/architecture.md, batches and latency.",
        factory=lambda: list(GC_THRESHOLD))
    freeze_when_caught_up: bool = doc(
        "The first time each Kafka input partition reads to the end of its log: one full "
        "collection, then gc.freeze(): the state built from the backlog (or resumed) is "
        "never scanned again.", True)

    def __post_init__(self) -> None:
        if len(self.threshold) != 3 or any(t < 0 for t in self.threshold):
            raise ValueError(f"gc.threshold: expected 3 integers >= 0, got {self.threshold}")


def apply_thresholds(config: GcConfig) -> None:
    """Set this process's GC thresholds from ``config``."""
    gc.set_threshold(*config.threshold)


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
