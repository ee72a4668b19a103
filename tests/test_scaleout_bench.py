"""bench/scaleout.py: a tiny run through 1 and 2 real processes prints every figure, and
its cross-process output check fails on lost, extra or duplicated outputs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from bench_module import load_bench

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> Any:
    return load_bench("scaleout")


def _run(ids: list[str], recs: int, events_in: int = 100) -> dict[str, Any]:
    return {"summary": {"events_in": events_in}, "example_ids": ids,
            "recommendations": recs, "rec_ids": {f"r{i}" for i in range(recs)}}


def test_output_check_catches_lost_duplicated_and_different_outputs() -> None:
    check = _bench().check_same
    one = _run(["a", "b", "c"], 5)
    check(one, _run(["c", "a", "b"], 5), lines=100, requests=5)  # same outputs: passes
    for bad, why in ((_run(["a", "b", "c", "c"], 5), "written twice"),
                     (_run(["a", "b"], 5), "other examples"),
                     (_run(["a", "b", "c"], 4), "recommendations"),
                     (_run(["a", "b", "c"], 5, events_in=200), "events_in")):
        with pytest.raises(SystemExit, match=why):
            check(one, bad, lines=100, requests=5)


def test_cluster_costs_split_cpu_and_wall_outside_the_stages() -> None:
    def stats(start: float, first: float, last: float, end: float, cpu: float,
              stages: dict[str, float], main: float, received: list[float],
              sent: list[float], waited: float, main_wait: float,
              sched: tuple[list[float], list[float]] | None) -> dict[str, Any]:
        out = {"start": start, "first": first, "last": last, "end": end, "cpu_s": cpu,
               "stage_cpu_s": stages, "main_cpu_s": main, "received": received,
               "sent": sent, "listen_wait_s": waited, "main_wait_cpu_s": main_wait}
        if sched is not None:  # the scheduler's [on a CPU, waiting for one] at first / eof
            out.update(eof=last - 0.5, sched_first=sched[0], sched_eof=sched[1])
        return out

    run = {"cpu_s": 20.0, "wall_s": 12.5, "stats": [
        stats(100.0, 100.5, 110.0, 110.25, 10.0, {"user_shard": 8.0, "read": 0.5}, 0.75,
              [10, 4000, 0.125], [60, 12000, 0.5], 0.0, 0.25, ([1.0, 0.5], [7.0, 2.5])),
        stats(100.25, 101.0, 110.5, 110.75, 10.0, {"user_shard": 7.0, "ranker": 1.0}, 1.0,
              [30, 6000, 0.25], [20, 8000, 0.25], 0.5, 0.5, None)]}
    costs = _bench().cluster_costs(run, lines=1000)
    assert costs == {
        "outside_stages_cpu_s": 3.5, "main_thread_cpu_s": 1.75, "main_thread_wait_cpu_s": 0.75,
        "crossing_items": 40,
        "crossing_bytes": 10000, "crossing_bytes_per_event": 10.0, "unpickle_cpu_s": 0.375,
        "dumps": 80, "dumps_bytes": 20000, "dumps_cpu_s": 0.75,
        "startup_s": 1.0, "shutdown_s": 0.25, "cpu_s_per_process": [10.0, 10.0],
        "listen_wait_s": [0.0, 0.5], "busy_share_per_process": [0.8, 0.8], "finish_gap_s": 0.5,
        # p0's worker: 9 s from its first call (100.5) to its last on_eof (109.5): 6 on a
        # CPU, 2 waiting for one, 1 asleep; p1 has no scheduler figures
        "worker_span_s_per_process": [9.0, None], "worker_run_s_per_process": [6.0, None],
        "worker_runq_s_per_process": [2.0, None], "worker_idle_s_per_process": [1.0, None]}
    one = _bench().cluster_costs({"cpu_s": 10.0, "wall_s": 10.0, "stats": run["stats"][:1]},
                                 lines=1000)
    assert one["main_thread_cpu_s"] is None  # one process: the main thread is the worker


def test_thread_schedstat_counts_this_threads_cpu() -> None:
    bench = _bench()
    before = bench.thread_schedstat()
    if not before:
        pytest.skip("no /proc/thread-self/schedstat on this system")
    t0 = time.thread_time()
    while time.thread_time() - t0 < 0.05:
        pass
    after = bench.thread_schedstat()
    assert after[0] - before[0] >= 0.04 and after[1] >= before[1] >= 0.0


def test_a_process_waits_for_the_lower_processes_listeners_without_connecting() -> None:
    """A cluster process hands its flow to Bytewax once the lower-numbered processes
    listen (timely retries a refused connection only after a whole second); the wait
    reads the host's listening ports and never connects (timely's listener would take a
    probe for a peer and fail)."""
    import socket

    bench = _bench()
    if bench._listening_ports() is None:
        pytest.skip("no /proc/net/tcp on this system")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert port not in bench._listening_ports()
        assert bench.wait_for_listeners([f"127.0.0.1:{port}"], timeout_s=0.2) >= 0.2
        listener.listen()
        assert port in bench._listening_ports()
        assert bench.wait_for_listeners([f"127.0.0.1:{port}"], timeout_s=5.0) < 1.0
        listener.settimeout(0.05)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody connected
    assert bench.wait_for_listeners([]) < 0.1


@pytest.mark.slow
def test_tiny_scaleout_run_prints_every_figure(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scaleout.py"), "-n", "3000"],
                          cwd=ROOT, capture_output=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    figures = orjson.loads(proc.stdout.splitlines()[-1])
    for key in ("events_per_s_1proc", "events_per_s_2proc", "ratio", "events_per_cpu_s_1proc",
                "events_per_cpu_s_2proc", "busy_share_ranker_2proc", "busy_share_index_2proc",
                "busy_share_metrics_2proc", "ceiling_events_per_s_ranker", "load_1min_start",
                "outside_stages_cpu_s_1proc", "outside_stages_cpu_s_2proc",
                "main_thread_cpu_s_2proc", "crossing_bytes_per_event_2proc", "startup_s_2proc",
                "shutdown_s_2proc", "cpu_s_per_process_2proc", "dumps_cpu_s_2proc",
                "listen_wait_s_2proc"):
        assert key in figures
    # what crossed: item updates to the other process's item shards, examples, metrics
    assert figures["crossing_items_2proc"] > 0 and figures["crossing_bytes_2proc"] > 0
    assert len(figures["cpu_s_per_process_2proc"]) == 2
    assert figures["events"] == 3000
    # both processes worked: the shards are placed round robin (operators/placement.py;
    # Bytewax's hash of the plain names gave 3 + 5 user and 0 + 4 item shards)
    assert figures["user_keys_per_process_2proc"] == [4, 4]
    assert figures["item_keys_per_process_2proc"] == [2, 2]
