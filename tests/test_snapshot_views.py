"""SnapshotViews: live views load new versions off the batch and swap them in together;
replays load at the batch boundary (issue 18, point 2: no poll stall).

The world (real item tables, hnswlib index and LR ranker in a real store):
tests/serving_world.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from serving_world import ITEM_KEYS, World

from operators.snapshot_views import SnapshotViews
from state.item_table import ItemTable


def _versions(views: SnapshotViews) -> dict[str, int | None]:
    return {"ranker": views.ranker.version, "index": views.index.version,
            **{key: reader.version for key, reader in views.tables.items()}}


@pytest.fixture
def slow_tables(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Item tables load only once the returned event is set (at most 10 s): a load that
    takes as long as the test wants."""
    gate = threading.Event()
    original = ItemTable.load.__func__  # type: ignore[attr-defined]

    def load(cls: type[ItemTable], path: Path) -> Any:
        gate.wait(10)
        return original(cls, path)

    monkeypatch.setattr(ItemTable, "load", classmethod(load))
    return gate


def test_live_poll_never_waits_for_loading(world: World, slow_tables: threading.Event) -> None:
    world.publish_all()
    views = SnapshotViews(world.store, ITEM_KEYS, poll_ms=1)
    assert views.background  # wall-clock polling: live input

    t0 = time.perf_counter()
    views.poll()
    assert time.perf_counter() - t0 < 1.0  # the batch went on while tables were loading
    assert _versions(views) == dict.fromkeys(["ranker", "index", *ITEM_KEYS])
    time.sleep(0.01)
    views.poll()  # the round is still loading: nothing installed, no second round
    assert views.table_map() == {} and views.ranker.current is None

    slow_tables.set()
    assert views.wait_loaded(timeout_s=30)
    assert _versions(views) == dict.fromkeys(["ranker", "index", *ITEM_KEYS], 1)
    assert set(views.table_map()) == set(ITEM_KEYS)


def test_a_loaded_round_is_installed_whole_at_the_next_poll(world: World) -> None:
    world.publish_all()
    views = SnapshotViews(world.store, ITEM_KEYS, poll_ms=1)
    views.poll()
    assert views.wait_loaded(timeout_s=30)
    tables_v1 = views.table_map()

    world.publish_tables(ts=world_ts(world) + 1)
    world.publish_index()
    world.publish_ranker()
    time.sleep(0.01)
    views.poll()  # starts the round for v2
    pending = views._pending
    assert pending is not None
    assert set(pending.result(timeout=30)) == {"ranker", "index", *(f"items-{k}" for k in ITEM_KEYS)}
    # loaded, not yet visible: serving keeps one consistent set until the batch boundary
    assert _versions(views) == dict.fromkeys(["ranker", "index", *ITEM_KEYS], 1)
    assert views.table_map() is tables_v1

    views.poll()
    assert _versions(views) == dict.fromkeys(["ranker", "index", *ITEM_KEYS], 2)
    assert views.table_map() is not tables_v1


def world_ts(world: World) -> int:
    """The event time the world's tables were published with by default."""
    from serving_world import T0

    return T0 - 60_000


def test_replay_poll_loads_at_the_batch_boundary(world: World) -> None:
    """poll_ms 0 (replays): the poll itself loads, so a replay meets the same versions at
    the same batch on every run (tests/test_determinism.py)."""
    world.publish_all()
    views = SnapshotViews(world.store, ITEM_KEYS, poll_ms=0)
    assert not views.background
    views.poll()
    assert _versions(views) == dict.fromkeys(["ranker", "index", *ITEM_KEYS], 1)


def test_background_round_skips_a_refused_version_and_keeps_serving(world: World) -> None:
    world.publish_all()
    views = SnapshotViews(world.store, ITEM_KEYS, poll_ms=1)
    views.poll()
    views.wait_loaded(timeout_s=30)
    manifests = world.publish_tables(ts=world_ts(world) + 1)
    damaged = world.store.root / manifests[ITEM_KEYS[0]]["path"]
    damaged.write_bytes(damaged.read_bytes()[:-10])
    time.sleep(0.01)
    views.poll()
    assert views.wait_loaded(timeout_s=30)
    assert views.tables[ITEM_KEYS[0]].version == 1 and views.tables[ITEM_KEYS[0]].refused == 1
    assert all(views.tables[k].version == 2 for k in ITEM_KEYS[1:])


def test_background_round_builds_the_top_lists_the_first_request_needs(world: World) -> None:
    world.publish_all()
    views = SnapshotViews(world.store, ITEM_KEYS, poll_ms=1)
    views.poll()
    assert views.wait_loaded(timeout_s=30)
    for key, table in views.table_map().items():
        assert set(table._top) == {"popular", "trending"}  # built off the batch
        cold = ItemTable.load(world.store.root / views.tables[key].manifest["path"])
        for source in ("popular", "trending"):  # the warm lists give what a cold table does
            for n in (1, 3, 150):
                assert table.top(source, n) == cold.top(source, n)


def test_replay_polls_of_a_process_share_a_version_installed_from_the_same_manifest(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """poll_ms 0: the second shard's poll installs the first one's objects for the
    manifests LATEST still holds (no second ``prepare``), exactly what ``refresh`` would
    install; a newer LATEST, or a batch too early for it, goes through ``refresh``'s path."""
    from state.snapshot_store import SnapshotReader

    prepared: list[str] = []
    original = SnapshotReader.prepare

    def prepare(self: SnapshotReader[Any], manifest: Any, newer_than: int | None = None) -> Any:
        prepared.append(self.kind)
        return original(self, manifest, newer_than)

    monkeypatch.setattr(SnapshotReader, "prepare", prepare)
    world.publish_all()
    first = SnapshotViews(world.store, ITEM_KEYS, poll_ms=0)
    second = SnapshotViews(world.store, ITEM_KEYS, poll_ms=0)
    first.poll()
    assert {"ranker", *(f"items-{k}" for k in ITEM_KEYS)} <= set(prepared)
    prepared.clear()
    second.poll()
    assert prepared == ["index"]  # the others came from the first shard's install
    assert _versions(second) == _versions(first) == dict.fromkeys(["ranker", "index", *ITEM_KEYS], 1)
    for key in ITEM_KEYS:
        assert second.tables[key].current is first.tables[key].current
        assert second.tables[key].manifest is first.tables[key].manifest
    assert second.ranker.current is first.ranker.current

    ts = world_ts(world) + 1
    world.publish_tables(ts=ts)
    second.poll(max_ts=ts - 1)  # the batch starts before v2's events: keeps v1
    assert _versions(second)[ITEM_KEYS[0]] == 1
    second.poll(max_ts=ts)
    first.poll(max_ts=ts)
    assert _versions(first) == _versions(second)
    assert all(first.tables[k].current is second.tables[k].current for k in ITEM_KEYS)
    assert all(first.tables[k].version == 2 for k in ITEM_KEYS)
