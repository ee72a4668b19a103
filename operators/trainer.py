"""The ranker trainer (Monolith's training copy) and its sync to the serving copy.

One Bytewax key (``ranker``). For each micro-batch of examples: score every example
with the training copy *before* learning from it (progressive AUC, log loss,
calibration), then learn. Every ``sync_interval_ms`` of event time (or every
``sync_every_examples`` examples) the training copy is frozen into a serving copy,
written into the snapshot store as data (``models.ranker_io``: arrays and JSON, no
pickle) as a new immutable version, and its manifest is
emitted (``snapshots`` output, and the serving stage, which loads it verified).
Metrics go out every ``metrics_every_examples`` examples and at end of input.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from bytewax.operators import StatefulLogic

from events.model import Record, processing_error
from models.features import example_features
from models.metrics import ProgressiveMetrics
from models.ranker_io import load_ranker_file, save_ranker
from models.rankers import Ranker, make_ranker
from state.settings import doc
from state.snapshot_store import Manifest, SnapshotStore

TrainerOutput = dict[str, list[Record]]


@dataclass
class RankerConfig:
    """The online ranker and its training/serving sync."""

    kind: Literal["lr", "fm", "efm"] = doc("Ranker: lr (River LogisticRegression), fm (River "
                                           "FMClassifier), efm (EmbeddingFM on the table).", "lr")
    enabled: bool = doc("Train in the main flow (false: run flows.trainer on the examples topic).",
                        True)
    sync_interval_ms: int = doc("Event time between serving-copy syncs (ms).", 300_000)
    sync_every_examples: int = doc("Also sync after this many examples.", 100_000)
    metrics_every_examples: int = doc("Emit progressive metrics after this many examples.", 20_000)
    delay_to_labels: bool = doc(
        "Score and learn examples in impression-time order once every label of that time is "
        "known (join wait + lateness later): unbiased progressive metrics and a calibrated "
        "model. False scores and learns on arrival (positives first: fresher, biased up).", True)
    params: dict[str, Any] = doc("Model parameters passed to models.rankers.make_ranker "
                                 "(e.g. lr, numeric_lr, n_factors, k, admit_threshold).",
                                 factory=dict)
    max_waiting: int = doc("delay_to_labels: examples waiting for their labels at most (the queue "
                           "holds example rate x (join wait + lateness)); beyond it the oldest "
                           "are scored and learned early (counted as learned_early).", 100_000)
    max_features: int = doc("lr/fm: weights kept (one per distinct feature, e.g. one per user "
                            "and item ID); beyond it the smallest |weight| are dropped down to "
                            "90% of it. 0 = no limit (efm: bounded by params.max_rows).",
                            1_000_000)


def load_ranker(path: Path) -> Ranker:
    """Loader of a ``ranker`` snapshot file (only ever called on verified store paths):
    data only (``models.ranker_io``), so a planted file can be refused but never run."""
    return load_ranker_file(path)


class Trainer:
    """Training copy, progressive metrics and sync schedule (pure Python)."""

    def __init__(self, config: RankerConfig, negative_rate: float, store: SnapshotStore,
                 label_delay_ms: int = 0) -> None:
        self.config = config
        self.store = store
        self.model = make_ranker(config.kind, negative_rate=negative_rate,
                                 max_features=config.max_features, **config.params)
        self.label_delay_ms = label_delay_ms if config.delay_to_labels else 0
        self._waiting: list[tuple[int, int, Record]] = []
        self._seq = 0
        self.max_seen_ms: int | None = None
        self.metrics = ProgressiveMetrics()
        self.examples = 0
        self.max_ts_ms: int | None = None
        self.last_sync_ts_ms: int | None = None
        self.since_sync = 0
        self.since_metrics = 0
        self.version: int | None = None
        self.learned_early = 0
        """Examples learned before their labels were all known (``max_waiting``)."""

    def process(self, examples: list[Record]) -> TrainerOutput:
        """Queue a batch; score-then-learn what is due (impression-time order); sync/report."""
        for e in examples:
            ts = e["ts"]
            if self.max_seen_ms is None or ts > self.max_seen_ms:
                self.max_seen_ms = ts
            heapq.heappush(self._waiting, (ts, self._seq, e))
            self._seq += 1
        if self.max_seen_ms is None:
            return {}
        due = self._due(self.max_seen_ms - self.label_delay_ms)
        over = len(self._waiting) - self.config.max_waiting
        if over > 0:  # the oldest (next due) go early: a bound on the queue's memory
            due.extend(heapq.heappop(self._waiting)[2] for _ in range(over))
            self.learned_early += over
        return self._learn_safely(due)

    def _learn_safely(self, examples: list[Record]) -> TrainerOutput:
        """``_learn``; if it raises, the examples become ``processing_error`` dead letters
        (the unit is the batch of due examples) and training goes on."""
        try:
            return self._learn(examples)
        except Exception as err:
            return {"dead-letters": [processing_error("ranker", e, err) for e in examples]}

    def _due(self, until_ms: int | None) -> list[Record]:
        """Pop queued examples with ts <= until_ms (all when None), oldest first."""
        waiting, out = self._waiting, []
        while waiting and (until_ms is None or waiting[0][0] <= until_ms):
            out.append(heapq.heappop(waiting)[2])
        return out

    def _learn(self, examples: list[Record]) -> TrainerOutput:
        if not examples:
            return {}
        features = [example_features(e) for e in examples]
        p = self.model.predict_many(features)
        y = np.fromiter((e["label"] for e in examples), np.float64, len(examples))
        w = np.fromiter((e["weight"] for e in examples), np.float64, len(examples))
        self.metrics.update_many(y, p, w)
        self.model.learn_many(examples, features)
        n = len(examples)
        self.examples += n
        self.since_sync += n
        self.since_metrics += n
        batch_max = max(e["ts"] for e in examples)
        if self.max_ts_ms is None or batch_max > self.max_ts_ms:
            self.max_ts_ms = batch_max
        if self.last_sync_ts_ms is None:
            self.last_sync_ts_ms = self.max_ts_ms
        out: TrainerOutput = {}
        if (self.max_ts_ms - self.last_sync_ts_ms >= self.config.sync_interval_ms
                or self.since_sync >= self.config.sync_every_examples):
            out["snapshots"] = [self.sync()]
        if self.since_metrics >= self.config.metrics_every_examples:
            out["metrics"] = [self.report()]
        return out

    def sync(self) -> Manifest:
        """Write the serving copy as a new snapshot version; returns its manifest."""
        ts = self.max_ts_ms or 0
        manifest = self.store.write("ranker", "npz",
                                    lambda path: save_ranker(self.model, path, frozen=True), ts,
                                    {"examples": self.examples, "kind": self.config.kind})
        self.version = manifest["version"]
        self.last_sync_ts_ms = ts
        self.since_sync = 0
        return manifest

    def report(self, final: bool = False) -> Record:
        """A ``metrics`` record of the progressive (score-before-learn) figures."""
        self.since_metrics = 0
        record = {"kind": "ranker_final" if final else "ranker", "ts": self.max_ts_ms,
                  "model_version": self.version, "ranker": self.config.kind,
                  "learned_early": self.learned_early, **self.metrics.report()}
        if final and self.metrics.count:
            record["reliability"] = self.metrics.reliability(10)
        return record

    def finish(self) -> TrainerOutput:
        """End of input: a last sync (if anything was learned since) and final metrics."""
        last = self._learn_safely(self._due(None))
        snapshots = last.get("snapshots", [])
        if self.since_sync:
            snapshots.append(self.sync())
        out: TrainerOutput = {"metrics": [self.report(final=True)]}
        if snapshots:
            out["snapshots"] = snapshots
        if "dead-letters" in last:
            out["dead-letters"] = last["dead-letters"]
        return out


class BatchTrainer(Protocol):
    """A single-key training stage: ``process`` a batch, ``finish`` at end of input;
    ``store``: where it publishes its copies."""

    store: SnapshotStore

    def process(self, batch: list[Any]) -> TrainerOutput: ...

    def finish(self) -> TrainerOutput: ...


class TrainerLogic(StatefulLogic[list[Any], TrainerOutput, BatchTrainer]):
    """Bytewax glue for a single-key trainer (the ranker's ``Trainer``, the central
    pool ranker's ``PoolTrainer``)."""

    def __init__(self, trainer: BatchTrainer) -> None:
        self.trainer = trainer

    def on_item(self, value: list[Any]) -> tuple[list[TrainerOutput], bool]:
        out = self.trainer.process(value)
        return ([out] if out else []), StatefulLogic.RETAIN

    def on_eof(self) -> tuple[list[TrainerOutput], bool]:
        out = self.trainer.finish()
        self.trainer.store.flush()  # end of input: every copy durable before the flow ends
        return [out], StatefulLogic.RETAIN

    def snapshot(self) -> BatchTrainer:
        return self.trainer
