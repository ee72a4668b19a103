"""Throughput of the zero-config workload beside a decoding passthrough, in one run.

* ``events_per_s``: the main flow with the zero-config settings (the config of
  ``python -m bytewax.run flows.recsys:flow``: simulator world of ``InputConfig``'s
  defaults, ranker, item side, serving with ``scorer = auto``, JSONL outputs) fed the
  same simulator's events from a replayed log, one process, one worker.
* ``passthrough_events_per_s``: the ceiling in the same Bytewax shape: replay ->
  parse + validate (``EventParser``) -> route to 8 user shards (``route_events``) ->
  identity stateful step per shard -> JSONL write of every event.
* ``requests_per_s``: requests answered per wall second of the main flow.
* ``*_per_cpu_s``, ``ratio_cpu``: the same per second of the process's CPU time (on a
  shared machine the wall figures follow the load; these hold).
* ``serving_cpu_ms_per_request``: thread CPU time inside ``Server.recommend`` per
  request (the main flow's serving cost, measured in the same run).
* ``bytes_per_example``: the examples output's size per example (its wire form).

Usage: ``python bench/throughput.py [-n EVENTS]`` (default: the zero-config 200,000).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import bytewax.operators as op
import orjson
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulLogic

from events.model import EventParser, event_to_dict
from events.simulator import SimConfig
from flows.config import InputConfig
from operators.serving import Server
from operators.sinks import JsonlFileSink
from operators.sources import ReplaySource
from operators.user_shard import route_events
from state.hashing import ShardOf

from common import count_lines, flow_events_per_s, simulated_log, timed_run

SHARDS = 8


def zero_config_world() -> tuple[SimConfig, int, int]:
    """(world, seed, events) of the zero-config flow's simulator input."""
    inp = InputConfig()
    return (SimConfig(n_users=inp.n_users, n_items=inp.n_items,
                      requests_per_s=inp.requests_per_s), inp.seed, inp.events)


class _Identity(StatefulLogic):
    """Keeps a count per shard and passes the batch on."""

    def __init__(self, seen: int) -> None:
        self.seen = seen

    def on_item(self, value: Any) -> tuple[list[Any], bool]:
        self.seen += len(value[1])
        return [value[1]], StatefulLogic.RETAIN

    def snapshot(self) -> int:
        return self.seen


def decoding_passthrough_events_per_s(log: Path, batch_size: int = 1000) -> tuple[float, float]:
    """(events per wall second, per CPU second) of replay -> parse -> validate -> route ->
    identity stateful -> JSONL."""
    out = Path(tempfile.mkdtemp(prefix="streamrec-bench-pass-"))
    try:
        flow = Dataflow("decoding_passthrough")
        parser = EventParser()
        shard_of = ShardOf(SHARDS)
        raw = op.input("in", flow, ReplaySource(log, batch_size=batch_size))
        parsed = op.map("parse", raw, lambda batch: (*parser.parse_batch(batch), time.time_ns()))
        routed = op.flat_map("route", parsed, lambda p: route_events(p[0], SHARDS, shard_of, p[2]))
        kept = op.map("shard_out", op.stateful("shard", routed, lambda s: _Identity(s or 0)),
                      lambda kv: [event_to_dict(e) for e in kv[1]])
        op.output("out", op.key_on("out_key", kept, lambda _: "events"),
                  JsonlFileSink(out, "events"))
        n = count_lines(log)
        return timed_run(flow, lambda: n)
    finally:
        shutil.rmtree(out, ignore_errors=True)


class ServingTimer:
    """Wraps ``Server.recommend`` to add up its thread CPU time (ns) and calls."""

    def __init__(self) -> None:
        self.cpu_ns = 0
        self.calls = 0
        self._original = Server.recommend

    def __enter__(self) -> ServingTimer:
        original = self._original
        timer = self

        def recommend(server: Server, *args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time_ns()
            try:
                return original(server, *args, **kwargs)
            finally:
                timer.cpu_ns += time.thread_time_ns() - t0
                timer.calls += 1

        Server.recommend = recommend  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Server.recommend = self._original  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    world, seed, default_n = zero_config_world()
    parser.add_argument("-n", type=int, default=default_n)
    args = parser.parse_args()
    log = simulated_log(args.n, seed, world)
    n = count_lines(log)
    passthrough, passthrough_cpu = decoding_passthrough_events_per_s(log)
    with ServingTimer() as timer:
        main_rate, summary = flow_events_per_s(log)
    elapsed = summary["events_in"] / main_rate
    example_bytes = summary["output_bytes"]["examples"] / max(summary["outputs"]["examples"], 1)
    requests = summary["events_by_type"].get("request", 0)
    print(f"log: {n:,} events of the zero-config world {world.n_users} users, "
          f"{world.n_items} items, {world.requests_per_s} requests/s; mix {summary['events_by_type']}")
    print(f"outputs: {summary['outputs']}")
    main_cpu = summary["events_per_cpu_s"]
    print(f"decoding passthrough: {passthrough:>10,.0f} events/s ({passthrough_cpu:,.0f} per CPU-s)")
    print(f"zero-config flow:     {main_rate:>10,.0f} events/s  ({main_rate / passthrough:.3f}x "
          f"passthrough; {main_cpu:,.0f} per CPU-s, {main_cpu / passthrough_cpu:.3f}x), "
          f"{requests / elapsed:,.0f} requests/s, serving "
          f"{timer.cpu_ns / 1e6 / max(timer.calls, 1):.2f} ms CPU per request")
    print(f"examples:             {example_bytes:>10,.0f} bytes each on the wire")
    print(orjson.dumps({
        "events": n,
        "events_per_s": round(main_rate, 1),
        "passthrough_events_per_s": round(passthrough, 1),
        "ratio": round(main_rate / passthrough, 4),
        "events_per_cpu_s": round(main_cpu, 1),
        "passthrough_events_per_cpu_s": round(passthrough_cpu, 1),
        "ratio_cpu": round(main_cpu / passthrough_cpu, 4),
        "requests_per_s": round(requests / elapsed, 1),
        "serving_cpu_ms_per_request": round(timer.cpu_ns / 1e6 / max(timer.calls, 1), 3),
        "bytes_per_example": round(example_bytes, 1),
    }).decode())


if __name__ == "__main__":
    main()
