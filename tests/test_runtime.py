"""The flow process's runtime (flows/runtime.py): GC thresholds and the GIL switch
interval from config, and one GC freeze once a Kafka input partition has read its
backlog (real broker)."""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from bytewax.testing import run_main

from flows.config import ConfigError, load_config
from flows.recsys import build
from flows.runtime import GC_THRESHOLD
from operators.kafka_io import KafkaSource, part_key

T0 = 1_767_225_600_000


@pytest.fixture
def gc_state() -> Iterator[None]:
    """Restore this test process's thresholds and switch interval, and unfreeze what a
    test froze."""
    thresholds, switch = gc.get_threshold(), sys.getswitchinterval()
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(switch)


def test_config_reaches_the_process(tmp_path: Path, gc_state: None) -> None:
    build({"inputs": [{"kind": "simulator", "events": 10}], "output": {"dir": str(tmp_path)},
           "runtime": {"gc_threshold": [1234, 5, 6], "switch_interval_ms": 2.5}})
    assert gc.get_threshold() == (1234, 5, 6)
    assert sys.getswitchinterval() == pytest.approx(0.0025)
    build({"inputs": [{"kind": "simulator", "events": 10}], "output": {"dir": str(tmp_path)}})
    assert gc.get_threshold() == GC_THRESHOLD
    assert sys.getswitchinterval() == pytest.approx(0.001)


@pytest.mark.parametrize("bad", [{"gc_threshold": [1, 2]}, {"gc_threshold": [700, -1, 10]},
                                 {"gc_threshold": [1, 2, 3, 4]}, {"switch_interval_ms": 0}])
def test_runtime_keys_are_validated(bad: dict[str, Any]) -> None:
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=rf"runtime.*{key}"):
        load_config({"runtime": bad})


def _drain(part: Any, n: int, calls: list[str]) -> list[int]:
    """Poll until ``n`` values are read and then once more; the number of callback calls
    seen after each poll."""
    import time

    read, seen = 0, []
    deadline = time.monotonic() + 20
    while True:
        assert time.monotonic() < deadline, f"read {read} of {n}"
        for batch in part.next_batch():
            read += len(batch)
        seen.append(len(calls))
        if read >= n and len(calls) and len(seen) > 3:
            return seen
        time.sleep(0.01)


@pytest.mark.kafka
def test_source_reports_caught_up_once_at_the_end_of_its_log(
        kafka_broker: Any, kafka_topic: Any, kafka_produce: Any) -> None:
    bs = kafka_broker.bootstrap
    topic = kafka_topic(1, "caughtup")
    kafka_produce(bs, topic, [b"v%d" % i for i in range(300)], partition=0)
    calls: list[str] = []
    part = KafkaSource(bs, [topic], batch_size=50, on_caught_up=calls.append).build_part(
        "in", part_key(topic, 0), None)
    try:
        seen = _drain(part, 300, calls)
        # not while the backlog (6 batches of 50) is read, then exactly once
        assert calls == [part_key(topic, 0)]
        assert part.snapshot() == 300
        kafka_produce(bs, topic, [b"more"], partition=0)
        _drain(part, 1, calls)
        assert calls == [part_key(topic, 0)]
    finally:
        part.close()
    assert seen[0] == 0


def _events() -> list[bytes]:
    out = []
    for n in range(60):
        out.append(orjson.dumps({"type": "impression", "ts": T0 + n, "impression_id": f"imp{n}",
                                 "user_id": f"u{n % 7}", "item_id": f"i{n % 5}"}))
    out.append(orjson.dumps({"type": "request", "ts": T0 + 100, "request_id": "r1",
                             "user_id": "u1"}))
    return out


@pytest.mark.kafka
@pytest.mark.parametrize("freeze", [True, False])
def test_flow_freezes_its_heap_once_its_kafka_input_caught_up(
        kafka_broker: Any, kafka_produce: Any, gc_state: None, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, freeze: bool) -> None:
    from flows.broker import create_topics

    app = f"gcfreeze{int(freeze)}"
    create_topics(kafka_broker.bootstrap, [f"{app}.events"], 1)
    kafka_produce(kafka_broker.bootstrap, f"{app}.events", _events(), partition=0)
    flow = build({
        "app": app, "kafka": {"bootstrap": kafka_broker.bootstrap},
        "inputs": [{"kind": "kafka", "topics": ["events"], "tail": False, "batch_size": 16}],
        "output": {"dir": str(tmp_path)}, "runtime": {"gc_freeze_when_caught_up": freeze},
    })
    assert gc.get_freeze_count() == 0
    with caplog.at_level(logging.INFO, logger="flows.runtime"):
        run_main(flow)
    frozen = [r for r in caplog.records if r.getMessage().startswith("gc: froze")]
    if freeze:
        assert gc.get_freeze_count() > 1000  # the flow's state, the modules, ...
        assert len(frozen) == 1 and f"{app}.events#0 read to the end" in frozen[0].getMessage()
    else:
        assert gc.get_freeze_count() == 0 and not frozen
    answers = (tmp_path / "recommendations.jsonl").read_text().splitlines()
    assert [orjson.loads(a)["request_id"] for a in answers] == ["r1"]


_PARKED_FLOW = '''
import time
from pathlib import Path

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource
from bytewax.connectors.stdio import StdOutSink

from flows import runtime

PARK = {park}
if PARK:
    runtime.park_main_thread()


def _main_switches() -> int:
    """Voluntary context switches of this process's main thread (its id is the pid)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def work(state, n):
    runtime.note_worker()
    if state is None:
        time.sleep(0.05)  # the main thread parks (or not) while the workers run
        state = _main_switches()
    time.sleep(1.0)
    Path({out!r}).with_suffix(f".{{n}}").write_text(str(_main_switches() - state))
    return state, n


flow = Dataflow("parked")
keyed = op.key_on("key", op.input("in", flow, TestingSource(["a", "b"])), lambda k: k)
op.output("out", op.stateful_map("work", keyed, work), StdOutSink())
'''


@pytest.mark.parametrize("park", [True, False])
def test_a_cluster_process_main_thread_parks_while_its_workers_run(
        tmp_path: Path, park: bool) -> None:
    """``python -m bytewax.run -w 2``: Bytewax's main thread wakes every 1 ms (up to 1,000
    voluntary switches in 1 s, fewer on a loaded machine); parked, only if a worker ends or every
    ``PARK_CHECK_S`` (1 s). The flow still ends (the main thread sees its workers end)."""
    import subprocess

    (tmp_path / "parked_flow.py").write_text(
        _PARKED_FLOW.format(park=park, out=str(tmp_path / "switches")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    subprocess.run([sys.executable, "-m", "bytewax.run", "parked_flow:flow", "-w", "2"],
                   cwd=tmp_path, env=env, check=True, timeout=60, capture_output=True)
    switches = [int(p.read_text()) for p in tmp_path.glob("switches.*")]
    assert len(switches) == 2
    if park:
        assert max(switches) < 20, switches
    else:
        assert min(switches) > 60, switches


def test_the_main_thread_parks_only_in_bytewax_run_and_until_its_workers_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``_park_main`` returns at once from a frame that is not ``bytewax.run``'s (the main
    thread running code of its own); from Bytewax's wait it returns once the noted
    worker thread has ended (its pidfd), not before, and closes that pidfd."""
    import threading
    import time
    from types import SimpleNamespace

    from flows import runtime

    monkeypatch.setattr(runtime, "_workers", {})
    monkeypatch.setattr(runtime, "_parking", True)
    monkeypatch.setattr(runtime._thread, "interrupt_main", lambda signum: None)
    ended: list[float] = []

    def worker() -> None:
        runtime.note_worker()
        time.sleep(0.2)
        ended.append(time.perf_counter())

    thread = threading.Thread(target=worker)
    thread.start()
    while not runtime._workers:
        time.sleep(0.001)
    if None in runtime._workers.values():
        pytest.skip("no thread pidfds (Linux 6.9+)")
    other = SimpleNamespace(f_globals={"__name__": "__main__", "__spec__": None})
    t0 = time.perf_counter()
    runtime._park_main(runtime.PARK_SIGNAL, other)  # type: ignore[arg-type]
    assert time.perf_counter() - t0 < 0.1 and not ended
    bytewax_run = SimpleNamespace(f_globals={"__spec__": SimpleNamespace(name="bytewax.run")})
    runtime._park_main(runtime.PARK_SIGNAL, bytewax_run)  # type: ignore[arg-type]
    returned = time.perf_counter()
    thread.join()
    assert ended and ended[0] <= returned < ended[0] + 0.1
    assert runtime._workers == {}
