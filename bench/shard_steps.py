"""How long the worker's shard calls are at the latency goal's rate, this checkout beside a rival.

A request that reaches the flow while the worker runs a step waits for it (``to_flow``
in ``bench/latency.py``), so the tail of the round trip is the longest steps. This
bench drives the zero-config flow in process (``flows.inprocess.InProcessFlow``, no
Kafka, no other process: the figures are CPU per call, which the load on a shared
machine moves far less than wall times) with ``bench/latency.py``'s world: its warm-up
backlog in batches of 1,000, then a live phase of ``--seconds`` of event time at
``--events-per-s`` simulated events and ``--requests-per-s`` requests, cut into the
micro-batches a live Kafka source reads (``--batch-ms`` of events each), every item
update tagged with its source batch as the flow does. Item tables are published every
``--refresh-ms`` of event time (``items.refresh_interval_ms``; shorter than the
default 60 s so that a short live phase holds several rounds). After the warm-up the
heap is frozen (``gc.freeze``, as ``runtime.gc_freeze_when_caught_up`` does). Every
``UserShard.process`` and ``ItemShard.process`` call of the live phase is timed
(thread CPU); a batch's step is the sum of its calls.

Figures (``_ms``: milliseconds of thread CPU): per call of each stage p50 / p99 / max
and the calls of 5 ms or more (``item_calls_over_5ms``, ``user_calls_over_5ms``), per
batch step p50 / p99 / max, the live phase's total CPU, and the same with the prefix
``rival_`` for ``--rival DIR`` (the same run with ``PYTHONPATH=DIR``). In the live
phase item shards publish in turn (``one_table_per_batch``) where the code has it; the
warm-up publishes as a replay does, so both sides start from the same tables.

Usage: ``python bench/shard_steps.py [--seconds 30] [--rival DIR]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import world  # noqa: E402


def run(seconds: float, events_per_s: float, requests_per_s: float, batch_ms: int,
        refresh_ms: int) -> dict[str, Any]:
    """The live phase's call and step times of this process's code (thread CPU, ms)."""
    from flows.inprocess import InProcessFlow
    from operators.item_shard import ItemShard
    from operators.user_shard import UserShard

    now_ms = 1_767_225_600_000
    n_live = int(seconds * events_per_s)
    warm, live = world(now_ms, n_live + 10_000)
    live = live[:n_live]
    flow = InProcessFlow({"items": {"refresh_interval_ms": refresh_ms}})
    flow.store.background = True  # the flow's store settles versions on its writer thread
    calls: dict[str, list[float]] = {"user": [], "item": []}
    timing = [False]

    def timed(kind: str, method: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.thread_time()
            out = method(*args, **kwargs)
            if timing[0]:
                calls[kind].append((time.thread_time() - t) * 1e3)
            return out
        return wrapper

    UserShard.process = timed("user", UserShard.process)  # type: ignore[method-assign]
    ItemShard.process = timed("item", ItemShard.process)  # type: ignore[method-assign]
    downstream = flow._downstream
    batch_id = [0]

    def tagged(examples: list[Any], updates: list[Any]) -> None:
        """The flow's item side: updates tagged with their source batch."""
        from operators.item_shard import route_updates

        if flow.trainer is not None and examples:
            flow.trainer.process(examples)
        if not updates:
            return
        buckets = route_updates(updates, flow.item_shard_of)
        for key in sorted(buckets):
            for change in flow.items[key].process(key, buckets[key], batch_id[0]).get("index", ()):
                flow.index.add(change)  # type: ignore[union-attr]

    flow._downstream = tagged  # type: ignore[method-assign]
    del downstream
    for i in range(0, len(warm), 1_000):
        batch_id[0] += 1
        flow.feed(warm[i:i + 1_000], batch_id[0])
    users = sorted({e["user_id"] for e in warm if "user_id" in e})
    for shard in flow.items.values():
        shard.one_table_per_batch = True  # live input (the warm-up as a replay's)
    gc.collect()
    gc.freeze()  # as the flow does once its input is caught up (flows/runtime.py)
    timing[0] = True
    steps: list[float] = []
    cpu0 = time.thread_time()
    t_ms, n_ev, n_req = now_ms, 0, 0
    while n_ev < len(live):
        t_ms += batch_ms
        due_ev = min(int((t_ms - now_ms) * events_per_s / 1e3), len(live))
        due_req = int((t_ms - now_ms) * requests_per_s / 1e3)
        batch = [{**e, "ts": t_ms} for e in live[n_ev:due_ev]]
        batch += [{"type": "request", "ts": t_ms, "request_id": f"lat-{j}",
                   "user_id": users[j % len(users)], "k": 10} for j in range(n_req, due_req)]
        n_ev, n_req = due_ev, due_req
        before = sum(calls["user"]) + sum(calls["item"])
        batch_id[0] += 1
        flow.feed(batch, batch_id[0])
        steps.append(sum(calls["user"]) + sum(calls["item"]) - before)
    cpu = time.thread_time() - cpu0
    flow.close()
    out: dict[str, Any] = {"live_cpu_s": round(cpu, 2), "batches": len(steps)}
    for kind, values in (("item", calls["item"]), ("user", calls["user"]), ("step", steps)):
        a = np.asarray(values)
        out.update({f"{kind}_p50_ms": round(float(np.percentile(a, 50)), 2),
                    f"{kind}_p99_ms": round(float(np.percentile(a, 99)), 2),
                    f"{kind}_max_ms": round(float(a.max()), 2)})
        if kind != "step":
            out[f"{kind}_calls_over_5ms"] = int((a >= 5).sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--events-per-s", type=float, default=2_000.0)
    parser.add_argument("--requests-per-s", type=float, default=100.0)
    parser.add_argument("--batch-ms", type=int, default=55)
    parser.add_argument("--refresh-ms", type=int, default=10_000)
    parser.add_argument("--rival", help="a checkout whose code runs the same phase")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = (args.seconds, args.events_per_s, args.requests_per_s, args.batch_ms,
                args.refresh_ms)
    if args.one:
        print(orjson.dumps(run(*settings)).decode())
        return
    figures = run(*settings)
    print("this checkout:", figures)
    if args.rival:
        env = {**os.environ, "PYTHONPATH": args.rival}
        cmd = [sys.executable, __file__, "--one", "--seconds", str(args.seconds),
               "--events-per-s", str(args.events_per_s), "--requests-per-s",
               str(args.requests_per_s), "--batch-ms", str(args.batch_ms),
               "--refresh-ms", str(args.refresh_ms)]
        rival = orjson.loads(subprocess.run(cmd, env=env, check=True, capture_output=True,
                                            text=True).stdout.strip().splitlines()[-1])
        print(f"rival {args.rival}:", rival)
        figures.update({f"rival_{k}": v for k, v in rival.items()})
    print(orjson.dumps(figures).decode())


if __name__ == "__main__":
    main()
