"""Bounded memory under ID churn: 10 million distinct user and item IDs through the flow.

Usage: ``python bench/memory_churn.py [--ids 10000000] [--points 20] [--trace]
[--default-capacities]``

The real flow (replay source reading a named pipe, every output to files) runs in this
process on ``flows.memory.churn_blocks``: ever-new users and items, half of them only
announced (``user`` / ``item`` events), the rest seen and clicked (joiner, profiles,
MF, co-visitation, ranker, index). The capacities of ``CHURN_CONFIG`` are far below
the number of IDs, so every store fills up and then evicts. The resident set size is
sampled as the IDs stream in and printed as a curve, beside ``flows.memory.
memory_bound`` of the config (the bound docs/operations.md documents). The last line
is one JSON object of the figures. ``--default-capacities`` runs the flow's default
config instead (only the input, the outputs and the metrics interval set), to measure
the default bound against the RSS it allows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from bytewax.testing import run_main  # noqa: E402

from flows.config import load_config  # noqa: E402
from flows.memory import churn_blocks, memory_bound  # noqa: E402
from flows.recsys import build  # noqa: E402
from operators.metrics import resident_mb  # noqa: E402

CHURN_CONFIG: dict[str, Any] = {
    "shards": {"users": 2, "items": 2, "max_users": 20_000, "max_items": 20_000,
               "hot_profiles": 2_000},
    "join": {"max_pending": 10_000, "max_orphans": 2_000},
    "items": {"max_items": 10_000,
              "covis": {"max_items": 10_000, "max_neighbors": 20},
              "mf": {"max_users": 20_000, "max_items": 10_000, "admit_threshold": 2}},
    "ranker": {"max_features": 100_000, "max_waiting": 30_000},
    "metrics": {"interval_s": 3600.0},
}
"""Capacities of the run: per user shard 20k users, 20k catalog items and 10k pending
impressions, per item shard 10k items and co-visitation rows of 20 neighbours, a
ranker of 100k weights and 30k waiting examples. The interacting IDs (4%) fill them
after ~2M IDs of the stream."""


DEFAULT_CAPACITIES: dict[str, Any] = {"metrics": {"interval_s": 3600.0}}
"""The default config's capacities (``--default-capacities``)."""


BLOCK_IDS = 50
"""New IDs per churn block: one user of each 50 new IDs interacts, with two items
(4% of the IDs)."""


def run(n_ids: int, points: int, config: dict[str, Any], workdir: Path,
        block_ids: int = BLOCK_IDS, trace: bool = False) -> dict[str, Any]:
    """Stream ``n_ids`` churn IDs through the flow; returns the figures (RSS in MB)."""
    fifo = workdir / "churn.jsonl"
    os.mkfifo(fifo)
    cfg = {**config, "inputs": [{"kind": "replay", "path": str(fifo), "batch_size": 1000}],
           "output": {"dir": str(workdir / "out")}}
    curve: list[tuple[int, float, float]] = []
    every = max(block_ids, n_ids // points // block_ids * block_ids)
    start = time.perf_counter()

    events = [0]

    def write() -> None:
        ids = 0
        with fifo.open("wb") as f:
            for lines in churn_blocks(n_ids, block_ids):
                f.write(b"\n".join(lines) + b"\n")
                events[0] += len(lines)
                ids += block_ids
                if ids >= (len(curve) + 1) * every:
                    curve.append((ids, round(resident_mb()[0], 1), round(time.perf_counter() - start, 1)))
                    print(f"{ids:>11,} IDs  RSS {curve[-1][1]:8.1f} MB  {curve[-1][2]:7.1f} s",
                          flush=True)
        if trace:
            _print_trace()

    baseline = resident_mb()[0]
    writer = threading.Thread(target=write, name="churn-writer")
    writer.start()
    run_main(build(cfg))
    writer.join()
    elapsed = time.perf_counter() - start
    bound = memory_bound(load_config(cfg))
    peak = resident_mb()[1]  # VmHWM: at least every sampled RSS
    half = [r for i, r, _ in curve if i > n_ids // 2]
    return {
        "ids": n_ids,
        "events": events[0],
        "events_per_s": round(events[0] / elapsed),
        "seconds": round(elapsed, 1),
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": peak,
        "final_rss_mb": curve[-1][1],
        "second_half_growth_mb": round(max(half) - min(half), 1) if half else None,
        "bound_mb": round(baseline + bound["total_mb"], 1),
        "bound_above_baseline_mb": round(bound["total_mb"], 1),
        "bound_parts_mb": {k: round(v, 1) for k, v in bound["parts_mb"].items()},
        "curve": [[i, r] for i, r, _ in curve],
    }


def _print_trace() -> None:
    import tracemalloc

    if not tracemalloc.is_tracing():
        return
    snap = tracemalloc.take_snapshot()
    stats = snap.statistics("lineno")
    print("traced MB", round(sum(s.size for s in stats) / 2**20, 1), flush=True)
    by_file = snap.statistics("filename")
    for s in by_file[:25]:
        print(f"{s.size / 2**20:7.1f} MB {s.count:>9}  {s.traceback.format()[-1].strip()}")
    for s in stats[:30]:
        print(f"{s.size / 2**20:7.1f} MB {s.count:>9}  {s.traceback.format()[-1].strip()}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ids", type=int, default=10_000_000)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--block-ids", type=int, default=BLOCK_IDS,
                    help="new IDs per block, of which 2 interact")
    ap.add_argument("--trace", action="store_true", help="tracemalloc: top allocations at the end")
    ap.add_argument("--default-capacities", action="store_true",
                    help="the default config's capacities instead of CHURN_CONFIG's")
    args = ap.parse_args(argv)
    if args.trace:
        import tracemalloc

        tracemalloc.start(1)
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-churn-"))
    try:
        config = DEFAULT_CAPACITIES if args.default_capacities else CHURN_CONFIG
        figures = run(args.ids, args.points, config, workdir, args.block_ids, args.trace)
        figures["capacities"] = "default" if args.default_capacities else "CHURN_CONFIG"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"peak RSS {figures['peak_rss_mb']} MB, bound {figures['bound_mb']} MB = RSS before "
          f"the flow {figures['baseline_rss_mb']} MB + {figures['bound_above_baseline_mb']} MB "
          f"set by the capacities ({figures['ids']:,} IDs in {figures['seconds']} s)")
    for part, mb in figures["bound_parts_mb"].items():
        print(f"  {part:15s} {mb:8.1f} MB")
    print(orjson.dumps(figures).decode())


if __name__ == "__main__":
    main()
