"""The real flow as an operating-system process, for the reliability tests.

``FlowProcess`` runs ``python -m bytewax.run "flows.recsys:build({...})"`` exactly as an
operator would (optionally with Bytewax recovery ``-r/-s/-b`` and the multi-process
flags ``-i/-a``), or ``streamrec run`` with a sub-second ``--epoch-ms``, with its
stderr in a log file, and can ``kill -9`` it. ``init_recovery``
creates a recovery database with the documented command ``python -m bytewax.recovery
DIR N``. ``simulated_log`` writes a seeded simulator log whose organic positives are
each preceded by an evaluation request (``context.eval_item``), so prequential HR@10
(``flows.evaluate.hit_rates``) applies to it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from events.simulator import SimConfig, Simulator

ROOT = Path(__file__).resolve().parents[2]


def init_recovery(db_dir: Path, partitions: int = 1) -> Path:
    """Create ``db_dir`` and its recovery partitions (``python -m bytewax.recovery``)."""
    db_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(db_dir), str(partitions)],
                   check=True, cwd=ROOT, capture_output=True, timeout=60)
    return db_dir


class FlowProcess:
    """One ``python -m bytewax.run`` process of the main flow built from ``config``.

    Args:
        config: The flow config (a plain dict, passed as a Python literal to ``build``).
        log: File receiving the process's stdout and stderr (appended to).
        recovery: Recovery database directory (``-r``), or None for no recovery.
        snapshot_s: ``-s``: whole seconds between recovery snapshots (also the epoch
            length).
        backup_s: ``-b``: whole seconds older snapshots are kept.
        process_id, addresses: ``-i`` / ``-a`` of a multi-process cluster.
        epoch_ms: Run ``streamrec run --epoch-ms`` instead (config in ``<log>.json``; no
            recovery).
    """

    def __init__(self, config: dict[str, Any], log: Path, *, recovery: Path | None = None,
                 snapshot_s: int = 1, backup_s: int = 10,
                 process_id: int | None = None, addresses: list[str] | None = None,
                 epoch_ms: int | None = None) -> None:
        self.config = config
        self.log = log
        if epoch_ms is not None:
            assert recovery is None, "epoch_ms runs without recovery"
            config_file = log.with_suffix(".json")
            config_file.write_bytes(orjson.dumps(config))
            self.args = [sys.executable, "-m", "flows.cli", "run", "--config", str(config_file),
                         "--epoch-ms", str(epoch_ms)]
        else:
            self.args = [sys.executable, "-m", "bytewax.run", f"flows.recsys:build({config!r})"]
        if recovery is not None:
            self.args += ["-r", str(recovery), "-s", str(snapshot_s), "-b", str(backup_s)]
        if process_id is not None:
            self.args += ["-i", str(process_id), "-a", ";".join(addresses or [])]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> FlowProcess:
        """Start the process (returns at once)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                         stdout=fh, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL: no shutdown code runs (no flush, no final snapshot)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait(self, timeout_s: float) -> float:
        """Wait for a clean exit; returns the run's wall seconds. Raises with the log tail
        when the process fails or outlives ``timeout_s``."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"flow still running after {timeout_s} s:\n{self.tail()}") from None
        assert code == 0, f"flow exited with {code}:\n{self.tail()}"
        return time.monotonic() - self.started

    def stop(self) -> None:
        """Kill the process if it still runs (test teardown)."""
        if self.running():
            self.kill9()

    def tail(self, n_bytes: int = 6000) -> str:
        data = self.log.read_bytes() if self.log.exists() else b""
        return data[-n_bytes:].decode(errors="replace")


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str,
               every_s: float = 0.2, alive: FlowProcess | None = None) -> None:
    """Poll ``predicate`` until true; fail after ``timeout_s`` (or when ``alive`` died)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if alive is not None and not alive.running():
            raise AssertionError(f"flow exited while waiting for {what}:\n{alive.tail()}")
        if time.monotonic() > deadline:
            tail = alive.tail() if alive is not None else ""
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tail}")
        time.sleep(every_s)


def simulated_log(path: Path, n: int, seed: int, **sim: Any) -> list[bytes]:
    """Write ``n`` simulator events (plus one evaluation request before each organic
    positive) to ``path`` as JSONL; returns the lines. ``sim``: ``SimConfig`` fields."""
    lines = []
    for n_org, event in enumerate(Simulator(SimConfig(**sim), seed=seed, max_events=n)):
        if (event["type"] == "feedback" and "impression_id" not in event
                and (event["action"] == "click" or event.get("value", 1.0) >= 4)):
            lines.append(orjson.dumps({"type": "request", "ts": event["ts"],
                                       "request_id": f"eval-{n_org}", "user_id": event["user_id"],
                                       "k": 10, "context": {"eval_item": event["item_id"]}}))
        lines.append(orjson.dumps(event))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return lines


class Follower:
    """Follows one Kafka topic from its start (partition 0 of a one-partition topic),
    keeping every record's decoded value in ``values``."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                      fetch_max_wait_ms=100)
        tp = TopicPartition(topic, 0)
        self.consumer.assign([tp])
        self.consumer.seek(tp, 0)
        self.values: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        """Read what arrived; returns ``values``."""
        for records in self.consumer.poll(timeout_ms=100).values():
            self.values.extend(orjson.loads(r.value) for r in records)
        return self.values

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float,
                 alive: FlowProcess | None = None) -> dict[str, Any]:
        """The first record matching ``predicate`` (waiting up to ``timeout_s``)."""
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = [v for v in self.poll() if predicate(v)][:1]
            return bool(found)

        wait_until(check, timeout_s, "a matching record", every_s=0.05, alive=alive)
        return found[0]

    def close(self) -> None:
        self.consumer.close(autocommit=False)
