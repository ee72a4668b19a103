"""Input files (issue 19 points 6 and 7): bounded reads, damaged and empty logs, bad paths.

The replay reader enforces ``parse.max_bytes`` while reading (a huge line is never held
in memory), reads a truncated or corrupted ``.gz`` up to the damage and reports the rest
as one ``truncated_input`` dead letter, ends an empty log with a zero summary, and a log
path that cannot be read is a one-line error at start (exit 2). ``streamrec replay``
skips lines larger than the broker accepts instead of aborting.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from events.logfile import LongLine, iter_lines
from flows.evaluate import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _events(n: int, start: int = 0) -> list[bytes]:
    return [orjson.dumps({"type": "impression", "ts": 1_700_000_000_000 + i, "impression_id": f"m{i}",
                          "user_id": f"u{i % 7}", "item_id": f"x{i % 11}"})
            for i in range(start, start + n)]


def _config(log: Path, out: Path, **extra: Any) -> Path:
    config = out.parent / f"{out.name}.json"
    config.write_bytes(orjson.dumps({"inputs": [{"kind": "replay", "path": str(log)}],
                                     "output": {"dir": str(out)}, **extra}))
    return config


def _run(log: Path, out: Path, **extra: Any) -> subprocess.CompletedProcess[str]:
    """``streamrec run`` on ``log`` in its own process (one process, files out)."""
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config",
                           str(_config(log, out, **extra))],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def _cli(capsys: Any, *args: str) -> tuple[int, str]:
    """``streamrec ARGS`` in this process: (exit code, stderr)."""
    from flows.cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def _summary(out: Path) -> dict[str, Any]:
    [summary] = [m for m in read_jsonl(out / "metrics.jsonl") if m["kind"] == "summary"]
    return summary


def test_iter_lines_bounds_what_it_holds() -> None:
    import io

    data = b"a\n" + b"x" * 100 + b"\nbb\r\n" + b"y" * 12 + b"\r\n" + b"z" * 50
    lines = list(iter_lines(io.BytesIO(data), max_bytes=10))
    assert [n for n, _ in lines] == [2, 101, 4, 14, 50]
    assert lines[0][1] == b"a\n" and lines[2][1] == b"bb\r\n"
    assert isinstance(lines[1][1], LongLine) and lines[1][1].size == 100
    assert len(lines[1][1].head) == 12  # max_bytes + 2, never the whole line
    assert isinstance(lines[3][1], LongLine) and lines[3][1].size == 12
    assert isinstance(lines[4][1], LongLine) and lines[4][1].size == 50
    assert sum(n for n, _ in lines) == len(data)
    assert [x for _, x in iter_lines(io.BytesIO(b"0123456789\r\n"), 10)] == [b"0123456789\r\n"]


def test_huge_line_is_skipped_while_reading(tmp_path) -> None:
    """A 200 MB line between valid events: dead-lettered (``oversized``, its size
    recorded, 4 KiB of it kept) without being read into memory; the events after it are
    read. The old reader held the whole line (and a copy): peak RSS + 400 MB."""
    log = tmp_path / "log.jsonl"
    huge = 200 * 2**20
    with log.open("wb") as f:
        f.write(b"\n".join(_events(100)) + b"\n")
        f.write(b'{"type":"impression","blob":"' + b"x" * huge + b'"}\n')
        f.write(b"\n".join(_events(100, 100)) + b"\n")
    run = _run(log, tmp_path / "out", items={"enabled": False}, ranker={"enabled": False})
    assert run.returncode == 0, run.stderr[-3000:]
    summary = _summary(tmp_path / "out")
    assert summary["events_by_type"] == {"impression": 200}
    assert summary["dead_by_reason"] == {"oversized": 1}
    [dead] = read_jsonl(tmp_path / "out" / "dead-letters.jsonl")
    assert dead["raw_bytes"] == huge + 31 and dead["raw_truncated"] and len(dead["raw"]) == 4096
    assert "skipped while reading" in dead["detail"]
    grew = summary["peak_rss_mb"] - summary["rss_start_mb"]
    print(f"peak RSS {summary['peak_rss_mb']} MB, {grew:.1f} MB above the start")
    assert grew < 50


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_damaged_gz_is_read_up_to_the_damage(tmp_path, capsys, damage: str) -> None:
    lines = _events(3000)
    log = tmp_path / "log.jsonl.gz"
    data = gzip.compress(b"\n".join(lines) + b"\n")
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        data = data[: len(data) // 2] + bytes(b ^ 0x5A for b in data[len(data) // 2:][:64]) \
            + data[len(data) // 2 + 64:]
    log.write_bytes(data)
    code, err = _cli(capsys, "run", "--config", str(_config(log, tmp_path / "out")))
    assert code == 0, err[-3000:]
    summary = _summary(tmp_path / "out")
    assert 500 < summary["events_by_type"]["impression"] < len(lines)
    # Corrupted deflate data may decode as garbage lines (each its own dead letter)
    # before the stream fails; a cut one just ends.
    assert summary["dead_by_reason"]["truncated_input"] == 1
    assert set(summary["dead_by_reason"]) <= {"truncated_input", "malformed_json"}
    if damage == "truncated":
        assert summary["dead_by_reason"] == {"truncated_input": 1}
    [dead] = [d for d in read_jsonl(tmp_path / "out" / "dead-letters.jsonl")
              if d["reason"] == "truncated_input"]
    assert str(log) in dead["detail"] and "unreadable after" in dead["detail"]


@pytest.mark.parametrize("kind", ["plain", "gz"])
def test_empty_log_ends_with_a_zero_summary(tmp_path, capsys, kind: str) -> None:
    log = tmp_path / ("empty.jsonl" if kind == "plain" else "empty.jsonl.gz")
    log.write_bytes(b"" if kind == "plain" else gzip.compress(b""))
    code, err = _cli(capsys, "run", "--config", str(_config(log, tmp_path / "out")))
    assert code == 0, err[-3000:]
    summary = _summary(tmp_path / "out")
    assert (summary["events_in"], summary["dead_letters"], summary["outputs"]) == (0, 0, {})


@pytest.mark.parametrize("what", ["missing", "directory", "not_gzip"])
def test_unreadable_log_is_a_one_line_error_at_start(tmp_path, capsys, what: str) -> None:
    log = {"missing": tmp_path / "nope.jsonl", "directory": tmp_path,
           "not_gzip": tmp_path / "plain.jsonl.gz"}[what]
    if what == "not_gzip":
        log.write_bytes(b"\n".join(_events(10)) + b"\n")
    expect = {"missing": "no such file", "directory": "is a directory",
              "not_gzip": "not a gzip file"}[what]
    code, err = _cli(capsys, "run", "--config", str(_config(log, tmp_path / "out")))
    assert code == 2
    assert err.startswith(f"streamrec: config error: inputs[0].path: {log}: {expect}")
    assert err.count("\n") == 1
    for args in (["eval", str(log), "--report", str(tmp_path / "r.json")],
                 ["replay", str(log), "--topic", "t", "--bootstrap", "127.0.0.1:1"]):
        code, err = _cli(capsys, *args)
        assert code == 2 and expect in err and err.count("\n") == 1, err[-2000:]
    if what == "missing":  # the same, as a process: one line on stderr, no traceback
        run = _run(log, tmp_path / "out")
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr[-2000:]


@pytest.mark.kafka
def test_replay_skips_lines_larger_than_the_broker_accepts(kafka_broker, kafka_topic,
                                                           kafka_read_records, tmp_path,
                                                           capsys) -> None:
    """A 3 MB line (over the producer's and Kafka's 1 MB default limits) used to abort
    ``streamrec replay`` with a traceback; now it is skipped and counted, and every other
    line is produced."""
    lines = _events(50)
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"\n".join(lines[:20] + [b'{"blob":"' + b"x" * (3 << 20) + b'"}']
                               + lines[20:]) + b"\n")
    topic = kafka_topic(1, "replay")
    code, err = _cli(capsys, "replay", str(log), "--topic", topic,
                     "--bootstrap", kafka_broker.bootstrap)
    assert code == 0, err[-3000:]
    assert "skipped 1 lines larger than the broker accepts" in err
    records = kafka_read_records(kafka_broker.bootstrap, topic, expected=50)
    assert [r.value for r in records] == lines
