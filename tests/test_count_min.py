"""Tests for the count-min admission sketch."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest

from state.count_min import CountMinSketch


def _zipf_stream(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.zipf(1.3, n) % 50_000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)


def test_never_underestimates_and_error_is_small() -> None:
    stream = _zipf_stream(200_000)
    sketch = CountMinSketch(width=1 << 12, depth=4)
    for chunk in np.array_split(stream, 37):
        sketch.add(chunk)
    truth = Counter(stream.tolist())
    keys = np.array(list(truth), np.uint64)
    true = np.array([truth[k] for k in keys.tolist()])
    est = sketch.estimate(keys)
    assert (est >= true).all()
    # count-min bound: overestimate <= e/width * N with prob 1 - e^-depth per key
    bound = np.e / sketch.width * stream.size
    assert np.mean(est - true <= bound) > 0.98
    assert sketch.total == stream.size


def test_conservative_update_beats_plain_count_min() -> None:
    stream = _zipf_stream(100_000, seed=1)
    sketch = CountMinSketch(width=1 << 10, depth=3)
    sketch.add(stream)
    # plain count-min on the same cells: every cell adds every increment
    uniq, counts = np.unique(stream, return_counts=True)
    cells = sketch._cells(uniq)
    plain = np.zeros_like(sketch.table, dtype=np.int64)
    for r in range(sketch.depth):
        np.add.at(plain[r], cells[r], counts)
    plain_est = plain[np.arange(sketch.depth)[:, None], cells].min(axis=0)
    est = sketch.estimate(uniq)
    assert (est >= counts).all()
    assert (est <= plain_est).all()
    assert est.sum() < plain_est.sum()


def test_exact_without_collisions_and_batching_does_not_matter() -> None:
    keys = np.arange(1, 201, dtype=np.uint64)
    one_by_one = CountMinSketch(width=1 << 16, depth=4)
    batched = CountMinSketch(width=1 << 16, depth=4)
    stream = np.repeat(keys, np.arange(1, 201))
    np.random.default_rng(2).shuffle(stream)
    for k in stream[:3000]:
        one_by_one.add(np.array([k]))
    one_by_one.add(stream[3000:])
    batched.add(stream)
    np.testing.assert_array_equal(batched.estimate(keys), np.arange(1, 201))
    np.testing.assert_array_equal(one_by_one.estimate(keys), np.arange(1, 201))


def test_add_returns_estimates_after_and_update_unique_before() -> None:
    sketch = CountMinSketch(width=1 << 12, depth=2)
    out = sketch.add(np.array([7, 7, 9], np.uint64))
    np.testing.assert_array_equal(out, [2, 2, 1])
    before = sketch.update_unique(np.array([7, 11], np.uint64), np.array([3, 1]))
    np.testing.assert_array_equal(before, [2, 0])
    np.testing.assert_array_equal(sketch.estimate(np.array([7, 9, 11], np.uint64)), [5, 1, 1])


def test_counters_saturate_instead_of_wrapping() -> None:
    sketch = CountMinSketch(width=1 << 4, depth=2, dtype=np.uint16)
    key = np.array([5], np.uint64)
    sketch.add(key, np.array([70_000]))
    sketch.add(key, np.array([10]))
    assert sketch.estimate(key)[0] == 65_535


def test_aging_halves_after_decay_every() -> None:
    sketch = CountMinSketch(width=1 << 10, depth=4, decay_every=10)
    key = np.array([3], np.uint64)
    sketch.add(key, np.array([9]))
    assert sketch.estimate(key)[0] == 9
    sketch.add(key, np.array([3]))  # 12 increments -> halve to 6
    assert sketch.estimate(key)[0] == 6
    assert sketch.since_decay == 0


def test_memory_is_bounded() -> None:
    sketch = CountMinSketch(width=1 << 8, depth=3, dtype=np.uint32)
    assert sketch.nbytes == 3 * 256 * 4
    sketch.add(np.random.default_rng(0).integers(0, 2**63, 100_000).astype(np.uint64))
    assert sketch.nbytes == 3 * 256 * 4


def test_snapshot_and_pickle_round_trip() -> None:
    sketch = CountMinSketch(width=1 << 10, depth=3, seed=5, decay_every=1000)
    sketch.add(_zipf_stream(5_000))
    snap = sketch.snapshot()
    restored = CountMinSketch.restore(snap)
    assert restored == sketch
    assert pickle.loads(pickle.dumps(sketch)) == sketch
    sketch.add(np.array([1], np.uint64))
    assert restored != sketch  # the snapshot is a copy, not a view
    assert CountMinSketch.restore(snap) == restored


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        CountMinSketch(width=1000)
    with pytest.raises(ValueError):
        CountMinSketch(width=1024, depth=0)
