"""Joiner path throughput and pending-state memory, beside the passthrough baseline.

The workload is the zero-config world (``bench/throughput.py``'s ``zero_config_world``:
the simulator settings of ``python -m bytewax.run flows.recsys:flow``, 2 requests of
~10 impressions per event-time second, 2,000 users), as many events as ``-n``. Its
pending impressions stay far below the default bound (``join.max_pending`` 50,000 per
shard): ``forced_closes`` is 0, so every window closes by event time, as in the flow
users run. (The simulator's own defaults, which this bench used before, replay 50
requests per second of 1,000 users, one of whom makes 14% of the traffic: a shard's
10-minute window then holds up to 75,000 impressions, and 30% of all windows were
force-closed at the bound, a load the default memory bound is not sized for.)

* ``events_per_s``: the real flow with only the joiner path on (parse, validate,
  route by user shard, join, sample, write examples/late-labels/metrics as JSONL; no
  profiles, serving, trainer or item side) over the log, one process, one worker.
* ``events_per_cpu_s`` (``_r01``): the same per second of the process's CPU time (on a
  shared machine the wall figures follow the load; these hold).
* ``joiner_only_events_per_s``: the same parsed events through ``UserShard`` objects
  directly (no Bytewax, no parsing, no output encoding): the user shard's own cost.
* ``passthrough_events_per_s``: the trivial Bytewax flow of bench/common.py over the
  same log (one item per event, nothing done).
* ``pending_bytes_per_impression``: tracemalloc growth per impression held in a
  joiner's pending state with the user shard's point-in-time context (the impression
  event, its row in the pending columns and its id in their index, its share of its
  deadline's id list, its deferred-features token and its share of its request's user
  context).
* ``forced_closes``: windows closed early at the pending bound in the r = 1 run.

Usage: ``python bench/joiner.py [-n EVENTS]``.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import orjson

from events.model import EventParser, Impression
from operators.point_in_time import PointInTime
from operators.user_shard import UserShard, route_events
from state.hashing import shard_of
from state.join_state import JoinConfig, Joiner
from state.sampling import NegativeSampler

from common import count_lines, flow_events_per_s, passthrough_events_per_s, simulated_log

JOINER_PATH = {"features": [], "serving": {"enabled": False}, "ranker": {"enabled": False},
               "items": {"enabled": False}}
"""The main flow with only the joiner path on: parse, validate, route, join, sample, write."""


def flow_rate(log: Path, negative_rate: float) -> tuple[float, dict]:
    return flow_events_per_s(log, sampler={"negative_rate": negative_rate}, **JOINER_PATH)


def joiner_only_rate(log: Path) -> float:
    parser = EventParser()
    with log.open("rb") as f:
        lines = [line.rstrip(b"\n") for line in f]
    batches = [parser.parse_batch(lines[i:i + 1000])[0] for i in range(0, len(lines), 1000)]
    routed = [route_events(b, 8, lambda u: shard_of(u, 8), 0) for b in batches]
    shards: dict[str, UserShard] = {}
    start = time.perf_counter()
    for parts in routed:
        for key, (name, events, _) in parts:
            shard = shards.get(key) or shards.setdefault(key, UserShard(JoinConfig(), NegativeSampler()))
            shard.process(name, events, 0)
    for shard in shards.values():
        shard.flush()
    return len(lines) / (time.perf_counter() - start)


def pending_bytes_per_impression(n: int = 100_000) -> float:
    context = PointInTime()  # the user shard's context: every impression defers its features
    joiner = Joiner(JoinConfig(max_pending=n), NegativeSampler(), context)  # all n held
    t0 = 1_767_225_600_000
    impressions = [Impression(t0 + i // 10, f"imp{i}", f"u{i // 10 % 5000}", f"i{i % 3000}",
                              f"r{i // 10}", i % 10, {"device": "web"}) for i in range(n)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for imp in impressions:
        context.group = imp.request_id  # as UserShard does: a request's impressions share it
        joiner.on_impression(imp)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert joiner.pending_count() == n
    return (after - before) / n


def main() -> None:
    from throughput import zero_config_world

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000_000)
    args = parser.parse_args()
    world, seed, _ = zero_config_world()
    log = simulated_log(args.n, seed, world)
    n = count_lines(log)
    passthrough = passthrough_events_per_s(log)
    rate, summary = flow_rate(log, 1.0)
    rate_r01, summary_r01 = flow_rate(log, 0.1)
    cpu, cpu_r01 = summary["events_per_cpu_s"], summary_r01["events_per_cpu_s"]
    joiner_only = joiner_only_rate(log)
    pending = pending_bytes_per_impression()
    print(f"log: {n:,} simulated events, mix {summary['events_by_type']}")
    print(f"join counters: {summary['join']}")
    print(f"passthrough flow:         {passthrough:>12,.0f} events/s")
    print(f"joiner path flow (r=1):   {rate:>12,.0f} events/s  ({rate / passthrough:.3f}x passthrough)"
          f"; {cpu:,.0f} per CPU-s")
    print(f"joiner path flow (r=0.1): {rate_r01:>12,.0f} events/s; {cpu_r01:,.0f} per CPU-s")
    print(f"joiner state only:        {joiner_only:>12,.0f} events/s (no parse, no output)")
    print(f"pending state:            {pending:>12,.0f} bytes per waiting impression")
    print(f"forced closes:            {summary['join']['forced_closes']:>12,} (windows closed at "
          "the pending bound, r = 1)")
    print(orjson.dumps({
        "events": n,
        "events_per_s": round(rate, 1),
        "events_per_s_r01": round(rate_r01, 1),
        "events_per_cpu_s": round(cpu, 1),
        "events_per_cpu_s_r01": round(cpu_r01, 1),
        "joiner_only_events_per_s": round(joiner_only, 1),
        "passthrough_events_per_s": round(passthrough, 1),
        "ratio": round(rate / passthrough, 4),
        "pending_bytes_per_impression": round(pending, 1),
        "forced_closes": summary["join"]["forced_closes"],
    }).decode())


if __name__ == "__main__":
    main()
