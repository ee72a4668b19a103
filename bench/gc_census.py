"""What the flow's garbage collections scan after the freeze, replayed in process.

Feeds ``LOG``'s first ``--warm`` events through ``flows.inprocess.InProcessFlow`` in
micro-batches of 1,000, freezes everything alive (``flows.runtime.freeze_now``, as a
live flow does once its input caught up), then feeds ``--live`` more events in batches
of ``--batch`` (a live source batch: ~70 records) under the flow's GC thresholds, each
collection logged by a ``gc.callbacks`` hook (generation, thread CPU ms, objects
collected). At the end: the objects in generation 1 and a forced generation-1
collection's thread CPU time (what a live gen1 pause scans: the survivors of the young
collections since the last one), and with ``--sites N`` the N allocation lines
(``tracemalloc``, started after the freeze) of a sample of the tracked survivors: which
long-lived containers each collection keeps scanning. A census slows the replay; the
pause figures of a run with ``--sites`` are not comparable with one without.

Usage: ``python bench/gc_census.py [LOG (default: the zero-config world)] [--warm 20000] [--live 40000] [--batch 70]
[--sites 0]``; the last line is JSON: ``collections`` (per generation: count, max and
total thread CPU ms), ``gen1_objects``, ``gen1_collect_ms``.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
from throughput import zero_config_world

from flows import runtime
from flows.inprocess import InProcessFlow

from common import gc_pause_hook, simulated_log


def survivor_sites(n: int, sample: int = 60_000, seed: int = 1) -> list[tuple[str, float, str]]:
    """The ``n`` commonest allocation lines of a sample of the tracked objects in the
    collected generations (frozen ones excluded): (file:line, share of the traced
    sample, its commonest types)."""
    objs = [o for g in range(3) for o in gc.get_objects(g)]
    picked = random.Random(seed).sample(objs, min(sample, len(objs)))
    del objs
    sites: Counter[str] = Counter()
    types: dict[str, Counter[str]] = {}
    for o in picked:
        tb = tracemalloc.get_object_traceback(o)
        if tb is None:  # made before tracing started (frozen or warm-up state)
            continue
        site = f"{Path(tb[0].filename).name}:{tb[0].lineno}"
        sites[site] += 1
        types.setdefault(site, Counter())[type(o).__qualname__] += 1
    total = max(sum(sites.values()), 1)
    return [(site, count / total, ", ".join(t for t, _ in types[site].most_common(2)))
            for site, count in sites.most_common(n)]


def replay(log: Path, warm: int, live: int, batch: int, sites: int) -> dict[str, Any]:
    """The figures of one replay (module docstring)."""
    with log.open("rb") as f:
        events = [orjson.loads(line) for line in islice(f, warm + live)]
    runtime.apply(runtime.RuntimeConfig())
    flow = InProcessFlow(None)
    pauses: list[tuple[int, float]] = []

    def pause(generation: int, start: int, dur: int) -> None:
        pauses.append((generation, dur / 1e6))  # thread CPU ms
    on_gc = gc_pause_hook(pause, time.thread_time_ns)

    try:
        for i in range(0, warm, 1_000):
            flow.feed(events[i:min(i + 1_000, warm)])
        runtime.freeze_now("gc_census")
        if sites:
            tracemalloc.start(1)
        gc.callbacks.append(on_gc)
        try:
            for i in range(warm, len(events), batch):
                flow.feed(events[i:i + batch])
            gc.collect(0)  # the young generation's survivors join generation 1
        finally:
            gc.callbacks.remove(on_gc)
        gen1 = len(gc.get_objects(1))
        top = survivor_sites(sites) if sites else []
        t0 = time.thread_time()
        gc.collect(1)
        gen1_ms = (time.thread_time() - t0) * 1e3
    finally:
        tracemalloc.stop()
        flow.close()
    by_gen: dict[str, dict[str, float]] = {}
    for g, ms in pauses[:-1]:  # the last: the gc.collect(0) above
        acc = by_gen.setdefault(f"gen{g}", {"count": 0, "max_ms": 0.0, "total_ms": 0.0})
        acc["count"] += 1
        acc["max_ms"] = round(max(acc["max_ms"], ms), 1)
        acc["total_ms"] = round(acc["total_ms"] + ms, 1)
    return {"events": len(events), "collections": by_gen, "gen1_objects": gen1,
            "gen1_collect_ms": round(gen1_ms, 1), "sites": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", nargs="?", type=Path, default=None,
                        help="JSONL events (default: the zero-config world, simulated)")
    parser.add_argument("--warm", type=int, default=20_000)
    parser.add_argument("--live", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=70)
    parser.add_argument("--sites", type=int, default=0)
    args = parser.parse_args()
    log = args.log
    if log is None:
        world, seed, _ = zero_config_world()
        log = simulated_log(args.warm + args.live, seed, world)
    figures = replay(log, args.warm, args.live, args.batch, args.sites)
    for site, share, kinds in figures.pop("sites"):
        print(f"{share:6.1%}  {site}  ({kinds})")
    print(orjson.dumps(figures).decode())


if __name__ == "__main__":
    main()
