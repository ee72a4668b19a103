"""Bytewax partitioned sources for replay logs and the simulator, and input chaining.

Every source emits micro-batches: each item is a ``list`` of raw events (bytes lines
or dicts), never a single event, so per-item Bytewax overhead is paid once per batch.
Each partition's position is its resume state, so a resumed flow continues exactly
where the last snapshot was taken. (The Kafka source lives in ``kafka_io``.)
"""

from __future__ import annotations

import gzip
import itertools
import logging
import operator
import threading
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from events.logfile import LongLine, iter_lines, line_pieces, open_log
from events.model import MAX_RAW_IN_DEAD_LETTER, Rejected
from events.simulator import SimConfig, Simulator
from operators import health

log = logging.getLogger(__name__)


class Gate:
    """A one-way latch: inputs chained after another wait until it opens (in-process)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def open(self) -> None:
        self._event.set()

    def is_open(self) -> bool:
        return self._event.is_set()


class _Pacer:
    """Paces emission by event time: ``speed`` times real time (0 = no pacing)."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self._anchor: tuple[int, float] | None = None

    def delay_s(self, ts_ms: int) -> float:
        """Seconds to wait before an event with ``ts_ms`` is due (<= 0: due now)."""
        if self.speed <= 0:
            return 0.0
        now = time.monotonic()
        if self._anchor is None:
            self._anchor = (ts_ms, now)
            return 0.0
        ts0, wall0 = self._anchor
        return wall0 + (ts_ms - ts0) / 1000.0 / self.speed - now


def _event_ts(raw: bytes | dict[str, Any]) -> int | None:
    try:
        obj = raw if isinstance(raw, dict) else orjson.loads(raw)
        ts = obj.get("ts") if isinstance(obj, dict) else None
    except orjson.JSONDecodeError:
        return None
    return ts if isinstance(ts, int) and not isinstance(ts, bool) else None


_SIZE, _LINE = operator.itemgetter(0), operator.itemgetter(1)
_PLAIN = frozenset((bytes,))


PLAIN_LINE_BYTES = 8192
"""Longest line (with its ending) a replay reads through its fast path (``_ReplayPartition.
_plain_lines``); a longer one, over-long or not, switches it to the general path."""


def _guarded(lines: Iterator[tuple[int, bytes | LongLine]]) -> Iterator[tuple[int, Any]]:
    """``lines``, ending with ``(-1, error)`` when reading fails (a damaged or cut .gz:
    ``EOFError``, ``OSError``, ``zlib.error``), so a batch pulls its lines in one call."""
    try:
        yield from lines
    except (EOFError, OSError, zlib.error) as err:
        yield -1, err


class _ReplayPartition(StatefulSourcePartition[list[bytes | Rejected], int]):
    """Reads a JSONL log in batches of lines; state = byte offset of the next line.

    Lines longer than ``max_bytes`` are skipped while reading (never held whole) and
    emitted as ``Rejected`` (``oversized``); a damaged ``.gz`` is read up to the damage
    and its rest emitted as one ``Rejected`` (``truncated_input``), then the log ends.
    """

    def __init__(self, path: str, offset: int, batch_size: int, speed: float,
                 max_bytes: int | None = None) -> None:
        self._path = path
        self._file = open_log(path)
        if offset:  # a fresh start never seeks, so the log may be a named pipe (FIFO)
            self._file.seek(offset)
        self._lines = _guarded(iter_lines(self._file, max_bytes))
        self._plain = (speed <= 0 and self._file.seekable()
                       and not isinstance(self._file, gzip.GzipFile))
        """Lines are pulled in C (``_plain_lines``) until one is longer than
        ``PLAIN_LINE_BYTES``; False: read through ``_lines``."""
        self._max_bytes = max_bytes
        self._offset = offset
        self._batch_size = batch_size
        self._pacer = _Pacer(speed)
        self._held: list[tuple[int, bytes | Rejected]] = []
        self._awake: datetime | None = None
        self._ended = False

    def next_batch(self) -> list[list[bytes | Rejected]]:
        self._awake = None
        lines = self._plain_lines() if self._plain and not self._ended else None
        if lines is not None:  # what the general path below gives for them
            if len(lines) < self._batch_size:
                self._ended = True
                if not lines:
                    raise StopIteration
            self._offset += sum(map(len, lines))
            # (not isspace: strip() is not empty, without its copy; pieces are never empty)
            batch = [x.rstrip(b"\r\n") for x in lines if not x.isspace()]
            return [batch] if batch else []
        raw = self._held
        self._held = []
        want = self._batch_size - len(raw)
        if want > 0 and not self._ended:
            got = list(itertools.islice(self._lines, want))  # the lines pulled in C
            if len(got) < want:
                self._ended = True
            if set(map(type, map(_LINE, got))) <= _PLAIN:
                raw += got
            else:
                self._special(raw, got)
        if not raw:
            raise StopIteration
        if self._pacer.speed > 0:
            raw = self._pace(raw)
        self._offset += sum(map(_SIZE, raw))
        batch = [x if isinstance(x, Rejected) else x.rstrip(b"\r\n")
                 for _, x in raw if isinstance(x, Rejected) or x.strip()]
        return [batch] if batch else []

    def _plain_lines(self) -> list[bytes] | None:
        """The next batch's lines (fewer at the end) of an unpaced plain file, pulled in C
        (``line_pieces``: ~0.15 us a line less than through ``_lines``). None when a line
        may be longer than ``PLAIN_LINE_BYTES`` (or ``max_bytes``) or the read fails: the
        file is then back where the read began, and this batch and the rest are read
        through ``_lines`` (over-long lines, read errors: ``_special``). At most
        ``batch_size * PLAIN_LINE_BYTES`` bytes are held before a long line is seen."""
        cap = PLAIN_LINE_BYTES if self._max_bytes is None else min(PLAIN_LINE_BYTES,
                                                                     self._max_bytes + 2)
        start = self._file.tell()
        try:
            lines = list(itertools.islice(line_pieces(self._file, cap - 2), self._batch_size))
        except OSError:
            lines = None
        if lines is not None and max(map(len, lines), default=0) < cap:
            return lines
        self._plain = False
        self._file.seek(start)
        self._lines = _guarded(iter_lines(self._file, self._max_bytes))
        return None

    def _special(self, raw: list[tuple[int, bytes | Rejected]], got: list[tuple[int, Any]]
                 ) -> None:
        """Append ``got`` to ``raw`` with an over-long line as ``Rejected`` (``oversized``)
        and a read error (``_guarded``'s last item) as the rest's ``truncated_input``."""
        for size, line in got:
            if size < 0:  # a damaged or cut .gz
                err = line
                at = self._offset + sum(map(_SIZE, raw))
                log.error("%s: unreadable after %d bytes (%s: %s); the rest is one dead letter",
                          self._path, at, type(err).__name__, err)
                raw.append((0, Rejected("truncated_input", f"{self._path}: unreadable after {at} "
                                        f"bytes of input ({type(err).__name__}: {err}); the rest "
                                        "of the file was not read")))
                self._ended = True
                return
            if isinstance(line, LongLine):
                line = Rejected("oversized", f"line of {line.size} bytes exceeds "
                                f"{self._max_bytes} (parse.max_bytes); skipped while reading",
                                line.head[:MAX_RAW_IN_DEAD_LETTER], line.size)
            raw.append((size, line))

    def _pace(self, raw: list[tuple[int, bytes | Rejected]]) -> list[tuple[int, bytes | Rejected]]:
        """Return the lines that are due; hold the rest (they count as unread)."""
        for i, (_, line) in enumerate(raw):
            ts = _event_ts(line) if isinstance(line, bytes) and line.strip() else None
            if ts is None:
                continue
            wait = self._pacer.delay_s(ts)
            if wait > 0:
                self._held = raw[i:]
                self._awake = datetime.now(UTC) + timedelta(seconds=min(wait, 1.0))
                return raw[:i]
        return raw

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        self._file.close()


class ReplaySource(FixedPartitionedSource[list[bytes | Rejected], int]):
    """A JSONL log (plain or .gz), one partition; ``speed`` > 0 paces by event time;
    lines over ``max_bytes`` (None: no limit) are rejected while reading.

    The resume state is the byte offset (of the decompressed stream for .gz) of the
    first line not yet emitted.
    """

    def __init__(self, path: str | Path, batch_size: int = 1000, speed: float = 0.0,
                 max_bytes: int | None = None) -> None:
        self.path = str(path)
        self.batch_size = batch_size
        self.speed = speed
        self.max_bytes = max_bytes

    def list_parts(self) -> list[str]:
        return [f"replay:{self.path}"]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _ReplayPartition:
        return _ReplayPartition(self.path, resume_state or 0, self.batch_size, self.speed,
                                self.max_bytes)


class _OncePartition(StatefulSourcePartition[Any, bool]):
    def __init__(self, item: Any, done: bool) -> None:
        self._item = item
        self._done = done

    def next_batch(self) -> list[Any]:
        if self._done:
            raise StopIteration
        self._done = True
        return [self._item]

    def snapshot(self) -> bool:
        return self._done


class OnceSource(FixedPartitionedSource[Any, bool]):
    """Emits ``item`` once, at start (not again on resume), then ends: lets a stage
    that must report at end of input (the metrics summary) exist even when every input
    is empty."""

    def __init__(self, item: Any) -> None:
        self.item = item

    def list_parts(self) -> list[str]:
        return ["once"]

    def build_part(self, step_id: str, for_part: str, resume_state: bool | None) -> _OncePartition:
        return _OncePartition(self.item, bool(resume_state))


class _SimulatorPartition(StatefulSourcePartition[list[dict[str, Any]], Any]):
    """Generates batches from a Simulator; state = the simulator's own snapshot."""

    def __init__(self, sim: Simulator, batch_size: int) -> None:
        self._sim = sim
        self._batch_size = batch_size

    def next_batch(self) -> list[list[dict[str, Any]]]:
        batch = self._sim.next_batch(self._batch_size)
        if not batch:
            raise StopIteration
        return [batch]

    def snapshot(self) -> Any:
        return self._sim.snapshot()


class SimulatorSource(FixedPartitionedSource[list[dict[str, Any]], Any]):
    """The seeded simulator as a one-partition source (``max_events`` None = endless)."""

    def __init__(self, config: SimConfig, seed: int, max_events: int | None,
                 batch_size: int = 1000) -> None:
        self.config = config
        self.seed = seed
        self.max_events = max_events
        self.batch_size = batch_size

    def list_parts(self) -> list[str]:
        return [f"simulator:{self.seed}"]

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _SimulatorPartition:
        if resume_state is not None:
            sim = Simulator.restore(resume_state)
        else:
            sim = Simulator(self.config, seed=self.seed, max_events=self.max_events)
        return _SimulatorPartition(sim, self.batch_size)


class _GatedPartition(StatefulSourcePartition[Any, Any]):
    def __init__(self, inner: StatefulSourcePartition[Any, Any], done: Gate | None,
                 wait_for: Gate | None) -> None:
        self._inner = inner
        self._done = done
        self._wait_for = wait_for

    def next_batch(self) -> list[Any]:
        health.beat()
        if self._wait_for is not None and not self._wait_for.is_open():
            return []
        try:
            return list(self._inner.next_batch())
        except StopIteration:
            if self._done is not None:
                self._done.open()
            raise

    def next_awake(self) -> datetime | None:
        if self._wait_for is not None and not self._wait_for.is_open():
            return datetime.now(UTC) + timedelta(milliseconds=50)
        return self._inner.next_awake()

    def snapshot(self) -> Any:
        return self._inner.snapshot()

    def close(self) -> None:
        self._inner.close()


class GatedSource(FixedPartitionedSource[Any, Any]):
    """Chains inputs: waits until ``wait_for`` opens; opens ``done`` when every partition ends.

    The gates are in-process latches: chaining (a replay log, then Kafka) is exact in a
    single-process run; in a multi-process run each process only waits for the
    partitions it owns, so run the backfill as its own job there.
    """

    def __init__(self, inner: FixedPartitionedSource[Any, Any], done: Gate | None = None,
                 wait_for: Gate | None = None) -> None:
        self.inner = inner
        self.done = done
        self.wait_for = wait_for
        self._remaining: int | None = None
        self._lock = threading.Lock()

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _GatedPartition:
        inner = self.inner.build_part(step_id, for_part, resume_state)
        return _GatedPartition(inner, self._part_done(), self.wait_for)

    def _part_done(self) -> Gate | None:
        """A per-partition gate; ``done`` opens once every built partition has ended."""
        if self.done is None:
            return None
        outer = self
        with self._lock:
            self._remaining = (self._remaining or 0) + 1

        class _Countdown(Gate):
            def open(self) -> None:
                if self.is_open():
                    return
                super().open()
                with outer._lock:
                    outer._remaining -= 1
                    if outer._remaining == 0:
                        outer.done.open()

        return _Countdown()
