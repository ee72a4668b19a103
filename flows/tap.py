"""``streamrec tap``: print the records of a topic readably, like kcat.

Where it reads (:func:`resolve`): an *app name* (an output such as ``examples``, or an
input such as ``events``) is the Kafka topic ``<app>.<name>``; any other name is a
Kafka topic as given. Outputs are read from the local JSONL file
``<output.dir>/<name>.jsonl`` when the config writes files (``output.kind = "files"``,
the zero-config default) and neither ``--bootstrap`` nor ``--source kafka`` asks for
Kafka; inputs and foreign topics always come from Kafka.

Positions (``--from``): ``beginning``, ``end`` (only what arrives after the start, with
``--follow``), ``-N`` (the last N records of each partition; of the file) or an offset
``N >= 0`` (of each partition; a line number of the file). Kafka's end offset is the
high watermark of a Fetch response (exact on every broker; the local Tansu broker
under-reports ListOffsets, see ``operators.kafka_io``).

Output (``--format``): the record's JSON by default; kcat tokens ``%t`` topic, ``%p``
partition, ``%o`` offset, ``%k`` key, ``%s`` value, ``%T`` timestamp (ms), ``%S``
value size (bytes), ``%%``, with ``\\n`` and ``\\t`` escapes; or named placeholders
``{topic} {partition} {offset} {key} {timestamp} {value}`` and ``{r[FIELD]}``; or
``json``: one envelope object per message (like ``kcat -J``). Local files have
partition 0, the line number as offset, ``user_id`` as key and the record's ``ts`` as
timestamp.

``--filter``: a Python expression over the record's fields (``label == 1 and weight >
1``; ``r`` is the whole record; a field a record lacks is ``None``). A syntax error, a
name no record read has as a field, or an expression that fails on every record is a
:class:`TapError` (the CLI exits 2).
"""

from __future__ import annotations

import ast
import builtins
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import orjson

from flows.config import OUTPUTS, Config
from operators.example_codec import unpack_example

UNKNOWN_FIELD_PROBE = 1_000
"""Records read before an unknown filter field is reported (if the stream is not caught
up earlier)."""

FILTER_BUILTINS: dict[str, Any] = {
    name: getattr(builtins, name)
    for name in ("abs", "all", "any", "bool", "float", "int", "len", "max", "min", "round",
                 "set", "sorted", "str", "sum", "isinstance", "list", "dict", "True", "False",
                 "None")
}
"""Names a filter may use besides the record's fields and ``r``."""


class TapError(Exception):
    """A user error in tap's arguments (filter, format, position): exit code 2."""


@dataclass
class Message:
    """One message of a topic (or one line of a local output file)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    timestamp_ms: int | None
    value: bytes


CAUGHT_UP = None
"""Yielded once by a reader when it has delivered everything there was at its start."""


# -- where ------------------------------------------------------------------------------


@dataclass
class Where:
    """The resolved place to read: a Kafka topic or a local file."""

    kind: str  # "kafka" | "files"
    topic: str  # the Kafka topic, or the app name of the file
    path: Path | None = None


def app_names(config: Config) -> set[str]:
    """Names that are the app's own topics: every output and every Kafka input topic."""
    names = set(OUTPUTS) | {"events"}
    for inp in config.inputs:
        if inp.kind == "kafka":
            names.update(inp.topics)
    return names


def resolve(name: str, config: Config, source: str = "auto", bootstrap: str | None = None,
            directory: str | None = None) -> Where:
    """Decide between Kafka and a local output file (module docstring)."""
    topic = config.topic(name) if name in app_names(config) else name
    if source == "files" or directory:
        if name not in OUTPUTS:
            raise TapError(f"{name!r} is not an output (local files exist for: {', '.join(OUTPUTS)})")
        return Where("files", name, Path(directory or config.output.dir) / f"{name}.jsonl")
    if source == "kafka" or bootstrap or name not in OUTPUTS or config.output.kind == "kafka":
        return Where("kafka", topic)
    return Where("files", name, Path(config.output.dir) / f"{name}.jsonl")


# -- positions --------------------------------------------------------------------------


def parse_from(text: str) -> tuple[str, int]:
    """``beginning`` / ``end`` / ``-N`` / ``N`` -> ``(kind, n)``."""
    if text in ("beginning", "end"):
        return text, 0
    try:
        n = int(text)
    except ValueError:
        raise TapError(f"--from {text!r}: expected beginning, end, -N (last N) or an "
                       "offset N") from None
    return ("last", -n) if n < 0 else ("offset", n)


def _start_offset(kind: str, n: int, begin: int, end: int) -> int:
    if kind == "beginning":
        return begin
    if kind == "end":
        return end
    if kind == "last":
        return max(begin, end - n)
    return min(max(begin, n), end)


# -- readers ----------------------------------------------------------------------------


def read_file(path: Path, start: tuple[str, int], follow: bool,
              poll_s: float = 0.2) -> Iterator[Message | None]:
    """Lines of a local output file as messages; :data:`CAUGHT_UP` at its end, then (with
    ``follow``) lines appended later. A last line without its newline (being written) is
    held back until it is complete."""
    kind, n = start
    with path.open("rb") as f:
        count = 0  # complete lines read
        pending = b""
        tail: deque[tuple[int, bytes]] | None = deque(maxlen=n) if kind == "last" else None
        for line in f:
            if not line.endswith(b"\n"):
                pending = line
                break
            if tail is not None:
                tail.append((count, line))
            elif kind == "beginning" or (kind == "offset" and count >= n):
                yield _file_message(path, count, line)
            count += 1
        for offset, line in tail or ():
            yield _file_message(path, offset, line)
        offset = count
        yield CAUGHT_UP
        while follow:
            chunk = f.readline()
            if not chunk:
                time.sleep(poll_s)
                continue
            pending += chunk
            if pending.endswith(b"\n"):
                yield _file_message(path, offset, pending)
                offset += 1
                pending = b""


def _file_message(path: Path, offset: int, line: bytes) -> Message:
    value = line.rstrip(b"\r\n")
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError:
        record = None
    key = ts = None
    if isinstance(record, dict):
        uid = record.get("user_id")
        key = str(uid).encode() if uid is not None else None
        ts = record.get("ts") if isinstance(record.get("ts"), int) else None
    return Message(path.stem, 0, offset, key, ts, value)


def end_offsets(consumer: Any, tps: list[Any], timeout_s: float = 10.0) -> dict[Any, int]:
    """Exact end offsets (next offset to be written) of ``tps``: the high watermark of a
    Fetch response for each (the consumer's positions are left undefined)."""
    guess = consumer.end_offsets(tps)
    for tp in tps:
        consumer.seek(tp, guess[tp])
    deadline = time.monotonic() + timeout_s
    while any(consumer.highwater(tp) is None for tp in tps):
        if time.monotonic() > deadline:
            missing = [tp.partition for tp in tps if consumer.highwater(tp) is None]
            raise TapError(f"no fetch answer for partitions {missing} in {timeout_s:.0f} s")
        consumer.poll(timeout_ms=200, max_records=1)
    return {tp: int(consumer.highwater(tp)) for tp in tps}


def read_kafka(bootstrap: str, topic: str, start: tuple[str, int], follow: bool,
               partitions: list[int] | None, client: dict[str, Any],
               wait_s: float = 10.0) -> Iterator[Message | None]:
    """Messages of a Kafka topic (partitions in turn as the consumer delivers them);
    :data:`CAUGHT_UP` once every partition reached the end it had at the start."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**{**client, "bootstrap_servers": bootstrap,
                                "enable_auto_commit": False, "fetch_max_wait_ms": 200})
    try:
        found: set[int] = set()
        deadline = time.monotonic() + wait_s
        while not found:
            found = consumer.partitions_for_topic(topic) or set()
            if not found:
                if time.monotonic() > deadline:
                    raise TapError(f"topic {topic!r} not found on {bootstrap}")
                time.sleep(0.2)
        if partitions:
            missing = sorted(set(partitions) - found)
            if missing:
                raise TapError(f"topic {topic!r} has partitions {sorted(found)}, not {missing}")
        tps = [TopicPartition(topic, p) for p in sorted(partitions or found)]
        consumer.assign(tps)
        begin = consumer.beginning_offsets(tps)
        end = end_offsets(consumer, tps)
        for tp in tps:
            consumer.seek(tp, _start_offset(*start, begin[tp], end[tp]))
        remaining = {tp for tp in tps if consumer.position(tp) < end[tp]}
        if not remaining:
            yield CAUGHT_UP
        while True:
            polled = consumer.poll(timeout_ms=300, max_records=2_000)
            for tp, records in polled.items():
                for m in records:
                    yield Message(topic, tp.partition, m.offset, m.key, m.timestamp,
                                  m.value if m.value is not None else b"")
                if tp in remaining and records and records[-1].offset + 1 >= end[tp]:
                    remaining.discard(tp)
                    if not remaining:
                        yield CAUGHT_UP
            if not remaining and not follow:
                return
    finally:
        consumer.close(autocommit=False)


# -- filter and format ------------------------------------------------------------------


class _Fields(dict):
    """A record's fields; a missing one is None."""

    def __missing__(self, key: str) -> None:
        return None


class RecordFilter:
    """A compiled ``--filter`` expression (module docstring)."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        try:
            tree = ast.parse(expr, mode="eval")
        except SyntaxError as err:
            raise TapError(f"--filter {expr!r}: {err.msg} (a Python expression over the "
                           "record's fields, e.g. \"label == 1\")") from None
        self.code = compile(tree, "<filter>", "eval")
        self.fields = {n.id for n in ast.walk(tree)
                       if isinstance(n, ast.Name) and n.id not in FILTER_BUILTINS and n.id != "r"}
        self.unseen = set(self.fields)
        self.evaluated = 0
        self.failed = 0
        self.first_error: str | None = None

    def __call__(self, record: Any) -> bool:
        fields = _Fields(record) if isinstance(record, dict) else _Fields()
        if self.unseen:
            self.unseen -= fields.keys()
        self.evaluated += 1
        try:
            return bool(eval(self.code, {"__builtins__": FILTER_BUILTINS},  # noqa: S307
                             _with_r(fields, record)))
        except Exception as err:  # a field of another type in this record: no match
            self.failed += 1
            if self.first_error is None:
                self.first_error = f"{type(err).__name__}: {err}"
            return False

    def check(self) -> None:
        """Raise :class:`TapError` for fields no record had, or when every record failed."""
        if self.unseen and self.evaluated:
            raise TapError(f"--filter {self.expr!r}: unknown field(s) {', '.join(sorted(self.unseen))} "
                           f"(no record of the {self.evaluated} read has it)")
        if self.evaluated and self.failed == self.evaluated:
            raise TapError(f"--filter {self.expr!r} failed on every record ({self.first_error})")


def _with_r(fields: _Fields, record: Any) -> _Fields:
    out = _Fields(fields)
    out["r"] = record
    return out


_KCAT = re.compile(r"%[tpokTsS%]")


def formatter(fmt: str | None) -> Callable[[Message, Any], str]:
    """The ``--format`` function ``(message, record) -> text`` (module docstring)."""
    if not fmt:
        return lambda m, record: m.value.decode("utf-8", "replace")
    if fmt == "json":
        def envelope(m: Message, record: Any) -> str:
            return orjson.dumps({
                "topic": m.topic, "partition": m.partition, "offset": m.offset,
                "key": m.key.decode("utf-8", "replace") if m.key is not None else None,
                "ts": m.timestamp_ms,
                "value": record if record is not None else m.value.decode("utf-8", "replace"),
            }).decode()
        return envelope
    text = fmt.replace("\\n", "\n").replace("\\t", "\t")
    if "%" in text:
        def kcat(m: Message, record: Any) -> str:
            key = m.key.decode("utf-8", "replace") if m.key is not None else ""
            tokens = {"%t": m.topic, "%p": str(m.partition), "%o": str(m.offset), "%k": key,
                      "%s": m.value.decode("utf-8", "replace"), "%T": str(m.timestamp_ms or ""),
                      "%S": str(len(m.value)), "%%": "%"}
            return _KCAT.sub(lambda t: tokens[t.group()], text)
        return kcat

    def named(m: Message, record: Any) -> str:
        return text.format_map({
            "topic": m.topic, "partition": m.partition, "offset": m.offset,
            "key": m.key.decode("utf-8", "replace") if m.key is not None else "",
            "timestamp": m.timestamp_ms, "value": m.value.decode("utf-8", "replace"),
            "r": _Fields(record) if isinstance(record, dict) else _Fields()})
    try:
        named(Message("t", 0, 0, b"k", 0, b"{}"), {})
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise TapError(f"--format {fmt!r}: {type(err).__name__}: {err} (placeholders: "
                       "{topic} {partition} {offset} {key} {timestamp} {value} {r[FIELD]}, "
                       "or kcat's %t %p %o %k %s %T %S)") from None
    return named


# -- the loop ---------------------------------------------------------------------------


def tap(messages: Iterator[Message | None], out: TextIO = sys.stdout, fmt: str | None = None,
        expr: str | None = None, limit: int = 0) -> int:
    """Print the messages that pass the filter; returns how many were printed. Raises
    :class:`TapError` for filter errors (checked once caught up or after
    :data:`UNKNOWN_FIELD_PROBE` records, and at the end)."""
    show = formatter(fmt)
    keep = RecordFilter(expr) if expr else None
    checked = keep is None
    shown = 0
    for m in messages:
        if m is None:
            if not checked:
                keep.check()  # type: ignore[union-attr]
                checked = True
            continue
        try:
            record = orjson.loads(m.value)
        except orjson.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            flat = unpack_example(record)  # examples travel packed (operators/example_codec.py)
            if flat is not record:
                record = flat
                m = replace(m, value=orjson.dumps(flat))
        if keep is not None:
            passed = keep(record)
            if not checked and keep.evaluated >= UNKNOWN_FIELD_PROBE:
                keep.check()
                checked = True
            if not passed:
                continue
        print(show(m, record), file=out, flush=True)
        shown += 1
        if limit and shown >= limit:
            break
    if keep is not None and not checked:
        keep.check()
    return shown
