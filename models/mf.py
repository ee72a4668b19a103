"""Incremental matrix factorisation for positive-only feedback, split for a sharded flow.

Two learners (docs/retrieval.md), both plain numpy over :class:`EmbeddingTable` rows
(no Bytewax):

* **BPR** with sampled negatives ``j`` (the default): ``g_j = sigmoid(-<u, v_i - v_j>)``;
  ``u += lr (sum_j g_j (v_i - v_j) - reg u)``; ``v_i += lr (sum_j g_j u - reg v_i)``;
  ``v_j += lr (-g_j u - reg v_j)``.
* **ISGD** (Vinagre et al. 2014): for a positive ``(u, i)`` the target is 1,
  ``err = 1 - <u, v>``; ``u += lr (err v - reg u)``; ``v += lr (err u - reg v)``.

Why BPR (k=10, lr 0.1, 4 uniform negatives) is the default, measured by
``python bench/mf.py`` (prequential HR@10, split user/item steps as in the flow; see
``docs/retrieval.md``): MovieLens 100k BPR 0.120 vs ISGD 0.068 (lr 0.05; the published
anchor is 0.063) / 0.064 (lr 0.1); simulator (1M events, seed 0) BPR 0.184 vs ISGD
0.126 (lr 0.1) / 0.036 (lr 0.05). ISGD regresses every score towards 1 and has no
contrast between items, so on positive-only data it mostly learns popularity slowly
and is very sensitive to ``lr``; BPR learns the ranking directly. The price: ``1 + m``
item steps (messages to item shards) per positive instead of 1.

**The split.** User vectors live in user shards (:class:`UserFactors`), item vectors
in item shards (:class:`ItemFactors`); the flow only sends user shard -> item shard,
and item vectors come back to the user side nearline (index snapshots), so they may
be stale by a refresh interval. Hence each side takes its own step with the other
side's vector *as it was given*:

1. user shard: ``u_before = users.update(user_id, v_stale, ts_ms)`` (ISGD) or
   ``u_before, g = users.bpr_update(user_id, v_i, v_negs, ts_ms)`` (BPR);
2. the flow sends ``(item_id, u_before[, coef])`` to the item's shard;
3. item shard: ``items.update(item_id, u_before, ts_ms, coef)`` - for ISGD (``coef``
   None) the error is recomputed with the item's *fresh* vector; for BPR ``coef`` is
   ``sum(g)`` for the positive and ``-g_j`` for each negative.

Everything is keyed by string IDs hashed with :func:`state.embedding_table.keys_of`;
times are event time in **ms**. Unknown IDs read as their deterministic initial vector
(``Normal(0, init_scale)`` seeded by the ID), so the user side can compute a brand-new
item's vector exactly as the item side will initialise it
(:meth:`ItemFactors.initial_vectors`). Both classes pickle compactly (the tables'
arrays plus small dicts).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from state.embedding_table import EmbeddingTable, keys_of
from state.hashing import stable_hash64

Algorithm = Literal["isgd", "bpr"]


@dataclass(frozen=True)
class MFConfig:
    """Hyper-parameters of the incremental MF (shared by the user and the item side).

    Both sides must use the same ``dim``, ``init_scale`` and ``init_seed`` so that
    initial vectors agree across shards.
    """

    dim: int = 10  # latent factors (k)
    algorithm: Algorithm = "bpr"
    lr: float = 0.1  # SGD step size (eta)
    reg: float = 0.01  # L2 regularisation (lambda), applied on every step of a touched row
    negatives: int = 4  # BPR only: sampled negatives per positive (chosen by the caller)
    init_scale: float = 0.1  # new vectors ~ Normal(0, init_scale), deterministic per ID
    init_seed: int = 0
    max_users: int = 1 << 20  # capacity of the user table (LRU batch eviction beyond)
    max_items: int = 1 << 20  # capacity of the item table
    admit_threshold: int = 1  # sightings before an ID gets a trainable row

    def __post_init__(self) -> None:
        if self.algorithm not in ("isgd", "bpr"):
            raise ValueError(f"unknown algorithm {self.algorithm!r}")
        if self.dim < 1 or self.lr <= 0 or self.reg < 0 or self.negatives < 1:
            raise ValueError("need dim >= 1, lr > 0, reg >= 0, negatives >= 1")

    def table(self, max_rows: int) -> EmbeddingTable:
        """A plain-SGD table of this config's vectors (updates are applied by scatter_add)."""
        return EmbeddingTable(
            dim=self.dim,
            max_rows=max_rows,
            admit_threshold=self.admit_threshold,
            init_scale=self.init_scale,
            init_seed=self.init_seed,
            missing="init",
            optimizer="sgd",
        )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def _waves(keys: np.ndarray) -> list[np.ndarray]:
    """Split positions ``0..n-1`` into waves in which every key occurs at most once.

    The j-th occurrence of a key goes to wave j, so applying the waves in order keeps
    each key's own updates in their original order (the batch equals the event loop).
    """
    n = keys.size
    if n == 0:
        return []
    if n <= _SMALL_WAVES:  # a dict of counts: cheaper than the sort's numpy calls
        seen: dict[int, int] = {}
        occurrence = []
        for k in keys.tolist():
            j = seen.get(k, 0)
            occurrence.append(j)
            seen[k] = j + 1
        if len(seen) == n:
            return [np.arange(n)]
        rank = np.array(occurrence, np.int64)
    else:
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        first = np.empty(n, bool)
        first[0] = True
        np.not_equal(sk[1:], sk[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        sizes = np.diff(starts, append=n)
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n) - np.repeat(starts, sizes)
    top = int(rank.max())
    if top == 0:
        return [np.arange(n)]
    return [np.flatnonzero(rank == w) for w in range(top + 1)]


_SMALL_WAVES = 256
"""Batches of at most this many keys count occurrences in a dict (``_waves``); larger
ones sort (the two give the same waves)."""


def _rows_once(table: EmbeddingTable, keys: np.ndarray, waves: list[np.ndarray],
               ts_ms: int) -> np.ndarray | None:
    """``table.insert(keys, ts_ms)`` for a whole batch of steps in one call, when that
    equals one insert per wave (``waves = _waves(keys)``): every new key is admitted at
    its first sighting (``admit_threshold`` 1, so a later wave's sightings only count)
    and the distinct keys (wave 0) fit the table (no overflow to retry in a later
    wave). None otherwise: insert wave by wave. The rows of a batch's keys cannot move
    between its waves (only an insert allocates or evicts)."""
    config = table.config
    if len(waves) < 2 or config.admit_threshold > 1 or waves[0].size > config.max_rows:
        return None
    return table.insert(keys, ts_ms)


def _as_matrix(vecs: np.ndarray | Sequence[np.ndarray], n: int, dim: int) -> np.ndarray:
    out = np.asarray(vecs, np.float32)
    if out.shape != (n, dim):
        out = out.reshape(n, dim)
    return out


class UserFactors:
    """User vectors of one user shard; the user half of every MF step.

    Invariant: a user's row changes only through :meth:`update`, :meth:`bpr_update`,
    :meth:`fold_in` (and expiry/eviction, which forget it).
    """

    def __init__(self, config: MFConfig | None = None) -> None:
        self.config = config or MFConfig()
        self.table = self.config.table(self.config.max_users)
        self.updates = 0

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, user_id: str) -> bool:
        return self.table.row_of(stable_hash64(user_id)) >= 0  # one key: no numpy

    def vector(self, user_id: str) -> np.ndarray | None:
        """The user's current vector (float32 ``(dim,)``, a copy), or None without a row."""
        return self.table.vector_of(stable_hash64(user_id))

    def vectors(self, user_ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors (n, dim), has_row (n,) bool)``; users without a row read their
        deterministic initial vector."""
        keys = keys_of(user_ids)
        return self.table.gather(keys), self.table.lookup(keys) >= 0

    def update(self, user_id: str, item_vec: np.ndarray, ts_ms: int) -> np.ndarray:
        """ISGD user step for a positive ``(user, item)`` with the (possibly stale) item
        vector the user shard has; returns the user vector *before* the step, to be sent
        with the item ID to the item's shard."""
        v = np.asarray(item_vec, np.float32).reshape(1, -1)
        return self.update_batch([user_id], v, ts_ms)[0]

    def update_batch(self, user_ids: Sequence[str], item_vecs: np.ndarray, ts_ms: int) -> np.ndarray:
        """:meth:`update` for a batch of positives, in order (a user seen twice gets two
        sequential steps). ``ts_ms`` is the batch's event time (ms), recorded as the
        touched rows' last update. Returns the users' vectors before their own step,
        ``(n, dim)`` float32."""
        c = self.config
        keys = keys_of(user_ids)
        V = _as_matrix(item_vecs, keys.size, c.dim)
        out = np.empty((keys.size, c.dim), np.float32)
        lr, reg = np.float32(c.lr), np.float32(c.reg)
        waves = _waves(keys)
        once = _rows_once(self.table, keys, waves, ts_ms)
        for idx in waves:
            k = keys[idx]
            # a wave's keys are distinct
            rows = once[idx] if once is not None else self.table.insert(k, ts_ms)
            U = self.table.gather_rows(k, rows)
            out[idx] = U
            v = V[idx]
            err = 1.0 - np.einsum("nd,nd->n", U, v)
            self.table.add_rows(rows, lr * (err[:, None] * v - reg * U), ts_ms)
        self.updates += keys.size
        return out

    def bpr_update(
        self, user_id: str, pos_vec: np.ndarray, neg_vecs: np.ndarray, ts_ms: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """BPR user step with one positive and ``m`` sampled negatives (stale vectors).

        Returns ``(u_before (dim,), g (m,))`` with ``g_j = sigmoid(-<u, v_i - v_j>)``;
        send ``(item, u_before, coef=g.sum())`` for the positive and
        ``(neg_j, u_before, coef=-g_j)`` for each negative to the item shards.
        """
        neg = np.asarray(neg_vecs, np.float32).reshape(1, -1, self.config.dim)
        u, g = self.bpr_update_batch([user_id], np.asarray(pos_vec, np.float32)[None], neg, ts_ms)
        return u[0], g[0]

    def bpr_update_batch(
        self, user_ids: Sequence[str], pos_vecs: np.ndarray, neg_vecs: np.ndarray, ts_ms: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`bpr_update` for a batch: ``pos_vecs (n, dim)``, ``neg_vecs (n, m, dim)``;
        returns ``(u_before (n, dim), g (n, m))``."""
        c = self.config
        keys = keys_of(user_ids)
        P = _as_matrix(pos_vecs, keys.size, c.dim)
        N = np.asarray(neg_vecs, np.float32).reshape(keys.size, -1, c.dim)
        out = np.empty((keys.size, c.dim), np.float32)
        gs = np.empty((keys.size, N.shape[1]), np.float32)
        lr, reg = np.float32(c.lr), np.float32(c.reg)
        waves = _waves(keys)
        once = _rows_once(self.table, keys, waves, ts_ms)
        for idx in waves:
            k = keys[idx]
            rows = once[idx] if once is not None else self.table.insert(k, ts_ms)
            U = self.table.gather_rows(k, rows)
            out[idx] = U
            diff = P[idx][:, None, :] - N[idx]  # (w, m, dim)
            g = _sigmoid(-np.einsum("wd,wmd->wm", U, diff)).astype(np.float32)
            gs[idx] = g
            grad = np.einsum("wm,wmd->wd", g, diff)
            self.table.add_rows(rows, lr * (grad - reg * U), ts_ms)
        self.updates += keys.size
        return out, gs

    def step_batch(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        item_vecs: np.ndarray,
        ts_ms: int,
        neg_ids: Sequence[Sequence[str]] | None = None,
        neg_vecs: np.ndarray | None = None,
    ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        """One step per positive ``(user_ids[n], item_ids[n])`` with the configured
        algorithm; returns the item-side work ``(item_ids, user_vecs, coefs)`` to route
        to the item shards and feed to :meth:`ItemFactors.update_batch`.

        ISGD: one entry per positive, ``coefs`` None. BPR: ``neg_ids`` (n lists of m
        items) and their stale vectors ``neg_vecs`` ``(n, m, dim)`` are required; the
        positives come first (coef ``sum_j g_j``), then every negative (coef ``-g_j``).
        """
        if self.config.algorithm == "isgd":
            return list(item_ids), self.update_batch(user_ids, item_vecs, ts_ms), None
        if neg_ids is None or neg_vecs is None:
            raise ValueError("BPR needs sampled negatives (neg_ids, neg_vecs)")
        u0, g = self.bpr_update_batch(user_ids, item_vecs, neg_vecs, ts_ms)
        m = g.shape[1]
        ids = list(item_ids) + [j for negs in neg_ids for j in negs]
        if len(ids) != len(item_ids) * (1 + m):
            raise ValueError("neg_ids must hold m items per positive, matching neg_vecs")
        return ids, np.concatenate((u0, np.repeat(u0, m, axis=0))), np.concatenate((g.sum(axis=1), -g.reshape(-1)))

    def fold_in(self, user_id: str, recent_item_vecs: np.ndarray, ts_ms: int) -> np.ndarray:
        """Give a (new) user the mean of their recent items' vectors as their vector.

        ``recent_item_vecs`` is ``(m, dim)``; with ``m == 0`` the user keeps their
        current (initial) vector. The row is created (if admitted) and overwritten.
        Returns the user's vector after fold-in (the mean even if not admitted).
        """
        vecs = np.asarray(recent_item_vecs, np.float32).reshape(-1, self.config.dim)
        keys = keys_of([user_id])
        if vecs.shape[0] == 0:
            return self.table.gather(keys)[0]
        target = vecs.mean(axis=0)
        self.table.insert(keys, ts_ms)
        self.table.scatter_add(keys, (target - self.table.gather(keys)[0])[None], ts_ms)
        return target

    def expire(self, now_ms: int, ttl_ms: int) -> int:
        """Forget users not updated since ``now_ms - ttl_ms``; returns how many."""
        return self.table.expire(now_ms, ttl_ms)


@dataclass(frozen=True)
class ItemChanges:
    """What changed in an :class:`ItemFactors` after a given version.

    ``version``: pass it to the next :meth:`ItemFactors.changed_since`.
    ``upserted``: live items whose vector changed (or appeared) since.
    ``removed``: items that left (removed, expired or evicted) since and are not back.
    ``full``: the asked version is 0, older than the tracked history, or newer than
    this table (restored from an older state): ``upserted`` lists every live item and
    the consumer should resync (``IndexBuilder.sync``) rather than patch.
    """

    version: int
    upserted: list[str]
    removed: list[str]
    full: bool


_UNPICKLED = frozenset({"_stepped", "_log", "_logged", "_log_from", "_place", "_next_place"})
"""``ItemFactors`` fields rebuilt on unpickling (``_start_log``), not pickled."""


class ItemFactors:
    """Item vectors of one item shard; the item half of every MF step, plus change tracking.

    Invariants: ``_ids`` maps the key of every live row to its item ID; an item is in
    exactly one of ``_changed`` (live: ID -> version of its last change) or ``_gone``
    (left: ID -> version it left) or neither (never admitted). Items in ``_blocked``
    (explicitly removed, e.g. ``available: false``) are not trained until
    :meth:`revive`. ``_place`` holds, for every item of ``_changed`` and ``_gone``, the
    number of insertions into either dict before it entered its own, so sorting a subset
    of one dict by it gives that dict's order; ``_log`` holds per version (ascending) the
    items changed or gone at it, every version after ``_log_from``: what changed since a
    recent version is read from it, without scanning every item (``changed_since``).
    """

    def __init__(self, config: MFConfig | None = None, max_tombstones: int | None = None) -> None:
        self.config = config or MFConfig()
        self.table = self.config.table(self.config.max_items)
        self.max_tombstones = max_tombstones or max(1024, self.config.max_items // 4)
        self._ids: dict[int, str] = {}
        self._changed: dict[str, int] = {}
        self._gone: dict[str, int] = {}
        self._blocked: dict[str, None] = {}  # ordered set
        self._version = 0
        self._horizon = 0  # changes at versions <= horizon may have been forgotten
        self.updates = 0
        self.ignored = 0  # updates of blocked items
        self._start_log()

    _stepped: dict[str, int] | None = None
    """The items the last ``update_batch`` stepped -> their rows, while no other mutation
    came since and that batch evicted nothing (so each row still holds its item):
    ``vectors`` of them reads the rows without hashing and looking the ids up again (the
    item shard's index change after each batch). None otherwise; not pickled."""

    def __getstate__(self) -> dict[str, object]:
        """Pickled without ``_stepped`` and the change log (the same state as before the
        log: a restored table starts a new one)."""
        return {k: v for k, v in self.__dict__.items() if k not in _UNPICKLED}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._start_log()

    def _start_log(self) -> None:
        """An empty change log from the current version; places in the dicts' order."""
        self._log: dict[int, list[str]] = {}
        self._logged = 0  # items in _log
        self._log_from = self._version  # every change after it is in _log
        self._place: dict[str, int] = {i: n for n, i in enumerate(itertools.chain(
            self._changed, self._gone))}
        self._next_place = len(self._place)

    def _logged_at(self, version: int) -> list[str]:
        """The log's list of the items changed at ``version`` (the current one), made
        when first asked; the oldest versions are forgotten beyond ``_log_bound``."""
        items = self._log.get(version)
        if items is None:
            if self._logged > self._log_bound():
                self._trim_log()
            items = self._log[version] = []
        return items

    def _log_bound(self) -> int:
        """Items logged before the older half of the log is forgotten."""
        return max(4_096, 2 * len(self._place))

    def _trim_log(self) -> None:
        """Forget the older half of the logged items (whole versions)."""
        kept: dict[int, list[str]] = {}
        n = 0
        for v in reversed(self._log):
            if n >= self._logged // 2:
                self._log_from = v
                break
            kept[v] = self._log[v]
            n += len(self._log[v])
        self._log = dict(reversed(kept.items()))
        self._logged = n

    def _enter(self, into: dict[str, int], item: str, version: int) -> None:
        """``into[item] = version`` (``_changed`` or ``_gone``), placed and logged."""
        if item not in into:
            self._place[item] = self._next_place
            self._next_place += 1
        into[item] = version
        self._logged_at(version).append(item)
        self._logged += 1

    def __len__(self) -> int:
        """Live (trainable, not removed) items."""
        return len(self._changed)

    @property
    def version(self) -> int:
        """Increases with every mutation; see :meth:`changed_since`."""
        return self._version

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._changed

    def initial_vectors(self, item_ids: Iterable[str]) -> np.ndarray:
        """The vectors brand-new items will start from (identical on every shard)."""
        return self.table.initial_vectors(keys_of(item_ids))

    def vectors(self, item_ids: Iterable[str]) -> np.ndarray:
        """Current vectors ``(n, dim)`` float32; unknown items read their initial vector."""
        stepped = self._stepped
        if stepped is not None:
            ids = item_ids if isinstance(item_ids, list) else list(item_ids)
            try:
                rows = [stepped[i] for i in ids]
            except KeyError:  # an item the last batch did not step: look them all up
                return self.table.gather(keys_of(ids))
            return self.table.gather_rows(np.zeros(0, np.uint64), np.asarray(rows, np.int64))
        return self.table.gather(keys_of(item_ids))

    def known(self, item_ids: Iterable[str]) -> np.ndarray:
        """Bool mask: the item is live here (has a row and is not removed)."""
        return np.fromiter((i in self._changed for i in item_ids), bool)

    def live_items(self) -> list[str]:
        """Every live item ID (order unspecified)."""
        return list(self._changed)

    def update(self, item_id: str, user_vec: np.ndarray, ts_ms: int, coef: float | None = None) -> float:
        """Item step with the user vector sent through the flow; returns the coefficient used.

        ``coef=None`` (ISGD): ``coef = err = 1 - <u, v>`` with this shard's current ``v``.
        Else (BPR) ``v += lr (coef u - reg v)``. Blocked items are not trained (NaN).
        """
        coefs = None if coef is None else np.array([coef], np.float32)
        u = np.asarray(user_vec, np.float32).reshape(1, -1)
        return float(self.update_batch([item_id], u, ts_ms, coefs)[0])

    def update_batch(
        self,
        item_ids: Sequence[str],
        user_vecs: np.ndarray,
        ts_ms: int,
        coefs: np.ndarray | None = None,
    ) -> np.ndarray:
        """:meth:`update` for a batch, in order (repeated items get sequential steps).

        ``ts_ms``: the batch's event time (ms). Returns the coefficients used (NaN for
        blocked items, which are skipped).
        """
        c = self.config
        ids = list(item_ids)
        n = len(ids)
        U = _as_matrix(user_vecs, n, c.dim)
        out = np.full(n, np.nan, np.float32)
        self._stepped = None
        if self._blocked:
            ok = np.fromiter((i not in self._blocked for i in ids), bool, n)
            self.ignored += int(n - ok.sum())
        else:
            ok = np.ones(n, bool)
        keep = np.flatnonzero(ok)
        if keep.size == 0:
            return out
        keys = keys_of(ids[i] for i in keep)
        U, C = U[keep], None if coefs is None else np.asarray(coefs, np.float32).reshape(n)[keep]
        lr, reg = np.float32(c.lr), np.float32(c.reg)
        evicted = self.table.stats()["evicted"]
        self._version += 1
        waves = _waves(keys)
        once = _rows_once(self.table, keys, waves, ts_ms)
        stepped: dict[str, int] = {}
        for idx in waves:
            k = keys[idx]
            rows = once[idx] if once is not None else self.table.insert(k, ts_ms)
            V = self.table.gather_rows(k, rows)
            u = U[idx]
            co = 1.0 - np.einsum("nd,nd->n", u, V) if C is None else C[idx]
            out[keep[idx]] = co
            self.table.add_rows(rows, lr * (co[:, None] * u - reg * V), ts_ms)
            if once is None:
                self._record(ids, keep, idx, k, rows, stepped)
        if once is not None:  # in batch order: each item first met where wave 0 met it
            self._record(ids, keep, np.arange(keys.size), keys, once, stepped)
        self.updates += keep.size
        if self.table.stats()["evicted"] != evicted:
            self._reconcile()
        else:
            self._stepped = stepped
        return out

    def _record(self, ids: list[str], keep: np.ndarray, idx: np.ndarray, keys: np.ndarray,
                rows: np.ndarray, stepped: dict[str, int]) -> None:
        """Mark the items stepped at positions ``idx`` of the kept updates (``keys``,
        their ``rows``) changed at this version, and note their rows in ``stepped``;
        items without a row are not."""
        version, changed, gone, known = self._version, self._changed, self._gone, self._ids
        place, logged = self._place, self._logged_at(version)
        row_list = rows.tolist()
        held = np.flatnonzero(rows >= 0).tolist()
        for j in held:
            item = ids[keep[idx[j]]]
            known[int(keys[j])] = item
            if item not in changed:  # _enter, inlined: the item shard's hot loop
                place[item] = self._next_place
                self._next_place += 1
            changed[item] = version
            logged.append(item)
            gone.pop(item, None)
            stepped[item] = row_list[j]
        self._logged += len(held)

    def _leave(self, items: Iterable[str]) -> None:
        for item in items:
            if self._changed.pop(item, None) is not None:
                self._enter(self._gone, item, self._version)
        if len(self._gone) > self.max_tombstones:
            drop = len(self._gone) - self.max_tombstones // 2
            for item in list(self._gone)[:drop]:  # insertion order = oldest first
                self._horizon = max(self._horizon, self._gone.pop(item))
                del self._place[item]

    def _reconcile(self) -> None:
        """Drop IDs whose rows the table evicted (capacity) and record them as gone."""
        keys = np.fromiter(self._ids, np.uint64, len(self._ids))
        dead = keys[self.table.lookup(keys) < 0]
        self._leave(self._ids.pop(int(k)) for k in dead)

    def remove(self, item_ids: Iterable[str]) -> int:
        """Retire items (e.g. ``available: false``): they leave the index at the next
        refresh and further updates are ignored until :meth:`revive`. Their rows are
        freed by expiry (the table has no point delete). Returns how many were live."""
        items = list(item_ids)
        self._version += 1
        self._stepped = None
        live = sum(1 for i in items if i in self._changed)
        for i in items:
            self._blocked[i] = None
        self._leave(items)
        while len(self._blocked) > self.max_tombstones:
            del self._blocked[next(iter(self._blocked))]
        return live

    def revive(self, item_ids: Iterable[str]) -> None:
        """Undo :meth:`remove` (the item is available again); a still-held row comes back."""
        self._version += 1
        self._stepped = None
        for item in item_ids:
            if item not in self._blocked and item not in self._gone:
                continue
            self._blocked.pop(item, None)
            key = int(keys_of([item])[0])
            if self.table.lookup(np.array([key], np.uint64))[0] >= 0:
                self._ids[key] = item
                self._gone.pop(item, None)
                self._enter(self._changed, item, self._version)

    def expire(self, now_ms: int, ttl_ms: int) -> list[str]:
        """Free items not updated since ``now_ms - ttl_ms`` (event time, ms); returns the
        live ones that left (removed items' rows are freed silently)."""
        self._stepped = None
        t = self.table
        rows = t.live_rows()
        old = rows[t.last_update_ms[rows] < np.int64(now_ms) - np.int64(ttl_ms)]
        keys = t.row_keys[old].copy()
        t.expire(now_ms, ttl_ms)
        gone = [i for i in (self._ids.pop(int(k), None) for k in keys) if i is not None]
        self._version += 1
        left = [i for i in gone if i in self._changed]
        self._leave(gone)
        return left

    def changed_since(self, version: int) -> ItemChanges:
        """Items upserted / removed after ``version`` (0: everything, as a full resync)."""
        # full resync when the caller is older than the tracked history, or ahead of it
        # (this table was restored from an older snapshot than the caller's version)
        full = version <= self._horizon or version == 0 or version > self._version
        if not full and version == self._version:  # nothing since: no scan of every item
            return ItemChanges(version, [], [], False)
        if full:
            up = list(self._changed)
            removed: list[str] = []
        elif version >= self._log_from:  # from the log: the items changed since, in order
            since = self._logged_since(version)
            up = self._in_order(self._changed, since, version)
            removed = self._in_order(self._gone, since, version)
        else:
            up = [i for i, v in self._changed.items() if v > version]
            removed = [i for i, v in self._gone.items() if v > version]
        return ItemChanges(self._version, up, removed, full)

    def _logged_since(self, version: int) -> list[str]:
        """The items logged after ``version`` (>= ``_log_from``), each once."""
        since: dict[str, None] = {}
        for v in reversed(self._log):
            if v <= version:
                break
            since.update(dict.fromkeys(self._log[v]))
        return list(since)

    def _in_order(self, of: dict[str, int], items: list[str], version: int) -> list[str]:
        """``[i for i, v in of.items() if v > version]`` among ``items`` (which hold every
        such one): those ``of`` holds at a later version, in its order (``_place``)."""
        place = self._place
        return sorted((i for i in items if of.get(i, version) > version), key=place.__getitem__)
