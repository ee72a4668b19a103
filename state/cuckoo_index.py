"""The bucketized cuckoo index of ``EmbeddingTable``: uint64 key -> row, collisionless.

``2 hashes x 4-slot buckets``; ``nb`` (a power of two) buckets flattened into
``_idx_keys`` (uint64) and ``_idx_rows`` (int32). A key lives in one of its two buckets,
so a lookup reads at most 8 slots. Slot key ``EMPTY_KEY`` (2**64 - 1) marks a free
slot, whose row is -1; the one real ID equal to it is kept aside by the table
(``_reserved_row``). ``CuckooIndex`` is the index half of the table's state and
methods (a mixin: the table's snapshot holds its arrays); no Bytewax.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from state.hashing import splitmix64, splitmix64_one, stable_hash64

EMPTY_KEY = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_EMPTY_INT = int(EMPTY_KEY)
"""Reserved key marking an empty index slot (the real ID with this value is kept aside)."""
SLOTS = 4
"""Slots per bucket."""

_INDEX_SEED = 0x1D3E  # hash-family members (splitmix64 seeds), disjoint from the sketch's
_KICK_SEED = 0x4B1C
_MAX_ROUNDS = 500  # vectorized placement/kick rounds before the index grows


def keys_of(ids: Iterable[str | int]) -> np.ndarray:
    """uint64 keys for str/int entity IDs via :func:`stable_hash64` (stable across processes).

    ``42`` and ``"42"`` map to the same key. Integer arrays that already are 64-bit IDs
    can be passed to the table directly instead (they are used as-is).
    """
    return np.fromiter((stable_hash64(i) for i in ids), dtype=np.uint64)


def as_keys(ids: np.ndarray | Iterable[int]) -> np.ndarray:
    """Integer IDs as a 1-D uint64 array (signed values reinterpreted, not hashed)."""
    arr = np.asarray(ids)
    if arr.dtype == np.uint64:
        return arr.reshape(-1)
    if arr.size == 0:
        return np.zeros(0, np.uint64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"IDs must be integers (got {arr.dtype}); hash str IDs with keys_of()")
    return arr.astype(np.int64).reshape(-1).view(np.uint64)


def pow2_at_least(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


class CuckooIndex:
    """Key -> row index over ``_idx_keys``/``_idx_rows`` (the table's arrays); needs the
    table's ``config`` (``max_load``, ``hash_seed``), ``_reserved_row``, ``_n_indexed``,
    ``_counters`` and ``_emb``."""

    config: Any
    _reserved_row: int
    _n_indexed: int
    _counters: dict[str, int]
    _nb: int
    _idx_keys: np.ndarray
    _idx_rows: np.ndarray

    def _buckets_for(self, n_keys: int) -> int:
        need = math.ceil(max(n_keys, 1) / (self.config.max_load * SLOTS))
        return max(2, pow2_at_least(need))

    def _new_index(self, nb: int) -> None:
        self._nb = nb
        self._idx_keys = np.full(nb * SLOTS, EMPTY_KEY, np.uint64)
        self._idx_rows = np.full(nb * SLOTS, -1, np.int32)

    def _buckets(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The two candidate buckets of each key (intp arrays), always distinct.

        ``b1 = h mod nb`` and ``b2 = b1 xor d`` with ``d`` odd, both from one 64-bit hash
        ``h``. Doubling ``nb`` adds one high bit to each, so a key in bucket ``b`` moves
        to ``b`` or ``b + nb`` and never needs a new cuckoo placement (see _grow_index).
        """
        h = splitmix64(keys, _INDEX_SEED + self.config.hash_seed)
        mask = np.uint64(self._nb - 1)
        b1 = h & mask
        d = ((h >> np.uint64(32)) & mask) | np.uint64(1)
        return b1.astype(np.intp), (b1 ^ d).astype(np.intp)

    def _find_slots(self, keys: np.ndarray) -> np.ndarray:
        """Flat index slot of each key (int64, -1 if absent). ``keys`` must not be EMPTY_KEY."""
        b1, b2 = self._buckets(keys)
        k2 = self._idx_keys.reshape(self._nb, SLOTS)
        cand = np.concatenate((k2[b1], k2[b2]), axis=1)  # (n, 8)
        match = cand == keys[:, None]
        j = match.argmax(axis=1)
        found = match[np.arange(keys.size), j]
        slot = np.where(j < SLOTS, b1, b2) * SLOTS + (j & (SLOTS - 1))
        return np.where(found, slot, -1)

    def _try_place(self, keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Insert absent, distinct, non-EMPTY keys; returns the (keys, rows) left unplaced
        when the walk gives up after ``_MAX_ROUNDS`` rounds (then the index must grow).

        Each round places every pending key it can into the emptier of its two buckets
        (keys competing for one bucket take its free slots in order); keys whose buckets
        are both full evict a pseudo-random occupant (one winner per slot), which becomes
        pending and moves to its other bucket next round (parallel cuckoo random walk).
        """
        keys_ix, rows_ix = self._idx_keys, self._idx_rows
        if keys.size == 1 and self._place_one(int(keys[0]), int(rows[0])):
            return keys[:0], rows[:0].astype(np.int32)
        k2 = keys_ix.reshape(self._nb, SLOTS)
        pk, pr = keys, rows.astype(np.int32)
        for rnd in range(_MAX_ROUNDS):
            if pk.size == 0:
                break
            b1, b2 = self._buckets(pk)
            e1, e2 = k2[b1] == EMPTY_KEY, k2[b2] == EMPTY_KEY
            f1, f2 = e1.sum(axis=1), e2.sum(axis=1)
            use2 = f2 > f1
            b = np.where(use2, b2, b1)
            e = np.where(use2[:, None], e2, e1)
            free = np.maximum(f1, f2)
            # rank of each key among the pending keys choosing the same bucket
            order = np.argsort(b, kind="stable")
            bs = b[order]
            starts = np.flatnonzero(np.r_[True, bs[1:] != bs[:-1]])
            sizes = np.diff(np.r_[starts, bs.size])
            rank = np.empty(pk.size, np.int64)
            rank[order] = np.arange(pk.size) - np.repeat(starts, sizes)
            ok = rank < free
            # the rank-th empty slot of the chosen bucket
            j = (e & (np.cumsum(e, axis=1) == (rank + 1)[:, None])).argmax(axis=1)
            slot = b[ok] * SLOTS + j[ok]
            keys_ix[slot], rows_ix[slot] = pk[ok], pr[ok]
            # kicks: keys whose two buckets were both full at the start of the round
            full = ~ok & (free == 0)
            wait = ~ok & (free > 0)
            kk, kr = pk[full], pr[full]
            target = self._kick_targets(kk, b1[full], b2[full], rnd)
            _, win = np.unique(target, return_index=True)
            lose = np.ones(kk.size, bool)
            lose[win] = False
            t = target[win]
            victims_k, victims_r = keys_ix[t].copy(), rows_ix[t].copy()
            keys_ix[t], rows_ix[t] = kk[win], kr[win]
            pk = np.concatenate((pk[wait], kk[lose], victims_k))
            pr = np.concatenate((pr[wait], kr[lose], victims_r))
        return pk, pr

    def _buckets_one(self, key: int) -> tuple[int, int]:
        """``_buckets`` of one key in plain Python ints."""
        h = splitmix64_one(key, _INDEX_SEED + self.config.hash_seed)
        mask = self._nb - 1
        b1 = h & mask
        return b1, b1 ^ (((h >> 32) & mask) | 1)

    def _place_one(self, key: int, row: int) -> bool:
        """``_try_place``'s first round for one key in plain Python (a free slot of the
        emptier of its buckets, the first bucket on a tie, its first free slot: the
        same slot; ~40 numpy calls less); False, nothing changed, when both are full."""
        b1, b2 = self._buckets_one(key)
        keys_ix = self._idx_keys
        s1 = keys_ix[b1 * SLOTS:(b1 + 1) * SLOTS].tolist()
        s2 = keys_ix[b2 * SLOTS:(b2 + 1) * SLOTS].tolist()
        f1, f2 = s1.count(_EMPTY_INT), s2.count(_EMPTY_INT)
        b, bucket = (b2, s2) if f2 > f1 else (b1, s1)
        if not max(f1, f2):
            return False
        slot = b * SLOTS + bucket.index(_EMPTY_INT)
        keys_ix[slot] = key
        self._idx_rows[slot] = row
        return True

    def _kick_targets(self, keys: np.ndarray, b1: np.ndarray, b2: np.ndarray, rnd: int) -> np.ndarray:
        """Slot each key (both buckets full) should take over: preferably one whose
        occupant has a free slot in its other bucket (a two-step move), else a
        pseudo-random one of its 8 slots (random walk). Deterministic per (key, round)."""
        ar = np.arange(SLOTS)
        slots = np.concatenate((b1[:, None] * SLOTS + ar, b2[:, None] * SLOTS + ar), axis=1)
        occupants = self._idx_keys[slots]  # (m, 8), all real keys
        o1, o2 = self._buckets(occupants.reshape(-1))
        here = slots.reshape(-1) // SLOTS
        alt = np.where(o1 == here, o2, o1)
        k2 = self._idx_keys.reshape(self._nb, SLOTS)
        movable = (k2[alt] == EMPTY_KEY).any(axis=1).reshape(slots.shape)
        bits = splitmix64(keys, _KICK_SEED + rnd)
        shifts = (np.arange(2 * SLOTS, dtype=np.uint64) * np.uint64(3))[None, :]
        noise = ((bits[:, None] >> shifts) & np.uint64(7)).astype(np.int64)
        j = (movable * 8 + noise).argmax(axis=1)
        return slots[np.arange(keys.size), j]

    def _grow_index(self, nb: int) -> None:
        """Grow the index to ``nb`` buckets (a larger power of two) by splitting buckets.

        A key in old bucket ``b`` goes to the same choice (b1 or b2) under the new size,
        which is congruent to ``b`` mod the old size, and keeps its slot position: new
        bucket ``b'`` only receives keys from old bucket ``b' mod old_nb``, so nothing can
        overflow and no cuckoo walk is needed. Cost: one hash per stored key.
        """
        old_nb = self._nb
        occupied = np.flatnonzero(self._idx_keys != EMPTY_KEY)
        keys, rows = self._idx_keys[occupied], self._idx_rows[occupied]
        self._new_index(nb)
        b1, b2 = self._buckets(keys)
        old_b = occupied // SLOTS
        target = np.where((b1 & (old_nb - 1)) == old_b, b1, b2)
        slot = target * SLOTS + occupied % SLOTS
        self._idx_keys[slot] = keys
        self._idx_rows[slot] = rows
        self._counters["index_growths"] += 1

    def _index_add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Index new keys (absent, distinct) whose rows already carry them in ``row_keys``."""
        reserved = keys == EMPTY_KEY
        if reserved.any():
            self._reserved_row = int(rows[reserved][0])
            keys, rows = keys[~reserved], rows[~reserved]
        n_after = self._n_indexed + keys.size
        if n_after > self.config.max_load * self._idx_keys.size:
            self._grow_index(self._buckets_for(n_after))
        pending, pending_rows = self._try_place(keys, rows)
        while pending.size:  # the walk gave up (very unlikely below max_load): grow, retry
            self._grow_index(2 * self._nb)
            pending, pending_rows = self._try_place(pending, pending_rows)
        self._n_indexed = n_after

    # --- lookups ------------------------------------------------------------------------

    def lookup(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        """Row of each ID (int64, -1 if it has no row). Does not count as an update."""
        keys = as_keys(ids)
        slot = self._find_slots(keys)
        rows = np.where(slot >= 0, self._idx_rows[slot], -1).astype(np.int64)
        if self._reserved_row >= 0:
            rows[keys == EMPTY_KEY] = self._reserved_row
        return rows

    def row_of(self, key: int) -> int:
        """Row of one uint64 key (-1 if it has no row): ``lookup`` for a single ID in
        plain Python (a few us instead of ~40 us of numpy overhead per call)."""
        if key == _EMPTY_INT:
            return self._reserved_row
        for b in self._buckets_one(key):
            start = b * SLOTS
            bucket = self._idx_keys[start:start + SLOTS].tolist()
            if key in bucket:
                return int(self._idx_rows[start + bucket.index(key)])
        return -1
