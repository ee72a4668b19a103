"""Snapshot versions settled before their Bytewax epoch ends.

A stage that publishes snapshots (item shards, index builder, trainers) writes each
version's file on the worker thread; the store's writer thread then makes it durable
and visible (fsyncs, renames, ``LATEST``: ``SnapshotStore.write``). A reader in the same
process waits for those (``SnapshotStore.latest``), but a reader in another process of a
cluster cannot: with one micro-batch per epoch (``streamrec run --epoch-ms 0``) the
other process's user shards polled the store for the next micro-batch while a version
of the last one was still settling, and served without it (issue 18, mp24:
``tests/reliability/test_multiprocess.py``'s flake).

``SettledAtEpochEnd`` wraps such a stage's logic: Bytewax calls ``snapshot`` on every
key it ran in an epoch when that epoch closes at the stage, before the stage's output
moves past the epoch, so before any input of the cluster reads the next epoch
(``bytewax.inputs``: a source waits until every output finished the previous epoch);
it waits there for the versions the stage's store is still settling. Every version
written in epoch N is then visible to every process from epoch N + 1 on, as it is to
the one process of a 1-process run. The flow wraps its publishing stages so in replays
and simulator runs (``flows.recsys._publishing``); live Kafka input keeps that I/O off
the worker thread (serving polls by wall time there).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from bytewax.operators import StatefulLogic

from operators.crossing import Unwrapped
from state.snapshot_store import SnapshotStore

W = TypeVar("W")
S = TypeVar("S")


class SettledAtEpochEnd(Unwrapped[W, S], Generic[W, S]):
    """``inner``'s logic fed ``PickledOnce`` items or plain ones (``Unwrapped``); its
    ``snapshot`` (at the end of every epoch in which the key ran) first waits until every
    version written through ``store`` is durable and visible (``SnapshotStore.flush``).
    The recovery state is ``inner``'s, unchanged."""

    def __init__(self, inner: StatefulLogic[Any, W, S], store: SnapshotStore) -> None:
        super().__init__(inner)
        self.store = store

    def snapshot(self) -> S:
        self.store.flush()
        return super().snapshot()
