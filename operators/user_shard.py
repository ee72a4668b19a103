"""The user-shard stage: everything keyed by user shard runs here, in event order.

One Bytewax key per user shard (``u00``..), each holding a ``UserShard``: the
joiner (and, as later stages land, profiles, user vectors and serving), so all
user-side state of a user lives on one worker and snapshots as one object.
Input items are micro-batches of events; each produces one ``ShardOutput`` dict
of record lists (``examples``, ``late-labels``, ...).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from bytewax.operators import StatefulLogic

from models.sampling import NegativeSampler
from operators.events import Event, Item
from state.join_state import JoinConfig, Joiner
from state.user_history import UserHistory

Record = dict[str, Any]
ShardOutput = dict[str, list[Record]]


class UserShard:
    """All user-side state of one shard; pure Python, driven by ``UserShardLogic``."""

    def __init__(self, join: JoinConfig, sampler: NegativeSampler) -> None:
        self.shard = ""
        self.history = UserHistory()
        self.joiner = Joiner(join, sampler, self.history)
        self.catalog: dict[str, Item] = {}
        self.idle_flush_s = join.idle_flush_s

    def process(self, shard: str, events: list[Event]) -> ShardOutput:
        """Apply a micro-batch of shard ``shard`` in order, close due windows, return outputs."""
        self.shard = shard
        joiner = self.joiner
        for event in events:
            kind = event.type
            if kind == "impression":
                joiner.on_impression(event)
            elif kind == "feedback":
                joiner.on_feedback(event)
            elif kind == "item":
                self.catalog[event.item_id] = event
                joiner.observe(event.ts)
            else:
                joiner.observe(event.ts)
        joiner.advance()
        return self._drain()

    def idle(self, idle_s: float) -> ShardOutput:
        """Wall-clock fallback for idle live streams: advance by ``idle_s`` seconds."""
        self.joiner.advance_idle(int(idle_s * 1000))
        return self._drain()

    def flush(self) -> ShardOutput:
        """End of input: close every pending window."""
        self.joiner.flush()
        return self._drain()

    def counters(self) -> dict[str, int]:
        """This shard's joiner counters plus sizes of its pending state."""
        out = asdict(self.joiner.counters)
        out["pending"] = len(self.joiner.pending)
        out["orphans"] = len(self.joiner.orphans)
        return out

    def has_pending(self) -> bool:
        return bool(self.joiner.pending or self.joiner.orphans)

    def _drain(self) -> ShardOutput:
        examples, late = self.joiner.drain()
        out: ShardOutput = {}
        if examples:
            out["examples"] = examples
        if late:
            out["late-labels"] = late
        if out:
            out["counters"] = [{"shard": self.shard, "counters": self.counters()}]
        return out


class UserShardLogic(StatefulLogic[tuple[str, list[Event]], ShardOutput, UserShard]):
    """Bytewax glue: batches in, outputs out, wall-clock idle fallback, flush at EOF."""

    def __init__(self, shard: UserShard) -> None:
        self.shard = shard
        self._last_input = time.monotonic()

    def on_item(self, value: tuple[str, list[Event]]) -> tuple[list[ShardOutput], bool]:
        self._last_input = time.monotonic()
        out = self.shard.process(*value)
        return ([out] if out else []), StatefulLogic.RETAIN

    def on_notify(self) -> tuple[list[ShardOutput], bool]:
        idle = time.monotonic() - self._last_input
        if idle < self.shard.idle_flush_s:
            return [], StatefulLogic.RETAIN
        self._last_input = time.monotonic()
        out = self.shard.idle(idle)
        return ([out] if out else []), StatefulLogic.RETAIN

    def on_eof(self) -> tuple[list[ShardOutput], bool]:
        out = self.shard.flush()
        return ([out] if out else []), StatefulLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if not self.shard.has_pending():
            return None
        return datetime.now(UTC) + timedelta(seconds=self.shard.idle_flush_s)

    def snapshot(self) -> UserShard:
        return self.shard


def route_events(events: list[Event], shards: int,
                 shard_of: Any) -> list[tuple[str, tuple[str, list[Event]]]]:
    """Split a micro-batch into per-user-shard batches, order kept within each shard.

    ``item`` events carry no user: they are broadcast to every shard (catalog).
    """
    buckets: dict[int, list[Event]] = {}
    for event in events:
        if isinstance(event, Item):
            for s in range(shards):
                buckets.setdefault(s, []).append(event)
        else:
            buckets.setdefault(shard_of(event.user_id), []).append(event)
    return [(shard_key(s), (shard_key(s), batch)) for s, batch in buckets.items()]


def shard_key(index: int) -> str:
    """The Bytewax key of user shard ``index``."""
    return f"u{index:03d}"

