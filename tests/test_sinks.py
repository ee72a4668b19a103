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


def test_named_sinks_write_each_output_to_its_own_file_in_a_cluster(tmp_path: Path) -> None:
    """One output step for several files: every ``(name, batch)`` lands in
    ``<name>.jsonl`` whatever worker made it (Bytewax numbers the parts in sorted order;
    ``part_fn`` must agree with it), each file's batches in the order they were made."""
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSource, cluster_main

    from operators.sinks import NamedSinks

    names = ["recommendations", "dead-letters", "metrics", "examples", "snapshots"]
    items = [(names[i % len(names)], [{"i": i, "j": j} for j in range(i % 3 + 1)])
             for i in range(60)]
    flow = Dataflow("named_sinks")
    stream = op.input("in", flow, TestingSource(items))
    # spread the items over the workers before the sink, as stages on many workers do
    spread = op.key_rm("unkey", op.stateful_map(
        "spread", op.key_on("key", stream, lambda item: str(item[1][0]["i"])),
        lambda state, item: (state, item)))
    op.output("out", spread, NamedSinks({n: JsonlFileSink(tmp_path, n) for n in names}))
    cluster_main(flow, [], 0, worker_count_per_proc=3)
    for name in names:
        lines = [orjson.loads(line) for line in (tmp_path / f"{name}.jsonl").read_bytes().splitlines()]
        expected = [r for n, batch in items if n == name for r in batch]
        assert sorted(lines, key=lambda r: (r["i"], r["j"])) == expected, name
