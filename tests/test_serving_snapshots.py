"""Serving, snapshots: tampered versions, recovery state, resumed shards.

The world and helpers: tests/serving_world.py.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

from serving_world import (
    DAY,
    FAVOURITE,
    ITEMS,
    SEED,
    T0,
    TypeSpy,
    World,
    ask,
    assert_record_shape,
    click,
    feed,
    ids,
)

from events.model import Request
from models.ranker_io import load_ranker_file, save_ranker
from operators.user_shard import UserShard
from state.item_table import CatalogEntry
from state.snapshot_store import Manifest, SnapshotStore, sha256_file


def _tamper(store: SnapshotStore, manifest: Manifest) -> None:
    path = store.root / manifest["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_snapshots_keep_the_previous_version_serving(world: World) -> None:
    world.publish_all()
    shard = world.user_shard()
    feed(shard, [click("u", SEED, T0 - 10_000)])
    v1 = ask(shard, "u", k=10, request_id="v1")
    assert (v1["model_version"], v1["index_version"]) == (1, 1)
    assert ids(v1)[:2] == [FAVOURITE, ITEMS[0]]

    # v2 of everything (new content), each altered after it was announced.
    _tamper(world.store, world.publish_ranker(favourites=("a07",)))
    world.vectors = {item: -v for item, v in world.vectors.items()}
    _tamper(world.store, world.publish_index())
    world.popular = {item: s + 0.5 for item, s in world.popular.items()}
    for manifest in world.publish_tables(**{ITEMS[0]: {"available": False}}).values():
        _tamper(world.store, manifest)
    for _ in range(3):
        record = ask(shard, "u", k=10, request_id="v1")
        assert (record["model_version"], record["index_version"]) == (1, 1)
        assert ids(record) == ids(v1)  # same ranker, index and tables as before
    views = shard.server.views
    assert views.ranker.refused >= 1 and "sha256" in views.ranker.last_error
    assert views.index.refused >= 1 and "sha256" in views.index.last_error
    assert all(r.refused >= 1 and r.version == 1 for r in views.tables.values())

    # The next good versions are picked up.
    world.publish_ranker(favourites=("a07",))
    world.publish_index()
    world.publish_tables()
    record = ask(shard, "u", k=10, request_id="v3")
    assert (record["model_version"], record["index_version"]) == (3, 3)
    assert ids(record)[0] == "a07" and ITEMS[0] not in ids(record)


def test_resumed_shard_serves_the_same_answer(world: World) -> None:
    world.publish_all()
    shard = world.user_shard(exploration=1.0)
    feed(shard, [click("u", SEED, T0 - 10_000)])
    before = ask(shard, "u", k=10, request_id="r")
    resumed: UserShard = pickle.loads(pickle.dumps(shard))  # what recovery does
    assert ask(resumed, "u", k=10, request_id="r") == {**before, "latency_ms": ANY_LATENCY}


def test_recovery_state_holds_no_snapshot_objects(world: World) -> None:
    """Snapshots are reloaded from the store on resume; the user shard's recovery state
    (pickled every epoch) must not embed item tables, the index or the ranker."""
    for n in range(5_000):  # a catalog big enough to show in the state's size
        world.catalog[f"z{n}"] = CatalogEntry("c9", True, T0 - 30 * DAY)
        world.popular[f"z{n}"] = 1.0 / (n + 1)
    world.publish_all()
    shard = world.user_shard(exploration=0.5, diversity=0.2)
    feed(shard, [click("u", SEED, T0 - 10_000)])
    before = len(pickle.dumps(shard, protocol=pickle.HIGHEST_PROTOCOL))
    for n in range(5):
        ask(shard, "u", k=10, request_id=f"s{n}")
        ask(shard, "cold", k=10, request_id=f"c{n}")
    spy = TypeSpy(io.BytesIO())
    spy.dump(shard)
    assert not {"ItemTable", "ItemIndex", "Index", "Ranker", "LinearScorer"} & spy.types
    after = len(pickle.dumps(shard, protocol=pickle.HIGHEST_PROTOCOL))
    assert after < before + 50_000, (before, after)


class _AnyLatency:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, float | int) and other >= 0


ANY_LATENCY = _AnyLatency()


def test_tampered_snapshots_keep_the_previous_version_after_resume(world: World) -> None:
    world.publish_all()
    shard = world.user_shard()
    feed(shard, [click("u", SEED, T0 - 10_000)])
    before = ask(shard, "u", k=10, request_id="v1")
    _tamper(world.store, world.publish_ranker(favourites=("a07",)))
    world.vectors = {item: -v for item, v in world.vectors.items()}
    _tamper(world.store, world.publish_index())
    world.popular = {item: s + 0.5 for item, s in world.popular.items()}
    for manifest in world.publish_tables().values():
        _tamper(world.store, manifest)
    assert ids(ask(shard, "u", k=10, request_id="v1")) == ids(before)
    resumed: UserShard = pickle.loads(pickle.dumps(shard))  # what recovery does
    after = ask(resumed, "u", k=10, request_id="v1")
    assert (after["model_version"], after["index_version"]) == (1, 1)
    assert ids(after) == ids(before)


def test_snapshot_outside_the_store_is_refused(world: World, tmp_path: Path) -> None:
    world.publish_all()
    shard = world.user_shard()
    assert ask(shard, "cold", request_id="a")["model_version"] == 1
    # A well-formed ranker file with a matching sha256, but outside the store root.
    outside = tmp_path / "outside.npz"
    ranker = load_ranker_file(world.store.root / world.store.latest("ranker")["path"])
    ranker.n_learned += 1  # another version (the same bytes would be the verified v1)
    save_ranker(ranker, outside)
    manifest = {**world.store.latest("ranker"), "version": 2, "path": "../outside.npz",
                "sha256": sha256_file(outside)}
    (world.store.root / "ranker" / "LATEST").write_text(json.dumps(manifest))
    record = ask(shard, "cold", request_id="b")
    assert record["model_version"] == 1
    assert "outside the snapshot store" in shard.server.views.ranker.last_error


def test_tampered_first_snapshot_serves_without_it(world: World) -> None:
    world.publish_tables()
    _tamper(world.store, world.publish_ranker())
    _tamper(world.store, world.publish_index())
    shard = world.user_shard()
    feed(shard, [click("u", SEED, T0 - 10_000)])
    req = Request(T0, "r", "u", 10)
    [record] = feed(shard, [req])["recommendations"]
    assert_record_shape(record, req)
    assert record["model_version"] is None and record["index_version"] is None
    assert len(record["items"]) == 10  # tables still serve (covis, trending, popular)
