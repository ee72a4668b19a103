"""The nearline side as serving reads it: the newest verified snapshots of the store.

The user shard owns one ``SnapshotViews`` and polls it once per micro-batch (point in
time: only versions reflecting no event after the batch's first event). Loaded
versions are shared by every shard of the process (``SnapshotReader``'s cache).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from operators.trainer import load_ranker
from state.item_index import IndexReader
from state.item_table import ItemTable
from state.snapshot_store import SnapshotReader, SnapshotStore


class SnapshotViews:
    """The newest verified serving ranker, index and item tables, polled from the store."""

    def __init__(self, store: SnapshotStore, item_shards: list[str], poll_ms: int) -> None:
        self.store = store
        self.poll_ms = poll_ms
        self.ranker = SnapshotReader(store, "ranker", load_ranker)
        self.index = IndexReader(store)
        self.tables = {s: SnapshotReader(store, f"items-{s}", ItemTable.load) for s in item_shards}
        self._next_poll = 0.0
        self._table_cache: tuple[tuple[ItemTable | None, ...], list[ItemTable],
                                 dict[str, ItemTable]] | None = None

    def poll(self, max_ts: int | None = None) -> None:
        """Pick up new snapshot versions (at most every ``poll_ms`` of wall time), only
        versions reflecting no event after ``max_ts`` (event time, ms; None = any).

        Point in time: serving (and impression-time features) must not see snapshots
        built from events after the ones being processed. A live stream never does
        (snapshots reflect the past); a replay through several processes would, as one
        process's item side runs ahead of another's user shards.
        """
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self.poll_ms / 1000.0
        self.ranker.refresh(max_ts)
        self.index.refresh(max_ts)
        for reader in self.tables.values():
            reader.refresh(max_ts)

    def loaded_tables(self) -> list[ItemTable]:
        """The loaded item tables, in ``item_shards`` order (a fresh list)."""
        return list(self._tables()[1])

    def table_map(self) -> dict[str, ItemTable]:
        """The loaded item tables by their shard. Cached until a reader's current table
        changes (one identity check per reader per call); callers must not modify it."""
        return self._tables()[2]

    def _tables(self) -> tuple[tuple[ItemTable | None, ...], list[ItemTable], dict[str, ItemTable]]:
        current = tuple(r.current for r in self.tables.values())
        cached = self._table_cache
        if (cached is None or len(cached[0]) != len(current)
                or any(a is not b for a, b in zip(cached[0], current, strict=True))):
            loaded = [t for t in current if t is not None]
            cached = self._table_cache = (current, loaded, {t.shard: t for t in loaded})
        return cached

    def __getstate__(self) -> dict[str, Any]:
        """Recovery state: the readers, each as its current manifest (reloaded and verified
        on resume, so a resumed shard serves the versions it served, even when the
        store's LATEST is refused), never the loaded snapshot objects."""
        return {"store": self.store, "poll_ms": self.poll_ms, "ranker": self.ranker,
                "index": self.index, "tables": self.tables}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["store"], list(state["tables"]), state["poll_ms"])
        self.ranker, self.index, self.tables = state["ranker"], state["index"], state["tables"]


class FrozenViews:
    """The snapshots a ``SnapshotViews`` serves at one moment (published snapshots are
    immutable): what ``PointInTime.item_features`` reads, kept to compute features later
    exactly as they were (deferred impression features, ``operators/point_in_time.py``)."""

    __slots__ = ("tables", "loaded", "index")

    def __init__(self, views: SnapshotViews) -> None:
        self.tables = views.table_map()
        self.loaded = views.loaded_tables()
        self.index = _FrozenIndex(views.index.index)

    def current(self, views: SnapshotViews) -> bool:
        """Whether ``views`` still serves exactly these snapshots."""
        return views.table_map() is self.tables and views.index.index is self.index.index

    def table_map(self) -> dict[str, ItemTable]:
        return self.tables

    def loaded_tables(self) -> list[ItemTable]:
        return list(self.loaded)


class _FrozenIndex:
    """``IndexReader``'s read methods over one loaded index version."""

    __slots__ = ("index",)

    def __init__(self, index: Any) -> None:
        self.index = index

    def vectors(self, item_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None:
            return np.zeros((len(item_ids), 0), np.float32), np.zeros(len(item_ids), bool)
        return self.index.vectors(item_ids)
