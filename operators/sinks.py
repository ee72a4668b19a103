"""Output sinks: one JSONL file per output topic (the local default), and a null sink.

Items reaching a sink are micro-batches: ``list[dict]`` records. The file sink is a
fixed-partitioned sink whose resume state is the file length in bytes, so a resumed
flow truncates what was written after the last snapshot and appends from there:
file outputs are exactly-once under Bytewax recovery. A resume whose file is missing
or shorter than that length stops at start (``OutputFileLost``, naming the file)
instead of padding it with NUL bytes. (The Kafka sink lives in ``kafka_io``.)
"""

from __future__ import annotations

import os
from itertools import repeat
from pathlib import Path
from typing import Any

import orjson
from bytewax.outputs import (
    DynamicSink,
    FixedPartitionedSink,
    StatefulSinkPartition,
    StatelessSinkPartition,
)

from events.logfile import IO_BUFFER_BYTES
from events.model import Record
from operators.crossing import UnwrappedPartition

WRITE_CHUNK = 64
"""Records encoded and written together. Encoding a whole micro-batch (~1,000 rows) before
writing it kept each row's buffer alive at once: the allocator grew and trimmed the heap
every batch, one page fault per row (13% of the joiner path's CPU); 64 rows never do."""


_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


def encode_record(record: Record) -> bytes:
    """One output record as a JSON line (bytes, with trailing newline)."""
    return orjson.dumps(record, option=_OPTIONS, default=str)


class OutputFileLost(RuntimeError):
    """A resumed flow's output file is missing or shorter than its recovery snapshot says."""


def check_resumable(path: Path, resume_bytes: int | None) -> None:
    """Raise ``OutputFileLost`` (naming ``path``) unless ``path`` holds at least the
    ``resume_bytes`` a recovery snapshot recorded: truncating a shorter file "back" to
    that length would pad it with NUL bytes instead of the lost records."""
    if not resume_bytes:
        return
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = None
    if size is not None and size >= resume_bytes:
        return
    found = "is missing" if size is None else f"has {size} bytes"
    raise OutputFileLost(
        f"cannot resume: output file {path} {found}, but the recovery snapshot says "
        f"{resume_bytes} bytes were written to it. Restore the output directory "
        f"{path.parent} from the same backup as the recovery directory, or start over with "
        f"a new recovery directory (docs/operations.md, 'How to restore').")


class _JsonlPartition(StatefulSinkPartition[list[Record], int]):
    def __init__(self, path: Path, resume_bytes: int | None) -> None:
        check_resumable(path, resume_bytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab", buffering=IO_BUFFER_BYTES)  # flushed every write_batch
        self._file.truncate(resume_bytes or 0)
        self._file.seek(0, os.SEEK_END)
        self.records = 0

    def write_batch(self, items: list[list[Record]]) -> None:
        write = self._file.write
        dumps, default, option = orjson.dumps, repeat(str), repeat(_OPTIONS)
        for batch in items:  # encode_record of each row, by map (positional: no keywords)
            for i in range(0, len(batch), WRITE_CHUNK):
                write(b"".join(map(dumps, batch[i:i + WRITE_CHUNK], default, option)))
            self.records += len(batch)
        self._file.flush()

    def snapshot(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


class JsonlFileSink(FixedPartitionedSink[list[Record], int]):
    """Writes ``DIR/NAME.jsonl``; feed it ``(any_key, list[record])`` items."""

    def __init__(self, directory: str | Path, name: str) -> None:
        self.path = Path(directory) / f"{name}.jsonl"

    def list_parts(self) -> list[str]:
        return [self.path.name]

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _JsonlPartition:
        return _JsonlPartition(self.path, resume_state)


class NamedSinks(FixedPartitionedSink[list[Record], Any]):
    """Several one-partition sinks behind one output step: items are ``(name, batch)``
    and go to ``sinks[name]``; each sink's partition is named after its output and
    keeps its own recovery state (a JSONL file's length, a Kafka producer's nothing).

    One step instead of one per output (and its ``key_on``) saves Bytewax's scheduling
    and progress work per step and micro-batch. Bytewax numbers a sink's partitions in
    the sorted order of their names: ``part_fn`` returns a name's place in it. A batch
    may come as ``operators.crossing.PickledOnce(batch)`` (pickled once if it crosses
    to the process writing it); each sink gets the batch itself."""

    def __init__(self, sinks: dict[str, FixedPartitionedSink[list[Record], Any]]) -> None:
        for name, sink in sinks.items():
            if len(sink.list_parts()) != 1:
                raise ValueError(f"output {name!r}: NamedSinks takes one-partition sinks")
        self.sinks = dict(sinks)
        self._place = {name: i for i, name in enumerate(sorted(sinks))}

    def list_parts(self) -> list[str]:
        return sorted(self.sinks)

    def part_fn(self, item_key: str) -> int:
        return self._place[item_key]

    def build_part(self, step_id: str, for_part: str, resume_state: Any
                   ) -> StatefulSinkPartition[list[Record], Any]:
        sink = self.sinks[for_part]
        return UnwrappedPartition(sink.build_part(step_id, sink.list_parts()[0], resume_state))


class _NullPartition(StatelessSinkPartition[Any]):
    def __init__(self, counter: list[int]) -> None:
        self._counter = counter

    def write_batch(self, items: list[Any]) -> None:
        self._counter[0] += len(items)


class NullSink(DynamicSink[Any]):
    """Discards items, counting them in ``self.count[0]`` (for benchmarks)."""

    def __init__(self) -> None:
        self.count = [0]

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _NullPartition:
        return _NullPartition(self.count)
