"""The central pool ranker trainer (one Bytewax key, ``pool``) and its published copies.

Every user shard matches its users' next positives against the pool it last served
them (``models.pool_ranker.PoolModel``) and sends each match as a ``PoolPair`` (the
pool's float32 feature matrix and the target row). This stage keeps ONE
``PoolRanker`` for all shards: per pair it updates the running feature scale with the
pool and takes one Adagrad step on ``log P(target | pool)`` (``observe_learn``: the
pool's input expanded once for both). Every
``serving.pool.sync_every_pairs`` pairs (or ``sync_interval_ms`` of event time) it
writes the model into the snapshot store as a new immutable ``pool-ranker`` version
(arrays only), stamped with the newest pair's event time; the user shards read it
through their ``SnapshotViews`` like the LR ranker's copy: by event time in replays
(deterministic), by wall-clock polling live.

Measured on MovieLens (docs/ranker.md): with 8 user shards the central model is
+0.002 HR@10 over per-shard models at 50k events (its copies lag a micro-batch, which
costs about what a shard's 1/8 of the outcomes costs), and unlike them it does not
degrade with the shard count. The Bytewax glue is the
ranker trainer's (``operators.trainer.TrainerLogic``).
"""

from __future__ import annotations

from events.model import Record, processing_error
from models.pool_ranker import PoolPair, PoolRanker, PoolRankerConfig, save_pool_ranker
from state.snapshot_store import Manifest, SnapshotStore

POOL_KIND = "pool-ranker"
"""Snapshot kind of the central pool ranker's copies."""

PoolTrainerOutput = dict[str, list[Record]]


class PoolTrainer:
    """The central pool ranker, its sync schedule and counters (pure Python)."""

    def __init__(self, config: PoolRankerConfig, store: SnapshotStore) -> None:
        self.config = config
        self.store = store
        self.ranker = PoolRanker(list(config.features), config.learning_rate,
                                 ranks=config.rank_features)
        self.pairs = 0
        self.pair_bytes = 0
        """Payload received (float32 matrices and targets, bytes)."""
        self.skipped = 0
        """Pairs whose matrix does not have the configured features (not learned)."""
        self.max_ts_ms: int | None = None
        self.last_sync_ts_ms: int | None = None
        self.since_sync = 0
        self.version: int | None = None

    def process(self, pairs: list[PoolPair]) -> PoolTrainerOutput:
        """Learn a batch of pairs in order; publish a copy when due. A pair that fails
        becomes a ``processing_error`` dead letter (its ts and target) and the rest go on."""
        ranker = self.ranker
        width = len(ranker.names)
        dead: list[Record] = []
        for pair in pairs:
            x = pair.x
            if x.ndim != 2 or x.shape[1] != width or not 0 <= pair.target < len(x):
                self.skipped += 1
                continue
            try:
                ranker.observe_learn(x, pair.target)
            except Exception as err:  # one bad pair must not stop training
                dead.append(processing_error("pool_trainer", {"ts": pair.ts,
                                                              "target": pair.target}, err))
                continue
            self.pairs += 1
            self.pair_bytes += pair.nbytes
            self.since_sync += 1
            if self.max_ts_ms is None or pair.ts > self.max_ts_ms:
                self.max_ts_ms = pair.ts
        out: PoolTrainerOutput = {}
        if dead:
            out["dead-letters"] = dead
        if self.since_sync and self.max_ts_ms is not None and (
                self.last_sync_ts_ms is None  # the first copy as soon as anything was learned
                or self.since_sync >= self.config.sync_every_pairs
                or self.max_ts_ms - self.last_sync_ts_ms >= self.config.sync_interval_ms):
            out["snapshots"] = [self.sync()]
        return out

    def sync(self) -> Manifest:
        """Write the model as a new ``pool-ranker`` version; returns its manifest."""
        ts = self.max_ts_ms or 0
        manifest = self.store.write(POOL_KIND, "npz", lambda p: save_pool_ranker(self.ranker, p),
                                    ts, {"pairs": self.pairs})
        self.version = manifest["version"]
        self.last_sync_ts_ms = ts
        self.since_sync = 0
        return manifest

    def report(self) -> Record:
        """A ``metrics`` record: pairs learned, their payload, the copy and its weights."""
        return {"kind": "pool_trainer_final", "ts": self.max_ts_ms, "version": self.version,
                "pairs": self.pairs, "skipped": self.skipped,
                "pair_bytes_mean": round(self.pair_bytes / self.pairs, 1) if self.pairs else None,
                "weights": {k: round(v, 4) for k, v in self.ranker.weights().items()}}

    def finish(self) -> PoolTrainerOutput:
        """End of input: a last copy (if anything was learned since) and the report."""
        out: PoolTrainerOutput = {"metrics": [self.report()]}
        if self.since_sync:
            out["snapshots"] = [self.sync()]
        return out
