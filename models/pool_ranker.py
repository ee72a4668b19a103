"""Online listwise re-ranker of a candidate pool (numpy; no Bytewax).

Serving retrieves a few hundred candidates and the co-visitation blend orders them;
the pool ranker re-orders the blend's best ``pool_size`` with a multinomial logit
over a small feature matrix (one row per candidate): ``P(c | pool) ∝ exp(w · x_c / σ)``,
σ the running standard deviation of each feature over served pools. It starts at
``w = 1`` on the ``blend`` feature (the blend's own score) and 0 elsewhere, so its
first order *is* the blend order, and it learns by Adagrad on the log-likelihood of
what happened after a request: the item of the user's next positive action (an
organic positive, or a click on one of the request's impressions) when that item was
in the pool served to the user. Targets outside the pool teach nothing (measured in
``bench/movielens_offline.py``: learning them costs 0.06 HR@10).

``PendingPools`` keeps the last served pool per user (its items and feature matrix),
bounded in number and dropped when stale. ``PoolModel`` is both, plus counters; it
pickles as plain numpy arrays and dicts (the user shard's recovery state).

Where it learns (``training``): ``central`` (default) -- the user shard only serves and
matches outcomes; each match leaves as a ``PoolPair`` (the pool's float32 feature
matrix and the target row) for the one central ``PoolRanker`` of the pool trainer
stage (``operators/pool_trainer.py``), whose copies the shards serve
(``save_pool_ranker`` / ``load_pool_ranker``: arrays only, no pickle); before the first
copy the starting weights (the blend order) serve. ``shard`` -- one model per user
shard learns from its own users (measured worse: docs/ranker.md).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from state.npz import save_npz
from state.packing import pack_strings, unpack_strings
from state.settings import doc

POOL_FEATURES = ("blend", "cov_liked", "cov_any", "long_liked", "pop", "trend", "n_any",
                 "pos_rate", "age", "pop_cold", "mf", "ranker", "ui_interacted", "ui_liked",
                 "last_liked")
"""Features the pool ranker knows (``operators/pool_features.py`` computes them)."""


@dataclass
class PoolRankerConfig:
    """The serving pool ranker (docs/ranker.md, "Pool ranker")."""

    enabled: bool = doc("Re-order the co-visitation blend's best pool_size candidates with "
                        "the online listwise pool ranker (false: the blend orders them).", True)
    pool_size: int = doc("Candidates (the blend's best) the pool ranker orders and learns "
                         "over.", 100)
    features: list[str] = doc(
        "Pool ranker features (names from models/pool_ranker.py POOL_FEATURES; 'blend' is "
        "required: the ranker starts as the blend order). Default by measurement: "
        "docs/ranker.md.",
        factory=lambda: ["blend", "cov_liked", "cov_any", "long_liked", "pop", "trend",
                         "n_any", "pos_rate", "age", "pop_cold", "mf", "last_liked"])
    learning_rate: float = doc("Adagrad step of the pool ranker's weights.", 0.1)
    max_pending: int = doc("Served pools kept per user shard (one per user, the least "
                           "recently served dropped first).", 2_000)
    pending_ttl_ms: int = doc("A served pool older than this (event time) teaches nothing "
                              "and is dropped (ms).", 86_400_000)
    serve_before_ranker: bool = doc(
        "serving.scorer auto: the pool ranker also orders the requests that come before "
        "the first LR ranker copy (false: the blend orders them, as without the pool "
        "ranker; the pool ranker learns from them either way). Default by measurement: "
        "docs/ranker.md.", False)
    long_items: int = doc("long_liked: the user's most recent positives whose co-visitation "
                          "rows form the long-term profile (each weighted 1/its count).", 100)
    rank_features: bool = doc(
        "Also give the model each feature's rank within the pool (0 = the pool's largest "
        "value): one weight more per feature. Default by measurement: docs/ranker.md.",
        True)
    training: str = doc(
        "Where the pool ranker learns: 'central' (one model in the pool trainer stage learns "
        "from every user shard's (pool, target) pairs and is published as a versioned "
        "snapshot the shards serve; before the first copy the starting weights, i.e. the "
        "blend order) or 'shard' (one model per user shard learns from its own users). "
        "Default by measurement: docs/ranker.md.", "central")
    sync_every_pairs: int = doc("central: publish a new copy of the pool ranker after this "
                                "many pairs learned.", 50)
    sync_interval_ms: int = doc("central: also publish a new copy when this much event time "
                                "passed since the last one and a pair was learned (ms).",
                                3_600_000)


POOL_TRAINING = ("central", "shard")


def check_pool_config(config: PoolRankerConfig) -> None:
    """ValueError ("key: reason") unless the features are known and include ``blend``,
    the pool holds >= 2, the step is positive and at least one pool can wait."""
    unknown = [f for f in config.features if f not in POOL_FEATURES]
    if unknown:
        raise ValueError(f"features: unknown {unknown} (known: {', '.join(POOL_FEATURES)})")
    if "blend" not in config.features:
        raise ValueError("features: 'blend' is required (the starting order)")
    for key, value, least in (("pool_size", config.pool_size, 2),
                              ("max_pending", config.max_pending, 1),
                              ("long_items", config.long_items, 1)):
        if value < least:
            raise ValueError(f"{key}: must be >= {least}, got {value}")
    if config.learning_rate <= 0:
        raise ValueError(f"learning_rate: must be > 0, got {config.learning_rate}")
    if config.training not in POOL_TRAINING:
        raise ValueError(f"training: must be one of {POOL_TRAINING}, got {config.training!r}")
    if config.sync_every_pairs < 1:
        raise ValueError(f"sync_every_pairs: must be >= 1, got {config.sync_every_pairs}")


class PoolRanker:
    """Listwise softmax over a pool's feature matrix, Adagrad, running std scaling.

    ``ranks``: beside each feature, its rank within the pool (0 for the pool's largest
    value .. (n-1)/n, ties in row order) -- a pool-relative view that one global scale
    per feature cannot give (measured: docs/ranker.md)."""

    def __init__(self, names: list[str], learning_rate: float = 0.1,
                 start: tuple[str, ...] = ("blend",), ranks: bool = False) -> None:
        """``start``: the features with weight 1 at the start (their sum is the starting
        order; the rest, and every rank column, start at 0)."""
        if not set(start) & set(names):
            raise ValueError(f"the pool ranker needs a starting feature of {start} (its "
                             "starting order)")
        self.names = list(names)
        self.ranks = ranks
        width = len(names) * (2 if ranks else 1)
        self.w = np.array([1.0 if n in start else 0.0 for n in names] + [0.0] * (width - len(names)))
        self.g2 = np.full(width, 1e-6)
        self.lr = learning_rate
        self.mean = np.zeros(width)
        self.var = np.ones(width)
        self.pools = 0
        """Pools observed (the running scale's count)."""
        self.updates = 0

    def expand(self, x: np.ndarray) -> np.ndarray:
        """The model's input: ``x`` (float64), with the within-pool rank columns when
        ``ranks``."""
        x = np.asarray(x, np.float64)
        if not getattr(self, "ranks", False) or not len(x):  # older state: no ranks
            return x
        order = (-x).argsort(axis=0, kind="stable")
        rank = np.empty_like(order)
        rank[order, np.arange(x.shape[1])] = np.arange(len(x))[:, None]  # put_along_axis
        return np.hstack([x, rank / len(x)])

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Logit of each row of ``x`` (candidates x features)."""
        return self._scores(self.expand(x))

    def _scores(self, z: np.ndarray) -> np.ndarray:
        return (z / np.sqrt(self.var + 1e-8)) @ self.w

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """``P(c | pool)`` of each row (softmax of ``scores``)."""
        return self._softmax(self.expand(x))

    def _softmax(self, z: np.ndarray) -> np.ndarray:
        s = self._scores(z)
        p = np.exp(s - s.max())
        return p / p.sum()

    def observe(self, x: np.ndarray) -> None:
        """Update the running mean and variance with a served pool (exponential, rate
        ``max(1/pools, 1e-3)``)."""
        if len(x) >= 2:
            self._observe(self.expand(x))

    def _observe(self, z: np.ndarray) -> None:
        """``observe`` of an expanded pool ``z`` (at least 2 rows)."""
        self.pools += 1
        a = max(1.0 / self.pools, 1e-3)
        self.mean = (1 - a) * self.mean + a * z.mean(0)
        self.var = (1 - a) * self.var + a * ((z - self.mean) ** 2).mean(0)

    def learn(self, x: np.ndarray, target: int) -> None:
        """One Adagrad step on ``log P(target | pool)``; ``x`` holds the target's row
        (float32 rows are read as float64, exactly)."""
        self._learn(self.expand(x), target)

    def observe_learn(self, x: np.ndarray, target: int) -> None:
        """``observe(x)`` then ``learn(x, target)`` (the central trainer's step per
        pair), expanding ``x`` once: the same arithmetic, so the same bits."""
        z = self.expand(x)
        if len(x) >= 2:
            self._observe(z)
        self._learn(z, target)

    def _learn(self, z: np.ndarray, target: int) -> None:
        """``learn`` of an expanded pool ``z``."""
        zs = z / np.sqrt(self.var + 1e-8)
        p = self._softmax(z)
        g = zs[target] - p @ zs
        self.g2 += g * g
        self.w += self.lr * g / np.sqrt(self.g2)
        self.updates += 1

    def weights(self) -> dict[str, float]:
        """Weight per feature (per unit of its running std); rank columns ``rank:<name>``."""
        names = self.names + ([f"rank:{n}" for n in self.names]
                              if getattr(self, "ranks", False) else [])
        return {n: float(w) for n, w in zip(names, self.w, strict=True)}

    def same_inputs(self, other: PoolRanker) -> bool:
        """Whether ``other`` reads the same matrix the same way (features and ranks)."""
        return (other.names == self.names
                and getattr(other, "ranks", False) == getattr(self, "ranks", False))


POOL_FORMAT = 1
"""Version of the ``save_pool_ranker`` layout; files of another version are refused."""


def save_pool_ranker(ranker: PoolRanker, path: str | os.PathLike) -> None:
    """Write ``ranker`` (names, weights, Adagrad sums, running scale, counts, step) as one
    uncompressed ``.npz`` of numeric arrays (no pickles)."""
    blob, offsets = pack_strings(ranker.names)
    with open(path, "wb") as f:
        save_npz(f, dict(format=np.array([POOL_FORMAT]), names_blob=blob, names_offsets=offsets,
                         w=ranker.w, g2=ranker.g2, mean=ranker.mean, var=ranker.var,
                         counts=np.array([ranker.pools, ranker.updates], np.int64),
                         lr=np.array([ranker.lr]), ranks=np.array([int(ranker.ranks)])))


def load_pool_ranker(path: str | os.PathLike | Path) -> PoolRanker:
    """Read a file of ``save_pool_ranker`` (``allow_pickle=False``); ``ValueError`` on
    anything else."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files") or "format" not in z.files:
                raise ValueError(f"{Path(path).name} is not a pool ranker snapshot (.npz)")
            if int(z["format"][0]) != POOL_FORMAT:
                raise ValueError(f"{Path(path).name}: pool ranker format {int(z['format'][0])}, "
                                 f"expected {POOL_FORMAT}")
            names = unpack_strings(z["names_blob"], z["names_offsets"])
            ranks = bool(z["ranks"][0]) if "ranks" in z.files else False
            ranker = PoolRanker(names, float(z["lr"][0]), start=tuple(names), ranks=ranks)
            ranker.w, ranker.g2 = z["w"].astype(np.float64), z["g2"].astype(np.float64)
            ranker.mean, ranker.var = z["mean"].astype(np.float64), z["var"].astype(np.float64)
            ranker.pools, ranker.updates = (int(v) for v in z["counts"])
    except (KeyError, OSError) as err:
        raise ValueError(f"{Path(path).name}: not a pool ranker snapshot ({err})") from None
    width = len(names) * (2 if ranker.ranks else 1)
    if not len(ranker.w) == len(ranker.g2) == len(ranker.mean) == len(ranker.var) == width:
        raise ValueError(f"{Path(path).name}: arrays do not match its {len(names)} features")
    return ranker


@dataclass(slots=True)
class PoolPair:
    """What a user shard sends the central pool trainer for one outcome: the served
    pool's feature matrix (float32, candidates x features, the target's row included)
    and the target's row; ``ts`` the outcome's event time (ms)."""

    ts: int
    x: np.ndarray
    target: int

    @property
    def nbytes(self) -> int:
        """Payload size (bytes): the matrix plus the two integers."""
        return int(self.x.nbytes) + 16


@dataclass(slots=True)
class ServedPool:
    """A pool served to a user: its items (row order) and feature matrix."""

    ts: int
    items: dict[str, int]
    """Item -> row of ``x``."""
    x: np.ndarray


@dataclass
class PendingPools:
    """The last served pool of each user, at most ``capacity`` users (least recently
    served dropped first), each valid ``ttl_ms`` of event time."""

    capacity: int = 5_000
    ttl_ms: int = 86_400_000
    pools: OrderedDict[str, ServedPool] = field(default_factory=OrderedDict)
    dropped_stale: int = 0
    dropped_full: int = 0

    def put(self, user_id: str, items: list[str], x: np.ndarray, ts: int) -> None:
        """Remember ``user_id``'s pool (replaces an older one)."""
        pools = self.pools
        pools.pop(user_id, None)
        pools[user_id] = ServedPool(ts, dict(zip(items, range(len(items)), strict=True)),
                                    np.asarray(x, np.float32))
        while len(pools) > self.capacity:
            pools.popitem(last=False)
            self.dropped_full += 1

    def take(self, user_id: str, item_id: str, ts: int) -> tuple[np.ndarray, int] | None:
        """(pool features as float32, target row) when ``item_id`` is in ``user_id``'s fresh pool;
        the target's row then leaves the pool (a later click on the same request learns
        among the rest). A stale pool is dropped; None when nothing matches."""
        pool = self.pools.get(user_id)
        if pool is None:
            return None
        if ts - pool.ts > self.ttl_ms:
            del self.pools[user_id]
            self.dropped_stale += 1
            return None
        row = pool.items.pop(item_id, None)
        if row is None:
            return None
        x = pool.x
        if len(pool.items) < 2:  # nothing left to choose among
            del self.pools[user_id]
        else:
            keep = np.ones(len(x), bool)
            keep[row] = False
            pool.x = x[keep]
            pool.items = {item: r - (r > row) for item, r in pool.items.items()}
        return x, row

    def __len__(self) -> int:
        return len(self.pools)


class PoolModel:
    """The pool ranker with its pending pools: ``serve`` scores and remembers a pool,
    ``outcome`` learns from a user's next positive (``training = "shard"``) or queues
    it as a ``PoolPair`` for the central trainer (``"central"``: ``take_pairs``)."""

    def __init__(self, config: PoolRankerConfig) -> None:
        check_pool_config(config)
        self.config = config
        self.ranker = PoolRanker(list(config.features), config.learning_rate,
                                 ranks=getattr(config, "rank_features", False))
        """Shard training: the learning model. Central: the starting weights (the
        blend order), serving until the first central copy."""
        self.pending = PendingPools(config.max_pending, config.pending_ttl_ms)
        self.outcomes = 0
        """Positives of users with a pending pool."""
        self.learned = 0
        """Outcomes whose item was in the pool (the ranker learned from them, here or
        centrally)."""
        self.pairs: list[PoolPair] = []
        """Central training: pairs not yet taken by the user shard's output."""

    @property
    def central(self) -> bool:
        return getattr(self.config, "training", "shard") == "central"

    def serve(self, user_id: str, items: list[str], x: np.ndarray, ts: int,
              copy: PoolRanker | None = None) -> np.ndarray:
        """``P(c | pool)`` of each item; remembers the pool. Central training scores with
        ``copy`` (the newest central copy; when None or trained on other features, the
        starting weights); shard training with its own model, whose scale it then
        updates (past pools only)."""
        if self.central:
            ranker = copy if copy is not None and copy.same_inputs(self.ranker) else self.ranker
            p = ranker.probabilities(x)
        else:
            p = self.ranker.probabilities(x)
            self.ranker.observe(x)
        self.pending.put(user_id, items, x, ts)
        return p

    def outcome(self, user_id: str, item_id: str, ts: int) -> bool:
        """The user's positive on ``item_id`` at ``ts``: learn (or queue a pair) when it
        is in the user's pending pool. True when it did."""
        if user_id not in self.pending.pools:
            return False
        self.outcomes += 1
        taken = self.pending.take(user_id, item_id, ts)
        if taken is None:
            return False
        if self.central:
            self.pairs.append(PoolPair(ts, *taken))
        else:
            self.ranker.learn(*taken)
        self.learned += 1
        return True

    def take_pairs(self) -> list[PoolPair]:
        """The pairs queued since the last call (central training), oldest first."""
        pairs = getattr(self, "pairs", None)  # older state: none
        self.pairs = []
        return pairs or []

    def counters(self) -> dict[str, int]:
        """Outcomes seen, learned from, and pending pools (metrics)."""
        return {"pool_outcomes": self.outcomes, "pool_learned": self.learned,
                "pool_pending": len(self.pending)}
