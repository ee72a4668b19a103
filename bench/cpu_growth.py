"""CPU per 1,000 events by position in a long replay: which stage's cost grows with the state.

Feeds ``LOG`` (JSONL events; e.g. ``streamrec simulate -n 200000 --seed 0``) through
``flows.inprocess.InProcessFlow`` (the zero-config stages, deterministic) in live-sized
micro-batches of ``--batch`` events (70: the Kafka source's batches at 2,000 events/s)
and adds up the thread CPU time (ns) spent inside each timed stage method, per window
of ``--window`` events. Nested methods are timed inclusively (``user`` holds ``serve``,
``join``, ``mf``...; ``item`` holds ``publish`` and ``index_change``).

Usage: ``python bench/cpu_growth.py LOG [-n EVENTS] [--batch 70] [--window 10000]
[--profile N=PATH ...]`` (a cProfile of window N);
prints a table of ms CPU per 1,000 events per window (``serve`` also per request) and
ends with one JSON line: ``windows`` (per window: ``events``, ``requests``, then ms per
stage) and ``growth`` (last window over first, per stage).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from events.model import EventParser
from flows import runtime
from flows.inprocess import InProcessFlow
from operators.index_builder import IndexStage
from operators.item_shard import ItemShard
from operators.serving import Server
from operators.snapshot_views import SnapshotViews
from operators.trainer import Trainer
from operators.user_shard import UserShard
from state.join_state import Joiner

from common import gc_pause_hook

TIMED: list[tuple[str, type, str]] = [
    ("parse", EventParser, "parse_batch"),
    ("user", UserShard, "process"),
    ("poll", SnapshotViews, "poll"),
    ("request", UserShard, "_request"),
    ("serve", Server, "recommend"),
    ("feedback", UserShard, "_feedback"),
    ("impression", Joiner, "on_impression"),
    ("advance", Joiner, "advance"),
    ("mf", UserShard, "_mf_steps"),
    ("drain", UserShard, "_drain"),
    ("item", ItemShard, "process"),
    ("publish", ItemShard, "publish"),
    ("index_change", ItemShard, "_index_change"),
    ("index", IndexStage, "add"),
    ("trainer", Trainer, "process"),
]
"""(label, class, method): the stage methods timed, each inclusive of what it calls."""


class StageTimers:
    """Wraps each ``TIMED`` method to add its thread CPU (ns) to ``spent[label]``."""

    def __init__(self) -> None:
        self.spent: dict[str, int] = dict.fromkeys((label for label, _, _ in TIMED), 0)
        self._originals: list[tuple[type, str, Callable[..., Any]]] = []

    def __enter__(self) -> StageTimers:
        for label, cls, name in TIMED:
            original = getattr(cls, name)
            self._originals.append((cls, name, original))
            setattr(cls, name, self._timed(label, original))
        return self

    def _timed(self, label: str, original: Callable[..., Any]) -> Callable[..., Any]:
        spent = self.spent

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time_ns()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.thread_time_ns() - t0
        return timed

    def __exit__(self, *exc: object) -> None:
        for cls, name, original in reversed(self._originals):
            setattr(cls, name, original)

    def gc_pause(self, generation: int, start: int, duration: int) -> None:
        """A ``gc_pause_hook`` record: adds the pause's thread CPU to ``spent["gc"]``."""
        self.spent["gc"] = self.spent.get("gc", 0) + duration

    def take(self) -> dict[str, int]:
        """The ns spent per label since the last take."""
        out = dict(self.spent)
        for label in self.spent:
            self.spent[label] = 0
        return out


def replay(log: Path, n: int, batch_size: int, window: int,
           profile: dict[int, Path] | None = None, freeze_at: int | None = None,
           ) -> list[dict[str, Any]]:
    """Per window of ``window`` events of ``log``'s first ``n``: events, requests and ms of
    thread CPU per stage and in GC pauses (``gc``, also inside the stages' figures).
    ``profile``: window number (1 = the first) -> where to write a cProfile of that
    window (pstats), run with the collector off. The flow process's runtime settings
    (``flows.runtime.apply``: GC thresholds, switch interval); with ``freeze_at``,
    ``flows.runtime.freeze_now`` after that many events, as the live flow does once it
    caught up with its backlog."""
    profile = profile or {}
    runtime.apply(runtime.RuntimeConfig())
    profiler: cProfile.Profile | None = None
    flow = InProcessFlow(None)
    windows: list[dict[str, Any]] = []
    events = requests = 0
    batch: list[dict[str, Any]] = []
    try:
        with StageTimers() as timers, log.open("rb") as f:
            on_gc = gc_pause_hook(timers.gc_pause, time.thread_time_ns)
            gc.callbacks.append(on_gc)
            for line in f:
                if events >= n:
                    break
                if events == freeze_at and not batch:
                    runtime.freeze_now("cpu_growth")
                if not line.strip():
                    continue
                if events % window == 0 and events // window + 1 in profile:
                    gc.disable()  # a collection would be charged to whatever function ran
                    profiler = cProfile.Profile()
                    profiler.enable()
                record = orjson.loads(line)
                batch.append(record)
                requests += record.get("type") == "request"
                events += 1
                if len(batch) == batch_size or events % window == 0 or events == freeze_at:
                    flow.feed(batch)
                    batch = []
                if events % window == 0 and profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(profile[events // window])
                    profiler = None
                    gc.enable()
                if events % window == 0:
                    windows.append(_window(events, requests, timers.take()))
                    requests = 0
            if batch:
                flow.feed(batch)
                windows.append(_window(events, requests, timers.take()))
            gc.callbacks.remove(on_gc)
        return windows
    finally:
        flow.close()


def _window(events: int, requests: int, spent: dict[str, int]) -> dict[str, Any]:
    spent.setdefault("gc", 0)
    return {"events": events, "requests": requests,
            **{label: round(ns / 1e6, 1) for label, ns in spent.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("-n", type=int, default=200_000, help="events to replay")
    parser.add_argument("--batch", type=int, default=70, help="events per micro-batch")
    parser.add_argument("--window", type=int, default=10_000, help="events per window")
    parser.add_argument("--profile", nargs="*", default=[], metavar="N=PATH",
                        help="write a cProfile of window N (1 = the first) to PATH")
    parser.add_argument("--freeze-at", type=int, default=None,
                        help="gc.freeze() after this many events (the live flow's warm-up)")
    args = parser.parse_args()
    profile = {int(k): Path(v) for k, v in (p.split("=", 1) for p in args.profile)}
    windows = replay(args.log, args.n, args.batch, args.window, profile, args.freeze_at)
    labels = [label for label, _, _ in TIMED] + ["gc"]
    print("ms CPU per 1,000 events per window (serve/req: ms per request)")
    print(f"{'events':>8} " + " ".join(f"{label[:9]:>9}" for label in labels) + "  serve/req")
    for w in windows:
        per_k = args.window / 1000
        print(f"{w['events']:>8} " + " ".join(f"{w[label] / per_k:>9.1f}" for label in labels)
              + f"  {w['serve'] / max(w['requests'], 1):>9.3f}")
    first, last = windows[0], windows[-1]
    print(orjson.dumps({
        "windows": windows,
        "growth": {label: round(last[label] / first[label], 2) if first[label] else None
                   for label in labels},
    }).decode())


if __name__ == "__main__":
    main()
