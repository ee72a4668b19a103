"""Replay and simulator sources: batches, resume from a snapshot position, pacing, chaining."""

from __future__ import annotations

import time

import orjson
import pytest

from events.logfile import open_log_for_write
from events.simulator import SimConfig
from operators.sources import Gate, GatedSource, ReplaySource, SimulatorSource

T0 = 1_767_225_600_000


def write_log(path, n: int, step_ms: int = 1) -> list[bytes]:
    lines = [orjson.dumps({"type": "user", "ts": T0 + i * step_ms, "user_id": f"u{i}"}) for i in range(n)]
    with open_log_for_write(path) as f:
        f.write(b"\n".join(lines[: n // 2]) + b"\n\n" + b"\n".join(lines[n // 2:]) + b"\n")
    return lines


def drain(part, max_batches: int | None = None) -> list:
    out: list = []
    n = 0
    while max_batches is None or n < max_batches:
        try:
            for batch in part.next_batch():
                out.extend(batch)
        except StopIteration:
            break
        n += 1
    return out


@pytest.mark.parametrize("name", ["log.jsonl", "log.jsonl.gz"])
def test_replay_resumes_exactly_from_snapshot(tmp_path, name: str) -> None:
    lines = write_log(tmp_path / name, 1000)
    source = ReplaySource(tmp_path / name, batch_size=64)
    [part_name] = source.list_parts()
    first = source.build_part("in", part_name, None)
    head = drain(first, max_batches=7)
    state = first.snapshot()
    first.close()
    resumed = source.build_part("in", part_name, state)
    tail = drain(resumed)
    assert head + tail == lines
    assert len(head) == 7 * 64


def _batches_and_offsets(part) -> list:
    """Every ``next_batch`` of a replay partition with its position after it."""
    out: list = []
    while True:
        try:
            out.append((part.next_batch(), part.snapshot()))
        except StopIteration:
            return out


@pytest.mark.parametrize("long_line", [0, 9_000, 70_000])
def test_replay_plain_fast_path_reads_as_the_general_path(tmp_path, long_line: int) -> None:
    """An unpaced plain file's lines pulled in C (``_plain_lines``) make the same batches
    and positions as the general path (``_lines``): blank and whitespace lines, CRLF, a
    last line without newline, and a line longer than ``PLAIN_LINE_BYTES`` (9,000: still
    an event; 70,000: over ``max_bytes``, dead-lettered) in the middle of a batch, from
    which on the general path reads."""
    lines = [orjson.dumps({"type": "user", "ts": T0 + i, "user_id": f"u{i}"}) for i in range(300)]
    lines[5] = b"   \t"
    lines[7] = b""
    lines[9] += b"\r"
    if long_line:
        lines[150] = b'{"type":"user","ts":1,"user_id":"' + b"x" * long_line + b'"}'
    (tmp_path / "log.jsonl").write_bytes(b"\n".join(lines))
    source = ReplaySource(tmp_path / "log.jsonl", batch_size=64, max_bytes=65_536)
    fast = source.build_part("in", source.list_parts()[0], None)
    general = source.build_part("in", source.list_parts()[0], None)
    general._plain = False
    assert fast._plain
    got = _batches_and_offsets(fast)
    assert got == _batches_and_offsets(general)
    assert fast._plain is not bool(long_line)
    assert got[-1][1] == (tmp_path / "log.jsonl").stat().st_size


def test_replay_paced_by_event_time(tmp_path) -> None:
    lines = write_log(tmp_path / "log.jsonl", 11, step_ms=100)  # 1 s of event time
    source = ReplaySource(tmp_path / "log.jsonl", batch_size=100, speed=4.0)  # -> 0.25 s
    part = source.build_part("in", source.list_parts()[0], None)
    start = time.monotonic()
    out: list = []
    while True:
        try:
            for batch in part.next_batch():
                out.extend(batch)
        except StopIteration:
            break
        awake = part.next_awake()
        if awake is not None:
            time.sleep(0.01)
    elapsed = time.monotonic() - start
    assert out == lines
    assert 0.2 <= elapsed < 1.0


def test_simulator_source_resume_is_exact() -> None:
    source = SimulatorSource(SimConfig(n_users=50, n_items=40), seed=5, max_events=3000, batch_size=100)
    [name] = source.list_parts()
    uninterrupted = drain(source.build_part("in", name, None))
    part = source.build_part("in", name, None)
    head = drain(part, max_batches=9)
    tail = drain(source.build_part("in", name, part.snapshot()))
    assert len(uninterrupted) == 3000
    assert head + tail == uninterrupted


def test_gated_source_waits_then_runs(tmp_path) -> None:
    lines = write_log(tmp_path / "a.jsonl", 10)
    gate_in, gate_out = Gate(), Gate()
    source = GatedSource(ReplaySource(tmp_path / "a.jsonl"), done=gate_out, wait_for=gate_in)
    part = source.build_part("in", source.list_parts()[0], None)
    assert part.next_batch() == [] and part.next_awake() is not None
    gate_in.open()
    assert drain(part) == lines
    assert gate_out.is_open()
