"""Prequential HR@10 / NDCG@10 on MovieLens 100k: the anchors, the retrieval + scoring
recipe of ``docs/movielens-recipe.md`` and its ablations.

Protocol (docs/evaluation.md, Vinagre et al. 2014): ratings in time order (stable sort
on the timestamp, ties keep file order); a positive is a rating >= 4. For each
positive (u, i), *before* anything learns from it, the recommender returns u's top 10
among the items seen so far in the stream, excluding every item u rated earlier (any
rating); a hit if i is in it. HR@10 = hits / positives, NDCG@10 = mean of
1/log2(rank + 2) over hits (0-based rank). Then every rating is learned from, in one
pass; nothing ever looks ahead.

    python bench/movielens_offline.py [--path PATH] [--quick] [--project-ranker] [--mf]

The recipe: two co-visitation channels (pairs among positives; pairs among all rated
items) seeded by the user's recent items, blended into a 100-item pool, reranked by an
online listwise (softmax) model over ten features, learned only when the rated item was
in the pool. ``--quick``: 4 rows; ``--mf``: MF rows (project ``models.mf``);
``--project-ranker``: the recipe through the project's River LR (``models.rankers``);
``--project-covis M``: the retrieval through ``state.covisitation`` bounded to M.

Prints a table (HR@10, NDCG@10, HR@10 on the first / second half of the positives,
seconds) and, as the last line, one JSON object. Without the data file it prints a
message and a JSON line of nulls and exits 0.

Implementation note: the co-visitation tables here are dense numpy matrices with the
exact pair semantics of ``state.covisitation.CoVisitation.pairs_for`` (symmetric,
weight ``decay**k`` for the k-th most recent distinct item) but with no row bound and
no time decay, and with a *query* position decay separate from the *pair* one
(``CoVisitation.candidates`` uses one ``position_decay`` for both). They run ~50x
faster than the dict tables, which keeps each configuration to seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from models.pool_ranker import PoolRanker  # noqa: E402

DEFAULT_PATH = ROOT.parent / "shared" / "data" / "movielens-100k" / "u.data"
K = 10
DAY_MS = 86_400_000
HOUR_MS = 3_600_000


# --- data -------------------------------------------------------------------------------


@dataclass
class Events:
    """Ratings in stream order, users and items as dense indices (order of first use)."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    ts_ms: np.ndarray
    n_users: int
    n_items: int


def load_movielens(path: Path, tie: str = "file", seed: int = 0) -> Events:
    """``u.data`` (user, item, rating, unix seconds) sorted by time. ``tie``: ``file``
    (stable: ties keep file order, the protocol), ``reverse`` (ties in reverse file
    order) or ``random`` (ties shuffled with ``seed``): robustness checks only."""
    a = np.loadtxt(path, dtype=np.int64, ndmin=2)
    if tie == "file":
        order = np.argsort(a[:, 3], kind="stable")
    elif tie == "reverse":
        order = len(a) - 1 - np.argsort(a[::-1, 3], kind="stable")
    elif tie == "random":
        perm = np.random.default_rng(seed).permutation(len(a))
        order = perm[np.argsort(a[perm, 3], kind="stable")]
    else:
        raise ValueError(f"unknown tie order {tie!r}")
    a = a[order]
    _, user = np.unique(a[:, 0], return_inverse=True)
    _, item = np.unique(a[:, 1], return_inverse=True)
    return Events(user.astype(np.int64), item.astype(np.int64), a[:, 2], a[:, 3] * 1000,
                  int(user.max()) + 1, int(item.max()) + 1)


# --- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class CovisSpec:
    """One co-visitation channel. ``source``: ``pos`` (pairs among a user's positives,
    seeds = the user's recent positives, normalised by positive counts) or ``all``
    (pairs among all rated items, seeds = recent rated items, normalised by rating
    counts)."""

    source: str = "pos"
    window: int = 40  # recent distinct items paired with a new one, and seeds at query time
    pair_decay: float = 0.95  # k-th most recent item pairs with weight pair_decay**k
    query_decay: float = 0.8  # k-th most recent seed weighs query_decay**k
    pop_alpha: float = 0.5  # candidate score divided by count**pop_alpha


@dataclass(frozen=True)
class Config:
    name: str
    kind: str = "covis"  # popularity | decayed_popularity | covis | rerank | mf
    channels: tuple[CovisSpec, ...] = ()
    pop_prior: float = 0.0  # covis: + pop_prior * decayed popularity (max-normalised)
    pop_half_life_days: float = 7.0  # decayed_popularity / pop_prior
    # reranker
    pool: int = 100
    features: tuple[str, ...] = ()
    ranker: str = "softmax"  # softmax (listwise, numpy) | lr (project River LR, pointwise)
    lr_id_features: bool = True  # lr: features through serving_features (ids, hour, dow, pos)
    lr_pairwise: bool = False  # lr: learn on differences x_target - x_negative (RankNet/BPR)
    lr: float = 0.1  # softmax: Adagrad step
    negatives: int = 10  # lr ranker: pool candidates sampled as negatives per positive
    long_max: int = 0  # long_pos: only the last long_max positives (0: all of them)
    learn_outside_pool: bool = False  # also learn when the target was not in the pool
    mf: bool = False  # add the MF dot product (project ISGD) as a feature
    tie: str = "file"
    tie_seed: int = 1


POS = CovisSpec("pos")
ALL = CovisSpec("all")
RECIPE_FEATURES = ("cov_pos", "cov_all", "long_pos", "pop", "n_ratings", "pos_rate",
                   "trend_1d", "pop_30d", "age", "pop_cold")
RECIPE = Config("recipe", kind="rerank", channels=(POS, ALL), features=RECIPE_FEATURES, long_max=100)


def configs(quick: bool, project_ranker: bool, mf: bool) -> list[tuple[str, Config]]:
    """(description, config) rows of the table, anchors first."""
    anchor_cov = CovisSpec("pos", window=20, pair_decay=0.8, query_decay=0.8, pop_alpha=0.5)
    plain = CovisSpec("pos", window=20, pair_decay=1.0, query_decay=1.0, pop_alpha=0.0)
    rows: list[tuple[str, Config]] = [
        ("anchor: popularity (positives so far)", Config("popularity", kind="popularity")),
        ("anchor: decayed popularity (half-life 7 d)", Config("decayed_popularity", kind="decayed_popularity")),
        ("anchor: co-occurrence (last 20 positives, no decay) + pop fill", Config("cooccurrence_pop", channels=(plain,))),
        ("anchor: covis tuned (project defaults W20 d0.8 alpha0.5)", Config("covis_tuned_anchor", channels=(anchor_cov,))),
        ("covis positives (W40 pair 0.95 query 0.8)", Config("covis_pos", channels=(POS,))),
        ("covis all ratings", Config("covis_all", channels=(ALL,))),
        ("covis pos + all (retrieval recipe)", Config("covis_blend", channels=(POS, ALL))),
        ("covis pos + all + decayed pop prior 0.1", Config("covis_blend_pop_prior", channels=(POS, ALL), pop_prior=0.1)),
        ("rerank: covis features only", replace(RECIPE, name="rerank_covis", features=("cov_pos", "cov_all"))),
        ("rerank: + long-term profile", replace(RECIPE, name="rerank_covis_long", features=("cov_pos", "cov_all", "long_pos"))),
        ("rerank: + popularity/time (RECIPE)", RECIPE),
        ("recipe without the all-ratings channel", replace(
            RECIPE, name="recipe_without_all_channel", channels=(POS,),
            features=tuple(f for f in RECIPE_FEATURES if f != "cov_all"))),
        ("recipe, reranker also learns when the target is outside the pool",
         replace(RECIPE, name="recipe_learn_outside_pool", learn_outside_pool=True)),
        ("recipe, ties in random order (seed 1)", replace(RECIPE, name="recipe_ties_random", tie="random")),
        ("recipe, ties in reverse file order", replace(RECIPE, name="recipe_ties_reverse", tie="reverse")),
    ]
    if mf:
        rows.append(("anchor: ISGD MF alone (project models.mf, k10, no fold-in)", Config("isgd_mf", kind="mf", mf=True)))
        rows.append(("recipe + MF dot feature (project ISGD k10)", replace(RECIPE, name="recipe_mf", mf=True)))
    if project_ranker:
        rows.append(("recipe features via serving_features, project River LR, pointwise",
                     replace(RECIPE, name="recipe_project_lr", ranker="lr")))
        rows.append(("recipe features (std-scaled, no ids), project River LR, pointwise",
                     replace(RECIPE, name="recipe_project_lr_no_ids", ranker="lr", lr_id_features=False)))
        rows.append(("recipe features (std-scaled), project River LR on pair differences",
                     replace(RECIPE, name="recipe_project_lr_pairwise", ranker="lr", lr_id_features=False,
                             lr_pairwise=True)))
    if quick:
        keep = {"popularity", "cooccurrence_pop", "covis_blend", "recipe"}
        rows = [r for r in rows if r[1].name in keep]
    return rows


# --- online state -----------------------------------------------------------------------


def _max_norm(x: np.ndarray) -> np.ndarray:
    """``x / max(x)`` (a new array; a copy of ``x`` if its max is not positive)."""
    m = x.max() if x.size else 0.0
    return x / m if m > 0 else x.copy()


class Covis:
    """Dense symmetric co-visitation matrix of one channel (no row bound, no time decay)."""

    def __init__(self, spec: CovisSpec, n_items: int) -> None:
        self.spec = spec
        self.m = np.zeros((n_items, n_items), np.float32)
        self.pair_w = (spec.pair_decay ** np.arange(spec.window)).astype(np.float32)
        self.query_w = (spec.query_decay ** np.arange(spec.window)).astype(np.float32)

    def add(self, recent: list[int], item: int) -> None:
        """Pairs of ``item`` with the last ``window`` items of ``recent`` (oldest first;
        distinct and != item by construction: a user rates an item once)."""
        w = min(len(recent), self.spec.window)
        if w:
            idx = np.array(recent[-1:-w - 1:-1])
            self.m[idx, item] += self.pair_w[:w]
            self.m[item, idx] += self.pair_w[:w]

    def scores(self, recent: list[int], counts: np.ndarray) -> np.ndarray | None:
        """``sum_k query_decay**k C[r_k, :] / max(count, 1)**alpha``, max-normalised; None
        without seeds."""
        w = min(len(recent), self.spec.window)
        if not w:
            return None
        idx = np.array(recent[-1:-w - 1:-1])
        s = (self.query_w[:w] @ self.m[idx]).astype(np.float64)
        if self.spec.pop_alpha:
            s /= np.maximum(counts, 1.0) ** self.spec.pop_alpha
        return _max_norm(s)


class State:
    """Everything learned from the past of the stream (updated after each answer)."""

    def __init__(self, ev: Events, cfg: Config) -> None:
        n, nu = ev.n_items, ev.n_users
        self.t0 = int(ev.ts_ms[0]) if len(ev.ts_ms) else 0
        self.pos_count = np.zeros(n)  # positives per item
        self.n_ratings = np.zeros(n)  # ratings per item
        self.half_lives = np.array([1.0, 7.0, 30.0]) * DAY_MS
        self.decayed = np.zeros((3, n))  # ratings, grown by 2**((t - t0)/hl)
        self.decayed_pos = np.zeros(n)  # positives, half-life cfg.pop_half_life_days
        self.pop_hl = cfg.pop_half_life_days * DAY_MS
        self.first_ms = np.zeros(n)
        self.seen = np.zeros(n, bool)
        self.consumed = np.zeros((nu, n), bool)
        self.hist_pos: list[list[int]] = [[] for _ in range(nu)]  # oldest first
        self.hist_all: list[list[int]] = [[] for _ in range(nu)]
        self.channels = [Covis(s, n) for s in cfg.channels]

    def grow(self, ts: int, hl: np.ndarray | float) -> np.ndarray | float:
        return 2.0 ** ((ts - self.t0) / hl)

    def learn(self, u: int, i: int, positive: bool, ts: int) -> None:
        for ch in self.channels:
            if ch.spec.source == "all":
                ch.add(self.hist_all[u], i)
            elif positive:
                ch.add(self.hist_pos[u], i)
        if positive:
            self.pos_count[i] += 1
            self.decayed_pos[i] += self.grow(ts, self.pop_hl)
            self.hist_pos[u].append(i)
        self.hist_all[u].append(i)
        self.n_ratings[i] += 1
        self.decayed[:, i] += self.grow(ts, self.half_lives)
        if not self.seen[i]:
            self.first_ms[i] = ts
            self.seen[i] = True
        self.consumed[u, i] = True

    def channel_scores(self, u: int) -> list[np.ndarray | None]:
        out = []
        for ch in self.channels:
            if ch.spec.source == "all":
                out.append(ch.scores(self.hist_all[u], self.n_ratings))
            else:
                out.append(ch.scores(self.hist_pos[u], self.pos_count))
        return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best finite scores, best first (stable on ties)."""
    finite = int(np.isfinite(scores).sum())
    k = min(k, finite)
    if k <= 0:
        return np.zeros(0, np.int64)
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


def retrieval_scores(st: State, cfg: Config, u: int, ts: int, mf: MFFeature | None = None) -> np.ndarray:
    """Score of every item (-inf: unseen or already consumed by u)."""
    if cfg.kind == "popularity":
        s = st.pos_count.copy()
    elif cfg.kind == "mf":
        assert mf is not None
        s = mf.dot(u, np.arange(st.seen.size)) + 1e-9 * _max_norm(st.pos_count)
    elif cfg.kind == "decayed_popularity":
        s = st.decayed_pos.copy()
    else:
        parts = [p for p in st.channel_scores(u) if p is not None]
        pop = _max_norm(st.pos_count)
        if parts:
            s = sum(parts) / len(parts)  # equal-weight blend of max-normalised channels
            if cfg.pop_prior:
                s = s + cfg.pop_prior * _max_norm(st.decayed_pos)
            s = s + 1e-9 * pop  # popularity fills zero-score slots
        else:
            s = pop  # cold user: popularity
    s = s.astype(np.float64, copy=False)
    s[~st.seen] = -np.inf
    s[st.consumed[u]] = -np.inf
    return s


# --- reranker ---------------------------------------------------------------------------


def pool_features(st: State, cfg: Config, u: int, ts: int, pool: np.ndarray,
                  ch_scores: list[np.ndarray | None], mf_dot: np.ndarray | None) -> np.ndarray:
    """Feature matrix (len(pool), len(cfg.features) [+1 with MF]) of candidates ``pool``."""
    cols = []
    n_hist = len(st.hist_all[u])
    for f in cfg.features:
        if f in ("cov_pos", "cov_all"):
            j = [c.spec.source for c in st.channels].index(f[4:])
            s = ch_scores[j]
            cols.append(np.zeros(pool.size) if s is None else s[pool])
        elif f == "long_pos":  # item-kNN over ALL the user's positives, seed weight 1/count
            h = st.hist_pos[u][-cfg.long_max:] if cfg.long_max else st.hist_pos[u]
            ch = next(c for c in st.channels if c.spec.source == "pos")
            if h:
                hi = np.array(h)
                w = (1.0 / np.maximum(st.pos_count[hi], 1.0)).astype(np.float32)
                v = (w @ ch.m[np.ix_(hi, pool)]).astype(np.float64)
                v /= np.maximum(st.pos_count[pool], 1.0) ** ch.spec.pop_alpha
                cols.append(_max_norm(v))
            else:
                cols.append(np.zeros(pool.size))
        elif f == "pop":
            cols.append(np.log1p(st.pos_count[pool]))
        elif f == "n_ratings":
            cols.append(np.log1p(st.n_ratings[pool]))
        elif f == "pos_rate":
            cols.append((st.pos_count[pool] + 1.0) / (st.n_ratings[pool] + 2.0))
        elif f == "trend_1d":
            cols.append(np.log1p(st.decayed[0, pool] / st.grow(ts, st.half_lives[0])))
        elif f == "pop_30d":
            cols.append(np.log1p(st.decayed[2, pool] / st.grow(ts, st.half_lives[2])))
        elif f == "age":
            cols.append(np.log1p((ts - st.first_ms[pool]) / DAY_MS))
        elif f == "pop_cold":
            cols.append(np.log1p(st.pos_count[pool]) / (1.0 + math.log1p(n_hist)))
        else:
            raise ValueError(f"unknown feature {f!r}")
    if mf_dot is not None:
        cols.append(mf_dot)
    return np.stack(cols, 1)


def softmax_ranker(names: list[str], lr: float) -> PoolRanker:
    """The flow's online listwise ranker (``models.pool_ranker.PoolRanker``: multinomial
    logit over the pool, running std scaling, Adagrad on the log-likelihood of the item
    the user actually rated), starting at w = 1 on the covis features (the retrieval
    order) and 0 elsewhere."""
    return PoolRanker(names, lr, start=tuple(n for n in names if n.startswith("cov_")))


class ProjectLRRanker:
    """The project's ``make_ranker("lr")`` (River LR, Adagrad), pointwise: the target
    as a positive and ``negatives`` candidates sampled from the pool as negatives.
    ``id_features``: features through ``models.features.serving_features`` (user/item
    ids, hour, weekday, position and the numeric features through signed log, as in
    the flow); else the numeric features alone, divided by their running std."""

    def __init__(self, names: list[str], negatives: int, id_features: bool = True,
                 pairwise: bool = False, seed: int = 0) -> None:
        from models.features import serving_features
        from models.rankers import make_ranker

        self.ranker = make_ranker("lr", negative_rate=1.0)
        self.feat = serving_features
        self.names = names
        self.negatives = negatives
        self.id_features = id_features
        self.pairwise = pairwise
        self.scale = softmax_ranker(names, 0.0)  # running std only
        self.rng = np.random.default_rng(seed)

    def _dicts(self, u: int, items: np.ndarray, ts: int, x: np.ndarray) -> list[dict[str, float]]:
        if not self.id_features:
            xs = x / np.sqrt(self.scale.var + 1e-8)
            return [dict(zip(self.names, row.tolist(), strict=True)) for row in xs]
        return [self.feat(str(u), str(it), ts, None, dict(zip(self.names, row.tolist(), strict=True)))
                for it, row in zip(items.tolist(), x, strict=True)]

    def scores(self, u: int, items: np.ndarray, ts: int, x: np.ndarray) -> np.ndarray:
        return self.ranker.predict_many(self._dicts(u, items, ts, x), calibrated=False)

    def learn(self, u: int, items: np.ndarray, ts: int, x: np.ndarray, target: int) -> None:
        others = np.delete(np.arange(len(items)), target)
        neg = self.rng.choice(others, min(self.negatives, others.size), replace=False)
        if self.pairwise:  # both orientations of (target, negative) differences: intercept stays ~0
            xs = x / np.sqrt(self.scale.var + 1e-8)
            exs, feats = [], []
            for j in neg.tolist():
                d = xs[target] - xs[j]
                for sign, label in ((1.0, True), (-1.0, False)):
                    exs.append({"user_id": str(u), "item_id": str(items[target]), "ts": ts, "label": label})
                    feats.append(dict(zip(self.names, (sign * d).tolist(), strict=True)))
            self.ranker.learn_many(exs, feats)
            return
        rows = np.r_[target, neg]
        exs = [{"user_id": str(u), "item_id": str(items[r]), "ts": ts, "label": r == target}
               for r in rows.tolist()]
        self.ranker.learn_many(exs, self._dicts(u, items[rows], ts, x[rows]))


class MFFeature:
    """Project incremental MF (``models.mf`` ISGD, k=10) learned on positives; the
    user vector dotted with candidate item vectors. Item vectors are read back right
    after each update (serving copy always fresh)."""

    def __init__(self, n_items: int) -> None:
        from models.mf import ItemFactors, MFConfig, UserFactors

        self.cfg = MFConfig(dim=10)
        self.users = UserFactors(self.cfg)
        self.items = ItemFactors(self.cfg)
        self.V = self.items.initial_vectors([str(j) for j in range(n_items)])

    def dot(self, u: int, pool: np.ndarray) -> np.ndarray:
        uv = self.users.vectors([str(u)])[0][0]
        return (self.V[pool] @ uv).astype(np.float64)

    def learn(self, u: int, i: int, ts: int) -> None:
        u0 = self.users.update(str(u), self.V[i], ts)
        self.items.update(str(i), u0, ts)
        self.V[i] = self.items.vectors([str(i)])[0]


# --- prequential loop -------------------------------------------------------------------


@dataclass
class Result:
    hr: float
    ndcg: float
    positives: int
    hr_first_half: float
    hr_second_half: float
    seconds: float
    curve: list[float] = field(default_factory=list)  # HR@10 per fifth of the positives
    weights: dict[str, float] | None = None
    pool_recall: float | None = None


def prequential(path: Path, cfg: Config) -> Result:
    ev = load_movielens(path, cfg.tie, cfg.tie_seed)
    t_start = time.perf_counter()
    st = State(ev, cfg)
    rerank = cfg.kind == "rerank"
    names = list(cfg.features) + (["mf_dot"] if cfg.mf else [])
    ranker: PoolRanker | ProjectLRRanker | None = None
    if rerank:
        ranker = (ProjectLRRanker(names, cfg.negatives, cfg.lr_id_features, cfg.lr_pairwise) if cfg.ranker == "lr"
                  else softmax_ranker(names, cfg.lr))
    mf = MFFeature(ev.n_items) if cfg.mf else None
    hits: list[bool] = []
    gains = 0.0
    in_pool = 0
    for u, i, r, ts in zip(ev.user.tolist(), ev.item.tolist(), ev.rating.tolist(), ev.ts_ms.tolist(), strict=True):
        positive = r >= 4
        if positive:
            if not rerank:
                top = top_k(retrieval_scores(st, cfg, u, ts, mf), K)
            else:
                ch_scores = st.channel_scores(u)
                pool = top_k(retrieval_scores(st, cfg, u, ts), cfg.pool)
                mfd = mf.dot(u, pool) if mf is not None else None
                x = pool_features(st, cfg, u, ts, pool, ch_scores, mfd)
                if pool.size:
                    sc = (ranker.scores(u, pool, ts, x) if isinstance(ranker, ProjectLRRanker)
                          else ranker.scores(x))
                    top = pool[top_k(sc, K)]
                else:
                    top = pool
            rank = np.flatnonzero(top == i)
            hit = bool(rank.size)
            hits.append(hit)
            if hit:
                gains += 1.0 / math.log2(rank[0] + 2)
            if rerank and pool.size:  # learn AFTER answering
                where = np.flatnonzero(pool == i)
                if where.size:
                    in_pool += 1
                    xl, tgt, items = x, int(where[0]), pool
                elif cfg.learn_outside_pool and st.seen[i]:
                    items = np.r_[pool, i]
                    xi = pool_features(st, cfg, u, ts, np.array([i]), ch_scores,
                                       mf.dot(u, np.array([i])) if mf is not None else None)
                    xl, tgt = np.vstack([x, xi]), pool.size
                else:
                    tgt = -1
                if tgt >= 0:
                    if isinstance(ranker, ProjectLRRanker):
                        ranker.learn(u, items, ts, xl, tgt)
                    else:
                        ranker.learn(xl, tgt)
                (ranker.scale if isinstance(ranker, ProjectLRRanker) else ranker).observe(x)
            if mf is not None:
                mf.learn(u, i, ts)
        st.learn(u, i, positive, ts)
    h = np.array(hits, bool)
    n = h.size
    mid = n // 2
    weights = None
    if isinstance(ranker, PoolRanker):  # weight per unit of each raw feature's std
        weights = {nm: round(float(w), 3) for nm, w in zip(names, ranker.w, strict=True)}
    return Result(
        hr=float(h.mean()) if n else 0.0,
        ndcg=gains / n if n else 0.0,
        positives=n,
        hr_first_half=float(h[:mid].mean()) if mid else 0.0,
        hr_second_half=float(h[mid:].mean()) if n - mid else 0.0,
        seconds=time.perf_counter() - t_start,
        curve=[round(float(c.mean()), 4) for c in np.array_split(h, 5)] if n >= 5 else [],
        weights=weights,
        pool_recall=in_pool / n if rerank and n else None,
    )


def prequential_project_covis(path: Path, max_neighbors: int) -> Result:
    """The retrieval recipe (covis_blend) on the project's ``state.covisitation``
    tables (dict rows bounded to ``max_neighbors``, half-life 10 years ~ no decay),
    through the public API: ``observe`` to learn, ``neighbors`` to read rows (the
    query decay differs from the pair decay, which ``candidates`` cannot express).
    Slow (pure-Python rows): minutes."""
    from state.covisitation import CoVisConfig, CoVisitation

    ev = load_movielens(path)
    t_start = time.perf_counter()
    n = ev.n_items
    tabs = {src: CoVisitation(CoVisConfig(half_life_ms=3650 * DAY_MS, max_neighbors=max_neighbors,
                                          window=POS.window, position_decay=POS.pair_decay))
            for src in ("pos", "all")}
    counts = {"pos": np.zeros(n), "all": np.zeros(n)}
    hist: dict[str, list[list[int]]] = {src: [[] for _ in range(ev.n_users)] for src in ("pos", "all")}
    seen = np.zeros(n, bool)
    consumed = np.zeros((ev.n_users, n), bool)
    qw = POS.query_decay ** np.arange(POS.window)
    hits: list[bool] = []
    gains = 0.0
    for u, i, r, ts in zip(ev.user.tolist(), ev.item.tolist(), ev.rating.tolist(), ev.ts_ms.tolist(), strict=True):
        positive = r >= 4
        if positive:
            parts = []
            for src, tab in tabs.items():
                h = hist[src][u][-POS.window:]
                if h:
                    s = np.zeros(n)
                    for k, it in enumerate(reversed(h)):
                        for b, v in tab.neighbors(str(it), max_neighbors, ts):
                            s[int(b)] += qw[k] * v
                    parts.append(_max_norm(s / np.maximum(counts[src], 1.0) ** POS.pop_alpha))
            pop = _max_norm(counts["pos"])
            s = sum(parts) / len(parts) + 1e-9 * pop if parts else pop
            s[~seen] = -np.inf
            s[consumed[u]] = -np.inf
            top = top_k(s, K)
            rank = np.flatnonzero(top == i)
            hits.append(bool(rank.size))
            if rank.size:
                gains += 1.0 / math.log2(rank[0] + 2)
        for src in ("pos", "all"):
            if src == "all" or positive:
                tabs[src].observe([str(x) for x in reversed(hist[src][u][-POS.window - 1:])], str(i), ts)
                hist[src][u].append(i)
                counts[src][i] += 1
        seen[i] = True
        consumed[u, i] = True
    h = np.array(hits, bool)
    mid = h.size // 2
    return Result(float(h.mean()), gains / h.size, h.size, float(h[:mid].mean()), float(h[mid:].mean()),
                  time.perf_counter() - t_start)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, default=DEFAULT_PATH, help="MovieLens u.data")
    ap.add_argument("--quick", action="store_true", help="4 rows only (anchors, retrieval, recipe)")
    ap.add_argument("--project-ranker", action="store_true",
                    help="also the recipe features through the project's River LR (slower)")
    ap.add_argument("--mf", action="store_true", help="also the recipe + project ISGD MF feature (slower)")
    ap.add_argument("--project-covis", type=int, default=0, metavar="M",
                    help="also the retrieval recipe on state.covisitation with max_neighbors M (minutes)")
    args = ap.parse_args(argv)
    rows = configs(args.quick, args.project_ranker, args.mf)
    if not args.path.exists():
        print(f"MovieLens file not found at {args.path}: skipped")
        out: dict[str, object] = {"hr_at_10": None, "ndcg_at_10": None, "positives": None,
                                  "popularity_hr_at_10": None, "skipped": True}
        out.update({f"{c.name}_hr_at_10": None for _, c in rows})
        print(json.dumps(out))
        return
    print(f"MovieLens 100k prequential HR@10 / NDCG@10 ({args.path})")
    print(f"{'row':30s} {'HR@10':>7s} {'NDCG@10':>8s} {'HR 1st':>7s} {'HR 2nd':>7s} {'sec':>6s}  description")
    figures: dict[str, object] = {}
    results: dict[str, Result] = {}
    t_all = time.perf_counter()
    for desc, cfg in rows:
        res = prequential(args.path, cfg)
        results[cfg.name] = res
        print(f"{cfg.name:30s} {res.hr:7.4f} {res.ndcg:8.4f} {res.hr_first_half:7.4f} "
              f"{res.hr_second_half:7.4f} {res.seconds:6.1f}  {desc}", flush=True)
        figures[f"{cfg.name}_hr_at_10"] = round(res.hr, 4)
        figures[f"{cfg.name}_ndcg_at_10"] = round(res.ndcg, 4)
    if args.project_covis:
        res = prequential_project_covis(args.path, args.project_covis)
        name = f"covis_blend_project_m{args.project_covis}"
        print(f"{name:30s} {res.hr:7.4f} {res.ndcg:8.4f} {res.hr_first_half:7.4f} "
              f"{res.hr_second_half:7.4f} {res.seconds:6.1f}  retrieval recipe on state.covisitation, "
              f"max_neighbors {args.project_covis}", flush=True)
        figures[f"{name}_hr_at_10"] = round(res.hr, 4)
        figures[f"{name}_ndcg_at_10"] = round(res.ndcg, 4)
    rec = results["recipe"]
    print(f"recipe: positives {rec.positives}, target in the 100-pool {rec.pool_recall:.4f}, "
          f"HR@10 per fifth of the stream {rec.curve}")
    print(f"recipe reranker weights (per feature std): {rec.weights}")
    print(f"total {time.perf_counter() - t_all:.1f} s")
    out = {
        "hr_at_10": round(rec.hr, 4),
        "ndcg_at_10": round(rec.ndcg, 4),
        "positives": rec.positives,
        "popularity_hr_at_10": round(results["popularity"].hr, 4),
        "recipe_hr_first_half": round(rec.hr_first_half, 4),
        "recipe_hr_second_half": round(rec.hr_second_half, 4),
        "recipe_seconds": round(rec.seconds, 1),
        "recipe_pool_recall": round(rec.pool_recall or 0.0, 4),
        "recipe_curve": rec.curve,
        **figures,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
