"""bench/latency.py: the co-partitioned events topic puts each user's events in the
partition read by the worker that runs the user's shard."""

from __future__ import annotations

from typing import Any

import pytest
from bench_module import load_bench

from flows.config import load_config
from operators.placement import worker_of
from operators.user_shard import shard_key
from state.hashing import ShardOf


def _bench() -> Any:
    return load_bench("latency")


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_co_partition_sends_a_user_to_the_partition_of_its_shard_s_worker(workers: int) -> None:
    partition_of = _bench().co_partition_of(workers)
    shard_of = ShardOf(load_config(None).shards.users)
    users = [f"u{i}" for i in range(500)] + list(range(50))
    # Bytewax runs partition p of a source on worker p (round robin in name order) and
    # user shard j on worker j mod W (operators.placement): the same worker
    assert all(partition_of(u) == worker_of(shard_key(shard_of(str(u))), workers)
               for u in users)
    assert set(map(partition_of, users)) == set(range(workers))
