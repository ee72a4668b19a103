"""Tests for the collisionless embedding table (cuckoo index, admission, expiry, snapshots)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from state.embedding_table import EMPTY_KEY, EmbeddingTable, TableConfig, keys_of

ROOT = Path(__file__).resolve().parents[1]


def _u64(*ids: int) -> np.ndarray:
    return np.array(ids, dtype=np.uint64)


def _random_ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, n, dtype=np.uint64, endpoint=False)


# --- collisionless index -------------------------------------------------------------------


def test_million_random_ids_get_distinct_rows() -> None:
    ids = np.unique(np.concatenate([_random_ids(1_000_000, 0), _u64(0, 2**64 - 2, 2**64 - 1)]))
    table = EmbeddingTable(4, max_rows=ids.size + 10)
    perm = np.random.default_rng(1).permutation(ids.size)
    for chunk in np.array_split(ids[perm], 16):
        table.insert(chunk, now_ms=1)
    rows = table.lookup(ids)
    assert (rows >= 0).all()
    assert np.unique(rows).size == ids.size  # no two IDs share a row
    assert len(table) == ids.size
    np.testing.assert_array_equal(table.row_keys[rows], ids)  # each row knows its owner
    others = np.setdiff1d(_random_ids(10_000, 2), ids)
    assert (table.lookup(others) == -1).all()
    stats = table.stats()
    assert stats["admitted"] == ids.size
    assert stats["load_factor"] <= table.config.max_load


def test_reserved_empty_key_is_a_real_id_with_its_own_row() -> None:
    table = EmbeddingTable(2, max_rows=10)
    ids = _u64(2**64 - 1, 2**64 - 2, 0)
    rows = table.insert(ids, now_ms=5)
    assert (rows >= 0).all() and np.unique(rows).size == 3
    assert (table.lookup(_u64(2**64 - 1)) == rows[0]).all()
    assert table.lookup(np.array([-1], np.int64))[0] == rows[0]  # int64 -1 is the same 64-bit ID
    table.apply_gradients(_u64(2**64 - 1), np.ones((1, 2), np.float32), now_ms=6, lr=0.1)
    assert not np.array_equal(table.gather(_u64(2**64 - 1)), table.gather(_u64(2**64 - 2)))
    assert table.expire(now_ms=100, ttl_ms=10) == 3
    assert (table.lookup(ids) == -1).all()
    again = table.insert(_u64(2**64 - 1), now_ms=200)
    assert again[0] >= 0 and table.lookup(_u64(2**64 - 1))[0] == again[0]
    assert int(EMPTY_KEY) == 2**64 - 1


def test_growth_under_high_load_factor() -> None:
    table = EmbeddingTable(2, max_rows=1_000_000, max_load=0.97, initial_rows=16)
    ids = _random_ids(200_000, 3)
    slots_seen = set()
    for chunk in np.array_split(ids, 50):
        table.insert(chunk, now_ms=1)
        slots_seen.add(table.stats()["index_slots"])
        assert table.stats()["load_factor"] <= 0.97
    rows = table.lookup(ids)
    assert (rows >= 0).all() and np.unique(rows).size == ids.size
    assert len(slots_seen) > 5 and table.stats()["index_growths"] >= 5


def test_failed_cuckoo_walk_grows_the_index(monkeypatch: pytest.MonkeyPatch) -> None:
    import state.cuckoo_index as et

    table = EmbeddingTable(2, max_rows=10_000)
    table.insert(_random_ids(500, 4), now_ms=1)
    slots = table.stats()["index_slots"]
    monkeypatch.setattr(et, "_MAX_ROUNDS", 0)  # every placement attempt "fails"
    calls = []
    real = et.CuckooIndex._try_place

    def flaky(self: EmbeddingTable, keys: np.ndarray, rows: np.ndarray) -> tuple:
        calls.append(keys.size)
        if len(calls) == 1:
            return real(self, keys, rows)  # with _MAX_ROUNDS = 0: nothing placed
        monkeypatch.setattr(et, "_MAX_ROUNDS", 500)
        return real(self, keys, rows)

    monkeypatch.setattr(et.CuckooIndex, "_try_place", flaky)
    new = _random_ids(10, 5)
    growths = table.stats()["index_growths"]
    table.insert(new, now_ms=2)
    assert calls == [10, 10]  # the walk gave up once, then the index doubled
    assert table.stats()["index_slots"] == 2 * slots
    assert table.stats()["index_growths"] == growths + 1
    rows = table.lookup(np.concatenate([_random_ids(500, 4), new]))
    assert (rows >= 0).all() and np.unique(rows).size == 510


def test_string_ids_hash_identically_across_processes() -> None:
    names = [f"user-{i}" for i in range(50)] + ["é", "", "42"]
    code = (
        "import json, sys, numpy as np\n"
        "from state.embedding_table import EmbeddingTable, keys_of\n"
        "names = json.loads(sys.argv[1])\n"
        "keys = keys_of(names)\n"
        "t = EmbeddingTable(8, max_rows=1000)\n"
        "rows = t.insert(keys, now_ms=1)\n"
        "print(json.dumps({'keys': [str(k) for k in keys], 'rows': rows.tolist(),\n"
        "  'vec': t.gather(keys).tolist(), 'pyhash': hash(names[0])}))\n"
    )

    def run(seed: str) -> dict:
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(names)],
            env=env, cwd=ROOT, capture_output=True, text=True, check=True,
        )
        return json.loads(out.stdout)

    a, b = run("1"), run("2")
    assert a["pyhash"] != b["pyhash"]  # the salted built-in hash does differ...
    assert a["keys"] == b["keys"]  # ...but our keys, rows and initial vectors do not
    assert a["rows"] == b["rows"] and a["vec"] == b["vec"]
    keys = keys_of(names)
    assert a["keys"] == [str(k) for k in keys]
    assert keys_of([42])[0] == keys_of(["42"])[0]
    assert np.unique(keys).size == len(names)


def test_rejects_string_arrays() -> None:
    with pytest.raises(TypeError):
        EmbeddingTable(2).lookup(np.array(["a"]))


# --- admission -----------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1, 2, 5])
def test_admission_threshold_is_exact(threshold: int) -> None:
    table = EmbeddingTable(4, max_rows=100, admit_threshold=threshold)
    a, b = _u64(11), _u64(22)
    for i in range(threshold - 1):
        assert table.insert(a, now_ms=i)[0] == -1
        np.testing.assert_array_equal(table.gather(a), np.zeros((1, 4), np.float32))
    assert table.stats()["rejected"] == threshold - 1 and table.stats()["admitted"] == 0
    row = table.insert(a, now_ms=10)[0]
    assert row >= 0 and table.lookup(a)[0] == row
    assert table.row_counts[row] == 1
    # the same within one batch: N-1 sightings -> no row, one more -> row
    if threshold > 1:
        assert table.insert(np.repeat(b, threshold - 1), now_ms=11)[0] == -1
    rows = table.insert(np.repeat(b, threshold + 2), now_ms=12)
    assert (rows == rows[0]).all() and rows[0] >= 0
    stats = table.stats()
    assert stats["admitted"] == 2
    # b: N-1 rejected in the first batch; in the second, 0 more before admission
    assert stats["rejected"] == 2 * (threshold - 1)
    assert table.row_counts[rows[0]] == threshold + 2  # sightings from the admitting one on


def test_admission_sketch_ages() -> None:
    """With aging, sightings fade: after a halving an ID needs fresh sightings."""
    table = EmbeddingTable(
        2, max_rows=100, admit_threshold=3, sketch_width=1 << 12, sketch_decay_every=4
    )
    a = _u64(1)
    table.insert(a, now_ms=1)
    table.insert(a, now_ms=2)
    table.insert(_u64(7, 8), now_ms=3)  # 4th sighting: the sketch halves (a: 2 -> 1)
    assert table.insert(a, now_ms=4)[0] == -1  # 1 + 1 < 3
    assert table.insert(a, now_ms=5)[0] >= 0  # 2 + 1 = 3
    assert table.stats()["rejected"] == 5 and table.stats()["admitted"] == 1
    assert table.sketch is not None and table.sketch.nbytes == 4 * (1 << 12)


def test_counters_do_not_depend_on_batching() -> None:
    rng = np.random.default_rng(7)
    stream = rng.integers(0, 300, 5_000).astype(np.uint64)
    # a sketch wide enough for no collisions among 300 IDs (collisions admit early)
    one = EmbeddingTable(2, max_rows=1000, admit_threshold=4, sketch_width=1 << 16)
    many = EmbeddingTable(2, max_rows=1000, admit_threshold=4, sketch_width=1 << 16)
    one.insert(stream, now_ms=1)
    for i in range(0, stream.size, 7):
        many.insert(stream[i : i + 7], now_ms=1)
    s1, s2 = one.stats(), many.stats()
    assert (s1["admitted"], s1["rejected"]) == (s2["admitted"], s2["rejected"])
    counts = np.bincount(stream.astype(np.int64), minlength=300)
    assert s1["admitted"] == int((counts >= 4).sum())
    assert s1["rejected"] == int(np.minimum(counts, 3).sum())
    keys = np.arange(300, dtype=np.uint64)
    r1, r2 = one.lookup(keys), many.lookup(keys)
    np.testing.assert_array_equal(r1 >= 0, counts >= 4)
    np.testing.assert_array_equal(one.row_counts[r1[r1 >= 0]], counts[r1 >= 0] - 3)
    np.testing.assert_array_equal(many.row_counts[r2[r2 >= 0]], counts[r2 >= 0] - 3)


def test_new_rows_are_initialised_deterministically_from_the_id() -> None:
    ids = _random_ids(2_000, 8)
    t1 = EmbeddingTable(16, init_scale=0.5, init_seed=3)
    t2 = EmbeddingTable(16, init_scale=0.5, init_seed=3)
    t1.insert(ids, now_ms=1)
    for chunk in np.array_split(ids[::-1], 9):  # other order, other batches
        t2.insert(chunk, now_ms=1)
    v1, v2 = t1.gather(ids), t2.gather(ids)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(v1, t1.initial_vectors(ids))
    assert abs(v1.mean()) < 0.02 and abs(v1.std() - 0.5) < 0.02
    assert len({row.tobytes() for row in v1}) == ids.size
    t3 = EmbeddingTable(16, init_scale=0.5, init_seed=4)
    t3.insert(ids, now_ms=1)
    assert not np.allclose(t3.gather(ids), v1)


def test_an_initial_vector_is_the_same_bits_in_any_batch() -> None:
    """``PointInTime.item_vectors`` computes initial vectors only for the items missing
    from the index: a row must not depend on the other ids of the call."""
    table = EmbeddingTable(10, init_scale=0.1)
    ids = _random_ids(3_000, 5)
    whole = table.initial_vectors(ids)
    rng = np.random.default_rng(0)
    for _ in range(200):
        some = np.sort(rng.choice(ids.size, size=int(rng.integers(1, 64)), replace=False))
        part = table.initial_vectors(ids[some])
        assert part.tobytes() == whole[some].tobytes()


def test_missing_init_reads_the_initial_vector_without_storing_it() -> None:
    table = EmbeddingTable(8, admit_threshold=3, missing="init", init_scale=0.1)
    ids = _u64(5, 6)
    table.insert(ids, now_ms=1)
    np.testing.assert_array_equal(table.gather(ids), table.initial_vectors(ids))
    assert len(table) == 0 and (table.lookup(ids) == -1).all()


# --- training ------------------------------------------------------------------------------


def test_gradients_only_train_admitted_ids() -> None:
    table = EmbeddingTable(4, admit_threshold=2, optimizer="sgd")
    a, b, c = 1, 2, 3
    table.insert(_u64(a, a, b), now_ms=1)  # a admitted, b seen once, c never seen
    grads = np.ones((3, 4), np.float32)
    before_a = table.gather(_u64(a))
    assert table.apply_gradients(_u64(a, b, c), grads, now_ms=2, lr=0.5) == 1
    np.testing.assert_allclose(table.gather(_u64(a)), before_a - 0.5)
    np.testing.assert_array_equal(table.gather(_u64(b, c)), np.zeros((2, 4), np.float32))
    assert (table.lookup(_u64(b, c)) == -1).all() and len(table) == 1
    assert table.scatter_add(_u64(b, c), grads[:2], now_ms=3) == 0
    # once admitted, b starts from its initial vector: earlier gradients were not kept
    table.insert(_u64(b), now_ms=4)
    np.testing.assert_array_equal(table.gather(_u64(b)), table.initial_vectors(_u64(b)))


@pytest.mark.parametrize("optimizer", ["adagrad", "rowwise_adagrad", "sgd"])
def test_update_of_a_subset_leaves_others_unchanged(optimizer: str) -> None:
    ids = _random_ids(1_000, 9)
    table = EmbeddingTable(8, optimizer=optimizer, adagrad_init=0.1)
    table.insert(ids, now_ms=100)
    before = table.gather(ids)
    ts_before = table.last_update_ms[table.lookup(ids)].copy()
    subset = ids[[3, 50, 50, 999]]  # a repeated ID: its gradients are summed
    grads = np.random.default_rng(10).normal(size=(4, 8)).astype(np.float32)
    assert table.apply_gradients(subset, grads, now_ms=200, lr=0.05) == 3
    after = table.gather(ids)
    changed = np.zeros(ids.size, bool)
    changed[[3, 50, 999]] = True
    np.testing.assert_array_equal(after[~changed], before[~changed])
    ts = table.last_update_ms[table.lookup(ids)]
    np.testing.assert_array_equal(ts[~changed], ts_before[~changed])
    assert (ts[changed] == 200).all()
    g = {3: grads[0], 50: grads[1] + grads[2], 999: grads[3]}
    for i, gi in g.items():
        if optimizer == "sgd":
            expect = before[i] - 0.05 * gi
        elif optimizer == "adagrad":
            expect = before[i] - 0.05 * gi / (np.sqrt(0.1 + gi * gi) + 1e-8)
        else:
            expect = before[i] - 0.05 * gi / (np.sqrt(0.1 + np.mean(gi * gi)) + 1e-8)
        np.testing.assert_allclose(after[i], expect, rtol=1e-5, atol=1e-7)


def test_scatter_add_and_event_time_never_goes_back() -> None:
    table = EmbeddingTable(3)
    table.insert(_u64(1, 2), now_ms=1_000)
    table.scatter_add(_u64(1, 1), np.ones((2, 3), np.float32), now_ms=500)  # late event
    row = table.lookup(_u64(1))[0]
    assert table.last_update_ms[row] == 1_000
    np.testing.assert_allclose(table.gather(_u64(1))[0], table.initial_vectors(_u64(1))[0] + 2)


# --- expiry and eviction -------------------------------------------------------------------


def test_expire_frees_exactly_the_stale_rows_and_reuses_them() -> None:
    table = EmbeddingTable(2, max_rows=100)
    ids = np.arange(1, 21, dtype=np.uint64)
    for i, k in enumerate(ids):
        table.insert(k.reshape(1), now_ms=1_000 + 10 * i)  # ids[i] at 1000 + 10 i
    table.apply_gradients(ids[:2], np.ones((2, 2), np.float32), now_ms=5_000, lr=0.1)
    old_rows = table.lookup(ids)
    # cutoff = 1_100: rows updated before it go (ids[2..9]); ids[10] at exactly 1_100 stays
    assert table.expire(now_ms=1_600, ttl_ms=500) == 8
    alive = table.lookup(ids) >= 0
    expect = np.ones(20, bool)
    expect[2:10] = False
    np.testing.assert_array_equal(alive, expect)
    assert table.stats()["expired"] == 8 and len(table) == 12
    assert table.expire(now_ms=1_600, ttl_ms=500) == 0 and table.stats()["expired"] == 8
    new_rows = table.insert(np.arange(100, 108, dtype=np.uint64), now_ms=2_000)
    assert set(new_rows.tolist()) == set(old_rows[2:10].tolist())  # free list reused
    assert table.embeddings.shape[0] == 20  # no new rows were needed


def test_eviction_removes_least_recently_updated_in_a_batch() -> None:
    table = EmbeddingTable(2, max_rows=100, evict_fraction=0.1)
    ids = np.arange(1, 101, dtype=np.uint64)
    times = np.random.default_rng(11).permutation(100) * 10  # distinct update times
    for k, t in zip(ids, times, strict=True):
        table.insert(k.reshape(1), now_ms=int(t))
    oldest = ids[np.argsort(times)]
    # refresh the two oldest: one by a sighting, one by a gradient
    table.insert(oldest[:1], now_ms=10_000)
    table.apply_gradients(oldest[1:2], np.ones((1, 2), np.float32), now_ms=10_000, lr=0.1)
    assert len(table) == 100
    table.insert(np.arange(1_000, 1_003, dtype=np.uint64), now_ms=20_000)
    stats = table.stats()
    assert stats["evicted"] == 10  # max(3 needed, 10% of 100)
    assert len(table) == 93 and stats["admitted"] == 103
    gone = table.lookup(ids) < 0
    np.testing.assert_array_equal(np.sort(ids[gone]), np.sort(oldest[2:12]))
    assert (table.lookup(np.arange(1_000, 1_003, dtype=np.uint64)) >= 0).all()
    assert table.evict(0) == 0 and table.stats()["evicted"] == 10
    assert table.evict(5) == 5 and table.stats()["evicted"] == 15
    np.testing.assert_array_equal(np.sort(ids[table.lookup(ids) < 0]), np.sort(oldest[2:17]))


def test_eviction_ties_are_deterministic_and_batch_members_are_protected() -> None:
    def build() -> EmbeddingTable:
        table = EmbeddingTable(2, max_rows=10, evict_fraction=0.2)
        table.insert(np.arange(10, dtype=np.uint64), now_ms=5)  # all tied
        return table

    t1, t2 = build(), build()
    # an old ID re-sighted in the same batch as the newcomers must not be evicted
    batch = np.array([3, 100, 101], np.uint64)
    r1, r2 = t1.insert(batch, now_ms=1), t2.insert(batch, now_ms=1)
    np.testing.assert_array_equal(r1, r2)
    assert (r1 >= 0).all() and np.unique(r1).size == 3
    assert t1.lookup(_u64(3))[0] == r1[0]
    assert t1 == t2 and t1.stats()["evicted"] == 2


def test_batch_larger_than_capacity_overflows_without_breaking() -> None:
    table = EmbeddingTable(2, max_rows=8)
    rows = table.insert(np.arange(20, dtype=np.uint64), now_ms=1)
    assert (rows >= 0).sum() == 8 and len(table) == 8
    assert table.stats()["overflow"] == 12 and table.stats()["admitted"] == 8
    assert np.unique(rows[rows >= 0]).size == 8


# --- snapshot / restore --------------------------------------------------------------------


def _busy_table() -> tuple[EmbeddingTable, np.ndarray]:
    table = EmbeddingTable(6, max_rows=3_000, admit_threshold=2, evict_fraction=0.05)
    rng = np.random.default_rng(12)
    ids = rng.integers(0, 5_000, 20_000).astype(np.uint64)
    for i, chunk in enumerate(np.array_split(ids, 20)):
        table.insert(chunk, now_ms=1_000 * i)
        grads = rng.normal(size=(chunk.size, 6)).astype(np.float32)
        table.apply_gradients(chunk, grads, now_ms=1_000 * i, lr=0.01)
    table.expire(now_ms=20_000, ttl_ms=2_500)
    table.insert(_u64(2**64 - 1, 2**64 - 1), now_ms=21_000)
    return table, np.arange(5_000, dtype=np.uint64)


def _assert_same(a: EmbeddingTable, b: EmbeddingTable, ids: np.ndarray) -> None:
    assert a == b
    probe = np.concatenate([ids, _u64(2**64 - 1)])
    np.testing.assert_array_equal(a.lookup(probe), b.lookup(probe))
    np.testing.assert_array_equal(a.gather(probe), b.gather(probe))
    assert a.stats() == b.stats()
    np.testing.assert_array_equal(a.sketch.table, b.sketch.table)


def test_snapshot_round_trip_is_equal_and_independent() -> None:
    table, ids = _busy_table()
    stats = table.stats()
    assert stats["evicted"] > 0 and stats["expired"] > 0 and stats["rejected"] > 0
    snap = table.snapshot()
    restored = EmbeddingTable.restore(snap)
    _assert_same(table, restored, ids)
    # the same future on both keeps them equal; the snapshot is not a view
    for t in (table, restored):
        t.insert(np.arange(4_000, 6_000, dtype=np.uint64), now_ms=30_000)
        t.apply_gradients(ids[:100], np.ones((100, 6), np.float32), now_ms=30_000, lr=0.1)
        t.expire(now_ms=40_000, ttl_ms=15_000)
    _assert_same(table, restored, ids)
    _assert_same(EmbeddingTable.restore(snap), EmbeddingTable.restore(snap), ids)
    assert EmbeddingTable.restore(snap) != table


def test_pickle_and_npz_round_trip(tmp_path: Path) -> None:
    table, ids = _busy_table()
    blob = pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(blob) < 1.2 * sum(v for k, v in table.memory().items()) + 10_000
    _assert_same(table, pickle.loads(blob), ids)
    path = tmp_path / "table.npz"
    table.save(path)
    loaded = EmbeddingTable.load(path)
    _assert_same(table, loaded, ids)
    loaded.insert(_u64(123_456), now_ms=50_000)  # loaded arrays are writable
    loaded.insert(_u64(123_456), now_ms=50_000)
    assert loaded.lookup(_u64(123_456))[0] >= 0


def test_empty_table_round_trips() -> None:
    table = EmbeddingTable(3, admit_threshold=1)
    restored = EmbeddingTable.restore(table.snapshot())
    assert restored == table and len(restored) == 0
    np.testing.assert_array_equal(restored.gather(_u64(1)), np.zeros((1, 3), np.float32))
    assert restored.insert(_u64(1), now_ms=1)[0] == 0


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        TableConfig(dim=0)
    with pytest.raises(ValueError):
        TableConfig(dim=2, optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        EmbeddingTable(2, config=TableConfig(dim=2))


# --- model-based property test -------------------------------------------------------------


ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.lists(st.integers(0, 40), max_size=12), st.integers(0, 50)),
        st.tuples(st.just("expire"), st.integers(0, 60), st.integers(0, 30)),
        st.tuples(st.just("evict"), st.integers(0, 5), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_matches_a_dict_model(script: list) -> None:
    """Threshold 2, capacity 16: live set, update times and every counter follow a
    plain-Python model of admission, LRU batch eviction (ties by row) and expiry."""
    cap, thr = 16, 2
    table = EmbeddingTable(
        2, max_rows=cap, admit_threshold=thr, evict_fraction=0.25, initial_rows=2,
        sketch_decay_every=0,
    )
    keys = np.arange(41, dtype=np.uint64)
    seen: Counter[int] = Counter()  # sightings while unadmitted (the sketch, exact here)
    live: dict[int, int] = {}  # id -> last update (ms)
    want = dict.fromkeys(("admitted", "rejected", "expired", "evicted", "overflow"), 0)

    for op, a, b in script:
        row_of = dict(zip(keys.tolist(), table.lookup(keys).tolist(), strict=True))

        def lru(n: int, protect: set[int], row_of: dict = row_of) -> list[int]:
            cands = sorted((live[k], row_of[k], k) for k in live if k not in protect)
            return [k for _, _, k in cands[:n]]

        if op == "insert":
            occ = Counter(a)
            hits = {k for k in occ if k in live}
            for k in hits:
                live[k] = max(live[k], b)
            new = []
            for k in sorted(occ):
                if k in hits:
                    continue
                before = seen[k]
                seen[k] += occ[k]
                want["rejected"] += min(max(thr - 1 - before, 0), occ[k])
                if before + occ[k] >= thr:
                    new.append(k)
            if len(new) > cap - len(live):
                gone = lru(max(len(new) - (cap - len(live)), 4), protect=hits)
                for k in gone:
                    del live[k]
                want["evicted"] += len(gone)
                room = cap - len(live)
                want["overflow"] += max(0, len(new) - room)
                new = new[:room]
            for k in new:
                live[k] = b
            want["admitted"] += len(new)
            rows = table.insert(np.array(a, np.uint64), now_ms=b)
            assert [r >= 0 for r in rows.tolist()] == [k in live for k in a]
        elif op == "expire":
            stale = [k for k, t in live.items() if t < a - b]
            for k in stale:
                del live[k]
            want["expired"] += len(stale)
            assert table.expire(now_ms=a, ttl_ms=b) == len(stale)
        else:
            gone = lru(a, protect=set())
            for k in gone:
                del live[k]
            want["evicted"] += len(gone)
            assert table.evict(a) == len(gone)

        rows = table.lookup(keys)
        assert {int(k) for k in keys[rows >= 0]} == set(live)
        assert np.unique(rows[rows >= 0]).size == len(live) == len(table) <= cap
        for k, t in live.items():
            assert table.last_update_ms[rows[k]] == t
        stats = table.stats()
        assert {k: stats[k] for k in want} == want


def test_single_key_lookup_agrees_with_the_vectorised_one() -> None:
    """``row_of``/``vector_of`` (plain Python, one key) give what ``lookup``/``gather`` give:
    present, absent, evicted and the reserved EMPTY_KEY ID, across index growth."""
    table = EmbeddingTable(4, max_rows=3_000, evict_fraction=0.1)
    keys = keys_of([f"u{i}" for i in range(4_000)])  # more than max_rows: evictions
    for start in range(0, keys.size, 500):
        table.insert(keys[start:start + 500], 1_000 + start)
    table.insert(np.array([EMPTY_KEY]), 9_999)
    probe = np.concatenate([keys, keys_of([f"absent{i}" for i in range(500)]),
                            np.array([EMPTY_KEY])])
    rows = table.lookup(probe)
    assert (rows >= 0).sum() > 2_000 and (rows < 0).sum() > 500
    assert [table.row_of(int(k)) for k in probe] == rows.tolist()
    vectors = table.gather(probe)
    for k, row, vec in zip(probe.tolist(), rows.tolist(), vectors, strict=True):
        got = table.vector_of(k)
        assert (got is None) if row < 0 else np.array_equal(got, vec)


class _WalkOnly(EmbeddingTable):
    """Every placement by the vectorised walk (the form before us15's one-key path)."""

    def _place_one(self, key: int, row: int) -> bool:
        return False


def test_one_key_placement_takes_the_walks_slot() -> None:
    """``_place_one`` (plain Python, one new key) puts the key in the slot the vectorised
    walk's first round gives it, and leaves full buckets to the walk: the index arrays
    stay equal key by key through growth, high load and evictions."""
    ours = EmbeddingTable(2, max_rows=3_000, max_load=0.97, initial_rows=16)
    walk = _WalkOnly(2, max_rows=3_000, max_load=0.97, initial_rows=16)
    ids = _random_ids(4_000, 7)  # more than max_rows: evictions
    sizes = np.random.default_rng(7).choice([1, 1, 1, 2, 5], 2_000)
    at = 0
    for step, size in enumerate(sizes.tolist(), 1):
        batch = ids[at:at + size]
        at += size
        assert np.array_equal(ours.insert(batch, step), walk.insert(batch, step))
        assert np.array_equal(ours._idx_keys, walk._idx_keys)
        assert np.array_equal(ours._idx_rows, walk._idx_rows)
        if at >= ids.size:
            break
    assert walk.stats()["index_growths"] >= 3 and walk.stats()["evicted"] > 0
