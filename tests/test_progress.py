"""Progress you can see: the flow's status lines and summary table, the CLI's bars."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import orjson
import pytest
from bytewax.testing import run_main

from events.simulator import write_log
from flows.cli import main
from flows.logs import JsonFormatter, TextFormatter
from flows.progress import Progress
from flows.recsys import build
from operators.status import StatusLog, human_duration, status_line, summary_table

STATUS = re.compile(
    r"^(?P<events>[\d,]+) events \((?:[\d,]+/s now, )?[\d,]+/s avg\) \| (?P<req>[\d,]+) requests "
    r"answered \| (?P<dead>[\d,]+) dead letters \| event time \d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    r"\(lag [^)]+\) \| snapshots .+$")


def _flow_config(tmp_path: Path, n: int, status_s: float) -> dict:
    log = tmp_path / "log.jsonl"
    write_log(log, n, seed=3)
    with log.open("ab") as f:
        f.write(b"{broken\n")
    return {"inputs": [{"kind": "replay", "path": str(log), "batch_size": 50}],
            "output": {"dir": str(tmp_path / "out")}, "log": {"status_interval_s": status_s}}


def test_flow_logs_status_lines_then_a_summary_table(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="streamrec.status")
    seen: list[int] = []
    run_main(build(_flow_config(tmp_path, 4000, 0.02), progress=seen.append))
    records = [r for r in caplog.records if r.name == "streamrec.status"]
    lines = [r for r in records if not hasattr(r, "summary")]
    assert len(lines) >= 2, [r.getMessage() for r in records]
    counts = []
    for r in lines:
        m = STATUS.match(r.getMessage())
        assert m, r.getMessage()
        counts.append(int(m["events"].replace(",", "")))
        assert r.status["events_in"] == counts[-1]  # the same figures for JSON logs
    assert counts == sorted(counts) and counts[-1] <= 4001
    [end] = [r for r in records if hasattr(r, "summary")]
    assert end.summary["events_in"] == 4001 and end.summary["dead_letters"] == 1
    table = end.getMessage().splitlines()
    assert table[0] == "streamrec summary (app streamrec)"
    row = next(line for line in table if line.strip().startswith("events in"))
    assert "4,001" in row and "/s over" in row
    assert re.search(r"dead letters\s+1\s+malformed_json 1", end.getMessage())
    requests = end.summary["outputs"]["recommendations"]
    assert re.search(rf"requests answered\s+{requests:,}\s", end.getMessage())
    # the text log shows the table, not the 2 KB record; the JSON log keeps the record
    assert '"kind"' not in TextFormatter().format(end)
    assert orjson.loads(JsonFormatter().format(end))["summary"]["events_in"] == 4001
    # the progress callback (eval's bar) ends at the full count, never going back
    assert seen and seen == sorted(seen) and seen[-1] == 4001


def test_status_lines_off_with_zero_interval(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="streamrec.status")
    run_main(build(_flow_config(tmp_path, 1500, 0.0)))
    records = [r for r in caplog.records if r.name == "streamrec.status"]
    assert len(records) == 1 and hasattr(records[0], "summary")


def _record(**over) -> dict:
    rec = {"app": "shop", "ts": 1_767_225_700_000, "events_in": 12345, "events_per_s": 987.6,
           "dead_letters": 2, "dead_by_reason": {"bad_ts": 2}, "events_by_type": {"impression": 12343},
           "outputs": {"recommendations": 321, "examples": 40, "late-labels": 1},
           "examples_by_label": {"0": 30, "1": 10}, "max_event_ts": 1_767_225_600_000,
           "serving_latency_ms": {"count": 321, "p50_le": 5.0, "p99_le": 20.0},
           "snapshots": {"ranker": {"version": 3}, "items-i000": {"version": 7},
                         "items-i001": {"version": 6}, "index": {"version": 2}},
           "elapsed_s": 12.5, "rss_mb": 100.0, "peak_rss_mb": 120.0}
    rec.update(over)
    return rec


def test_status_line_and_table_figures() -> None:
    line = status_line(_record(), rate_now=1500.4)
    assert line == ("12,345 events (1,500/s now, 988/s avg) | 321 requests answered | "
                    "2 dead letters | event time 2026-01-01 00:00:00 (lag 100.0 s) | "
                    "snapshots index v2, items v7 (2 shards), ranker v3")
    assert "snapshots none yet" in status_line(_record(snapshots={}))
    table = summary_table(_record())
    assert re.search(r"examples\s+40\s+label 0: 30, label 1: 10", table)
    assert "p50 <= 5.0 ms, p99 <= 20.0 ms" in table
    assert [human_duration(s) for s in (3.21, 600, 7200 * 2, 86400 * 300, -5)] == [
        "3.2 s", "10 min", "4.0 h", "300 d", "-5.0 s"]


def test_status_log_rate_and_progress_pacing(monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="streamrec.status")
    clock = [100.0]
    monkeypatch.setattr("operators.status.time.monotonic", lambda: clock[0])
    seen: list[int] = []
    status = StatusLog(5.0, seen.append)
    events = [0]
    record = lambda: _record(events_in=events[0])  # noqa: E731
    for step in range(40):  # 0.25 s apart: progress every 0.5 s, a line every 5 s
        events[0] = 100 * step
        status.tick(record)
        clock[0] += 0.25
    assert len(seen) == 20
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("2,000 events (988/s avg)")
    for _ in range(20):
        events[0] += 100
        status.tick(record)
        clock[0] += 0.25
    assert caplog.records[-1].getMessage().startswith("4,000 events (400/s now")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_shows_total_and_eta() -> None:
    out = _Tty()
    with Progress("eval", 1000, stream=out) as p:
        assert p.bar_on
        for _ in range(4):
            p.add(100)
        p._bar.refresh()
        shown = out.getvalue().split("\r")[-1]
    assert shown.startswith("eval:  40%") and "400/1.00k" in shown and "<" in shown, shown
    quiet = _Tty()
    with Progress("eval", 1000, stream=quiet, quiet=True) as p:
        p.add(1000)
    assert quiet.getvalue() == "" and not p.bar_on


def test_progress_without_a_terminal_logs_status_lines(caplog) -> None:
    caplog.set_level(logging.INFO, logger="streamrec.progress")
    with Progress("replay", 1000, stream=io.StringIO(), log_every_s=0.0) as p:
        p.add(250)
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"replay: 250 of 1,000 events \(25%\), [\d,]+/s, [\d.]+ s, ETA .+", lines[0])
    assert lines[-1].startswith("replay: 250 of 1,000 events (25%)")
    with Progress("tap", None, stream=io.StringIO(), log_every_s=0.0) as p:
        p.add(7)
    assert re.fullmatch(r"tap: 7 events, [\d,]+/s, [\d.]+ s", caplog.records[-1].getMessage())


@pytest.mark.parametrize("quiet", [[], ["--quiet"]])
def test_cli_simulate_and_import_report_progress(tmp_path, caplog, quiet) -> None:
    caplog.set_level(logging.INFO, logger="streamrec.progress")
    assert main(["simulate", "-n", "25000", "-o", str(tmp_path / "s.jsonl"), *quiet]) == 0
    ratings = tmp_path / "u.data"
    ratings.write_text("".join(f"{u}\t{i}\t{4 + (u + i) % 2}\t{880000000 + u * 10 + i}\n"
                               for u in range(1, 30) for i in range(1, 20)))
    assert main(["import", "movielens", str(ratings), "-o", str(tmp_path / "m.jsonl"),
                 "--with-requests", *quiet]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "streamrec.progress"]
    assert any(line.startswith("simulate: 25,000 of 25,000 events (100%)") for line in lines)
    n = len((tmp_path / "m.jsonl").read_bytes().splitlines())
    assert any(line.startswith(f"import movielens: {n:,} of {n:,} events (100%)") for line in lines)


@pytest.mark.kafka
def test_cli_replay_reports_progress_toward_the_log_size(tmp_path, caplog, kafka_broker) -> None:
    caplog.set_level(logging.INFO, logger="streamrec.progress")
    log = tmp_path / "log.jsonl"
    write_log(log, 3000, seed=5)
    with log.open("ab") as f:
        f.write(b"\n\n")  # blank lines are not events: the total counts only events
    topic = f"progress-{tmp_path.name}"
    assert main(["replay", str(log), "--topic", topic, "--bootstrap", kafka_broker.bootstrap,
                 "--partitions", "1", "-q"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "streamrec.progress"]
    assert lines[-1].startswith("replay: 3,000 of 3,000 events (100%)"), lines
