"""Item-table publication: at most once per source micro-batch (issue 18 point 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from operators.item_shard import ItemsConfig, ItemShard
from state.item_table import ItemTable
from state.snapshot_store import SnapshotStore

T0 = 1_767_225_600_000
STEP = 100_000  # event time per user-shard part: more than the refresh interval


def parts(batch: int, n_parts: int = 8) -> list[list[tuple[Any, ...]]]:
    """The item updates one source batch sends this shard: one part per user shard,
    each further in event time than the refresh interval."""
    base = T0 + batch * n_parts * STEP
    return [[("fb", f"i{p}", base + p * STEP, True), ("fb", "i0", base + p * STEP + 1, True)]
            for p in range(n_parts)]


def shard(tmp_path: Path) -> ItemShard:
    return ItemShard(ItemsConfig(refresh_interval_ms=60_000), SnapshotStore(tmp_path))


def published(outputs: list[dict[str, list[Any]]]) -> list[dict[str, Any]]:
    return [m for out in outputs for m in out.get("snapshots", [])]


def test_one_table_per_source_batch_with_every_part_in_it(tmp_path: Path) -> None:
    items = shard(tmp_path)
    outputs = []
    for batch in range(3):
        outputs.extend(items.process("i000", part, batch) for part in parts(batch))
    outputs.append(items.finish())
    manifests = published(outputs)
    # Batches 0 and 1 are published when the next batch's first part arrives; batch 2 at EOF.
    assert len(manifests) == 3
    ends = [max(u[2] for part in parts(b) for u in part) for b in range(3)]
    assert [m["ts"] for m in manifests] == ends
    table = ItemTable.load(SnapshotStore(tmp_path).verified_path(manifests[0]))
    assert set(table.popular) == {f"i{p}" for p in range(8)}  # every part of batch 0


def test_without_batch_ids_every_due_part_publishes(tmp_path: Path) -> None:
    """The control: called without a source batch, a shard publishes whenever due."""
    items = shard(tmp_path)
    outputs = [items.process("i000", part) for part in parts(0)]
    assert len(published(outputs)) == 8
