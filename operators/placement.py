"""Shard keys that Bytewax spreads evenly over its workers.

Bytewax 0.21 runs a stateful key on worker ``SipHash-1-3(key) mod workers``: Rust's
``DefaultHasher`` (SipHash-1-3 with zero keys) over the key's ``Hash`` bytes (its UTF-8
bytes then ``0xff``), modulo the number of workers of the whole cluster (processes x
threads); checked against real 1-, 2-, 3- and 4-worker clusters in
tests/test_placement.py. Plain names (``i000``..``i003``) can all land on one worker:
the zero-config 4 item shards did, in 2 processes, on the second.

``spread_key(prefix, index)`` is ``<prefix><index:03d>`` when that name's route is
``index`` modulo ``SPREAD``, else the name with the smallest suffix ``_<k>`` that makes
it so; shard ``j`` then runs on worker ``j mod W`` for every ``W`` dividing ``SPREAD``
(1, 2, 3, 4, 6, 12 workers): round robin, as even as the shard count allows.
``last_key(name)`` places a single-key stage (ranker trainer, pool trainer, index
builder, metrics) on the last worker for those worker counts: worker 0 also reads and
parses the one-partition inputs (simulator, replays that are not sharded) and writes the
recommendations, so the last worker is the less loaded one.
"""

from __future__ import annotations

from functools import lru_cache

SPREAD = 12
"""Worker counts that divide this get a round-robin placement of shard keys."""

_M64 = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M64


def siphash13(data: bytes) -> int:
    """SipHash-1-3 with keys (0, 0) of ``data``: Rust's ``DefaultHasher`` (unsigned 64-bit)."""
    v0, v1 = 0x736F6D6570736575, 0x646F72616E646F6D
    v2, v3 = 0x6C7967656E657261, 0x7465646279746573

    def rounds(n: int) -> None:
        nonlocal v0, v1, v2, v3
        for _ in range(n):
            v0 = (v0 + v1) & _M64
            v1 = _rotl(v1, 13) ^ v0
            v0 = _rotl(v0, 32)
            v2 = (v2 + v3) & _M64
            v3 = _rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & _M64
            v3 = _rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & _M64
            v1 = _rotl(v1, 17) ^ v2
            v2 = _rotl(v2, 32)

    n = len(data)
    end = n - n % 8
    for i in range(0, end, 8):
        m = int.from_bytes(data[i:i + 8], "little")
        v3 ^= m
        rounds(1)
        v0 ^= m
    b = ((n & 0xFF) << 56) | int.from_bytes(data[end:], "little")
    v3 ^= b
    rounds(1)
    v0 ^= b
    v2 ^= 0xFF
    rounds(3)
    return v0 ^ v1 ^ v2 ^ v3


def route(key: str) -> int:
    """Bytewax 0.21's routing hash of a state key (``route(key) % workers`` runs it)."""
    return siphash13(key.encode() + b"\xff")


def worker_of(key: str, workers: int) -> int:
    """The worker (0-based, over the whole cluster) that runs ``key``."""
    return route(key) % workers


@lru_cache(maxsize=4096)
def spread_key(prefix: str, index: int) -> str:
    """The Bytewax key of shard ``index`` of a sharded stage (``prefix`` ``u``: user
    shards, ``i``: item shards): ``<prefix><index:03d>``, with the smallest suffix
    ``_<k>`` that puts it on worker ``index mod W`` for every ``W`` dividing ``SPREAD``."""
    base = f"{prefix}{index:03d}"
    key, k = base, 0
    while route(key) % SPREAD != index % SPREAD:
        k += 1
        key = f"{base}_{k}"
    return key


@lru_cache(maxsize=256)
def last_key(name: str) -> str:
    """The Bytewax key of the single-key stage ``name``: ``name`` itself when it runs on
    the last worker of every cluster whose worker count divides ``SPREAD``, else the name
    with the smallest suffix ``_<k>`` that makes it so."""
    key, k = name, 0
    while route(key) % SPREAD != SPREAD - 1:
        k += 1
        key = f"{name}_{k}"
    return key
