"""Serving CPU per request over a replayed log, the flow's stages driven in process.

Feeds ``LOG`` (JSONL events; default: the first ``-n`` events of the zero-config world,
as ``bench/throughput.py`` makes it) through ``flows.inprocess.InProcessFlow`` (the
zero-config stages, deterministic: snapshots by event time every micro-batch of
1,000, as ``streamrec eval`` runs them) and adds up the thread CPU time inside
``Server.recommend`` (``throughput.ServingTimer``). No Bytewax and no outputs, so a run
is short and paired runs of two checkouts compare the serving code alone (e.g.
``ml20k.jsonl``, the first 20k events of ``streamrec import movielens u.data
--with-requests``).

Beside it, in the same run: the process CPU of the whole replay per request (what
serving is a share of).

Usage: ``python bench/serving_cpu.py [LOG] [-n EVENTS]``; the last line is JSON:
``serving_cpu_ms_per_request``, ``flow_cpu_ms_per_request``, ``serving_share``,
``requests``, ``events``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import orjson
from throughput import ServingTimer, zero_config_world

from flows.inprocess import InProcessFlow

from common import simulated_log

BATCH = 1_000


def replay(log: Path, n: int) -> tuple[int, float]:
    """(events fed, process CPU seconds) of ``log``'s first ``n`` events through the
    in-process flow."""
    flow = InProcessFlow(None)
    events, batch = 0, []
    cpu0 = time.process_time()
    try:
        with log.open("rb") as f:
            for line in f:
                if events >= n:
                    break
                if not line.strip():
                    continue
                batch.append(orjson.loads(line))
                events += 1
                if len(batch) == BATCH:
                    flow.feed(batch)
                    batch = []
        if batch:
            flow.feed(batch)
        return events, time.process_time() - cpu0
    finally:
        flow.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", nargs="?", type=Path, default=None)
    parser.add_argument("-n", type=int, default=60_000, help="events to replay")
    args = parser.parse_args()
    log = args.log
    if log is None:
        world, seed, _ = zero_config_world()
        log = simulated_log(args.n, seed, world)
    with ServingTimer() as timer:
        events, cpu_s = replay(log, args.n)
    requests = max(timer.calls, 1)
    serving_ms = timer.cpu_ns / 1e6 / requests
    flow_ms = cpu_s * 1e3 / requests
    print(f"log {log}: {events:,} events, {timer.calls:,} requests")
    print(f"serving: {serving_ms:.3f} ms CPU per request; the whole replay "
          f"{flow_ms:.3f} ms CPU per request (serving {serving_ms / flow_ms:.0%} of it)")
    print(orjson.dumps({
        "events": events,
        "requests": timer.calls,
        "serving_cpu_ms_per_request": round(serving_ms, 4),
        "flow_cpu_ms_per_request": round(flow_ms, 4),
        "serving_share": round(serving_ms / flow_ms, 4),
    }).decode())


if __name__ == "__main__":
    main()
