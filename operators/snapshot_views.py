"""The nearline side as serving reads it: the newest verified snapshots of the store.

The user shard owns one ``SnapshotViews`` and polls it once per micro-batch (point in
time: only versions reflecting no event after the batch's first event). Loaded
versions are shared by every shard of the process (``SnapshotReader``'s cache).

Two ways to load (``background``):

* synchronous (replays, ``poll_ms`` 0): the poll verifies and loads new versions itself,
  so the same log always meets the same versions (deterministic replays);
* background (live, wall-clock polling): the poll only installs what the process's one
  loader thread has verified and loaded since the last poll (every new version of a
  round at once: ranker, index and item tables swap together at a batch boundary) and,
  when due, asks it for the next round; the batch never waits for sha256 and ``np.load``.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from models.pool_ranker import load_pool_ranker
from operators.pool_trainer import POOL_KIND
from operators.trainer import load_ranker
from state.item_index import IndexReader
from state.item_table import ItemTable
from state.snapshot_store import Manifest, SnapshotReader, SnapshotStore

log = logging.getLogger(__name__)

Round = dict[str, tuple[Manifest, Any]]
"""Versions verified and loaded off-thread, by reader name (``ranker``, ``pool``,
``index``, ``items-<shard>``), waiting to be installed."""

WARM_TOP = 600
"""Popular and trending top lists built on the loader thread for each new item table
(``ItemTable.top`` caches the longest asked; serving asks 6x a source's count, so this
covers sources of up to 100 items); the first request on a new table finds them."""

_INSTALLED: weakref.WeakKeyDictionary[SnapshotStore, dict[str, tuple[Manifest, Any]]] = (
    weakref.WeakKeyDictionary())
"""Per store, per kind: the manifest a synchronous poll installed last in this process and
its loaded object (``SnapshotReader.refresh``'s ``installed``)."""

_loader: ThreadPoolExecutor | None = None
_loader_lock = threading.Lock()


def _background_loader() -> ThreadPoolExecutor:
    """The process's one snapshot loader thread (every shard's views share it, so a new
    version is read once and the others find it in ``SnapshotReader``'s cache)."""
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-load")
        return _loader


class SnapshotViews:
    """The newest verified serving ranker, central pool ranker copy, index and item
    tables, polled from the store.

    ``background`` (default: ``poll_ms > 0``, i.e. live wall-clock polling) loads new
    versions on the loader thread and installs them at the next poll; otherwise
    ``poll`` loads them itself (replays stay deterministic).
    """

    def __init__(self, store: SnapshotStore, item_shards: list[str], poll_ms: int,
                 background: bool | None = None) -> None:
        self.store = store
        self.poll_ms = poll_ms
        self.background = poll_ms > 0 if background is None else background
        self.ranker = SnapshotReader(store, "ranker", load_ranker)
        self.pool = SnapshotReader(store, POOL_KIND, load_pool_ranker)
        """The central pool ranker's copy (``operators/pool_trainer.py``)."""
        self.index = IndexReader(store)
        self.tables = {s: SnapshotReader(store, f"items-{s}", ItemTable.load) for s in item_shards}
        self._next_poll = 0.0
        self._pending: Future[Round] | None = None
        self._table_cache: tuple[tuple[ItemTable | None, ...], list[ItemTable],
                                 dict[str, ItemTable]] | None = None

    def poll(self, max_ts: int | None = None) -> None:
        """Pick up new snapshot versions (at most every ``poll_ms`` of wall time), only
        versions reflecting no event after ``max_ts`` (event time, ms; None = any).
        In background mode: install the last finished round, then start the next one
        when due (never waits for loading).

        Point in time: serving (and impression-time features) must not see snapshots
        built from events after the ones being processed. A live stream never does
        (snapshots reflect the past); a replay through several processes would, as one
        process's item side runs ahead of another's user shards. (A background round
        uses the ``max_ts`` of the poll that started it: older, so still in the past.)
        """
        if self.background:
            self._install_finished()
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self.poll_ms / 1000.0
        if self.background:
            if self._pending is None:
                self._pending = _background_loader().submit(self._prepare_round, max_ts)
            return
        installed = _INSTALLED.get(self.store)
        if installed is None:
            installed = _INSTALLED[self.store] = {}
        self.ranker.refresh(max_ts, installed)
        self.pool.refresh(max_ts, installed)
        self.index.refresh(max_ts)
        for reader in self.tables.values():
            reader.refresh(max_ts, installed)

    def _readers(self) -> dict[str, SnapshotReader[Any]]:
        return {"ranker": self.ranker, "pool": self.pool, "index": self.index.reader,
                **{reader.kind: reader for reader in self.tables.values()}}

    def _prepare_round(self, max_ts: int | None) -> Round:
        """On the loader thread: the newest verifying version of every reader that is
        newer than its current one (and reflects no event after ``max_ts``)."""
        ready: Round = {}
        for name, reader in self._readers().items():
            for manifest in reader.candidates(max_ts):
                obj = reader.prepare(manifest)
                if obj is not None:
                    if isinstance(obj, ItemTable):  # what the first request would build
                        for source in ("popular", "trending"):
                            obj.top(source, WARM_TOP)
                    ready[name] = (manifest, obj)
                    break
        return ready

    def _install_finished(self) -> bool:
        """Install the finished background round, every version of it at once; True
        when one was installed."""
        pending = self._pending
        if pending is None or not pending.done():
            return False
        self._pending = None
        try:
            ready = pending.result()
        except Exception:  # a bug in a loader; the next round tries again
            log.exception("background snapshot loading failed; keeping the current versions")
            return False
        readers = self._readers()
        for name, (manifest, obj) in ready.items():
            reader = readers[name]
            if manifest["version"] <= (reader.version or 0):
                continue
            if name == "index":
                self.index.install(manifest, obj)
            else:
                reader.install(manifest, obj)
        return bool(ready)

    def wait_loaded(self, timeout_s: float | None = None) -> bool:
        """Background mode: wait for the running round and install it (benchmarks,
        tests, shutdown); True when versions were installed."""
        pending = self._pending
        if pending is None:
            return False
        pending.exception(timeout_s)
        return self._install_finished()

    def loaded_tables(self) -> list[ItemTable]:
        """The loaded item tables, in ``item_shards`` order (a fresh list)."""
        return list(self._tables()[1])

    def table_map(self) -> dict[str, ItemTable]:
        """The loaded item tables by their shard. Cached until a reader's current table
        changes (one identity check per reader per call); callers must not modify it."""
        return self._tables()[2]

    def _tables(self) -> tuple[tuple[ItemTable | None, ...], list[ItemTable], dict[str, ItemTable]]:
        cached = self._table_cache
        readers = self.tables
        if cached is not None and len(cached[0]) == len(readers):
            # the usual case (no reader installed a table since): identity checks only,
            # no tuple of the current tables (ItemTable's dataclass __eq__ compares fields)
            for reader, table in zip(readers.values(), cached[0], strict=True):
                if reader.current is not table:
                    break
            else:
                return cached
        current = tuple(r.current for r in readers.values())
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
                "pool": self.pool, "index": self.index, "tables": self.tables, "background": self.background}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["store"], list(state["tables"]), state["poll_ms"],
                      state.get("background"))
        self.ranker, self.index, self.tables = state["ranker"], state["index"], state["tables"]
        self.pool = state.get("pool", self.pool)  # older state: none yet


class FrozenViews:
    """The snapshots a ``SnapshotViews`` serves at one moment (published snapshots are
    immutable): what ``PointInTime.item_features`` reads, kept to compute features later
    exactly as they were (deferred impression features, ``operators/point_in_time.py``)."""

    __slots__ = ("tables", "loaded", "index", "__weakref__")

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
