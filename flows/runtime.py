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

In a cluster process (``python -m bytewax.run ... -i N -a ...``, or ``-w`` workers)
Bytewax's main thread only waits for the worker threads: it sleeps 1 ms, then takes the
GIL to check for signals, and each time the worker computing hands the GIL over and
back (1.1-1.5 CPU-s of a 60,000-event 2-process run, ~5%, plus the worker's lost
caches). ``park_main_thread``: the first worker thread that builds a stage
(``note_worker``) opens a pidfd of itself and asks the main thread, through the signal
``PARK_SIGNAL``, to run ``_park_main``, which waits in ``select`` on the workers'
pidfds (the GIL released; readable when the thread ends) and returns to Bytewax's loop
once they have ended. Signals still stop the flow: a Ctrl-C interrupts the wait and its
``KeyboardInterrupt`` leaves Bytewax's signal check as before. A one-process run (its
worker is the main thread) never parks. (A poll of the workers every 20 ms instead
cost as much CPU as Bytewax's 1 ms loop under load: each wake waits for the GIL.)
"""

from __future__ import annotations

import _thread
import gc
import logging
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType

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
    """Set this process's GC thresholds and GIL switch interval from ``config``, and
    (on the main thread) let a cluster process's main thread park (``park_main_thread``)."""
    gc.set_threshold(*config.gc_threshold)
    sys.setswitchinterval(config.switch_interval_ms / 1e3)
    park_main_thread()


PARK_SIGNAL = signal.SIGUSR2
"""The signal that asks the main thread to park (sent by ``note_worker`` with
``_thread.interrupt_main``, no OS signal; one sent from outside parks it too)."""

PIDFD_THREAD = os.O_EXCL
"""``os.pidfd_open`` flag (Linux 6.9+): a pidfd of one thread, readable once it ended."""

PARK_CHECK_S = 1.0
"""How often (s) the parked main thread wakes to run the Python handlers of signals
that another thread received (the main thread gets most signals itself, at once)."""

_workers: dict[int, int] = {}
"""This process's noted worker threads not yet seen ending: native thread id -> pidfd."""
_workers_lock = threading.Lock()
_parking = False


def park_main_thread() -> bool:
    """Install ``_park_main`` as the handler of ``PARK_SIGNAL`` (once; only from the main
    thread, where ``os.pidfd_open`` exists); True if installed."""
    global _parking
    if (not _parking and hasattr(os, "pidfd_open")
            and threading.current_thread() is threading.main_thread()):
        signal.signal(PARK_SIGNAL, _park_main)
        _parking = True
    return _parking


def note_worker() -> None:
    """Note the calling thread as a worker of this process (called where a stage is
    built); the first noted worker that is not the main thread parks the main thread.
    A kernel without thread pidfds (before Linux 6.9) leaves it unparked."""
    if not _parking or threading.get_ident() == threading.main_thread().ident:
        return
    tid = threading.get_native_id()
    with _workers_lock:
        if tid in _workers:
            return
        try:
            _workers[tid] = os.pidfd_open(tid, PIDFD_THREAD)
        except OSError:
            return
        first = len(_workers) == 1
    if first:
        _thread.interrupt_main(PARK_SIGNAL)


def _park_main(signum: int, frame: FrameType | None) -> None:
    """``PARK_SIGNAL``'s handler: when the main thread runs it from Bytewax's wait for the
    workers (its Python frame is ``bytewax.run``'s, the module that called ``cli_main``),
    sleep (the GIL released) until the noted workers have ended; anywhere else (the main
    thread running Python code of its own) return at once."""
    spec = frame.f_globals.get("__spec__") if frame is not None else None
    if getattr(spec, "name", None) != "bytewax.run":
        return
    while True:
        with _workers_lock:
            waiting = list(_workers.values())
        if not waiting:
            return
        ended, _, _ = select.select(waiting, [], [], PARK_CHECK_S)
        with _workers_lock:
            for tid, fd in list(_workers.items()):
                if fd in ended:
                    os.close(fd)
                    del _workers[tid]


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
