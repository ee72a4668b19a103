"""The item ANN index: recall against exact search, upsert/remove semantics, the refresh
policy, one-file snapshots (monotonic, atomic, verified) and the hot-swapping reader."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

from state.item_index import IndexBuilder, IndexConfig, IndexReader, ItemIndex, exact_topk
from state.snapshot_store import SnapshotReader, SnapshotStore

DIM = 16


def _data(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f"i{j}" for j in range(n)], rng.normal(size=(n, DIM)).astype(np.float32)


def _builder(n: int = 3000, seed: int = 0, **kw) -> tuple[IndexBuilder, list[str], np.ndarray]:
    ids, x = _data(n, seed)
    b = IndexBuilder(IndexConfig(dim=DIM, threads=2, **kw))
    b.apply(ids, x)
    return b, ids, x


def test_recall_at_10_against_exact_search() -> None:
    b, ids, x = _builder(5000, ef=64)
    queries = np.random.default_rng(1).normal(size=(200, DIM)).astype(np.float32)
    rows, _ = exact_topk(x, queries, 10)
    recall = np.mean([
        len({i for i, _ in b.query(q, 10)} & {ids[j] for j in rows[n]}) / 10
        for n, q in enumerate(queries)
    ])
    assert recall >= 0.95, recall
    # scores are inner products of the stored vectors
    item, score = b.query(queries[0], 1)[0]
    assert score == pytest.approx(float(x[ids.index(item)] @ queries[0]), rel=1e-4)
    # the index's own exact search agrees with the numpy reference
    assert [i for i, _ in b.index.exact_query(queries[0], 10)] == [ids[j] for j in rows[0]]


def test_upsert_replaces_vectors_and_removed_items_never_return() -> None:
    b, ids, x = _builder(2000)
    target = np.ones(DIM, np.float32)
    # make i7 the best match of `target`, then move it away again
    assert b.apply(["i7"], 10 * target[None]) == "incremental"
    assert b.query(target, 1)[0][0] == "i7"
    # replaced = old node deleted + new node inserted (keeps the graph's recall)
    assert len(b.index) == 2000 and (b.index.slots, b.index.deleted) == (2001, 1)
    b.apply(["i7"], -10 * target[None])
    assert "i7" not in {i for i, _ in b.query(target, 50)}
    assert b.index.vectors(["i7"])[0][0] == pytest.approx(-10 * target)
    # remove the 100 best matches of `target`: none of them is ever returned again
    best = [i for i, _ in b.index.exact_query(target, 100)]
    b.remove(best)
    assert len(b.index) == 1900 and b.index.deleted == 102
    assert not set(best) & {i for i, _ in b.query(target, 200)}
    for q in np.random.default_rng(2).normal(size=(50, DIM)):
        assert not set(best) & {i for i, _ in b.query(q, 20)}
    assert b.index.vectors(best[:1])[1].tolist() == [False]
    # a removed item that comes back gets a fresh label (hnswlib cannot re-add a deleted one)
    b.apply([best[0]], 20 * target[None])
    assert b.query(target, 1)[0][0] == best[0]
    b.apply([f"new{j}" for j in range(99)], np.random.default_rng(3).normal(size=(99, DIM)))
    assert len(b.index) == 2000 and b.index.deleted == 102
    # a rebuild drops the deleted nodes; removed items stay out, replaced vectors stay
    b.rebuild()
    assert (b.index.slots, b.index.deleted, len(b.index)) == (2000, 0, 2000)
    assert not set(best[1:]) & {i for i, _ in b.query(target, 200)}
    assert b.query(target, 1)[0][0] == best[0] and b.index.vectors(["i7"])[0][0] == pytest.approx(-10 * target)


def test_exclude_filters_results_small_and_large_sets() -> None:
    b, ids, x = _builder(2000)
    q = x[0]
    top = [i for i, _ in b.index.exact_query(q, 300)]
    few = set(top[:5])
    got = b.query(q, 10, exclude=few)
    assert len(got) == 10 and not few & {i for i, _ in got}
    many = set(top[:250]) | {"not-in-index"}  # beyond the over-fetch limit: hnswlib filter
    got = b.query(q, 10, exclude=many)
    assert len(got) == 10 and not many & {i for i, _ in got}
    assert {i for i, _ in got} & set(top[250:270])  # still the next best ones
    assert b.query(q, 10, exclude=set(ids)) == []


def test_refresh_policy_rebuilds_on_large_changes_and_many_deletions() -> None:
    b, ids, x = _builder(1000, rebuild_fraction=0.3, max_deleted_fraction=0.2)
    rng = np.random.default_rng(4)
    assert b.apply(ids[:100], rng.normal(size=(100, DIM))) == "incremental"
    assert b.apply(ids[:400], rng.normal(size=(400, DIM))) == "rebuild"
    assert b.index.slots == 1000 and b.index.deleted == 0
    # deletions accumulate until they pass 20% of the slots, then the graph is rebuilt
    assert b.apply(remove_ids=ids[:150]) == "incremental"
    assert b.index.deleted == 150
    assert b.apply(remove_ids=ids[150:250]) == "rebuild"
    assert b.index.deleted == 0 and len(b.index) == 750
    q = rng.normal(size=DIM)
    assert [i for i, _ in b.query(q, 5)] == [i for i, _ in b.index.exact_query(q, 5)]
    assert not set(ids[:250]) & {i for i, _ in b.query(q, 100)}
    with pytest.raises(ValueError, match="finite"):
        b.apply(["bad"], np.full((1, DIM), np.nan))


def test_save_load_single_file_roundtrip_and_frozen(tmp_path) -> None:
    b, ids, x = _builder(1500)
    b.remove(ids[:10])
    path = tmp_path / "index.npz"
    b.index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]
    loaded = ItemIndex.load(path, frozen=True)
    assert loaded.stats() == b.index.stats() and loaded.config == b.config
    for q in np.random.default_rng(5).normal(size=(20, DIM)):
        assert loaded.query(q, 10) == b.query(q, 10)
    with pytest.raises(RuntimeError, match="frozen"):
        loaded.upsert(["x"], np.zeros((1, DIM)))
    again = pickle.loads(pickle.dumps(b.index))
    assert again.query(x[20], 5) == b.query(x[20], 5)
    again.upsert(["zzz"], 100 * x[20][None])
    assert again.query(x[20], 1)[0][0] == "zzz" and "zzz" not in b.index


def test_publish_versions_monotonic_and_reader_hot_swaps(tmp_path) -> None:
    store = SnapshotStore(tmp_path / "snaps", keep=3)
    b, ids, x = _builder(1000)
    reader = IndexReader(store)
    assert reader.query(x[0], 5) == [] and reader.version is None
    m1 = b.publish(store, ts_ms=1000)
    assert reader.offer(m1) and reader.version == 1
    target = np.ones(DIM, np.float32)
    b.apply(["fresh"], 50 * target[None])
    assert reader.query(target, 1)[0][0] != "fresh"  # the served copy is a snapshot
    m2 = b.publish(store, ts_ms=2000)
    assert reader.refresh() and reader.version == 2 and m2["counts"]["items"] == 1001
    assert reader.query(target, 1)[0][0] == "fresh"
    assert not reader.offer(m1) and reader.version == 2  # never goes back
    versions = [b.publish(store, ts_ms=3000 + j)["version"] for j in range(4)]
    assert versions == [3, 4, 5, 6]
    vec, found = reader.vectors(["fresh", "nope"])
    assert found.tolist() == [True, False] and vec[0] == pytest.approx(50 * target)
    # pickles as a reference to the store, reloads on unpickle
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.version == 2 and clone.query(target, 3) == reader.query(target, 3)
    assert len(pickle.dumps(reader)) < 2000


def test_tampered_snapshot_refused_reader_keeps_previous(tmp_path) -> None:
    store = SnapshotStore(tmp_path)
    b, ids, x = _builder(500)
    reader = IndexReader(store)
    assert reader.offer(b.publish(store, ts_ms=1))
    before = reader.query(x[3], 5)
    b.apply(["x"], 100 * x[3][None])
    m2 = b.publish(store, ts_ms=2)
    path = store.verified_path(m2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    assert not reader.offer(m2)
    assert reader.version == 1 and reader.refused == 1 and "sha256" in (reader.last_error or "")
    assert reader.query(x[3], 5) == before
    # a manifest pointing outside the store is refused too
    assert not reader.offer(dict(m2, version=7, path="../evil.npz"))
    assert reader.version == 1
    # the next good version is taken
    m3 = b.publish(store, ts_ms=3)
    assert reader.offer(m3) and reader.query(x[3], 1)[0][0] == "x"


def test_queries_never_fail_during_hot_swaps(tmp_path) -> None:
    """Readers query continuously while the builder keeps publishing and the reader
    swaps (some loads in the background): every query returns a full, valid answer."""
    store = SnapshotStore(tmp_path, keep=3)
    b, ids, x = _builder(800)
    reader = IndexReader(store)
    reader.offer(b.publish(store, ts_ms=0))
    errors: list[BaseException] = []
    stop = threading.Event()
    seen_versions: set[int] = set()

    def serve() -> None:
        rng = np.random.default_rng(threading.get_ident() % 1000)
        while not stop.is_set():
            try:
                v = reader.version
                got = reader.query(rng.normal(size=DIM), 10)
                assert len(got) == 10 and all(isinstance(i, str) for i, _ in got)
                seen_versions.add(v)
            except BaseException as err:  # noqa: BLE001 - collected for the main thread
                errors.append(err)
                return

    threads = [threading.Thread(target=serve) for _ in range(3)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(9)
    try:
        for step in range(12):
            b.apply([f"n{step}"], rng.normal(size=(1, DIM)), remove_ids=[ids[step]])
            m = b.publish(store, ts_ms=step + 1)
            if step % 2:
                assert reader.offer_async(m).result(timeout=30)
            else:
                assert reader.refresh()
    finally:
        stop.set()
        for t in threads:
            t.join()
        reader.close()
    assert not errors, errors[:1]
    assert reader.version == 13 and len(seen_versions) >= 2
    # older loaded versions are not pinned by the process-wide reader cache
    cached = [k for k in SnapshotReader._cache if k[0] == str(store.root) and k[1] == "index"]
    assert len(cached) <= 1


def test_sync_of_one_owner_and_builder_pickles() -> None:
    b, ids, x = _builder(300)

    def owns(item: str) -> bool:  # e.g. the items of one item shard
        return item.startswith("i") and int(item[1:]) % 2 == 0

    keep = [i for i in ids if owns(i)][:50]
    b.sync(keep, x[[ids.index(i) for i in keep]], owns)
    assert set(b.index.item_ids()) == set(keep) | {i for i in ids if not owns(i)}
    clone = pickle.loads(pickle.dumps(b))
    assert clone.query(x[0], 5) == b.query(x[0], 5) and len(clone) == len(b) == 200


def test_config_of_an_older_snapshot_and_dim_required() -> None:
    old = '{"dim": 4, "space": "ip", "M": 16, "ef_construction": 100, "ef": 400, "num_threads": 3}'
    assert IndexConfig.from_json(old) == IndexConfig(dim=4, ef=400, threads=3)
    with pytest.raises(ValueError, match="dim"):
        ItemIndex(IndexConfig())
    assert ItemIndex(IndexConfig().with_dim(4)).config.dim == 4


def test_query_arrays_is_the_query_as_arrays(tmp_path) -> None:
    """Serving's retrieval reads the ANN answer as (items, float64 scores): the same items
    in the same order and the same scores as ``query``, on the builder's index and
    through a reader of its snapshot (empty before one is loaded)."""
    b, _, _ = _builder(2000)
    queries = np.random.default_rng(2).normal(size=(20, DIM)).astype(np.float32)
    for q in queries:
        items, scores = b.index.query_arrays(q, 50)
        found = b.index.query(q, 50)
        assert items == [i for i, _ in found]
        assert scores.dtype == np.float64 and scores.tolist() == [s for _, s in found]
    store = SnapshotStore(tmp_path)
    reader = IndexReader(store)
    assert reader.query_arrays(queries[0], 5)[0] == []
    reader.offer(b.publish(store, 1))
    items, scores = reader.query_arrays(queries[0], 5)
    assert items == [i for i, _ in reader.query(queries[0], 5)]
    assert b.index.query_arrays(queries[0], 0)[0] == []


@pytest.mark.parametrize("space", ["ip", "cosine"])
def test_a_frozen_index_reads_vectors_from_one_copy_with_the_same_floats(tmp_path, space) -> None:
    """A frozen copy answers ``vectors`` through ``get_items`` until the labels asked
    reach its item count, then from one copy of every live vector: the same float32
    rows and found flags as the builder's index, for live, replaced, removed and unknown
    items, asked in any order and with repeats."""
    b, ids, x = _builder(400, space=space)
    b.apply(ids[:30], x[:30] * 2.0)  # replaced: new labels, the old nodes deleted
    b.remove(ids[30:40])
    path = tmp_path / "index.npz"
    b.index.save(path)
    frozen = ItemIndex.load(path, frozen=True)
    rng = np.random.default_rng(1)
    names = ids + ["nope", "i999"]
    for call in range(12):
        ask = [names[j] for j in rng.integers(0, len(names), 90)]
        got, found = frozen.vectors(ask)
        want, want_found = b.index.vectors(ask)
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
        assert found.tolist() == want_found.tolist()
        if call == 0:
            assert frozen._dense is None  # ~90 labels asked of 390 items: get_items
    assert frozen._dense is not None  # ~1,000 labels asked: one copy
    assert b.index._dense is None  # a writable index never copies its vectors out
    assert frozen.vectors([])[0].shape == (0, DIM)


@pytest.mark.parametrize("space", ["ip", "cosine"])
def test_vectors_read_each_stored_row_and_zeros_for_unknown_ids(space) -> None:
    """``vectors`` of live, replaced, removed, unknown and repeated ids (all found, some
    found, none found): each found row is hnswlib's stored vector of the id's label bit
    for bit, the others zeros, with the found flags."""
    b, ids, x = _builder(200, space=space)
    b.apply(ids[:20], x[:20] * 3.0)
    b.remove(ids[20:30])
    index = b.index
    rng = np.random.default_rng(2)
    names = ids + ["nope", "i999"]
    for ask in ([ids[j] for j in rng.integers(30, 200, 50)],
                [names[j] for j in rng.integers(0, len(names), 60)],
                ["nope", "i20", "nope"], []):
        got, found = index.vectors(ask)
        assert got.dtype == np.float32 and got.shape == (len(ask), DIM)
        assert found.dtype == bool
        assert found.tolist() == [i in index for i in ask]
        for row, item, ok in zip(got, ask, found.tolist(), strict=True):
            want = (index._index.get_items([index._label_of[item]], return_type="numpy")[0]
                    if ok else np.zeros(DIM, np.float32))
            assert row.tobytes() == np.asarray(want, np.float32).tobytes()
