"""operators/placement.py predicts where Bytewax runs a key, and the shard keys it picks are
spread round robin: checked against real Bytewax clusters of 2, 3 and 4 workers."""

from __future__ import annotations

import threading
from collections import defaultdict

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, cluster_main

from flows.recsys import INDEX_KEY, METRICS_KEY, POOL_KEY, RANKER_KEY
from operators.item_shard import item_shard_key
from operators.placement import SPREAD, last_key, spread_key, worker_of
from operators.user_shard import shard_key


def _placement(keys: list[str], workers: int) -> list[set[str]]:
    """The keys each worker of a real ``workers``-thread Bytewax cluster ran."""
    seen: dict[int, set[str]] = defaultdict(set)
    lock = threading.Lock()

    def record(state: None, key_value: str) -> tuple[None, str]:
        with lock:
            seen[threading.get_ident()].add(key_value)
        return None, key_value

    flow = Dataflow("placement")
    keyed = op.key_on("key", op.input("in", flow, TestingSource(keys)), lambda k: k)
    op.inspect("done", op.stateful_map("where", keyed, record), lambda _step, _kv: None)
    cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return list(seen.values())


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_worker_of_predicts_bytewax(workers: int) -> None:
    keys = [f"u{i:03d}" for i in range(24)] + [f"i{i:03d}" for i in range(24)] + [
        "ranker", "index", "metrics"]
    actual = _placement(keys, workers)
    predicted: dict[int, set[str]] = defaultdict(set)
    for key in keys:
        predicted[worker_of(key, workers)].add(key)
    assert sorted(map(sorted, actual)) == sorted(map(sorted, predicted.values()))


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_shard_keys_are_spread_round_robin(workers: int) -> None:
    users = [shard_key(i) for i in range(8)]
    items = [item_shard_key(i) for i in range(4)]
    for keys in (users, items):
        counts = sorted(len(group) for group in _placement(keys, workers))
        even = len(keys) // workers
        assert len(counts) == min(workers, len(keys))
        assert counts[0] >= even and counts[-1] <= even + 1, counts
    # plain names are not: the 4 item shards i000..i003 all run on one of 2 workers
    assert len({worker_of(f"i{i:03d}", 2) for i in range(4)}) == 1


def test_spread_key_is_stable_and_keeps_the_index_readable() -> None:
    assert spread_key("i", 3) == spread_key("i", 3)
    for i in range(20):
        key = spread_key("u", i)
        assert key.split("_")[0] == f"u{i:03d}"
        assert all(worker_of(key, w) == i % w for w in (1, 2, 3, 4, 6, SPREAD))


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_single_key_stages_run_on_the_last_worker(workers: int) -> None:
    """The trainer, pool trainer, index builder and metrics keys run on the worker that
    holds user shard ``workers - 1`` (the last one), away from worker 0, which reads the
    one-partition inputs; the plain names do not all get there."""
    single = [RANKER_KEY, POOL_KEY, INDEX_KEY, METRICS_KEY]
    assert [k.split("_")[0] for k in single] == ["ranker", "pool", "index", "metrics"]
    last = shard_key(workers - 1)
    groups = _placement([*single, last, shard_key(0)], workers)
    [group] = [g for g in groups if last in g]
    assert set(single) <= group and shard_key(0) not in group
    assert all(worker_of(last_key(n), w) == w - 1 for n in ("ranker", "x") for w in (1, 2, 3, 4, 6, 12))
    assert any(worker_of(n, workers) != workers - 1 for n in ("ranker", "pool", "index", "metrics"))
