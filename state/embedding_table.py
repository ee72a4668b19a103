"""Collisionless embedding table: a bucketized cuckoo hash index over a dense row pool.

Monolith-style (arXiv 2209.07663) sparse-ID storage, numpy only (no Bytewax):

* **Index.** ``2 hashes x 4-slot buckets``; ``nb`` (a power of two) buckets flattened
  into ``idx_keys`` (uint64) and ``idx_rows`` (int32). A key lives in one of its two
  buckets, so a lookup reads at most 8 slots. Slot key ``EMPTY_KEY`` (2**64 - 1) marks
  a free slot, whose row is -1. The one real ID equal to ``EMPTY_KEY`` is kept out of
  the index in a dedicated side entry (``reserved_row``), so it still gets its own
  row: no two IDs ever share a row.
* **Rows.** A dense pool (``emb`` float32 ``(rows, dim)``, optimizer slots, last
  update time in ms ``int64``, sighting count ``uint32``, owner key ``uint64``) with a
  free list. Rows ``[0, hw)`` have been used at least once; a free row has
  ``ts == FREE_TS``.
* **Admission.** Unknown IDs are counted in a count-min sketch and get a row only once
  seen ``admit_threshold`` times. Unadmitted IDs read as the default embedding and are
  not trained. New rows are initialised deterministically from the ID.
* **Expiry / capacity.** ``expire(now_ms, ttl_ms)`` frees rows last updated before
  ``now_ms - ttl_ms``; at ``max_rows`` the least recently updated rows are evicted in
  a batch.
* **Snapshot.** All state is a handful of arrays; ``snapshot``/``restore``, pickling
  and ``.npz`` files copy them and nothing else.

Times are integer epoch **milliseconds** (event time). "Updated" means written by
``insert`` (a sighting) or by ``apply_gradients``/``scatter_add``; reads never
refresh a row.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Literal

import numpy as np

from state.count_min import CountMinSketch
from state.cuckoo_index import EMPTY_KEY, SLOTS, CuckooIndex, as_keys, keys_of, pow2_at_least
from state.hashing import splitmix64

__all__ = ["EMPTY_KEY", "FREE_TS", "EmbeddingTable", "TableConfig", "keys_of"]
"""``keys_of`` and ``EMPTY_KEY`` live with the index (state/cuckoo_index.py); the table's
API offers them too."""

FREE_TS = np.int64(np.iinfo(np.int64).min)
"""Last-update time of a free row (no real event time is this small)."""

_INIT_SEED = 0x1417  # hash-family member (splitmix64 seed) of the initial vectors
_SNAPSHOT_VERSION = 1
_CNT_MAX = np.iinfo(np.uint32).max
_COUNTERS = ("admitted", "rejected", "expired", "evicted", "overflow", "index_growths")

Optimizer = Literal["adagrad", "rowwise_adagrad", "sgd"]


@dataclass(frozen=True)
class TableConfig:
    """Static configuration of an :class:`EmbeddingTable` (all of it is snapshotted)."""

    dim: int
    max_rows: int = 1 << 20  # capacity bound; LRU batch eviction beyond it
    admit_threshold: int = 1  # sightings before an ID gets a row (1 = immediately)
    init_scale: float = 0.01  # new rows ~ Normal(0, init_scale), seeded by the ID
    init_seed: int = 0
    missing: Literal["zeros", "init"] = "zeros"  # what gather returns for IDs without a row
    optimizer: Optimizer = "adagrad"
    adagrad_init: float = 0.1  # initial accumulator value
    adagrad_eps: float = 1e-8
    evict_fraction: float = 0.01  # when full, evict at least this share of max_rows at once
    max_load: float = 0.9  # index load factor that triggers growth (doubling)
    hash_seed: int = 0
    initial_rows: int = 1024  # first row-pool allocation (grows by doubling to max_rows)
    sketch_width: int = 0  # 0: next power of two >= max(2 * max_rows, 1024)
    sketch_depth: int = 4
    sketch_decay_every: int | None = None  # halve the sketch after this many sightings of
    # unadmitted IDs (TinyLFU-style aging); None: sketch_width; 0: never

    def __post_init__(self) -> None:
        if self.dim < 1 or self.max_rows < 1:
            raise ValueError("dim and max_rows must be >= 1")
        if not 1 <= self.admit_threshold <= 255:
            raise ValueError("admit_threshold must be in [1, 255] (uint8 sketch counters)")
        if self.max_rows >= 2**31 - 1:
            raise ValueError("max_rows must fit in int32")
        if not 0.0 <= self.evict_fraction <= 1.0:
            raise ValueError("evict_fraction must be in [0, 1]")
        if not 0.1 <= self.max_load <= 0.97:
            raise ValueError("max_load must be in [0.1, 0.97]")
        if self.missing not in ("zeros", "init"):
            raise ValueError(f"unknown missing={self.missing!r}")
        if self.optimizer not in ("adagrad", "rowwise_adagrad", "sgd"):
            raise ValueError(f"unknown optimizer={self.optimizer!r}")

    @property
    def slot_width(self) -> int:
        """Optimizer slot floats per row (dim for Adagrad, 1 for row-wise, 0 for SGD)."""
        return {"adagrad": self.dim, "rowwise_adagrad": 1, "sgd": 0}[self.optimizer]


class EmbeddingTable(CuckooIndex):
    """uint64 ID -> row of a float32 ``(rows, dim)`` matrix; collisionless, bounded, snapshottable.

    Invariants: every live ID owns exactly one row and every live row exactly one ID;
    ``len(self) <= max_rows``; index load <= ``max_load``.

    >>> table = EmbeddingTable(dim=4, max_rows=1_000, admit_threshold=2)
    >>> ids = keys_of(["user:1", "user:2"])
    >>> table.insert(ids, now_ms=1_000).tolist()  # first sighting: not admitted yet
    [-1, -1]
    >>> rows = table.insert(ids[:1], now_ms=2_000)  # second sighting of user:1: a row
    >>> len(table), table.gather(ids).shape, bool(table.gather(ids)[1].any())
    (1, (2, 4), False)
    >>> bool((EmbeddingTable.restore(table.snapshot()).gather(ids) == table.gather(ids)).all())
    True
    """

    def __init__(self, dim: int | None = None, config: TableConfig | None = None, **kw) -> None:
        if config is None:
            config = TableConfig(dim=dim, **kw)  # type: ignore[arg-type]
        elif dim is not None or kw:
            raise TypeError("pass either config or dim/keyword options, not both")
        self.config = config
        c = config
        cap = max(1, min(c.initial_rows, c.max_rows))
        self._emb = np.zeros((cap, c.dim), np.float32)
        self._acc = np.zeros((cap, c.slot_width), np.float32)
        self._ts = np.full(cap, FREE_TS, np.int64)
        self._cnt = np.zeros(cap, np.uint32)
        self._row_keys = np.full(cap, EMPTY_KEY, np.uint64)
        self._hw = 0  # rows [0, hw) were used at least once
        self._free = np.zeros(0, np.int32)  # LIFO stack of free rows below hw
        self._nfree = 0
        self._live = 0  # rows holding an ID
        self._reserved_row = -1  # row of the real ID equal to EMPTY_KEY, or -1
        self._n_indexed = 0  # keys in the cuckoo index (= live rows minus the reserved one)
        self._new_index(self._buckets_for(cap))
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._sketch: CountMinSketch | None = None
        if c.admit_threshold > 1:
            width = c.sketch_width or pow2_at_least(max(2 * c.max_rows, 1024))
            decay = width if c.sketch_decay_every is None else c.sketch_decay_every
            self._sketch = CountMinSketch(
                width, c.sketch_depth, seed=c.hash_seed, dtype=np.uint8, decay_every=decay or None
            )

    # --- sizes --------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of IDs holding a row."""
        return self._live

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def sketch(self) -> CountMinSketch | None:
        """The admission sketch (None when ``admit_threshold == 1``)."""
        return self._sketch

    def memory(self) -> dict[str, int]:
        """Bytes allocated, by part: ``table`` (embeddings + index + row metadata), ``slots``
        (optimizer state), ``sketch`` and ``free_list``. Includes unused pool capacity
        (a restored table's pool is trimmed to the rows in use)."""
        table = (
            self._emb.nbytes
            + self._ts.nbytes
            + self._cnt.nbytes
            + self._row_keys.nbytes
            + self._idx_keys.nbytes
            + self._idx_rows.nbytes
        )
        sketch = self._sketch.nbytes if self._sketch is not None else 0
        return {
            "table": int(table),
            "slots": int(self._acc.nbytes),
            "sketch": int(sketch),
            "free_list": int(self._free.nbytes),
        }

    def stats(self) -> dict[str, int | float]:
        """Counters (admitted, rejected, expired, evicted, overflow, index_growths) and gauges
        (rows, max_rows, index_slots, load_factor); see :meth:`memory` for bytes.

        ``rejected`` counts sightings of IDs still below the admission threshold;
        ``overflow`` counts admissions refused because every row was in use by the same
        batch; ``index_growths`` counts cuckoo index doublings (or larger growths).
        """
        return {
            **self._counters,
            "rows": self._live,
            "max_rows": self.config.max_rows,
            "index_slots": int(self._idx_keys.size),
            "load_factor": self._n_indexed / self._idx_keys.size,
        }

    # --- read-only row views (valid until the next call that allocates rows) ------------

    def _view(self, arr: np.ndarray) -> np.ndarray:
        view = arr[: self._hw]
        view.flags.writeable = False
        return view

    @property
    def embeddings(self) -> np.ndarray:
        """Read-only ``(hw, dim)`` view of the row pool (index it with ``lookup`` rows)."""
        return self._view(self._emb)

    @property
    def last_update_ms(self) -> np.ndarray:
        """Read-only per-row last update time in ms (``FREE_TS`` for free rows)."""
        return self._view(self._ts)

    @property
    def row_counts(self) -> np.ndarray:
        """Read-only per-row sightings since admission."""
        return self._view(self._cnt)

    @property
    def row_keys(self) -> np.ndarray:
        """Read-only per-row owner key (meaningful only for live rows)."""
        return self._view(self._row_keys)

    def live_rows(self) -> np.ndarray:
        """Rows currently holding an ID (int64, ascending)."""
        return np.flatnonzero(self._ts[: self._hw] != FREE_TS)

    def vector_of(self, key: int) -> np.ndarray | None:
        """The embedding of one uint64 key (float32 ``(dim,)``, a copy), or None without a row."""
        row = self.row_of(key)
        return None if row < 0 else self._emb[row].copy()

    def __contains__(self, id_: int) -> bool:
        return bool(self.lookup([id_])[0] >= 0)

    def gather(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        """Embeddings ``(n, dim)`` float32 (a new array); IDs without a row read the default
        (zeros, or their deterministic initial vector if ``missing="init"``)."""
        keys = as_keys(ids)
        return self.gather_rows(keys, self.lookup(keys))

    def gather_rows(self, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``gather(keys)`` when their ``rows`` are known (``insert``'s answer, -1 for an
        ID without a row), without looking them up again."""
        out = self._emb.take(rows, axis=0, mode="clip")
        miss = rows < 0
        if miss.any():
            if self.config.missing == "init":
                out[miss] = self.initial_vectors(keys[miss])
            else:
                out[miss] = 0.0
        return out

    def add_rows(self, rows: np.ndarray, deltas: np.ndarray, now_ms: int) -> int:
        """``scatter_add`` on known, distinct ``rows`` (``insert``'s answer for distinct
        IDs; -1 rows are skipped): the same sums without a lookup or a sort."""
        keep = rows >= 0
        if not keep.all():
            rows, deltas = rows[keep], deltas[keep]
        self._emb[rows] += np.asarray(deltas, np.float32).reshape(rows.size, self.dim)
        self._ts[rows] = np.maximum(self._ts[rows], np.int64(now_ms))
        return int(rows.size)

    def initial_vectors(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        """Deterministic initial embedding of each ID: Normal(0, init_scale) per element,
        from a counter-based hash of (init_seed, ID, column) and Box-Muller (float32)."""
        keys = as_keys(ids)
        base = splitmix64(keys, _INIT_SEED + self.config.init_seed)
        cols = np.arange(self.dim, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        with np.errstate(over="ignore"):
            bits = splitmix64(base[:, None] + cols[None, :], _INIT_SEED)
        scale = np.float32(2.0**-24)
        u1 = ((bits >> np.uint64(40)).astype(np.float32) + np.float32(0.5)) * scale  # (0, 1)
        u2 = ((bits >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float32) * scale
        z = np.sqrt(np.float32(-2.0) * np.log(u1)) * np.cos(np.float32(2 * np.pi) * u2)
        return z * np.float32(self.config.init_scale)

    # --- inserts, admission, eviction -----------------------------------------------------

    def insert(self, ids: np.ndarray | Iterable[int], now_ms: int) -> np.ndarray:
        """Record one sighting per occurrence of each ID at event time ``now_ms``.

        Known IDs get ``last_update = max(last_update, now_ms)`` and their count raised.
        Unknown IDs are counted in the admission sketch; those reaching
        ``admit_threshold`` sightings get a fresh, deterministically initialised row
        (evicting the least recently updated rows first if the table is full).
        Returns the row of each ID (int64, -1 if still unadmitted).
        """
        keys = as_keys(ids)
        if keys.size == 0:
            return np.zeros(0, np.int64)
        now = np.int64(now_ms)
        uniq, inverse, occ = np.unique(keys, return_inverse=True, return_counts=True)
        rows = self.lookup(uniq)
        hit = rows >= 0
        touched = rows[hit]
        self._ts[touched] = np.maximum(self._ts[touched], now)
        self._cnt[touched] = np.minimum(self._cnt[touched] + occ[hit], _CNT_MAX)  # saturate

        miss = np.flatnonzero(~hit)
        if miss.size:
            m_occ = occ[miss]
            n_thr = self.config.admit_threshold
            if self._sketch is None:
                admit = np.ones(miss.size, bool)
                early = np.zeros(miss.size, np.int64)
            else:
                before = self._sketch.update_unique(uniq[miss], m_occ)
                early = np.clip(n_thr - 1 - before, 0, m_occ)  # sightings below threshold
                admit = before + m_occ >= n_thr
            self._counters["rejected"] += int(early.sum())
            new = miss[admit]
            new_rows = self._alloc(new.size, protect=touched)
            if new_rows.size < new.size:
                self._counters["overflow"] += int(new.size - new_rows.size)
                new = new[: new_rows.size]
            if new.size:
                new_keys = uniq[new]
                self._emb[new_rows] = self.initial_vectors(new_keys)
                self._acc[new_rows] = self.config.adagrad_init
                self._ts[new_rows] = now
                self._cnt[new_rows] = (occ[new] - early[admit][: new.size]).astype(np.uint32)
                self._row_keys[new_rows] = new_keys
                self._index_add(new_keys, new_rows)
                self._live += new.size
                self._counters["admitted"] += int(new.size)
                rows[new] = new_rows
        return rows[inverse]

    def _alloc(self, k: int, protect: np.ndarray) -> np.ndarray:
        """Take ``k`` rows (free list first, then fresh rows), evicting if at capacity.

        Rows in ``protect`` are never evicted. Returns fewer than ``k`` rows only if
        even evicting every unprotected row cannot make room.
        """
        cap = self.config.max_rows
        if k == 0:
            return np.zeros(0, np.int64)
        room = cap - self._live
        if k > room:
            want = max(k - room, math.ceil(self.config.evict_fraction * cap))
            self._evict_lru(want, protect)
            k = min(k, cap - self._live)
        take = min(k, self._nfree)
        from_free = self._free[self._nfree - take : self._nfree][::-1].astype(np.int64)
        self._nfree -= take
        fresh = k - take
        self._ensure_pool(self._hw + fresh)
        new = np.arange(self._hw, self._hw + fresh, dtype=np.int64)
        self._hw += fresh
        return np.concatenate((from_free, new))

    def _ensure_pool(self, n_rows: int) -> None:
        """Grow the row pool (doubling, capped at max_rows) to hold ``n_rows`` rows."""
        cap = self._emb.shape[0]
        if n_rows <= cap:
            return
        new_cap = min(self.config.max_rows, max(n_rows, 2 * cap))

        def grown(arr: np.ndarray) -> np.ndarray:
            # rows >= hw are never read before insert() writes every field of them
            out = np.empty((new_cap, *arr.shape[1:]), arr.dtype)
            out[: self._hw] = arr[: self._hw]
            return out

        self._emb, self._acc = grown(self._emb), grown(self._acc)
        self._ts, self._cnt, self._row_keys = grown(self._ts), grown(self._cnt), grown(self._row_keys)

    def _free_rows(self, rows: np.ndarray) -> None:
        """Release live rows: drop their keys from the index and push them on the free list."""
        if rows.size == 0:
            return
        keys = self._row_keys[rows]
        normal = keys != EMPTY_KEY
        if not normal.all():
            self._reserved_row = -1
        slot = self._find_slots(keys[normal])
        assert (slot >= 0).all(), "live row missing from the index"
        self._idx_keys[slot] = EMPTY_KEY
        self._idx_rows[slot] = -1
        self._n_indexed -= int(normal.sum())
        self._ts[rows] = FREE_TS
        self._cnt[rows] = 0
        self._row_keys[rows] = EMPTY_KEY
        if self._nfree + rows.size > self._free.size:
            grown = np.empty(max(self._nfree + rows.size, 2 * self._free.size), np.int32)
            grown[: self._nfree] = self._free[: self._nfree]
            self._free = grown
        self._free[self._nfree : self._nfree + rows.size] = rows
        self._nfree += rows.size
        self._live -= rows.size

    def _evict_lru(self, n: int, protect: np.ndarray | None = None) -> int:
        """Free the ``n`` least recently updated rows (ties: lower row first)."""
        if n <= 0:
            return 0
        ts = self._ts[: self._hw]
        ok = ts != FREE_TS
        if protect is not None and protect.size:
            ok[protect] = False
        cand = np.flatnonzero(ok)
        if n < cand.size:
            t = ts[cand]
            kth = np.partition(t, n - 1)[n - 1]
            below, tied = cand[t < kth], cand[t == kth]
            cand = np.concatenate((below, tied[: n - below.size]))
        self._free_rows(cand)
        self._counters["evicted"] += int(cand.size)
        return int(cand.size)

    def evict(self, n: int) -> int:
        """Evict the ``n`` least recently updated rows now; returns how many were freed."""
        return self._evict_lru(max(0, int(n)))

    def expire(self, now_ms: int, ttl_ms: int) -> int:
        """Free rows whose last update is older than ``now_ms - ttl_ms`` (strictly).

        Returns the number of rows freed. Their sketch counts are kept, so an expired ID
        seen again is readmitted at once (until sketch aging forgets it).
        """
        ts = self._ts[: self._hw]
        rows = np.flatnonzero((ts != FREE_TS) & (ts < np.int64(now_ms) - np.int64(ttl_ms)))
        self._free_rows(rows)
        self._counters["expired"] += int(rows.size)
        return int(rows.size)

    # --- training -------------------------------------------------------------------------

    def _rows_and_sums(
        self, ids: np.ndarray | Iterable[int], values: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Distinct rows of the admitted IDs and the per-row sum of their ``values``."""
        keys = as_keys(ids)
        values = np.asarray(values, np.float32).reshape(keys.size, self.dim)
        rows = self.lookup(keys)
        keep = rows >= 0
        rows, values = rows[keep], values[keep]
        uniq, inverse = np.unique(rows, return_inverse=True)
        if uniq.size == rows.size:
            out = np.empty_like(values)
            out[inverse] = values
            return uniq, out
        order = np.argsort(inverse, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
        return uniq, np.add.reduceat(values[order], starts, axis=0)

    def apply_gradients(
        self, ids: np.ndarray | Iterable[int], grads: np.ndarray, now_ms: int, lr: float
    ) -> int:
        """One optimizer step on the rows of admitted IDs; others are ignored (not trained).

        Gradients of a repeated ID are summed first. Adagrad:
        ``acc += g**2; w -= lr * g / (sqrt(acc) + eps)`` (row-wise Adagrad keeps one
        accumulator per row, fed with ``mean(g**2)``; SGD: ``w -= lr * g``). Sets
        ``last_update = max(last_update, now_ms)``. Returns the number of rows updated.
        """
        rows, g = self._rows_and_sums(ids, grads)
        if rows.size == 0:
            return 0
        c = self.config
        lr32 = np.float32(lr)
        if c.optimizer == "sgd":
            self._emb[rows] -= lr32 * g
        else:
            sq = g * g if c.optimizer == "adagrad" else (g * g).mean(axis=1, keepdims=True)
            acc = self._acc[rows] + sq
            self._acc[rows] = acc
            self._emb[rows] -= lr32 * g / (np.sqrt(acc) + np.float32(c.adagrad_eps))
        self._ts[rows] = np.maximum(self._ts[rows], np.int64(now_ms))
        return int(rows.size)

    def scatter_add(self, ids: np.ndarray | Iterable[int], deltas: np.ndarray, now_ms: int) -> int:
        """``w += delta`` on the rows of admitted IDs (repeats summed, no optimizer state).

        For updates computed outside (e.g. ISGD/BPR steps). Sets
        ``last_update = max(last_update, now_ms)``; returns the number of rows updated.
        """
        rows, d = self._rows_and_sums(ids, deltas)
        self._emb[rows] += d
        self._ts[rows] = np.maximum(self._ts[rows], np.int64(now_ms))
        return int(rows.size)

    # --- snapshot / restore -----------------------------------------------------------------

    def _state(self, copy: bool) -> dict[str, np.ndarray | int | float | str]:
        hw = self._hw

        def arr(a: np.ndarray) -> np.ndarray:
            return a.copy() if copy else a

        state: dict[str, np.ndarray | int | float | str] = {
            "version": _SNAPSHOT_VERSION,
            **{f"cfg_{k}": (-1 if v is None else v) for k, v in asdict(self.config).items()},
            "idx_keys": arr(self._idx_keys),
            "idx_rows": arr(self._idx_rows),
            "emb": arr(self._emb[:hw]),
            "acc": arr(self._acc[:hw]),
            "ts": arr(self._ts[:hw]),
            "cnt": arr(self._cnt[:hw]),
            "row_keys": arr(self._row_keys[:hw]),
            "free": arr(self._free[: self._nfree]),
            "live": self._live,
            "reserved_row": self._reserved_row,
            "n_indexed": self._n_indexed,
            **{f"stat_{k}": v for k, v in self._counters.items()},
        }
        if self._sketch is not None:
            state.update(self._sketch.snapshot("sketch_", copy=copy))
        return state

    def snapshot(self) -> dict[str, np.ndarray | int | float | str]:
        """A self-contained copy of the whole table: arrays plus scalars (cost ~ a memcpy
        of the used rows and the index). Feed it to :meth:`restore`."""
        return self._state(copy=True)

    @classmethod
    def restore(cls, snap: dict, *, copy: bool = True) -> EmbeddingTable:
        """Rebuild a table equal to the one snapshotted (arrays copied unless ``copy=False``)."""
        table = cls.__new__(cls)
        table._load_state(snap, copy)
        return table

    def _load_state(self, s: dict, copy: bool) -> None:
        if int(s["version"]) != _SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {s['version']}")
        cfg = {}
        for f in fields(TableConfig):
            v = s[f"cfg_{f.name}"]
            v = v.item() if isinstance(v, np.ndarray) else v
            cfg[f.name] = None if f.name == "sketch_decay_every" and v == -1 else v
        self.config = TableConfig(**cfg)

        def arr(name: str) -> np.ndarray:
            return np.array(s[name], copy=True) if copy else np.asarray(s[name])

        self._idx_keys, self._idx_rows = arr("idx_keys"), arr("idx_rows")
        self._nb = self._idx_keys.size // SLOTS
        self._emb, self._acc, self._ts = arr("emb"), arr("acc"), arr("ts")
        self._cnt, self._row_keys, self._free = arr("cnt"), arr("row_keys"), arr("free")
        self._hw = self._emb.shape[0]
        self._nfree = self._free.size
        if self._hw == 0:  # keep the pool non-empty so gather's clipped take works
            self._emb = np.zeros((1, self.dim), np.float32)
            self._acc = np.zeros((1, self.config.slot_width), np.float32)
            self._ts = np.full(1, FREE_TS, np.int64)
            self._cnt = np.zeros(1, np.uint32)
            self._row_keys = np.full(1, EMPTY_KEY, np.uint64)
        self._live = int(s["live"])
        self._reserved_row = int(s["reserved_row"])
        self._n_indexed = int(s["n_indexed"])
        self._counters = {k: int(s[f"stat_{k}"]) for k in _COUNTERS}
        self._sketch = (
            CountMinSketch.restore(s, "sketch_", copy=copy) if "sketch_table" in s else None
        )

    def __getstate__(self) -> dict:
        return self._state(copy=False)

    def __setstate__(self, state: dict) -> None:
        self._load_state(state, copy=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the table to an uncompressed ``.npz`` file (no pickled objects)."""
        np.savez(path, **{k: np.asarray(v) for k, v in self._state(copy=False).items()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> EmbeddingTable:
        """Read a table written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            return cls.restore({k: z[k] for k in z.files}, copy=False)

    def __eq__(self, other: object) -> bool:
        """Same config, rows, values, index, free list, counters and sketch."""
        if not isinstance(other, EmbeddingTable):
            return NotImplemented
        a, b = self._state(copy=False), other._state(copy=False)
        if a.keys() != b.keys():
            return False
        for k, v in a.items():
            w = b[k]
            if isinstance(v, np.ndarray) or isinstance(w, np.ndarray):
                v, w = np.asarray(v), np.asarray(w)
                if v.dtype != w.dtype or not np.array_equal(v, w):
                    return False
            elif v != w:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # mutable
