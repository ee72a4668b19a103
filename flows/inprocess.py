"""The flow's stages driven directly in one process, without Bytewax (benchmarks, tests).

``InProcessFlow(config)`` wires the same stage objects as ``flows.recsys.build`` (user
shards, the ranker trainer, item shards, the index stage, one snapshot store) in the
same order, and ``feed(raw events)`` pushes one micro-batch through all of them at once:
parse -> route by user shard -> ``UserShard.process`` -> examples to the trainer, item
updates to the item shards -> index changes to the index stage. Every schedule runs on
event time, snapshots are read back by event time (``serving.poll_ms`` is forced to 0:
every micro-batch), and the index is built with one thread, so a run is deterministic
for its input: the closed-loop benchmark (``bench/closed_loop.py``) answers requests
with it and feeds the users' responses back in.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from events.model import EventParser
from flows.config import Config, load_config
from models.rankers import positive_hold_ms
from operators.index_builder import IndexStage
from operators.item_shard import ItemShard, item_shard_key, route_updates
from operators.snapshot_views import SnapshotViews
from operators.trainer import Trainer
from operators.user_shard import UserShard, route_events, shard_key
from state.hashing import ShardOf
from state.sampling import NegativeSampler
from state.snapshot_store import SnapshotStore

Record = dict[str, Any]


class InProcessFlow:
    """User shards, trainer, item shards and index of one config, fed batch by batch.

    ``snapshot_dir``: where the store lives (a fresh temporary directory when None,
    removed by :meth:`close`).
    """

    def __init__(self, config: Config | dict[str, Any] | None = None,
                 snapshot_dir: str | Path | None = None) -> None:
        cfg = load_config(config) if not isinstance(config, Config) else config
        cfg.serving = replace(cfg.serving, poll_ms=0)
        cfg.index = replace(cfg.index, threads=1)
        self.config = cfg
        self._tmp = tempfile.TemporaryDirectory(prefix="streamrec-inproc-") if snapshot_dir is None else None
        root = Path(snapshot_dir) if snapshot_dir is not None else Path(self._tmp.name)
        self.store = SnapshotStore(root / cfg.app, keep=cfg.snapshots.keep)
        self.parser = EventParser(cfg.parse.max_bytes, max_future_skew_ms=10 * 365 * 86_400_000)
        n_users, n_items = cfg.shards.users, cfg.shards.items
        self.user_shard_of = ShardOf(n_users)
        self.item_shard_of = ShardOf(n_items, item_shard_key)
        sampler = NegativeSampler(cfg.sampler.negative_rate, cfg.sampler.seed)
        item_keys = [item_shard_key(i) for i in range(n_items)]
        items_on = cfg.items.enabled
        self.users: dict[str, UserShard] = {}
        for s in range(n_users):
            views = SnapshotViews(self.store, item_keys, 0)
            self.users[shard_key(s)] = UserShard(
                cfg.join, sampler, features=cfg.features,
                mf=cfg.items.mf_config() if items_on else None,
                covis=cfg.items.covis_config() if items_on else None,
                serving=cfg.serving, views=views, item_shard_of=self.item_shard_of,
                max_users=cfg.shards.max_users, max_items=cfg.shards.max_items,
                hot_profiles=cfg.shards.hot_profiles, covis_any=items_on and cfg.items.covis_any)
        self.items = ({key: ItemShard(cfg.items, self.store, cfg.features,
                                      hot_profiles=cfg.shards.hot_profiles) for key in item_keys}
                      if items_on else {})
        dim = cfg.items.mf_config().dim
        max_pending = 2 * n_items * cfg.items.mf_config().max_items
        self.index = IndexStage(cfg.index, dim, self.store, max_pending) if items_on else None
        self.trainer = (Trainer(cfg.ranker, cfg.sampler.negative_rate, self.store,
                                positive_hold_ms(cfg.join)) if cfg.ranker.enabled else None)
        self.dead_letters: list[Record] = []
        self.examples = 0

    def feed(self, raw: list[Record], ingest_ns: int = 0) -> list[Record]:
        """One micro-batch of raw events through every stage; returns its recommendations."""
        events, dead = self.parser.parse_batch(raw)
        self.dead_letters.extend(dead)
        recs: list[Record] = []
        updates: list[Any] = []
        examples: list[Record] = []
        for key, (_, batch, _ns) in route_events(events, len(self.users), self.user_shard_of,
                                                 ingest_ns):
            out = self.users[key].process(key, batch, ingest_ns)
            recs.extend(out.get("recommendations", ()))
            updates.extend(out.get("item-updates", ()))
            examples.extend(out.get("examples", ()))
        self._downstream(examples, updates)
        return recs

    def finish(self) -> None:
        """End of input: flush the user shards, then the item side and the trainer."""
        examples: list[Record] = []
        for shard in self.users.values():
            examples.extend(shard.flush().get("examples", ()))
        self._downstream(examples, [])
        for shard in self.items.values():
            shard.finish()
        if self.index is not None:
            self.index.finish()
        if self.trainer is not None:
            self.trainer.finish()

    def _downstream(self, examples: list[Record], updates: list[Any]) -> None:
        self.examples += len(examples)
        if self.trainer is not None and examples:
            self.trainer.process(examples)
        if not self.items or not updates:
            return
        buckets = route_updates(updates, self.item_shard_of)
        for key in sorted(buckets):
            for change in self.items[key].process(key, buckets[key]).get("index", ()):
                assert self.index is not None
                self.index.add(change)

    def counters(self) -> dict[str, int]:
        """User-shard counters summed over the shards."""
        total: dict[str, int] = {}
        for shard in self.users.values():
            for name, value in shard.counters().items():
                total[name] = total.get(name, 0) + value
        return total

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
