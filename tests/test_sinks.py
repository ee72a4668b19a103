"""The JSONL file sink (operators/sinks.py): every record of every batch, in order, one
line each, whatever the write chunks; its resume state is the file length."""

from __future__ import annotations

from pathlib import Path

import orjson

from operators.sinks import WRITE_CHUNK, JsonlFileSink, encode_record


def test_batches_are_written_whole_and_in_order_across_write_chunks(tmp_path: Path) -> None:
    sizes = [0, 1, WRITE_CHUNK, WRITE_CHUNK + 1, 2 * WRITE_CHUNK + 3]
    batches = [[{"n": n, "batch": b, "x": [n * 0.5]} for n in range(size)]
               for b, size in enumerate(sizes)]
    sink = JsonlFileSink(tmp_path, "examples")
    part = sink.build_part("out", "examples.jsonl", None)
    part.write_batch(batches[:2])
    part.write_batch(batches[2:])
    assert part.records == sum(sizes)
    assert part.snapshot() == (tmp_path / "examples.jsonl").stat().st_size
    part.close()
    data = (tmp_path / "examples.jsonl").read_bytes()
    assert data == b"".join(encode_record(r) for batch in batches for r in batch)
    assert [orjson.loads(line) for line in data.splitlines()] == [r for b in batches for r in b]
