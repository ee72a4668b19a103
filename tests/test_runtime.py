"""The flow process's runtime (flows/runtime.py): GC thresholds and the GIL switch
interval from config, and one GC freeze once a Kafka input partition has read its
backlog (real broker)."""

from __future__ import annotations

import gc
import logging
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
