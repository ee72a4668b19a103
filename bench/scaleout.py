"""Scale-out: the zero-config workload through 1 process and through 2 processes, one run.

The log is ``bench/throughput.py``'s: the zero-config simulator world (``InputConfig``'s
defaults, the settings of ``python -m bytewax.run flows.recsys:flow``), replayed as fast
as possible with the zero-config flow (ranker, item side, serving ``scorer = auto``,
JSONL outputs). Each run is real operating-system processes started exactly as an
operator would: ``python -m bytewax.run "bench/scaleout.py:timed_flow(...)"`` (``-i N
-a ADDRS`` for 2 processes), where ``timed_flow`` is ``flows.recsys.build`` plus a CPU
timer around every stateful stage (each Bytewax worker is one thread, so a stage's
thread CPU time is its busy time on that worker).

Figures (the last line is JSON):

* ``events_per_s_1proc``, ``events_per_s_2proc``, ``ratio``: log events per wall
  second from the first process's flow build (after Python's imports) to the last
  process's exit (cluster connection and shutdown included); ``total_s_*`` also counts
  the interpreters' start-up.
* ``events_per_cpu_s_*``: the same per second of CPU time of all processes (on a shared
  machine the wall figures follow the load).
* ``busy_share_*_2proc``: for each stage, its CPU time over the wall time of the
  process that ran it, in the 2-process run; a single-key stage (``ranker``,
  ``pool_trainer`` (the central pool ranker), ``index``, ``metrics``) runs on one worker
  (the last: ``operators.placement.last_key``), so a share near 1 means that stage caps
  the flow. The per-process lines also show the stateless plumbing: ``read`` (the log),
  ``parse``, ``route`` (to the user shards), ``write`` (JSONL).
  ``cpu_share_*_2proc``: the same over that process's CPU time (holds under load).
* ``ceiling_events_per_s_*``: log events per CPU second of one key of the stage in the
  1-process run (the stage's CPU over its number of keys): the flow's rate at which that
  key would fill a core of its own (how far one key goes).
* ``gc_s_*``: wall time in Python's garbage collector, summed over processes;
  ``user_keys_per_process_2proc``/``item_keys_per_process_2proc``: how Bytewax spread
  the 8 user shards and 4 item shards over the processes.
* ``outside_stages_cpu_s_*``: CPU outside the timed stages and plumbing (Bytewax's
  runtime, pickling, the untimed steps, other threads); ``main_thread_cpu_s_2proc``:
  the processes' main threads (in a cluster process Bytewax's main thread builds the
  flow, then waits for the worker thread, taking the GIL every millisecond to check
  for signals, unless parked: ``flows.runtime``); ``main_thread_wait_cpu_s_2proc``: their CPU after the flow's build
  (imports and build left out: the wait alone); ``crossing_items_2proc``,
  ``crossing_bytes_2proc``, ``crossing_bytes_per_event_2proc``,
  ``unpickle_cpu_s_2proc``: the items Bytewax pickled in one process and unpickled in
  the other; ``dumps_2proc``,
  ``dumps_bytes_2proc``, ``dumps_cpu_s_2proc``: the pickles made for them (Bytewax
  pickles a crossing item twice; ``operators.crossing.PickledOnce`` items once);
  ``startup_s_*`` (first build ->
  the last process's first stage call) and ``shutdown_s_*`` (last stage call -> last
  exit): the parts of the wall figure with no stage work; ``cpu_s_per_process_2proc``;
  ``listen_wait_s_2proc``: per process, the wall seconds it waited after its build for
  the lower-numbered processes to listen (``wait_for_listeners``: without it the higher
  process often connected first, and timely retries a refused connection after a whole
  second, ~1 s of a 60,000-event run's ~20).
* ``busy_share_per_process_2proc``: each process's CPU time over the 2-process wall
  time; ``finish_gap_s_2proc``: the wall seconds between the processes' last stage
  calls (the one done first then idles); ``worker_{span,run,runq,idle}_s_per_process_*``:
  each worker thread's wall seconds from its first stage call to its last ``on_eof``
  split by the scheduler (``/proc/thread-self/schedstat``) into on a CPU, waiting for a
  CPU (the machine's load) and asleep (parked: waiting for the other process or for
  input; what holds under load).
* ``load_1min_start``/``load_1min_end``: the machine's load average around the runs.

Correctness across processes is checked in the same run: the replay source has one
partition per user shard (``operators/replay_shards.py``: each process reads the log
and parses only its own shards' users, plus the item events every shard needs), every
output file is written by one process (the one owning its partition), and the
2-process run must give the 1-process run's example ids (none twice), as many
recommendations as the log has requests, and ``events_in`` equal to the log's lines;
the bench stops with an error otherwise.

Usage: ``python bench/scaleout.py [-n EVENTS] [--processes 2] [--shards USERS,ITEMS]``
(default 200,000 events, the zero-config 8 user and 4 item shards).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from common import (  # noqa: E402
    ROOT,
    count_lines,
    flow_process_args,
    gc_pause_hook,
    root_pythonpath,
    simulated_log,
)

STAGES = ("user_shard", "item_shard", "ranker", "pool_trainer", "index", "metrics")
SINGLE_KEY = ("ranker", "pool_trainer", "index", "metrics")
SHARDED = ("user_shard", "item_shard")
PLUMBING = ("read", "parse", "route", "write")
"""Stateless work timed too: reading the log (source partitions), parsing, routing to
the user shards, writing the JSONL outputs."""


def _stage_classes() -> dict[str, type]:
    from operators.index_builder import IndexBuilderLogic
    from operators.item_shard import ItemShardLogic
    from operators.metrics import MetricsLogic
    from operators.trainer import TrainerLogic
    from operators.user_shard import UserShardLogic

    return {"user_shard": UserShardLogic, "item_shard": ItemShardLogic, "ranker": TrainerLogic,
            "index": IndexBuilderLogic, "metrics": MetricsLogic}


def _stage_of(stage: str, logic: Any) -> str:
    """The timed stage of a stateful logic: ``TrainerLogic`` runs the ranker trainer and
    the central pool trainer."""
    if stage == "ranker" and type(getattr(logic, "trainer", None)).__name__ == "PoolTrainer":
        return "pool_trainer"
    return stage


def _timed(f: Any, stage: str, cpu_ns: dict[str, int], lock: threading.Lock) -> Any:
    """``f`` adding its thread CPU time to ``cpu_ns[stage]``."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time_ns()
        try:
            return f(*args, **kwargs)
        finally:
            spent = time.thread_time_ns() - t0
            with lock:
                cpu_ns[stage] += spent

    return timed


def thread_schedstat() -> list[float]:
    """The calling thread's scheduler times (Linux ``/proc/thread-self/schedstat``):
    [seconds on a CPU, seconds runnable but waiting for one]; [] where it cannot be read."""
    try:
        with open("/proc/thread-self/schedstat") as fh:
            run_ns, wait_ns = fh.read().split()[:2]
    except (OSError, ValueError):
        return []
    return [int(run_ns) / 1e9, int(wait_ns) / 1e9]


def worker_idle(stats: dict[str, Any]) -> dict[str, float] | None:
    """The worker thread's wall seconds from its first stage call to its last ``on_eof``
    split into on a CPU (``run_s``), waiting for a CPU (``runq_s``: the machine's load)
    and asleep (``idle_s``: parked, waiting for input from the other process); None
    without the scheduler's figures."""
    first, last = stats.get("sched_first"), stats.get("sched_eof")
    if not first or not last or "eof" not in stats:
        return None
    span = stats["eof"] - stats["first"]
    run, runq = last[0] - first[0], last[1] - first[1]
    return {"span_s": span, "run_s": run, "runq_s": runq, "idle_s": span - run - runq}


def _install_timers(cpu_ns: dict[str, int], keys: dict[str, set[str]],
                    marks: dict[str, Any] | None = None) -> None:
    """Wrap the stateful stages' callbacks to add their thread CPU time to ``cpu_ns`` and
    the shard keys they saw (user and item shards) to ``keys``; also time the stateless
    plumbing (``PLUMBING``). ``marks`` gets ``first``/``last`` (epoch s: the start of
    the first and the end of the last stateful call), ``worker_cpu_s`` (the CPU time
    of the thread that ran them, as of that last call), ``eof`` (the end of the last
    ``on_eof`` call) and ``sched_first``/``sched_eof`` (``thread_schedstat`` at the first
    call and at that last ``on_eof``)."""
    marks = {} if marks is None else marks
    import flows.recsys
    from events.model import EventParser
    from operators import replay_shards, sinks, sources

    lock = threading.Lock()
    for stage, cls in _stage_classes().items():
        for name in ("on_item", "on_notify", "on_eof"):
            original = cls.__dict__.get(name)
            if original is None:
                continue

            def timed(self: Any, *args: Any, _f: Any = original, _s: str = stage,
                      _eof: bool = name == "on_eof") -> Any:
                if _s in SHARDED and args and isinstance(args[0], tuple):
                    keys[_s].add(args[0][0])  # (shard key, ...) items
                t0 = time.thread_time_ns()
                if "first" not in marks:
                    marks["first"] = time.time()
                    marks["sched_first"] = thread_schedstat()
                try:
                    return _f(self, *args)
                finally:
                    t1 = time.thread_time_ns()
                    with lock:
                        cpu_ns[_stage_of(_s, self)] += t1 - t0
                        marks["last"] = time.time()
                        marks["worker_cpu_s"] = t1 / 1e9
                        if _eof:
                            marks["eof"] = marks["last"]
                            marks["sched_eof"] = thread_schedstat()

            setattr(cls, name, timed)
    for cls in (c for c in vars(sources).values()
                if isinstance(c, type) and c.__name__.endswith("Partition") and "next_batch" in vars(c)
                and c.__name__ != "_GatedPartition"):
        cls.next_batch = _timed(cls.next_batch, "read", cpu_ns, lock)
    EventParser.parse_batch = _timed(EventParser.parse_batch, "parse", cpu_ns, lock)
    flows.recsys.parse_shard_batch = _timed(flows.recsys.parse_shard_batch, "parse", cpu_ns, lock)
    replay_shards.split_window = _timed(replay_shards.split_window, "read", cpu_ns, lock)
    # a process that runs every shard parses in its reader (parse_window), not in the step
    replay_shards.parse_window = _timed(replay_shards.parse_window, "parse", cpu_ns, lock)
    flows.recsys.route_events = _timed(flows.recsys.route_events, "route", cpu_ns, lock)
    sinks._JsonlPartition.write_batch = _timed(sinks._JsonlPartition.write_batch, "write",
                                                cpu_ns, lock)


def _install_unpickle_counter(received: list[float]) -> None:
    """Count what this process unpickles into ``received``: [items, bytes, thread CPU s].
    Bytewax pickles every item that a step routes to a worker of another process and
    unpickles it there (nothing else in the flow unpickles while it runs, recovery being
    off): the items and bytes that crossed into this process."""
    import pickle

    loads = pickle.loads

    def counted(data: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time_ns()
        try:
            return loads(data, *args, **kwargs)
        finally:
            received[0] += 1
            received[1] += len(data)
            received[2] += (time.thread_time_ns() - t0) / 1e9

    pickle.loads = counted


def _install_dumps_counter(sent: list[float]) -> None:
    """Count what this process pickles into ``sent``: [dumps calls, bytes, thread CPU s].
    Bytewax pickles an item that crosses to another process twice (timely sizes the
    message, then writes it); a ``PickledOnce`` item reuses its first pickle the second
    time (``operators.crossing``)."""
    import pickle

    dumps = pickle.dumps

    def counted(obj: Any, *args: Any, **kwargs: Any) -> bytes:
        t0 = time.thread_time_ns()
        data = dumps(obj, *args, **kwargs)
        sent[0] += 1
        sent[1] += len(data)
        sent[2] += (time.thread_time_ns() - t0) / 1e9
        return data

    pickle.dumps = counted


def _install_gc_timer(gc_ns: list[int]) -> None:
    """Add the wall time of every garbage collection of this process to ``gc_ns[0]``."""

    def add(generation: int, start: int, dur: int) -> None:
        gc_ns[0] += dur

    gc.callbacks.append(gc_pause_hook(add))


def _listening_ports() -> set[int] | None:
    """The TCP ports with a socket in LISTEN state on this host (Linux ``/proc/net/tcp``
    and ``tcp6``); None where those files cannot be read."""
    ports: set[int] = set()
    read = False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as fh:
                lines = fh.readlines()[1:]
        except OSError:
            continue
        read = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports if read else None


def wait_for_listeners(addresses: list[str], timeout_s: float = 60.0) -> float:
    """Wait until every ``host:port`` of ``addresses`` (processes of this host) listens;
    returns the seconds waited. A cluster process connects to the lower-numbered ones
    when Bytewax starts it, and timely sleeps a whole second before it retries a refused
    connection: waiting here, after the flow's build, for the lower processes' listeners
    (which they open right after their own build) takes their start-up's difference
    instead of that second. Never connects (timely would take a probe for a peer)."""
    t0 = time.perf_counter()
    wanted = {int(a.rsplit(":", 1)[1]) for a in addresses}
    while wanted and time.perf_counter() - t0 < timeout_s:
        listening = _listening_ports()
        if listening is None or wanted <= listening:
            break
        time.sleep(0.005)
    return time.perf_counter() - t0


def timed_flow(config: dict[str, Any], stats_path: str, lower: list[str] | None = None) -> Any:
    """The main flow of ``config`` with stage CPU timers; at exit this process writes
    ``{"start", "end" (epoch s), "wall_s", "cpu_s", "gc_s", "stage_cpu_s": {stage: s},
    "keys": {stage: [key, ...]}, "first", "last" (epoch s of the first and last stage
    call), "main_cpu_s" (the main thread's CPU: in a cluster process it builds the
    flow, then only waits for the worker thread), "worker_cpu_s", "received": [items,
    bytes, unpickle CPU s] from other processes, "sent": [dumps calls, bytes, CPU s],
    "listen_wait_s", "main_wait_cpu_s" (the main thread's CPU after the build: waiting
    for the worker)}`` (from the flow's
    build, after Python's imports, to exit) to ``stats_path`` (the entry point of the
    worker processes: ``python -m bytewax.run "bench/scaleout.py:timed_flow(...)"``).
    ``lower``: the addresses of the cluster's lower-numbered processes, whose listeners
    this one waits for after its build (``wait_for_listeners``)."""
    from flows.recsys import build

    cpu_ns: dict[str, int] = defaultdict(int)
    keys: dict[str, set[str]] = defaultdict(set)
    gc_ns = [0]
    marks: dict[str, Any] = {}
    received = [0, 0, 0.0]
    sent = [0, 0, 0.0]
    _install_timers(cpu_ns, keys, marks)
    _install_gc_timer(gc_ns)
    _install_unpickle_counter(received)
    _install_dumps_counter(sent)
    start, wall0, cpu0 = time.time(), time.perf_counter(), time.process_time()
    main0 = time.thread_time()  # bytewax.run builds the flow on the main thread
    waited = 0.0
    built = [main0]  # the main thread's CPU time once the flow is built

    def dump() -> None:
        Path(stats_path).write_bytes(orjson.dumps({
            "start": start, "end": time.time(),
            "wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
            "gc_s": gc_ns[0] / 1e9,
            "stage_cpu_s": {s: ns / 1e9 for s, ns in cpu_ns.items()},
            "keys": {s: sorted(k) for s, k in keys.items()},
            "first": marks.get("first", start), "last": marks.get("last", start),
            "main_cpu_s": time.thread_time() - main0,  # atexit runs on the main thread
            "main_wait_cpu_s": time.thread_time() - built[0],
            "worker_cpu_s": marks.get("worker_cpu_s", 0.0), "received": received,
            **{k: marks[k] for k in ("eof", "sched_first", "sched_eof") if k in marks},
            "sent": sent,
            "listen_wait_s": waited}))

    atexit.register(dump)
    flow = build(config)
    waited = wait_for_listeners(lower or [])
    built[0] = time.thread_time()
    return flow


def _free_port() -> int:
    from flows.broker import free_port

    return free_port()


def run_cluster(log: Path, out: Path, processes: int, timeout_s: float,
                shards: dict[str, int] | None = None) -> dict[str, Any]:
    """Run the flow over ``log`` in ``processes`` processes (``shards``: ``shards.users``
    / ``shards.items`` overrides); returns wall seconds, CPU seconds summed over
    processes, per-process stats and the outputs' facts."""
    out.mkdir(parents=True)
    config: dict[str, Any] = {"inputs": [{"kind": "replay", "path": str(log)}],
                              "output": {"dir": str(out)}}
    if shards:
        config["shards"] = shards
    addresses = [f"127.0.0.1:{_free_port()}" for _ in range(processes)]
    env = {**os.environ, "PYTHONPATH": root_pythonpath()}
    procs = []
    start = time.perf_counter()
    for i in range(processes):
        args = flow_process_args(
            f"{BENCH / 'scaleout.py'}:timed_flow({config!r}, {str(out / f'stats-{i}.json')!r}, "
            f"{addresses[:i]!r})", i, addresses)
        with (out / f"process-{i}.log").open("wb") as fh:
            procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                          stdout=fh, stderr=subprocess.STDOUT))
    try:
        for i, proc in enumerate(procs):
            code = proc.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - start)))
            if code != 0:
                tail = (out / f"process-{i}.log").read_bytes()[-4000:].decode(errors="replace")
                raise SystemExit(f"process {i} of {processes} exited with {code}:\n{tail}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    total = time.perf_counter() - start
    stats = [orjson.loads((out / f"stats-{i}.json").read_bytes()) for i in range(processes)]
    wall = max(s["end"] for s in stats) - min(s["start"] for s in stats)
    return {"wall_s": wall, "total_s": total, "cpu_s": sum(s["cpu_s"] for s in stats),
            "stats": stats, **_outputs(out)}


def _outputs(out: Path) -> dict[str, Any]:
    """Facts of a run's outputs: the summary record, example ids, recommendation count."""
    from flows.evaluate import read_jsonl
    from operators.example_codec import unpack_example

    [summary] = [m for m in read_jsonl(out / "metrics.jsonl") if m["kind"] == "summary"]
    example_ids = [unpack_example(e)["example_id"] for e in read_jsonl(out / "examples.jsonl")]
    recs = read_jsonl(out / "recommendations.jsonl")
    return {"summary": summary, "example_ids": example_ids,
            "recommendations": len(recs), "rec_ids": {r["request_id"] for r in recs}}


def check_same(one: dict[str, Any], two: dict[str, Any], lines: int, requests: int) -> None:
    """Stop unless both runs read every event once and wrote every output once."""
    for name, run in (("1 process", one), ("2 processes", two)):
        problems = []
        if run["summary"]["events_in"] != lines:
            problems.append(f"events_in {run['summary']['events_in']} != {lines} log lines")
        if len(set(run["example_ids"])) != len(run["example_ids"]):
            problems.append("an example written twice")
        if run["recommendations"] != requests or len(run["rec_ids"]) != requests:
            problems.append(f"{run['recommendations']} recommendations "
                            f"({len(run['rec_ids'])} distinct) for {requests} requests")
        if problems:
            raise SystemExit(f"{name}: " + "; ".join(problems))
    if sorted(one["example_ids"]) != sorted(two["example_ids"]):
        raise SystemExit("the 2-process run wrote other examples than the 1-process run")


def cluster_costs(run: dict[str, Any], lines: int) -> dict[str, Any]:
    """What a run spent besides its stages: CPU outside the timed stages and plumbing
    (Bytewax's runtime, pickling, untimed steps, other threads), the main threads' CPU
    (in a cluster process Bytewax's main thread only waits for the worker thread, taking
    the GIL every millisecond to check for signals; in one process it is the worker),
    the items and bytes unpickled from other processes, and the wall seconds from the
    first process's build to the first stage call of the last process to start
    (``startup_s``: connecting the cluster, opening the inputs) and from the last stage
    call to the last exit (``shutdown_s``: end of input, flushes, exit); per process, its
    CPU over the run's wall time (``busy_share_per_process``), the wall seconds between
    the first and the last process's last stage call (``finish_gap_s``: the imbalance)
    and its worker thread's ``worker_idle`` split (``worker_idle_s_per_process``: asleep,
    waiting for the other process or for input; ``worker_runq_s_per_process``: waiting
    for a CPU, the load)."""
    stats = run["stats"]
    idle = [worker_idle(s) for s in stats]
    staged = sum(sum(s["stage_cpu_s"].values()) for s in stats)
    received = [sum(s["received"][i] for s in stats) for i in range(3)]
    return {
        "outside_stages_cpu_s": round(run["cpu_s"] - staged, 2),
        "main_thread_cpu_s": round(sum(s["main_cpu_s"] for s in stats), 2)
        if len(stats) > 1 else None,
        "main_thread_wait_cpu_s": round(sum(s.get("main_wait_cpu_s", 0.0) for s in stats), 2)
        if len(stats) > 1 else None,
        "crossing_items": int(received[0]),
        "crossing_bytes": int(received[1]),
        "crossing_bytes_per_event": round(received[1] / lines, 1),
        "unpickle_cpu_s": round(received[2], 3),
        "dumps": int(sum(s.get("sent", (0,))[0] for s in stats)),
        "dumps_bytes": int(sum(s.get("sent", (0, 0))[1] for s in stats)),
        "dumps_cpu_s": round(sum(s.get("sent", (0, 0, 0.0))[2] for s in stats), 3),
        "startup_s": round(max(s["first"] for s in stats) - min(s["start"] for s in stats), 2),
        "shutdown_s": round(max(s["end"] for s in stats) - max(s["last"] for s in stats), 2),
        "cpu_s_per_process": [round(s["cpu_s"], 2) for s in stats],
        "listen_wait_s": [round(s.get("listen_wait_s", 0.0), 2) for s in stats],
        "busy_share_per_process": [round(s["cpu_s"] / run["wall_s"], 3) for s in stats],
        "finish_gap_s": round(max(s["last"] for s in stats) - min(s["last"] for s in stats), 2),
        **{f"worker_{k}_per_process": [round(w[k], 2) if w else None for w in idle]
           for k in ("span_s", "run_s", "runq_s", "idle_s")},
    }


def _default_shards() -> dict[str, int]:
    from flows.config import load_config

    config = load_config(None)
    return {"users": config.shards.users, "items": config.shards.items}


def _requests(log: Path) -> int:
    with log.open("rb") as fh:
        return sum(1 for line in fh if b'"type":"request"' in line)


def main() -> None:
    from throughput import zero_config_world

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    world, seed, default_n = zero_config_world()
    parser.add_argument("-n", type=int, default=default_n)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--shards", default="",
                        help="USERS,ITEMS: shards.users and shards.items for both runs "
                             "(default: the zero-config 8,4)")
    args = parser.parse_args()
    shards = None
    if args.shards:
        users, items = (int(x) for x in args.shards.split(","))
        shards = {"users": users, "items": items}
    log = simulated_log(args.n, seed, world)
    lines, requests = count_lines(log), _requests(log)
    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="streamrec-scaleout-"))
    try:
        one = run_cluster(log, tmp / "one", 1, args.timeout_s, shards)
        many = run_cluster(log, tmp / "many", args.processes, args.timeout_s, shards)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_end = os.getloadavg()[0]
    check_same(one, many, lines, requests)

    rate1, rate2 = lines / one["wall_s"], lines / many["wall_s"]
    cpu1, cpu2 = lines / one["cpu_s"], lines / many["cpu_s"]
    stage1 = one["stats"][0]["stage_cpu_s"]
    n_keys = {s: max(len(one["stats"][0]["keys"].get(s, ())), 1) for s in STAGES}
    ceilings = {s: lines / (stage1[s] / n_keys[s]) for s in STAGES if stage1.get(s)}
    shares: dict[str, float] = {}  # of the wall time of the process running the stage
    cpu_shares: dict[str, float] = {}  # of that process's CPU time
    for st in many["stats"]:
        for stage, cpu in st["stage_cpu_s"].items():
            if cpu > 0:
                shares[stage] = max(shares.get(stage, 0.0), cpu / st["wall_s"])
                cpu_shares[stage] = max(cpu_shares.get(stage, 0.0), cpu / st["cpu_s"])
    print(f"log: {lines:,} events ({requests:,} requests) of the zero-config world; "
          f"load average {load_start:.2f} -> {load_end:.2f} on {os.cpu_count()} CPUs")
    print(f"outputs: {len(one['example_ids']):,} examples, {one['recommendations']:,} "
          f"recommendations, identical example ids in both runs, none twice")
    for label, run, rate, cpu in (("1 process", one, rate1, cpu1),
                                  (f"{args.processes} processes", many, rate2, cpu2)):
        per = "; ".join(
            f"p{i} {s['cpu_s']:.1f} CPU-s in {s['wall_s']:.1f} s (gc {s['gc_s']:.1f} s): "
            + ", ".join(f"{k} {v:.1f}" + (f" [{len(s['keys'][k])} keys]" if s["keys"].get(k) else "")
                        for k, v in s["stage_cpu_s"].items() if v >= 0.05)
            for i, s in enumerate(run["stats"]))
        print(f"{label:>12}: {rate:8,.0f} events/s ({run['wall_s']:.1f} s, "
              f"{run['total_s']:.1f} s with start-up), {cpu:8,.0f} per CPU-s ({per})")
    print(f"ratio {rate2 / rate1:.2f}x wall, {cpu2 / cpu1:.2f}x per CPU-s")
    costs1, costs2 = cluster_costs(one, lines), cluster_costs(many, lines)
    print(f"CPU outside the timed stages: 1 process {costs1['outside_stages_cpu_s']:.1f} s, "
          f"{args.processes} processes {costs2['outside_stages_cpu_s']:.1f} s (of which their "
          f"main threads, waiting for the workers, {costs2['main_thread_cpu_s']:.1f} s, "
          f"{costs2['main_thread_wait_cpu_s']:.2f} s after the build; "
          f"unpickling {costs2['unpickle_cpu_s']:.2f} s of {costs2['crossing_items']:,} items, "
          f"{costs2['crossing_bytes'] / 1e6:.1f} MB, that crossed between processes: "
          f"{costs2['crossing_bytes'] / lines:.0f} bytes and "
          f"{1000 * costs2['crossing_items'] / lines:.1f} items per 1,000 events); "
          f"wall time before the first stage call {costs1['startup_s']:.2f} / "
          f"{costs2['startup_s']:.2f} s, after the last {costs1['shutdown_s']:.2f} / "
          f"{costs2['shutdown_s']:.2f} s")
    print(f"per process ({args.processes} processes): busy "
          f"{', '.join(f'{b:.0%}' for b in costs2['busy_share_per_process'])} of the wall time; "
          f"worker asleep {costs2['worker_idle_s_per_process']} s, waiting for a CPU "
          f"{costs2['worker_runq_s_per_process']} s, on a CPU "
          f"{costs2['worker_run_s_per_process']} s "
          f"of {costs2['worker_span_s_per_process']} s from its first stage call to its last "
          f"end of input; last stage calls {costs2['finish_gap_s']:.2f} s apart "
          f"(1 process: worker asleep {costs1['worker_idle_s_per_process']} s)")
    print("stage CPU (1 process) and the flow's rate at which one key of it fills a core:")
    for stage in STAGES:
        if stage in ceilings:
            print(f"  {stage:>10}: {stage1[stage]:7.1f} CPU-s "
                  f"({stage1[stage] / one['cpu_s']:.1%} of the flow, {n_keys[stage]} keys), "
                  f"{ceilings[stage]:10,.0f} events/s per key; in the {args.processes}-process "
                  f"run busy {shares.get(stage, 0):.1%} of its process's wall time, "
                  f"{cpu_shares.get(stage, 0):.1%} of its CPU")
    print(orjson.dumps({
        "events": lines,
        "processes": args.processes,
        "events_per_s_1proc": round(rate1, 1),
        "events_per_s_2proc": round(rate2, 1),
        "ratio": round(rate2 / rate1, 3),
        "events_per_cpu_s_1proc": round(cpu1, 1),
        "events_per_cpu_s_2proc": round(cpu2, 1),
        "ratio_cpu": round(cpu2 / cpu1, 3),
        "total_s_1proc": round(one["total_s"], 2),
        "total_s_2proc": round(many["total_s"], 2),
        **{f"busy_share_{s}_2proc": round(shares.get(s, 0.0), 4) for s in STAGES},
        **{f"cpu_share_{s}_2proc": round(cpu_shares.get(s, 0.0), 4) for s in STAGES},
        **{f"ceiling_events_per_s_{s}": round(ceilings[s], 1) for s in STAGES if s in ceilings},
        "gc_s_1proc": round(sum(st["gc_s"] for st in one["stats"]), 2),
        "gc_s_2proc": round(sum(st["gc_s"] for st in many["stats"]), 2),
        **{f"{k}_1proc": v for k, v in costs1.items() if k in ("outside_stages_cpu_s",
                                                                "startup_s", "shutdown_s",
                                                                "worker_idle_s_per_process")},
        **{f"{k}_2proc": v for k, v in costs2.items()},
        "user_keys_per_process_2proc": [len(st["keys"].get("user_shard", ())) for st in many["stats"]],
        "item_keys_per_process_2proc": [len(st["keys"].get("item_shard", ())) for st in many["stats"]],
        "shards": shards or _default_shards(),
        "load_1min_start": round(load_start, 2),
        "load_1min_end": round(load_end, 2),
        "cpus": os.cpu_count(),
    }).decode())


if __name__ == "__main__":
    main()
