"""A replay log read as one partition per user shard, so several processes share the parsing.

``ShardedReplaySource`` lists one partition per user shard (``replay:<path>#<j:03d>``).
Bytewax 0.21 places the partitions of a source round robin in the sorted order of
their names (partition ``j`` on worker ``j mod W``), which is where
``operators.placement`` puts user shard ``j``: each process reads the log, but parses
and routes only its own users' events, and no user event crosses to another process.

Every partition reads the same windows of ``batch_size`` lines as the one-partition
``ReplaySource`` and emits the part of each window that is its shard's (a
``ShardBatch``), so a user shard gets exactly the events, in the same order and the same
micro-batches, that it gets from one partition:

* a line whose user can be read without parsing (``line_user``: one top-level
  ``"type"`` of a user event and one ``"user_id"`` string without escapes) goes to the
  partition of that user's shard only;
* every other line (``item`` events, which every shard needs for its catalog, malformed
  lines, unusual spellings) is *shared*: every partition parses it
  (``parse_shard_batch``) and keeps an ``item`` event for its own shard, a user event
  only if the user is its shard's, and a dead letter only in partition 0, so each line
  is counted and dead-lettered once.

A named pipe (FIFO) cannot be read once per partition: it is read as one partition.
Costs: every partition reads the whole log and looks for the user of every line
(``bytes.find``, ~0.3 us a line), ~1% of the flow's CPU with 8 shards in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from events.model import EventParser, Item
from operators.sources import ReplaySource, _ReplayPartition

_USER_TYPES = (b'impression"', b'feedback"', b'request"', b'user"')


class ShardBatch(list):  # type: ignore[type-arg]
    """A sharded replay partition's micro-batch: raw lines (in log order) for user shard
    ``shard``; ``shared`` holds the positions of lines every partition reads."""

    __slots__ = ("shard", "shared")

    def __init__(self, lines: list[Any], shard: int, shared: frozenset[int]) -> None:
        super().__init__(lines)
        self.shard = shard
        self.shared = shared


def _string_after(line: bytes, key: bytes) -> bytes | None:
    """The raw bytes of the JSON string value of ``key`` (``b'"user_id"'``) when ``key``
    occurs exactly once in ``line`` and its value is a string without escapes; else None."""
    i = line.find(key)
    if i < 0 or line.find(key, i + len(key)) >= 0:
        return None
    j = i + len(key)
    n = len(line)
    while j < n and line[j] in b" \t":
        j += 1
    if j >= n or line[j] != 0x3A:  # ':'
        return None
    j += 1
    while j < n and line[j] in b" \t":
        j += 1
    if j >= n or line[j] != 0x22:  # '"'
        return None
    end = line.find(b'"', j + 1)
    if end < 0:
        return None
    value = line[j + 1:end]
    return None if b"\\" in value else value


def line_user(line: Any) -> str | None:
    """The ``user_id`` of a raw line of a user event (impression, feedback, request,
    user), read without parsing; None when the line must be parsed to know (no single
    top-level ``type`` of a user event, no single ``user_id`` string, escapes, not
    UTF-8, not bytes). Never wrong for a line that parses: ``"type"`` and ``"user_id"``
    occur once, so they are the top-level keys."""
    if not isinstance(line, bytes):
        return None
    kind = _string_after(line, b'"type"')
    if kind is None or not (kind + b'"').startswith(_USER_TYPES):
        return None
    user = _string_after(line, b'"user_id"')
    if user is None:
        return None
    try:
        return user.decode()
    except UnicodeDecodeError:
        return None


class _ShardPartition(_ReplayPartition):
    """One user shard's share of each window of the log (state: the byte offset, as
    ``_ReplayPartition``)."""

    def __init__(self, path: str, offset: int, batch_size: int, speed: float,
                 max_bytes: int | None, shard: int, shard_of: Callable[[str], int]) -> None:
        super().__init__(path, offset, batch_size, speed, max_bytes)
        self._shard = shard
        self._shard_of = shard_of

    def next_batch(self) -> list[ShardBatch]:  # type: ignore[override]
        windows = super().next_batch()
        if not windows:
            return []
        own: list[Any] = []
        shared: list[int] = []
        shard, shard_of = self._shard, self._shard_of
        for line in windows[0]:
            user = line_user(line)
            if user is None:
                shared.append(len(own))
                own.append(line)
            elif shard_of(user) == shard:
                own.append(line)
        return [ShardBatch(own, shard, frozenset(shared))] if own else []


class ShardedReplaySource(ReplaySource):
    """A JSONL log (plain or .gz) as one partition per user shard (``shards``, with the
    flow's ``shard_of``: user id -> shard index); a named pipe is one partition."""

    def __init__(self, path: str | Path, shards: int, shard_of: Callable[[str], int],
                 batch_size: int = 1000, speed: float = 0.0,
                 max_bytes: int | None = None) -> None:
        super().__init__(path, batch_size, speed, max_bytes)
        self.shards = shards
        self.shard_of = shard_of

    def _sharded(self) -> bool:
        return self.shards > 1 and Path(self.path).is_file()

    def list_parts(self) -> list[str]:
        if not self._sharded():
            return super().list_parts()
        return [f"replay:{self.path}#{j:03d}" for j in range(self.shards)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _ReplayPartition:
        if "#" not in for_part or not for_part.startswith("replay:"):
            return super().build_part(step_id, for_part, resume_state)
        shard = int(for_part.rsplit("#", 1)[1])
        return _ShardPartition(self.path, resume_state or 0, self.batch_size, self.speed,
                               self.max_bytes, shard, self.shard_of)


def parse_shard_batch(parser: EventParser, batch: ShardBatch, shard_of: Callable[[str], int]
                      ) -> tuple[list[Any], list[dict[str, Any]], int]:
    """Parse a ``ShardBatch`` in order: (events, dead letters, item events that are copies
    and must not be counted). Of a shared line, an ``item`` event is kept (counted in
    partition 0 only), a user event only in its shard's partition, a dead letter only in
    partition 0."""
    events: list[Any] = []
    dead: list[dict[str, Any]] = []
    copies = 0
    shared, shard = batch.shared, batch.shard
    for i, raw in enumerate(batch):
        out = parser.parse(raw)
        if isinstance(out, dict):
            if shard == 0 or i not in shared:
                dead.append(out)
        elif i not in shared:
            events.append(out)
        elif isinstance(out, Item):
            events.append(out)
            copies += shard != 0
        elif shard_of(out.user_id) == shard:
            events.append(out)
    return events, dead, copies
