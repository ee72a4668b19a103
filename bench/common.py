"""Shared pieces of the benchmarks: a cached simulated log, the passthrough baseline and a
garbage-collection pause hook."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bytewax.operators as op  # noqa: E402
from bytewax.dataflow import Dataflow  # noqa: E402
from bytewax.testing import run_main  # noqa: E402

from events.simulator import SimConfig, write_log  # noqa: E402
from flows.evaluate import read_jsonl  # noqa: E402
from flows.recsys import build  # noqa: E402
from operators.sinks import NullSink  # noqa: E402
from operators.sources import ReplaySource  # noqa: E402
from state.hashing import stable_hash64  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "streamrec-bench"


def gc_pause_hook(record: Callable[[int, int, int], None],
                  clock: Callable[[], int] = time.perf_counter_ns
                  ) -> Callable[[str, dict[str, Any]], None]:
    """A ``gc.callbacks`` hook that calls ``record(generation, start, duration)`` at the
    end of every collection of this process, both in ``clock``'s ns (wall, epoch or
    thread CPU); the caller appends it to ``gc.callbacks`` and removes it."""
    started = [0]

    def hook(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = clock()
        else:
            record(info["generation"], started[0], clock() - started[0])
    return hook


def simulated_log(n: int, seed: int = 0, config: SimConfig | None = None) -> Path:
    """A simulated JSONL log of ``n`` events of the world ``config`` (the simulator's
    defaults when None), cached across runs in the temp dir."""
    tag = "" if config is None else "-" + format(
        stable_hash64(repr(sorted(asdict(config).items()))), "016x")
    path = CACHE / f"sim-{n}-{seed}{tag}.jsonl"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write_log(tmp, n, seed, config)
        tmp.rename(path)
    return path


def flow_process_args(entry: str, index: int, addresses: list[str]) -> list[str]:
    """``python -m bytewax.run ENTRY`` for process ``index`` of ``len(addresses)`` (the
    cluster's ``host:port`` list: ``-i/-a`` when more than one, none for one process)."""
    args = [sys.executable, "-m", "bytewax.run", entry]
    if len(addresses) > 1:
        args += ["-i", str(index), "-a", ";".join(addresses)]
    return args


def root_pythonpath() -> str:
    """``PYTHONPATH`` for the bench's child processes: the project root, then the caller's."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def passthrough_events_per_s(log: Path, batch_size: int = 1000) -> float:
    """Events/s of a trivial Bytewax flow: the same replay source, one item per event, a null sink."""
    flow = Dataflow("passthrough")
    batches = op.input("in", flow, ReplaySource(log, batch_size=batch_size))
    events = op.flat_map("events", batches, lambda batch: batch)
    sink = NullSink()
    op.output("out", events, sink)
    return timed_run(flow, lambda: sink.count[0])[0]


def timed_run(flow: Dataflow, count: Any) -> tuple[float, float]:
    """Run ``flow``; (``count()`` per wall second, per second of this process's CPU time)."""
    start, cpu = time.perf_counter(), time.process_time()
    run_main(flow)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return count() / elapsed, count() / cpu


def flow_events_per_s(log: Path, **overrides: object) -> tuple[float, dict]:
    """Events/s of the main flow replaying ``log`` (config ``overrides`` on top), one
    worker, outputs to a temp dir; returns (rate, the run's summary metrics record, with
    ``output_bytes``: the size of each output file, and ``events_per_cpu_s``: events per
    second of this process's CPU time, the figure that holds on a shared machine)."""
    out = Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    try:
        flow = build({"inputs": [{"kind": "replay", "path": str(log)}],
                      "output": {"dir": str(out)}, **overrides})
        start, cpu = time.perf_counter(), time.process_time()
        run_main(flow)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        summary = [m for m in read_jsonl(out / "metrics.jsonl") if m["kind"] == "summary"][-1]
        summary["output_bytes"] = {p.stem: p.stat().st_size for p in out.glob("*.jsonl")}
        summary["events_per_cpu_s"] = summary["events_in"] / cpu
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return summary["events_in"] / elapsed, summary
