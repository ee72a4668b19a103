"""EmbeddingFM: a second-order factorization machine whose parameters live in an
``EmbeddingTable`` (Monolith-style: collisionless, frequency admission, expiry).

Model, for a sparse input ``x = {name: value}``::

    score(x) = b + sum_i w_i x_i + 1/2 * sum_f [ (sum_i v_if x_i)^2 - sum_i v_if^2 x_i^2 ]
    p(x)     = sigmoid(score(x))

Each feature name ``i`` owns one table row ``[w_i, v_i1 .. v_ik]`` (``dim = k + 1``)
under the key ``stable_hash64(name)`` (``keys_of``). A name gets a row only after it was
seen in ``admit_threshold`` training examples; until then (and after it expired or was
evicted) its row reads as zeros: it contributes nothing and receives no update.
Predictions never count sightings. The global bias ``b`` is a scalar.

Training minimises the weighted log loss ``w * logloss(y, p)`` with Adagrad (the
table's per-element Adagrad for rows, a scalar Adagrad for ``b``). A mini-batch is one
step: per-example gradients

    dL/dw_i = g x_i,    dL/dv_if = g x_i (S_f - v_if x_i),    g = w (p - y),  S_f = sum_j v_jf x_j

are summed per row (over the batch's examples) and applied once; ``learn_one`` is a
batch of one, so ``learn_many`` with one example equals ``learn_one`` exactly.
Everything after the dict walk is vectorized numpy over the batch, in float64 over the
table's float32 rows (so the order of a dict's features does not change results).

Times (``now_ms``) are event-time epoch milliseconds: they stamp rows for expiry and
LRU eviction. ``ttl_ms`` (optional) expires rows not updated for that long, checked
every ``ttl_ms / 10`` of event time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from river import base

from state.embedding_table import EmbeddingTable
from state.hashing import stable_hash64

_ADAGRAD_INIT = 0.1  # initial accumulator of the bias (rows use the table's adagrad_init)
_MAX_LOGIT = 35.0


class _KeyCache(dict):
    """Feature name -> uint64 key (``stable_hash64``), filled on miss; cleared when it
    reaches ``limit`` entries, so memory stays bounded under unbounded vocabularies."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __missing__(self, name: str) -> int:
        if len(self) >= self.limit:
            self.clear()
        key = self[name] = stable_hash64(name)
        return key

    def __reduce__(self) -> tuple[Any, ...]:  # pickles empty: rebuilt lazily
        return (_KeyCache, (self.limit,))


class _Batch:
    """A mini-batch flattened: distinct feature keys plus per-occurrence index/value.

    Occurrences are grouped by example (examples contiguous, ``counts`` each).
    ``perm``/``starts_u`` sort occurrences by key, for per-key sums with reduceat.
    """

    __slots__ = ("keys", "inv", "vals", "counts", "starts", "nnz", "perm", "starts_u")

    def __init__(self, keys_occ: np.ndarray, vals: np.ndarray, counts: np.ndarray) -> None:
        self.vals = vals  # (nnz,) float64 feature values
        self.counts = counts  # (B,) features per example
        self.nnz = nnz = int(keys_occ.size)
        starts = np.zeros(counts.size, np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        self.starts = starts
        perm = np.argsort(keys_occ, kind="stable")
        ks = keys_occ[perm]
        first = np.ones(nnz, bool)
        np.not_equal(ks[1:], ks[:-1], out=first[1:])
        self.perm = perm
        self.starts_u = np.flatnonzero(first)
        self.keys = ks[self.starts_u]  # (U,) distinct keys, ascending
        inv = np.empty(nnz, np.int64)
        inv[perm] = np.cumsum(first) - 1
        self.inv = inv  # (nnz,) index into keys of each occurrence

    def sum_by_key(self, a: np.ndarray) -> np.ndarray:
        """Sum the per-occurrence rows of ``a`` per distinct key -> (U, cols)."""
        return np.add.reduceat(a[self.perm], self.starts_u, axis=0)


class EmbeddingFM(base.Classifier):
    """Binary FM classifier with table-backed, admission-controlled feature parameters.

    Args:
        k: latent dimension (table rows hold ``k + 1`` floats).
        lr: Adagrad learning rate.
        l2: L2 penalty added to the gradient of every row used by an example.
        admit_threshold: training examples a feature must appear in before it gets a row.
        max_rows: table capacity (least recently updated rows are evicted beyond it).
        init_scale: standard deviation of new rows (deterministic per feature name).
        ttl_ms: expire rows not updated for this long (event time, ms); None = never.
        key_cache_size: bound of the feature name -> key cache (cleared when full).
        seed: seed of the rows' initialisation.

    >>> fm = EmbeddingFM(k=4, lr=0.1, max_rows=1_000)
    >>> liked, other = {"user=u1": 1.0, "item=i1": 1.0}, {"user=u1": 1.0, "item=i2": 1.0}
    >>> for _ in range(50):
    ...     fm.learn_many([liked, other], [True, False], now_ms=1_000)
    >>> fm.predict_proba_one(liked)[True] > 0.8 > 0.2 > fm.predict_proba_one(other)[True]
    True
    >>> len(fm.table)  # one row per feature name seen in training
    3
    """

    def __init__(self, k: int = 8, lr: float = 0.1, l2: float = 0.0, admit_threshold: int = 1,
                 max_rows: int = 1 << 20, init_scale: float = 0.05, ttl_ms: int | None = None,
                 key_cache_size: int = 1 << 20, seed: int = 0) -> None:
        self.k = k
        self.lr = lr
        self.l2 = l2
        self.admit_threshold = admit_threshold
        self.max_rows = max_rows
        self.init_scale = init_scale
        self.ttl_ms = ttl_ms
        self.key_cache_size = key_cache_size
        self.seed = seed
        self.table = EmbeddingTable(
            dim=k + 1, max_rows=max_rows, admit_threshold=admit_threshold, optimizer="adagrad",
            init_scale=init_scale, init_seed=seed, missing="zeros")
        self.bias = 0.0
        self._bias_acc = _ADAGRAD_INIT
        self.now_ms = 0  # latest event time seen by learning (ms)
        self._last_expire_ms: int | None = None
        self.n_learned = 0
        self._keys = _KeyCache(key_cache_size)

    # --- flattening -----------------------------------------------------------------------

    def _flatten(self, X: Sequence[Mapping[str, float]]) -> _Batch:
        names: list[str] = []
        vals: list[float] = []
        counts: list[int] = []
        for x in X:
            names.extend(x)
            vals.extend(x.values())
            counts.append(len(x))
        keys = np.fromiter(map(self._keys.__getitem__, names), np.uint64, len(names))
        return _Batch(keys, np.array(vals, np.float64), np.array(counts, np.int64))

    # --- the FM ---------------------------------------------------------------------------

    def _segment_sum(self, a: np.ndarray, batch: _Batch) -> np.ndarray:
        """Per-example sums of the rows of ``a`` (examples contiguous) -> (B, cols)."""
        nonempty = batch.counts > 0
        if nonempty.all():
            return np.add.reduceat(a, batch.starts, axis=0)
        out = np.zeros((batch.counts.size, a.shape[1]), a.dtype)
        if batch.nnz:
            out[nonempty] = np.add.reduceat(a, batch.starts[nonempty], axis=0)
        return out

    def _forward(self, batch: _Batch, rows: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Probabilities (B,) float64, plus per-occurrence params ``e`` (nnz, k+1),
        admitted mask per distinct key, and ``S`` (B, k) for the backward pass."""
        admitted = rows >= 0
        params = np.zeros((rows.size, self.k + 1), np.float64)
        if admitted.any():
            params[admitted] = self.table.embeddings[rows[admitted]]
        e = params[batch.inv]
        xe = e * batch.vals[:, None]  # [w_i x_i, v_i x_i]
        sums = self._segment_sum(xe, batch)
        sq = self._segment_sum(np.square(xe[:, 1:]), batch)
        s = sums[:, 1:]
        logit = self.bias + sums[:, 0] + 0.5 * (s * s - sq).sum(axis=1)
        p = 1.0 / (1.0 + np.exp(-np.clip(logit, -_MAX_LOGIT, _MAX_LOGIT)))
        return p, e, admitted, s

    def _learn(self, X: Sequence[Mapping[str, float]], y: Sequence[Any],
               w: Sequence[float] | np.ndarray | None, now_ms: int | None) -> None:
        if now_ms is not None and now_ms > self.now_ms:
            self.now_ms = int(now_ms)
        now = self.now_ms
        batch = self._flatten(X)
        table = self.table
        rows = np.empty(batch.keys.size, np.int64)
        if batch.nnz:
            rows[batch.inv] = table.insert(batch.keys[batch.inv], now)  # sightings
        p, e, admitted, s = self._forward(batch, rows)
        yv = np.fromiter((1.0 if t else 0.0 for t in y), np.float64, len(X))
        g = p - yv
        if w is not None:
            g *= np.asarray(w, np.float64)
        # bias: scalar Adagrad
        gb = float(g.sum())
        self._bias_acc += gb * gb
        self.bias -= self.lr * gb / math.sqrt(self._bias_acc)
        if admitted.any():
            x = batch.vals
            gx = np.repeat(g, batch.counts) * x  # g * x_i per occurrence
            grad = np.empty_like(e)
            grad[:, 0] = gx
            s_occ = np.repeat(s, batch.counts, axis=0)
            grad[:, 1:] = gx[:, None] * (s_occ - e[:, 1:] * x[:, None])
            if self.l2:
                grad += self.l2 * e
            summed = batch.sum_by_key(grad)
            table.apply_gradients(batch.keys[admitted], summed[admitted], now, self.lr)
        self.n_learned += len(X)
        self._maybe_expire()

    def _maybe_expire(self) -> None:
        if self.ttl_ms is None:
            return
        if self._last_expire_ms is None:
            self._last_expire_ms = self.now_ms
        elif self.now_ms - self._last_expire_ms >= max(self.ttl_ms // 10, 1):
            self.table.expire(self.now_ms, self.ttl_ms)
            self._last_expire_ms = self.now_ms

    # --- River API ------------------------------------------------------------------------

    def learn_one(self, x: Mapping[str, float], y: Any, sample_weight: float = 1.0, *,
                  now_ms: int | None = None, w: float | None = None) -> None:
        """One Adagrad step on one example (``w`` is River's name for ``sample_weight``)."""
        self._learn([x], [y], [sample_weight if w is None else w], now_ms)

    def learn_many(self, X: Sequence[Mapping[str, float]], y: Sequence[Any],
                   sample_weight: Sequence[float] | np.ndarray | None = None, *,
                   now_ms: int | None = None) -> None:
        """One Adagrad step on a mini-batch (lists of feature dicts and labels)."""
        if len(X) != len(y):
            raise ValueError("X and y differ in length")
        if len(X):
            self._learn(X, y, sample_weight, now_ms)

    def predict_proba_many(self, X: Sequence[Mapping[str, float]]) -> np.ndarray:
        """P(True) of each feature dict, float64 array (B,). Read-only: no sightings."""
        if not len(X):
            return np.zeros(0)
        batch = self._flatten(X)
        rows = self.table.lookup(batch.keys) if batch.keys.size else batch.keys.astype(np.int64)
        return self._forward(batch, rows)[0]

    def predict_proba_one(self, x: Mapping[str, float], **kwargs: Any) -> dict[bool, float]:
        """``{False: 1 - p, True: p}``."""
        p = float(self.predict_proba_many([x])[0])
        return {False: 1.0 - p, True: p}

    # --- table passthrough ----------------------------------------------------------------

    def expire(self, now_ms: int, ttl_ms: int) -> int:
        """Free feature rows not updated since ``now_ms - ttl_ms`` (ms); returns how many."""
        return self.table.expire(now_ms, ttl_ms)

    def stats(self) -> dict[str, Any]:
        """Table counters and gauges, plus ``bias``, ``n_learned`` and ``cached_keys``."""
        return {**self.table.stats(), "bias": self.bias, "n_learned": self.n_learned,
                "cached_keys": len(self._keys)}

    @classmethod
    def _unit_test_params(cls) -> Any:
        yield {"k": 4}
