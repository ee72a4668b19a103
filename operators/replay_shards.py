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

The partitions one process runs share one reader (``_SharedLog``): each window is read
and split once per process, whatever the number of its partitions (reading it once per
partition cost 5.7% of a one-process run's CPU). A named pipe (FIFO) cannot be read
more than once: it is read as one partition.

When the process runs every shard's partition (a one-process run) and the source has
the flow's parser, the reader parses each window once, in log order, and hands each
partition its part already parsed (``parse_window``, a ``ParsedShardBatch``): the same
events, dead letters and copies as ``split_window`` then ``parse_shard_batch`` give it,
without the ``line_user`` scan of every line (~1-1.4 us a line) and the second parse of
shared lines. (The parser's watermark then advances in log order, as the one-partition
source's does; it decides only ``ts_ahead``, for events ahead of the wall clock.)
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from bytewax.inputs import StatefulSourcePartition

from events.model import EventParser, Item
from operators.sources import ReplaySource, _ReplayPartition


class ShardBatch(list):  # type: ignore[type-arg]
    """A sharded replay partition's micro-batch: raw lines (in log order) for user shard
    ``shard``; ``shared`` holds the positions of lines every partition reads."""

    __slots__ = ("shard", "shared")

    def __init__(self, lines: list[Any], shard: int, shared: frozenset[int]) -> None:
        super().__init__(lines)
        self.shard = shard
        self.shared = shared


class ParsedShardBatch:
    """A sharded replay partition's micro-batch parsed in the reader (``parse_window``):
    what ``parse_shard_batch`` returns for its ``ShardBatch`` (``events`` in log order,
    ``dead`` letters, ``copies``: item events that are copies, not counted), for user
    shard ``shard``. Empty (false) when it holds no event and no dead letter."""

    __slots__ = ("copies", "dead", "events", "max_ts", "shard")

    def __init__(self, events: list[Any], dead: list[dict[str, Any]], copies: int,
                 shard: int) -> None:
        self.events = events
        self.dead = dead
        self.copies = copies
        self.shard = shard
        self.max_ts: int | None = None
        """The largest ``ts`` of ``events`` when ``parse_window`` took it while routing them
        (the parse metrics' ``max_ts``); None: not taken (or no event)."""

    def __len__(self) -> int:
        return len(self.events) + len(self.dead)


_TYPE = re.compile(rb'"type"[ \t]*:[ \t]*"(?:impression|feedback|request|user)"')
"""The top-level ``type`` of a user event (when ``"type"`` occurs once in the line)."""
_USER = re.compile(rb'"user_id"[ \t]*:[ \t]*"([^"\\]*)"')
"""The ``user_id`` string without escapes (when ``"user_id"`` occurs once in the line)."""


def line_user(line: Any) -> str | None:
    """The ``user_id`` of a raw line of a user event (impression, feedback, request,
    user), read without parsing; None when the line must be parsed to know (no single
    top-level ``type`` of a user event, no single ``user_id`` string, escapes, not
    UTF-8, not bytes). Never wrong for a line that parses: ``"type"`` and ``"user_id"``
    occur once, so they are the top-level keys. Two byte counts and two compiled
    patterns, all in C (~0.9 us a line; a Python scan of the bytes cost ~1.9 us)."""
    if (not isinstance(line, bytes) or line.count(b'"type"') != 1
            or line.count(b'"user_id"') != 1 or _TYPE.search(line) is None):
        return None
    user = _USER.search(line)
    if user is None:
        return None
    try:
        return user.group(1).decode()
    except UnicodeDecodeError:
        return None


def split_window(lines: list[Any], shards: Iterable[int], shard_of: Callable[[str], int]
                 ) -> dict[int, ShardBatch]:
    """The part of a window of raw lines for each of ``shards``: its users' lines and
    every shared line (``line_user`` None), in log order. Each line is looked at once."""
    wanted = set(shards)
    parts: dict[int, tuple[list[Any], list[int]]] = {s: ([], []) for s in wanted}
    for line in lines:
        user = line_user(line)
        if user is None:
            for own, shared in parts.values():
                shared.append(len(own))
                own.append(line)
        else:
            part = parts.get(shard_of(user))
            if part is not None:
                part[0].append(line)
    return {s: ShardBatch(own, s, frozenset(shared)) for s, (own, shared) in parts.items()}


def parse_window(lines: list[Any], parser: EventParser, shards: Iterable[int],
                 shard_of: Callable[[str], int]) -> dict[int, ParsedShardBatch]:
    """Each of ``shards``' part of a window of raw lines, parsed once (``parser``, in log
    order): per shard what ``parse_shard_batch`` gives for its ``split_window`` part, given
    that ``shards`` are all the flow's shards (``shard_of`` maps every user into them):
    a user event in its user's shard, an ``item`` event in every shard (a copy in all but
    shard 0), a dead letter where its line goes (its ``line_user``'s shard, else 0)."""
    outs = parser.parse_many(lines)
    parts = {s: ParsedShardBatch([], [], 0, s) for s in shards}
    events = {s: part.events for s, part in parts.items()}
    n_items = 0
    if not parser.dead_in_last:
        # A request's impressions come in a row: one lookup; the largest ts of each part
        # is taken on the way (``top``, of the part being filled: ``top_of`` holds the
        # others'; ``item_top`` the item events', which every part holds).
        user, own, shard, top, item_top = None, None, None, -1, -1
        top_of = dict.fromkeys(parts, -1)
        for out in outs:
            if type(out) is Item:
                n_items += 1
                for part in events.values():
                    part.append(out)
                if out.ts > item_top:
                    item_top = out.ts
            elif out.user_id == user:  # type: ignore[union-attr]
                own.append(out)  # type: ignore[union-attr]
                if out.ts > top:
                    top = out.ts
            else:
                top_of[shard] = top
                user = out.user_id  # type: ignore[union-attr]
                shard = shard_of(user)
                own = events[shard]
                own.append(out)
                top = top_of[shard]
                if out.ts > top:
                    top = out.ts
        top_of[shard] = top
        for s, part in parts.items():
            if part.events:  # (every ts >= 0: a parsed event's)
                part.max_ts = max(top_of[s], item_top)
    else:
        for line, out in zip(lines, outs, strict=True):
            if type(out) is dict:
                user = line_user(line)
                parts[0 if user is None else shard_of(user)].dead.append(out)
            elif type(out) is Item:
                n_items += 1
                for own in events.values():
                    own.append(out)
            else:
                events[shard_of(out.user_id)].append(out)  # type: ignore[union-attr]
    if n_items:
        for s, part in parts.items():
            part.copies = n_items if s != 0 else 0
    return parts


_END, _WAIT, _PRIVATE = "end", "wait", "private"
MAX_AHEAD = 64
"""Windows the shared reader holds for slower partitions of the process at most; beyond
it the fastest partition waits (returns nothing) until they catch up."""


class _SharedLog:
    """One process's reader of a log for the shard partitions it runs: each window is
    read and split once (``split_window``) and held until every local partition took
    its part. A partition whose offset is not the reader's (a resume from positions
    that differ) reads privately instead (``_PRIVATE``)."""

    def __init__(self, source: ShardedReplaySource, offset: int) -> None:
        self.source = source
        self.reader = _ReplayPartition(source.path, offset, source.batch_size, source.speed,
                                       source.max_bytes)
        self.pos = offset
        self.ended = False
        self.members: set[int] = set()
        self.windows: dict[int, tuple[int, dict[int, Any], set[int]]] = {}
        self.lock = threading.Lock()

    def take(self, shard: int, offset: int
             ) -> tuple[ShardBatch | ParsedShardBatch | None, int] | str:
        """(shard's part of the window at ``offset`` or None, the next offset), or
        ``_END``, ``_WAIT`` (nothing due yet), ``_PRIVATE``. The part is parsed
        (``parse_window``) when this process runs every shard and the source has a parser."""
        with self.lock:
            window = self.windows.get(offset)
            if window is None:
                if offset != self.pos:
                    return _PRIVATE
                if self.ended:
                    return _END
                if len(self.windows) >= MAX_AHEAD:
                    return _WAIT
                try:
                    batches = self.reader.next_batch()
                except StopIteration:
                    self.ended = True
                    return _END
                nxt = self.reader.snapshot()
                if nxt == self.pos:
                    return _WAIT  # paced: the lines are not due yet
                lines = batches[0] if batches else []
                source = self.source
                if source.parser is not None and len(self.members) == source.shards:
                    parts = parse_window(lines, source.parser, self.members, source.shard_of)
                else:
                    parts = split_window(lines, self.members, source.shard_of)
                window = self.windows[offset] = (nxt, parts, set(self.members))
                self.pos = nxt
            nxt, parts, remaining = window
            remaining.discard(shard)
            if not remaining:
                del self.windows[offset]
            return parts.get(shard), nxt

    def next_awake(self) -> datetime | None:
        return self.reader.next_awake()

    def leave(self, shard: int) -> None:
        with self.lock:
            self.members.discard(shard)
            for offset, (_, _, remaining) in list(self.windows.items()):
                remaining.discard(shard)
                if not remaining:
                    del self.windows[offset]
            if not self.members:
                self.reader.close()


class _ShardPartition(StatefulSourcePartition[ShardBatch | ParsedShardBatch, int]):
    """One user shard's part of each window of the log; state = the byte offset of the
    next window (as ``_ReplayPartition``)."""

    def __init__(self, shared: _SharedLog, shard: int, offset: int) -> None:
        self._shared = shared
        self._shard = shard
        self._offset = offset
        self._private: _ReplayPartition | None = None

    def next_batch(self) -> list[ShardBatch | ParsedShardBatch]:
        if self._private is None:
            got = self._shared.take(self._shard, self._offset)
            if got == _END:
                raise StopIteration
            if got == _WAIT:
                return []
            if got != _PRIVATE:
                part, self._offset = got  # type: ignore[misc]
                return [part] if part else []
            source = self._shared.source
            self._private = _ReplayPartition(source.path, self._offset, source.batch_size,
                                             source.speed, source.max_bytes)
        batches = self._private.next_batch()  # StopIteration at the end
        self._offset = self._private.snapshot()
        if not batches:
            return []
        part = split_window(batches[0], (self._shard,), self._shared.source.shard_of)[self._shard]
        return [part] if part else []

    def next_awake(self) -> datetime | None:
        return (self._private or self._shared).next_awake()

    def snapshot(self) -> int:
        return self._offset

    def close(self) -> None:
        if self._private is not None:
            self._private.close()
        self._shared.leave(self._shard)


class ShardedReplaySource(ReplaySource):
    """A JSONL log (plain or .gz) as one partition per user shard (``shards``, with the
    flow's ``shard_of``: user id -> shard index); a named pipe is one partition. The
    partitions a process runs share one reader (``_SharedLog``); with ``parser`` (the
    flow's), a process that runs all of them parses each window there once."""

    def __init__(self, path: str | Path, shards: int, shard_of: Callable[[str], int],
                 batch_size: int = 1000, speed: float = 0.0,
                 max_bytes: int | None = None, parser: EventParser | None = None) -> None:
        super().__init__(path, batch_size, speed, max_bytes)
        self.shards = shards
        self.shard_of = shard_of
        self.parser = parser
        self._shared: _SharedLog | None = None
        self._lock = threading.Lock()

    def _sharded(self) -> bool:
        return self.shards > 1 and Path(self.path).is_file()

    def list_parts(self) -> list[str]:
        if not self._sharded():
            return super().list_parts()
        return [f"replay:{self.path}#{j:03d}" for j in range(self.shards)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None
                   ) -> StatefulSourcePartition[Any, int]:
        if "#" not in for_part or not for_part.startswith("replay:"):
            return super().build_part(step_id, for_part, resume_state)
        shard = int(for_part.rsplit("#", 1)[1])
        offset = resume_state or 0
        with self._lock:
            if self._shared is None or not self._shared.members:
                self._shared = _SharedLog(self, offset)
            shared = self._shared
        with shared.lock:
            shared.members.add(shard)
        return _ShardPartition(shared, shard, offset)


def parse_shard_batch(parser: EventParser, batch: ShardBatch, shard_of: Callable[[str], int]
                      ) -> tuple[list[Any], list[dict[str, Any]], int]:
    """Parse a ``ShardBatch`` in order: (events, dead letters, item events that are copies
    and must not be counted). Of a shared line, an ``item`` event is kept (counted in
    partition 0 only), a user event only in its shard's partition, a dead letter only in
    partition 0."""
    shared, shard = batch.shared, batch.shard
    if not shared:  # all its lines are its own: the batch parse as it is
        return (*parser.parse_batch(batch), 0)
    outs = parser.parse_many(batch)
    copies = 0
    if not parser.dead_in_last:  # only the shared lines need a look (item events, mostly)
        drop: set[int] = set()
        for i in shared:
            out = outs[i]
            if isinstance(out, Item):
                copies += shard != 0
            elif shard_of(out.user_id) != shard:  # type: ignore[union-attr]
                drop.add(i)
        if drop:
            outs = [out for i, out in enumerate(outs) if i not in drop]
        return outs, [], copies
    events: list[Any] = []
    dead: list[dict[str, Any]] = []
    for i, out in enumerate(outs):
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
