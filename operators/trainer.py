"""The ranker trainer (Monolith's training copy) and its sync to the serving copy.

One Bytewax key (``ranker``). For each micro-batch of examples: score every example
with the training copy *before* learning from it (progressive AUC, log loss,
calibration), then learn. Every ``sync_interval_ms`` of event time (or every
``sync_every_examples`` examples) the training copy is frozen into a serving copy,
pickled into the snapshot store as a new immutable version, and its manifest is
emitted (``snapshots`` output, and the serving stage, which loads it verified).
Metrics go out every ``metrics_every_examples`` examples and at end of input.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from bytewax.operators import StatefulLogic

from models.features import example_features
from models.metrics import ProgressiveMetrics
from models.rankers import Ranker, make_ranker
from state.settings import doc
from state.snapshot_store import Manifest, SnapshotStore

Record = dict[str, Any]
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
    params: dict[str, Any] = doc("Model parameters passed to models.rankers.make_ranker "
                                 "(e.g. lr, n_factors, k, admit_threshold).", factory=dict)


def load_ranker(path: Path) -> Ranker:
    """Loader of a ``ranker`` snapshot file (only ever called on verified store paths)."""
    with path.open("rb") as f:
        ranker = pickle.load(f)
    if not isinstance(ranker, Ranker):
        raise ValueError(f"{path.name} does not hold a Ranker")
    return ranker


class Trainer:
    """Training copy, progressive metrics and sync schedule (pure Python)."""

    def __init__(self, config: RankerConfig, negative_rate: float, store: SnapshotStore) -> None:
        self.config = config
        self.store = store
        self.model = make_ranker(config.kind, negative_rate=negative_rate, **config.params)
        self.metrics = ProgressiveMetrics()
        self.examples = 0
        self.max_ts_ms: int | None = None
        self.last_sync_ts_ms: int | None = None
        self.since_sync = 0
        self.since_metrics = 0
        self.version: int | None = None

    def process(self, examples: list[Record]) -> TrainerOutput:
        """Score-then-learn a batch; sync and report when due."""
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
        serving = self.model.copy(frozen=True)
        ts = self.max_ts_ms or 0

        def write(path: Path) -> None:
            with path.open("wb") as f:
                pickle.dump(serving, f, protocol=pickle.HIGHEST_PROTOCOL)

        manifest = self.store.write("ranker", "pkl", write, ts,
                                    {"examples": self.examples, "kind": self.config.kind})
        self.version = manifest["version"]
        self.last_sync_ts_ms = ts
        self.since_sync = 0
        return manifest

    def report(self, final: bool = False) -> Record:
        """A ``metrics`` record of the progressive (score-before-learn) figures."""
        self.since_metrics = 0
        return {"kind": "ranker_final" if final else "ranker", "ts": self.max_ts_ms,
                "model_version": self.version, "ranker": self.config.kind, **self.metrics.report()}

    def finish(self) -> TrainerOutput:
        """End of input: a last sync (if anything was learned since) and final metrics."""
        out: TrainerOutput = {"metrics": [self.report(final=True)]}
        if self.since_sync:
            out["snapshots"] = [self.sync()]
        return out


class TrainerLogic(StatefulLogic[list[Record], TrainerOutput, Trainer]):
    """Bytewax glue for the single-key trainer."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_item(self, value: list[Record]) -> tuple[list[TrainerOutput], bool]:
        out = self.trainer.process(value)
        return ([out] if out else []), StatefulLogic.RETAIN

    def on_eof(self) -> tuple[list[TrainerOutput], bool]:
        return [self.trainer.finish()], StatefulLogic.RETAIN

    def snapshot(self) -> Trainer:
        return self.trainer
