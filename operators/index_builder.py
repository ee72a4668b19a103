"""The index builder: one key (``index``) that owns the mutable HNSW index.

It collects item-vector changes from every item shard and, every
``index.refresh_interval_ms`` of event time (and at end of input), applies them
(incremental upsert / mark-deleted, or a full rebuild when cheaper) and publishes a
versioned immutable snapshot (kind ``index``) whose manifest goes to ``snapshots``.
Serving never touches this index: it loads the published snapshots.
"""

from __future__ import annotations

import numpy as np
from bytewax.operators import StatefulLogic

from state.item_index import IndexBuilder, IndexConfig
from state.snapshot_store import Manifest, SnapshotStore

IndexChange = tuple[list[str], np.ndarray | None, list[str], int]
"""(upsert ids, vectors (n, dim) or None, removed ids, event time ms of the change)."""


class IndexStage:
    """Pending changes (last write wins per item) and the refresh schedule.

    ``max_pending``: changed items held between refreshes at most (0 = no limit); beyond
    it the index refreshes before its interval, so under heavy churn the pending
    vectors stay bounded by the item tables' capacity instead of the churn rate.
    """

    def __init__(self, config: IndexConfig, dim: int, store: SnapshotStore,
                 max_pending: int = 0) -> None:
        self.config = config.with_dim(dim)
        self.max_pending = max_pending
        self.store = store
        self.builder = IndexBuilder(self.config)
        self.pending: dict[str, np.ndarray | None] = {}
        self.max_ts_ms: int | None = None
        self.last_publish_ms: int | None = None

    def add(self, change: IndexChange) -> list[Manifest]:
        """Queue one shard's change; publish when the refresh interval has passed."""
        ids, vectors, removed, ts = change
        for i, item in enumerate(ids):
            self.pending[item] = vectors[i]
        for item in removed:
            self.pending[item] = None
        if self.max_ts_ms is None or ts > self.max_ts_ms:
            self.max_ts_ms = ts
        if self.last_publish_ms is None:
            self.last_publish_ms = self.max_ts_ms
        if (self.max_ts_ms - self.last_publish_ms >= self.config.refresh_interval_ms
                or 0 < self.max_pending < len(self.pending)):
            return [self.refresh()]
        return []

    def refresh(self) -> Manifest:
        """Apply pending changes and publish a snapshot."""
        ups = [i for i, v in self.pending.items() if v is not None]
        gone = [i for i, v in self.pending.items() if v is None]
        vectors = np.stack([self.pending[i] for i in ups]) if ups else None
        self.builder.apply(ups, vectors, gone)
        self.pending.clear()
        ts = self.max_ts_ms or 0
        self.last_publish_ms = ts
        return self.builder.publish(self.store, ts)

    def finish(self) -> list[Manifest]:
        return [self.refresh()] if self.pending else []


class IndexBuilderLogic(StatefulLogic[IndexChange, list[Manifest], IndexStage]):
    """Bytewax glue for the single-key index builder."""

    def __init__(self, stage: IndexStage) -> None:
        self.stage = stage

    def on_item(self, value: IndexChange) -> tuple[list[list[Manifest]], bool]:
        out = self.stage.add(value)
        return ([out] if out else []), StatefulLogic.RETAIN

    def on_eof(self) -> tuple[list[list[Manifest]], bool]:
        out = self.stage.finish()
        self.stage.store.flush()  # end of input: every version durable before the flow ends
        return ([out] if out else []), StatefulLogic.RETAIN

    def snapshot(self) -> IndexStage:
        return self.stage



