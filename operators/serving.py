"""Serving on the user shard: retrieve -> filter -> score -> order -> top k.

The user shard answers each ``request`` with the user's own state (recent items,
consumed set, MF vector, profile features) and the newest verified nearline
snapshots (serving ranker copy, HNSW index, one item table per item shard), both read
through the shard's ``PointInTime`` (its ``SnapshotViews`` are polled by the user shard
once per micro-batch, at most every ``serving.poll_ms`` of wall time). Stages, each with a hook for business rules (``"module:function"``,
called as ``hook(request, candidates) -> candidates``):

1. retrieve: ANN over the user vector, co-visitation of recent items, trending,
   popular (always as backfill, alone for cold users), each sampled category's best
   items (``category``, operators/category_items.py); candidates keep their sources;
2. filter: consumed items, unavailable items, the request's ``exclude``; hook
   ``after_retrieval``;
3. score: the serving ranker on the user shard's feature function (the same one the
   joiner uses at impression time, so training and serving features agree) or the
   retrieval blend (co-visitation channels, docs/movielens-recipe.md), chosen by
   ``serving.scorer`` (``auto``: a champion/challenger duel on the users' next
   positives, ``operators/scorer_duel.py``); hook ``after_scoring``;
4. order: diversity across categories and an epsilon-greedy exploration slot (a new
   item), both configurable and off-able; hook ``after_ordering``.

Candidates travel as arrays (``CandidatePool``, operators/candidates.py: rows in the
``CovisView`` id space with per-row values of the loaded snapshots in ``ItemRows``,
state/item_rows.py); ``Candidate`` objects are made for the top k, and for every
candidate only when a hook is configured.
"""

from __future__ import annotations

import heapq
import importlib
import itertools
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from events.model import Record
from models.category_bandit import CategoryExploreConfig, CodedCategories
from models.features import SERVING_POSITION, ranking_features_many
from models.pool_ranker import PoolModel, PoolRankerConfig
from models.seeded import SeededGenerator
from operators.candidates import (
    SOURCES,
    Candidate,
    CandidatePool,
    MergeScratch,
    merge,
    record_item,
    round_to,
    top_indices,
)
from operators.category_explore import CategoryExplore, category_scores
from operators.category_items import CategoryItems, CategoryList
from operators.linear_scorer import column_scorer, linear_scorer
from operators.point_in_time import ItemColumns, PointInTime, UserContext, member_mask
from operators.pool_features import pool_matrix
from operators.scorer_duel import SCORERS, ScorerDuel, team_draft
from operators.snapshot_views import SnapshotViews
from state.covis_view import CovisView, SparseScores, sparse_sum
from state.hashing import stable_hash64
from state.item_rows import ItemRows
from state.item_table import ItemTable, category_of, set_memo
from state.settings import doc

log = logging.getLogger(__name__)

Hook = Callable[[Any, list[Candidate]], list[Candidate]]
__all__ = ["Candidate", "REPEAT_POLICIES", "Server", "ServingConfig", "load_hook",
           "repeat_blocked"]


def _by_score(kv: tuple[str, float]) -> float:
    return kv[1]


def _merged_top(tables: list[ItemTable], source: str, n: int
                ) -> tuple[list[tuple[str, float]], list[str], np.ndarray]:
    """``Server._top``'s merged list of ``6 n`` over ``tables`` as (pairs, items, scores):
    every table's cached top list decayed to the newest table's time, merged by score
    (equal scores in table then list order)."""
    most = 6 * n
    ref = max(t.ts for t in tables)
    lists = []
    for t in tables:
        f = t.decay_factor(source, ref)
        lists.append([(item, score * f) for item, score in t.top(source, most)])
    merged = list(itertools.islice(heapq.merge(*lists, key=_by_score, reverse=True), most))
    return (merged, [item for item, _ in merged],
            np.array([score for _, score in merged], np.float64))


@dataclass
class ServingConfig:
    """The serving operator on the user shard."""

    enabled: bool = doc("Answer requests (false: requests are only counted).", True)
    sources: dict[str, int] = doc(
        "Candidates per retrieval source: ann (MF user vector over the HNSW index), covis "
        "(co-visitation of recent items), trending, popular, category (the best items by "
        "click rate of the user's categories of highest posterior mean, "
        "serving.category_explore; users with impressions only).",
        factory=lambda: {"ann": 100, "covis": 150, "trending": 50, "popular": 50,
                         "category": 200},
    )
    recent_items: int = doc("Recent items of the user used as co-visitation seeds (per "
                            "channel: recent positives for 'liked', recent interactions for "
                            "'any').", 40)
    covis_query_decay: float = doc("Weight of the k-th most recent seed is decay**k (k = 0 "
                                   "newest); the same recency weight forgets old positives "
                                   "in the ui.liked feature.", 0.8)
    covis_pop_alpha: float = doc("A channel's candidate score is divided by the item's count "
                                 "in that channel ** alpha (0 = raw co-counts).", 0.5)
    diversity: float = doc("Score penalty factor per item of an already chosen category "
                           "(0 = off; 0.2 = each repeat costs 20%).", 0.0)
    exploration: float = doc("Probability that the last slot goes to a new item "
                             "(epsilon-greedy; 0 = off).", 0.0)
    new_item_ms: int = doc("Items first seen within this much event time are 'new' (ms).",
                           86_400_000)
    poll_ms: int = doc("Wall time between checks of the snapshot store for new versions "
                       "(ms; 0 = every micro-batch).", 1_000)
    scorer: str = doc("Final score: 'ranker' (the serving ranker's probability), 'retrieval' "
                      "(the co-visitation blend, other sources breaking ties), 'pool' (the "
                      "pool ranker over the blend's best candidates, serving.pool) or 'auto' "
                      "(a duel of the ranker against the pool ranker, or the blend when "
                      "serving.pool is off: their lists are interleaved until the ranker wins "
                      "the clicks on them; the challenger serves alone when it held the "
                      "users' next organic positives more often lately; "
                      "operators/scorer_duel.py).", "auto")
    scorer_min_outcomes: int = doc("auto: outcomes (organic positives and clicks on "
                                   "interleaved lists) a shard sees before either scorer "
                                   "serves alone (until then every request is interleaved; "
                                   "the choice is revisited at every request after that).", 30)
    scorer_shadow_rate: float = doc("auto: once one scorer serves alone, the share of requests "
                                    "both still score (shadow; interleaved once clicks judge) "
                                    "to keep the duel going (1 = every request).", 0.1)
    scorer_window: int = doc("auto: outcomes over which hit counts decay (1 - 1/window each; "
                             "organic positives and clicks apart).", 5_000)
    repeat: str = doc("Items the user already interacted with: 'not-consumed' (allowed "
                      "again unless an interaction was a consuming action, consume_actions: "
                      "e.g. viewed or clicked but not bought or rated), 'never' (no item "
                      "interacted with), 'allow' (candidates like any other) or 'cooldown' "
                      "(allowed repeat_cooldown_ms after the last interaction). Default by "
                      "measurement: docs/evaluation.md.", "not-consumed")
    consume_actions: list[str] = doc("Feedback actions after which an item counts as consumed "
                                     "(repeat 'not-consumed').",
                                     factory=lambda: ["purchase", "rating"])
    repeat_cooldown_ms: int = doc("cooldown: event time after the user's last interaction "
                                  "with an item before it may be recommended again (ms).",
                                  86_400_000)
    pool: PoolRankerConfig = doc("The pool ranker: an online listwise re-ranker of the blend's "
                                 "best candidates (models/pool_ranker.py).",
                                 factory=PoolRankerConfig)
    category_explore: CategoryExploreConfig = doc(
        "Thompson sampling across item categories on per-user click posteriors "
        "(models/category_bandit.py).", factory=CategoryExploreConfig)
    hooks: dict[str, str] = doc("Business-rule hooks by stage (after_retrieval, after_scoring, "
                                "after_ordering): 'module:function'.", factory=dict)
    record_cost: bool = doc("Add cpu_ms (CPU time of this request's serving call, ms) and "
                            "queue_ms (latency_ms minus that call's wall time: waiting in the "
                            "flow) to every recommendation; streamrec eval sets it.", False)


REPEAT_POLICIES = ("not-consumed", "never", "allow", "cooldown")

ANN_MEMO_USERS = 64
"""Users per user shard whose last ANN answer serving keeps (``Server._ann_rows``)."""


def repeat_blocked(config: ServingConfig, ctx: UserContext, ts_ms: int) -> Any:
    """The user's items that ``serving.repeat`` keeps out of the answer (a container)."""
    mode = config.repeat
    if mode == "never":
        return ctx.consumed
    if mode == "allow":
        return ()
    if mode == "cooldown":
        since = ts_ms - config.repeat_cooldown_ms
        return {item for item, ts in ctx.consumed.items() if ts > since}
    return ctx.finished  # not-consumed


_FEW_BLOCKED = 8
"""``blocked_mask`` compares rows for containers of at most this many items."""


def blocked_mask(blocked: Any, rows: np.ndarray, items: list[str],
                 ids: dict[str, int]) -> np.ndarray:
    """``member_mask(blocked, items)`` (``rows``: the items' rows, named by the id space
    ``ids``, name -> row). A dict or set of at most ``_FEW_BLOCKED`` items (the
    zero-config users' consumed items: ~2 against ~300 candidates) is compared row by
    row (an item without a row is no candidate), not looked up once per candidate."""
    if not isinstance(blocked, (dict, set, frozenset)) or len(blocked) > _FEW_BLOCKED:
        return member_mask(blocked, items)
    out = np.zeros(rows.size, bool)
    for row in map(ids.get, blocked):
        if row is not None:
            out |= rows == row
    return out


def log1p_retrieved(scores: np.ndarray, retrieved: np.ndarray) -> np.ndarray:
    """``np.log1p(scores)`` of a source's pool row (``retrieved``: the source's
    candidates): log1p only where retrieved, 0.0 elsewhere, the same floats (the other
    entries are 0.0 and log1p(0.0) is 0.0) in a fraction of the log1p calls."""
    return np.log1p(scores, out=np.zeros(scores.size), where=retrieved)


def load_hook(spec: str) -> Hook:
    """Import ``module:function``."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"hook {spec!r} must look like 'module:function'")
    return getattr(importlib.import_module(module), name)


class Server:
    """Retrieval, filtering, scoring and ordering for one user shard."""

    min_view_ids = 16_384
    """The co-visitation view's id bound never goes below this (``CovisView.over_bound``)."""

    ann_memo_users = ANN_MEMO_USERS
    """Users whose last ANN answer ``_ann_rows`` keeps (flows/memory.py ``ann_memo_user``)."""

    def __init__(self, config: ServingConfig, context: PointInTime,
                 max_users: int = 1_000_000) -> None:
        self.config = config
        self.context = context
        """The user shard's point-in-time state: users, catalog, features, snapshot views."""
        views = context.views
        item_shard_of = context.item_shard_of
        if views is None or item_shard_of is None:
            raise ValueError("serving needs the context's snapshot views and item routing")
        self.views: SnapshotViews = views
        self.item_shard_of: Callable[[str], str] = item_shard_of
        self.hooks = {stage: load_hook(spec) for stage, spec in config.hooks.items()}
        if config.repeat not in REPEAT_POLICIES:
            raise ValueError(f"serving.repeat must be one of {REPEAT_POLICIES}, "
                             f"not {config.repeat!r}")
        if config.scorer not in SCORERS:
            raise ValueError(f"serving.scorer must be one of {SCORERS}, not {config.scorer!r}")
        self.duel = ScorerDuel(config.scorer_window, config.scorer_min_outcomes)
        self.duel.max_users = min(self.duel.max_users, max_users)
        """Remembers each requesting user's last two top-k lists."""
        self.covis_view = CovisView()
        self.item_rows: ItemRows | None = ItemRows(self.covis_view, self.item_shard_of)
        """Per-item values of the loaded snapshots by row (the candidates' id space)."""
        self.view_resets = 0
        """New co-visitation views started because items churned past the bound."""
        self.pool = PoolModel(config.pool) if config.pool.enabled else None
        self.categories = (CategoryExplore(config.category_explore)
                           if config.category_explore.enabled else None)
        """Per-user category posteriors (``serving.category_explore``), fed by the shard."""
        self.category_items = (CategoryItems(config.category_explore)
                               if self.categories is not None else None)
        """Each category's best items of the loaded tables (the ``category`` source)."""
        """The pool ranker (learns on this shard from its users' next positives)."""
        self.organic_positives = 0
        """Organic positives seen on this shard (``outcome``). After
        ``serving.scorer_min_outcomes`` of them the pool ranker scores every request under
        ``auto`` but those the LR ranker serves alone after it won the clicks; before,
        only those the duel judges it on (``_pool_wanted``)."""
        self.served_by = {"ranker": 0, "retrieval": 0, "pool": 0}
        self.interleaved = 0
        """Requests served as a team-draft interleaving of both scorers (not in
        ``served_by``)."""
        self.served = 0
        self._top_cache: dict[tuple[str, int], tuple[tuple[ItemTable, ...],
                                                     list[tuple[str, float]], np.ndarray,
                                                     np.ndarray]] = {}
        self.stage_ns: dict[str, int] | None = None
        """Optional profiling: set it to ``{}`` and ``recommend`` adds the wall time (ns)
        of each stage to it (hooks count in
        their stage: ``filter``, ``score``, ``order``) and the number of candidates
        scored (``candidates``). None (the default) costs one check per stage."""
        self.costs: list[tuple[float, float]] = []
        """``(cpu_ms, queue_ms)`` of every request answered since the owner last took
        them (the metrics stage's serving-cost histograms)."""

    def __getstate__(self) -> dict[str, Any]:
        """Recovery state without caches (they hold snapshot objects, reloaded on resume)."""
        state = self.__dict__.copy()
        state["_top_cache"] = {}
        state["covis_view"] = CovisView()
        state["item_rows"] = None
        state.pop("_ann_memo", None)
        state.pop("_merge_scratch", None)
        state.pop("_seeded", None)
        return state

    def _bound_ids(self) -> None:
        """Start a new co-visitation view (and with it a new ``ItemRows`` and top-list
        cache: they hold its ids) when items churned past its bound
        (``CovisView.over_bound``); called before a request takes any id."""
        if self.covis_view.over_bound(self.min_view_ids):
            self.covis_view = CovisView()
            self._top_cache = {}
            self.item_rows = None
            self.view_resets = getattr(self, "view_resets", 0) + 1

    def _space(self) -> ItemRows:
        """The candidates' id space (rebuilt after a resume)."""
        space = getattr(self, "item_rows", None)  # None after a resume (and in older state)
        if space is None or space.view is not self.covis_view:
            space = self.item_rows = ItemRows(self.covis_view, self.item_shard_of)
        return space

    def _category_of(self, item_id: str) -> str | None:
        """An item's category in the shard's catalog (None: unknown or without one)."""
        attrs = self.context.catalog.get(item_id)
        return category_of(attrs) if attrs is not None else None

    def _item_rates(self, pool: CandidatePool, names: Sequence[str]) -> np.ndarray:
        """The candidates' item-profile features ``names`` as their item tables publish
        them (names x candidates, 0.0 without a value or a table yet)."""
        space = self._space()
        columns = pool.columns
        if columns is not None and columns.space is space and columns.slots is not None:
            slots = columns.slots
        else:
            space.sync(self.views.table_map())
            slots = space.fill(pool.rows)
        return space.profile_values(slots, pool.rows, tuple(names))

    def covis_channels(self, ctx: UserContext, ts_ms: int, n: int
                       ) -> tuple[list[tuple[str, float]], dict[str, SparseScores]]:
        """Co-visitation retrieval (docs/movielens-recipe.md): per channel, the raw sum
        ``s[c] = sum_k decay**k covis(seed_k, c)`` over the channel's seeds (newest
        first); then ``s[c] / max(count[c], 1)**alpha`` (count: the item's positives for
        ``liked``, interactions for ``any``), divided by its max so each channel is in
        [0, 1]; the blend is their mean over the channels that have seeds.

        Returns (the ``n`` best ``(item, blend)``, best first, ties by id order; the raw
        sums per channel: the ranker features)."""
        ids, vals, raw = self._covis_best(ctx, ts_ms, n)
        names = self.covis_view.names
        return [(names[i], v) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)], raw

    def _covis_best(self, ctx: UserContext, ts_ms: int, n: int
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, SparseScores]]:
        """``covis_channels`` as arrays: (rows of the ``n`` best, their blends, raw sums)."""
        tables = self.views.table_map()
        raw: dict[str, SparseScores] = {}
        none = np.zeros(0, np.int64), np.zeros(0)
        if not tables:
            return *none, raw
        view = self.covis_view
        view.sync(tables)
        alpha = self.config.covis_pop_alpha
        parts_ids, parts_vals = [], []
        shard_of = self.item_shard_of
        for name, seeds in self.context.seeds(ctx):
            ids, vals = view.channel_sums(name, seeds, self._recency_weights(len(seeds)),
                                          tables, shard_of, ts_ms)
            raw[name] = scores = SparseScores(ids, vals, view.ids)
            if not ids.size:
                continue
            if alpha:
                vals = vals / np.maximum(view.counts[name][ids], 1.0) ** alpha
            top = vals.max()
            scores.normalized = (alpha, vals / top if top > 0 else None)
            if top > 0:
                parts_ids.append(ids)
                parts_vals.append(scores.normalized[1])
        if not parts_ids or n <= 0:
            return *none, raw
        ids, vals = sparse_sum(np.concatenate(parts_ids), np.concatenate(parts_vals),
                               len(view.names))
        order = top_indices(vals, n)  # best first, ties by id (ids are ascending)
        return ids[order], vals[order] * (1.0 / len(parts_ids)), raw

    def _recency_weights(self, n: int) -> np.ndarray:
        """``decay**k`` of the k-th newest seed, k < n, each the product of the one
        before and ``serving.covis_query_decay`` (as a running product in Python gives)."""
        q = self.config.covis_query_decay
        cached = getattr(self, "_powers", None)  # older state: none
        if cached is None or cached[0] != q or cached[1].size < n:
            powers, weight = [], 1.0
            for _ in range(max(n, 64)):
                powers.append(weight)
                weight *= q
            cached = self._powers = (q, np.array(powers))
        return cached[1][:n]

    def outcome(self, user_id: str, item_id: str) -> None:
        """An organic positive of the user: the scorer duel's outcome."""
        self.organic_positives = getattr(self, "organic_positives", 0) + 1  # older state: none
        self.duel.outcome(user_id, item_id)

    def click_outcome(self, user_id: str, item_id: str) -> None:
        """A positive on an impression of the user: the duel's outcome when the item was
        in the user's latest interleaved list."""
        self.duel.click(user_id, item_id)

    def pool_outcome(self, user_id: str, item_id: str, ts_ms: int) -> None:
        """A positive of the user (organic, or a click on an impression): the pool
        ranker learns when the item was in the pool last served to the user."""
        if self.pool is not None:
            self.pool.outcome(user_id, item_id, ts_ms)

    def counters(self) -> dict[str, int]:
        """Requests served by each scorer and the duel's outcome counts (metrics)."""
        duel = self.duel
        out = {"served_by_ranker": self.served_by["ranker"],
               "served_by_retrieval": self.served_by["retrieval"],
               "served_by_pool": self.served_by.get("pool", 0),
               "duel_outcomes": duel.outcomes, "duel_hits_ranker": duel.hits_ranker,
               "duel_hits_retrieval": duel.hits_retrieval,
               "duel_clicks": getattr(duel, "clicks", 0),
               "duel_click_wins_ranker": getattr(duel, "click_wins_ranker", 0),
               "duel_click_wins_challenger": getattr(duel, "click_wins_challenger", 0),
               "served_interleaved": getattr(self, "interleaved", 0)}
        if self.pool is not None:
            out.update(self.pool.counters())
        categories = getattr(self, "categories", None)
        if categories is not None:
            out["served_by_category_sampling"] = categories.ordered
        return out

    # -- the four stages ---------------------------------------------------------------
    def recommend(self, request: Any, ctx: UserContext, ingest_ns: int) -> Record:
        """Answer one request with its top k (its cost is appended to ``costs``)."""
        timing = self.stage_ns
        cpu0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        pool, covis = self._retrieve(ctx, request.ts)
        if timing is not None:
            t1 = time.perf_counter_ns()
            timing["retrieve"] = timing.get("retrieve", 0) + t1 - t0
        pool = self._filter(request, ctx, pool)
        pool = self._pool_hook("after_retrieval", request, pool)
        if timing is not None:
            t2 = time.perf_counter_ns()
            timing["filter"] = timing.get("filter", 0) + t2 - t1
            timing["candidates"] = timing.get("candidates", 0) + len(pool)
        self._score(request, ctx, pool, covis)
        scored = (self._hook("after_scoring", request, pool.candidates())
                  if "after_scoring" in self.hooks else None)
        if timing is not None:
            t3 = time.perf_counter_ns()
            timing["score"] = timing.get("score", 0) + t3 - t2
        top = None  # (positions, propensities): the record's items straight from the pool
        if scored is not None:
            ranked = self._hook("after_ordering", request,
                                self.order(request, scored, request.k, ctx.consumed))
        else:
            categories = getattr(self, "categories", None)  # None: off, or older state
            picked = (categories.order_indices(request, ctx.user_id, pool, ctx.liked,
                                               self.context.covis.decay, self._category_of,
                                               self._item_rates,
                                               categories.user_attrs(ctx.profile))
                      if categories else None)
            if picked is None:  # the scorer's order
                picked = top_indices(pool.score, self._depth(request.k)), None
            if self._objects_needed(pool):
                best = pool.candidates(*picked)
                ranked = self._hook("after_ordering", request,
                                    self._rerank(request, best, request.k, ctx.consumed))
            else:  # _rerank and the hooks would keep the first k as they are
                k = request.k
                top = picked[0][:k], None if picked[1] is None else picked[1][:k]
        if timing is not None:
            timing["order"] = timing.get("order", 0) + time.perf_counter_ns() - t3
        self.served += 1
        ranker, index = self.views.ranker, self.views.index
        cpu_ms = (time.thread_time_ns() - cpu0) / 1e6
        serve_ns = time.perf_counter_ns() - t0
        latency_ns = time.time_ns() - ingest_ns
        queue_ms = max(latency_ns - serve_ns, 0) / 1e6
        if not hasattr(self, "costs"):  # resumed from a version without it
            self.costs = []
        self.costs.append((cpu_ms, queue_ms))
        record = {
            "request_id": request.request_id,
            "user_id": request.user_id,
            "ts": request.ts,
            "items": pool.record_items(*top) if top is not None else [
                record_item(c.item_id, c.score, c.source, c.propensity)
                for c in ranked[: request.k]],
            "model_version": ranker.version,
            "index_version": index.version,
            "latency_ms": round_to(latency_ns / 1e6, 3),
            **({"eval_item": request.context["eval_item"]} if "eval_item" in request.context else {}),
        }
        if self.config.record_cost:
            record["cpu_ms"] = round_to(cpu_ms, 4)
            record["queue_ms"] = round_to(queue_ms, 3)
        return record

    def retrieve(self, ctx: UserContext, ts_ms: int
                 ) -> tuple[dict[str, Candidate], dict[str, SparseScores]]:
        """Candidates from every source, merged by item (sources and scores kept), and the
        raw co-visitation sums per channel of every item reachable from the seeds."""
        pool, covis = self._retrieve(ctx, ts_ms)
        return {c.item_id: c for c in pool.candidates()}, covis

    def _retrieve(self, ctx: UserContext, ts_ms: int
                  ) -> tuple[CandidatePool, dict[str, SparseScores]]:
        """``retrieve`` as a ``CandidatePool`` (no per-candidate objects)."""
        sizes = self.config.sources
        tables = self.views.loaded_tables()
        self._bound_ids()
        space = self._space()
        parts: list[tuple[str, np.ndarray, np.ndarray]] = []
        n = sizes.get("ann", 0)
        if n and ctx.vector is not None and self.views.index.index is not None:
            rows, scores = self._ann_rows(ctx, n, space)
            if rows.size:
                parts.append(("ann", rows, scores))
        ids, vals, covis = self._covis_best(ctx, ts_ms, sizes.get("covis", 0))
        parts.append(("covis", ids, vals))
        for source in ("trending", "popular"):
            n = sizes.get(source, 0)
            if n and tables:
                # Fetch extra to make up for the consumed items the filter will drop.
                parts.append((source, *self._top_rows(tables, source, n,
                                                      n + min(len(ctx.consumed), 2 * n))))
        n = sizes.get("category", 0)
        finder = getattr(self, "category_items", None)  # None: off, or older state
        if n and tables and finder is not None and self.categories is not None:
            lists = finder.lists(tables)
            picks = self.categories.pick(ctx.user_id, n, lists,
                                         self.categories.user_attrs(ctx.profile))
            if picks:
                parts.append(("category", *self._category_rows(finder, lists, picks, n, space)))
        scratch = getattr(self, "_merge_scratch", None)  # older state: none
        if scratch is None:
            scratch = self._merge_scratch = MergeScratch()
        return merge(parts, space.names, scratch), covis

    def _ann_rows(self, ctx: UserContext, n: int, space: ItemRows
                  ) -> tuple[np.ndarray, np.ndarray]:
        """The ANN source's ``(rows in space, scores)`` of the user's vector: the index's
        ``query_arrays`` once per user, vector, ``n`` and loaded index version (hnswlib's
        search is deterministic for one index and query), kept for the last
        ``ann_memo_users`` users (oldest first out; 60% of the zero-config requests
        repeat their user's last query, and 16 users a shard keep almost all of them),
        scores as float32 when they are exactly that (hnswlib's distances). The memo goes
        with the index object or the id space (weak reference: an old index is not kept
        alive)."""
        index = self.views.index.index
        memo = getattr(self, "_ann_memo", None)
        if memo is None or memo[0]() is not index or memo[1] is not space:
            try:
                memo = self._ann_memo = (weakref.ref(index), space, {})
            except TypeError:  # an index that takes no weak reference: no memo
                memo = None
        key = ctx.vector.tobytes()
        users = memo[2] if memo is not None else {}
        hit = users.get(ctx.user_id)
        if hit is not None and hit[0] == n and hit[1] == key:
            return hit[2].astype(np.int64), hit[3].astype(np.float64)
        items, scores = self.views.index.query_arrays(ctx.vector, n)
        rows = space.rows(items) if items else np.zeros(0, np.int64)
        if memo is not None:
            if len(users) >= self.ann_memo_users:
                users.pop(next(iter(users)))
            users.pop(ctx.user_id, None)  # newest last
            # scores are float32 distances widened (exact in float32); ids fit int32
            narrow = scores.astype(np.float32)
            users[ctx.user_id] = (n, key, rows.astype(np.int32),
                                  narrow if np.array_equal(narrow, scores) else scores.copy())
        return rows, scores

    def _category_rows(self, finder: CategoryItems, lists: dict[str, CategoryList],
                       picks: list[tuple[str, Any]], n: int, space: ItemRows
                       ) -> tuple[np.ndarray, np.ndarray]:
        """``CategoryExplore.retrieve``'s items and scores of ``picks`` as (rows, scores):
        each category's rows kept per list version (``CategoryItems.rows``), no name
        lookups; by name when ``n`` cuts into a category (only the first ``n`` items take
        ids then)."""
        per = self.config.category_explore.retrieve_per_category
        scores = category_scores(picks, lists, per)
        if scores.size > n:
            items = [item for name, _ in picks for item in lists[name].items[:per]]
            return space.rows(items[:n]), scores[:n]
        return np.concatenate([finder.rows(name, space)[:per] for name, _ in picks]), scores

    def _top(self, tables: list[ItemTable], source: str, n: int, m: int) -> list[tuple[str, float]]:
        """The ``m`` best ``(item, score)`` of ``source`` over every table, best first, equal
        scores in table then dict order: what a stable sort of all the tables' items
        gives, from each table's cached top list (``ItemTable.top``), every table's counts
        decayed to the newest table's time so they compare. The merged list is cached
        per set of loaded tables for the most a request can ask (``6 n``)."""
        return self._top_cached(tables, source, n)[1][:m]

    def _top_rows(self, tables: list[ItemTable], source: str, n: int, m: int
                  ) -> tuple[np.ndarray, np.ndarray]:
        """``_top`` as (rows, scores) arrays."""
        cached = self._top_cached(tables, source, n)
        return cached[2][:m], cached[3][:m]

    def _top_cached(self, tables: list[ItemTable], source: str, n: int
                    ) -> tuple[tuple[ItemTable, ...], list[tuple[str, float]], np.ndarray,
                               np.ndarray]:
        key = (source, n)
        cached = self._top_cache.get(key)
        if cached is None or len(cached[0]) != len(tables) or any(
                a is not b for a, b in zip(cached[0], tables, strict=True)):
            merged, items, scores = set_memo(tables, ("top", source, n),
                                             lambda: _merged_top(tables, source, n))
            cached = self._top_cache[key] = (tuple(tables), merged, self._space().rows(items),
                                             scores)
        return cached

    def _filter(self, request: Any, ctx: UserContext, pool: CandidatePool) -> CandidatePool:
        """Drop consumed, unavailable and excluded items (boolean masks); attach categories
        (from the items' tables) and the shard catalog's attributes."""
        items = pool.items
        space = self._space()
        space.sync(self.views.table_map())
        slots = space.fill(pool.rows)
        cross = self.context.cross_attrs()
        attrs = space.catalog_attrs(slots, items, self.context.catalog, cross,
                                    self.context.unavailable_attrs)
        keep = space.available[slots] & ~space.unavailable[slots]
        blocked = repeat_blocked(self.config, ctx, request.ts)
        if blocked:
            keep &= ~blocked_mask(blocked, pool.rows, items, space.view.ids)
        if request.exclude:
            keep &= ~member_mask(set(request.exclude), items)
        pool.attrs = attrs
        pool.coded = CodedCategories(space.category[slots], space.categories)
        if keep.all():  # the slots of pool.rows stay ItemRows' last (no second check)
            return pool
        out = pool.take(keep)
        space.remember(out.rows, slots[keep], out.attrs, cross)  # what the columns ask next
        return out

    def _pool_hook(self, stage: str, request: Any, pool: CandidatePool) -> CandidatePool:
        """A hook on the pool: its candidates as objects, and the hook's list back."""
        if stage not in self.hooks:
            return pool
        cands = self._hook(stage, request, pool.candidates())
        space = self._space()
        out = CandidatePool.from_candidates(cands, space.rows([c.item_id for c in cands]))
        out.attrs = list(map(self.context.catalog.get, out.items))
        space.sync(self.views.table_map())
        space.fill_attrs(space.fill(out.rows), out.attrs, self.context.cross_attrs(),
                         self.context.unavailable_attrs)
        return out

    def _score(self, request: Any, ctx: UserContext, pool: CandidatePool,
               covis: dict[str, SparseScores] | None = None) -> None:
        """Set ``pool.score``: the serving ranker's calibrated probability, the pool
        ranker's ``P(c | pool)`` over the blend's best ``serving.pool.pool_size`` (blend - 2
        below), or the retrieval blend, whichever ``serving.scorer`` picks (``auto``: the
        duel of the LR ranker against the pool ranker, or against the blend when the pool
        ranker is off); under ``auto`` both top k lists are recorded for the duel."""
        if not len(pool):
            return
        # Co-visitation blend in [0, 1] first; the rest breaks ties.
        s = {name: pool.scores[k] for k, name in enumerate(SOURCES)}
        has = {name: pool.has[k] for k, name in enumerate(SOURCES)}
        pool.score = (s["covis"] + 1e-3 * s["ann"]
                      + 1e-4 * log1p_retrieved(s["trending"], has["trending"])
                      + 1e-6 * log1p_retrieved(s["popular"], has["popular"]))
        scorer_mode = self.config.scorer
        model = self.pool if scorer_mode in ("auto", "pool") else None
        current = self.views.ranker.current
        alone = False  # the LR ranker serves alone, the pool ranker's shadow not sampled
        if (model is not None and scorer_mode == "auto"
                and not self._pool_wanted(request, model, current is not None)):
            # it could not serve this request, nor be judged on it
            alone = (current is not None
                     and getattr(self, "organic_positives", 0) >= self.duel.min_outcomes)
            model = None
        needs_ranker = model is not None and "ranker" in model.config.features
        ranker = current if scorer_mode in ("auto", "ranker") or needs_ranker else None
        probs = None
        if ranker is not None and (needs_ranker or not self._unscored(request, ctx, scorer_mode)):
            probs = np.asarray(self._ranker_scores(ranker, request, ctx, pool, covis), np.float64)
        challenger = "retrieval"
        if model is not None:
            scored = self._pool_scores(model, request, ctx, pool, covis, probs)
            if (ranker is not None or scorer_mode == "pool"
                    or model.config.serve_before_ranker):
                pool.score = scored
                challenger = "pool"
            # else: no LR copy yet, the blend serves as without the pool ranker (which
            # still learns from this request's pool).
        if probs is None or scorer_mode == "pool":
            self.served_by[challenger] += 1
            return
        if alone:  # no challenger list: nothing for the duel to judge on this request
            self.duel.forget(ctx.user_id)
            self.served_by["ranker"] += 1
            pool.score = probs
            return
        if scorer_mode == "auto":
            k = request.k
            items = pool.items
            ranker_top, other_top = top_indices(probs, k), top_indices(pool.score, k)
            duel = self.duel
            duel.record(ctx.user_id, [items[i] for i in ranker_top.tolist()],
                        [items[i] for i in other_top.tolist()])
            choice = duel.mode(self._sampled(request))
            if choice == "interleave":
                self._interleave(request, ctx, pool, ranker_top, other_top)
                return
            duel.teams.pop(ctx.user_id, None)  # clicks on this list judge nothing
        else:
            choice = scorer_mode
        self.served_by[challenger if choice == "retrieval" else choice] += 1
        if choice == "ranker":
            pool.score = probs

    def _interleave(self, request: Any, ctx: UserContext, pool: CandidatePool,
                    ranker_top: np.ndarray, other_top: np.ndarray) -> None:
        """Serve the team-draft interleaving of the ranker's and the challenger's top k
        (coins drawn from the request id) and remember each item's team for the duel. The
        interleaved items score ``1 + (k - position) / k`` (their order), the others
        keep the challenger's order below them."""
        k = request.k
        seeded = getattr(self, "_seeded", None)  # None: older state
        if seeded is None:
            seeded = self._seeded = SeededGenerator()
        order, teams = team_draft(ranker_top.tolist(), other_top.tolist(), k,
                                  stable_hash64(f"interleave:{request.request_id}"), seeded)
        items = pool.items
        self.duel.record_teams(ctx.user_id, [items[i] for i in order], teams)
        score = pool.score - (pool.score.max() + 1.0) if len(pool.score) else pool.score
        score[np.asarray(order, np.int64)] = 1.0 + (k - np.arange(len(order))) / k
        pool.score = score
        self.interleaved = getattr(self, "interleaved", 0) + 1

    def _pool_wanted(self, request: Any, model: PoolModel, has_ranker: bool) -> bool:
        """``auto``: whether the pool ranker scores this request (computes its features,
        remembers the pool to learn from). Without an LR copy: when it orders those
        requests (``serve_before_ranker``) or once the shard saw ``scorer_min_outcomes``
        organic positives (it learns from them). With one: unless the LR ranker serves
        the request alone (``_ranker_alone``), so only the ``scorer_shadow_rate`` sample
        of those is shadow-scored (its lists judged, its pools learned from)."""
        if not has_ranker:
            return (model.config.serve_before_ranker
                    or getattr(self, "organic_positives", 0) >= self.duel.min_outcomes)
        return not self._ranker_alone(request)

    def _ranker_alone(self, request: Any) -> bool:
        """``auto`` with an LR copy: the duel is decided, the organic positives do not
        favour the challenger, the LR ranker won clicks on interleaved lists (at least one
        judged) and the request is not in the shadow sample: the LR ranker's list is
        served as it is (``ScorerDuel.mode``). Without clicks (a rating log) the
        challenger's lists are all that organic positives can bring it back by, so it
        keeps scoring every request."""
        duel = self.duel
        return (duel.decided and getattr(duel, "clicks", 0) > 0
                and duel.choice("auto") == "ranker" and duel.ranker_won_clicks()
                and not self._sampled(request))

    def _pool_scores(self, model: PoolModel, request: Any, ctx: UserContext,
                     pool: CandidatePool, covis: dict[str, SparseScores] | None,
                     probs: np.ndarray | None) -> np.ndarray:
        """The pool ranker's scores of the candidates: ``P(c | pool)`` for the blend's best
        ``pool_size`` (ties in candidate order), ``blend - 2`` for the others (below every
        pool score, in blend order); the pool is remembered for learning from the user's
        next positive."""
        best = top_indices(pool.score, model.config.pool_size)
        items = [pool.items[i] for i in best.tolist()]
        space = self._space()
        cols = pool.columns
        if cols is not None and cols.space is space and cols.slots is not None:
            slots = cols.slots
        else:  # the filter's slots of the pool (ItemRows.fill keeps them: no second check)
            space.sync(self.views.table_map())
            slots = space.fill(pool.rows)
        # no attributes: with the pool's rows in the id space, pool_matrix reads only
        # numeric columns (``item_columns(numeric_only=True)`` ignores them)
        x = pool_matrix(model.ranker.names, self.context, self.covis_view,
                        self.config.covis_pop_alpha, ctx, items, pool.score[best], request.ts,
                        covis, probs[best] if probs is not None else None,
                        model.config.long_items, rows=pool.rows[best], space=space,
                        numeric=None if cols is None else
                        {name: col[best] for name, col in cols.numeric.items()},
                        slots=slots[best])
        out = pool.score - 2.0  # the blend is in [0, ~1.001]
        out[best] = model.serve(ctx.user_id, items, x, request.ts, self.views.pool.current)
        return out

    def _unscored(self, request: Any, ctx: UserContext, scorer_mode: str) -> bool:
        """``auto`` once the blend leads the duel: only a ``scorer_shadow_rate`` sample of
        requests (by request id) is scored by the ranker, to keep the duel going."""
        if scorer_mode != "auto" or self.duel.choice("auto") != "retrieval":
            return False
        if self._sampled(request):
            return False
        self.duel.forget(ctx.user_id)
        return True

    def _sampled(self, request: Any) -> bool:
        """The request is in the ``scorer_shadow_rate`` sample (by request id) that keeps
        the duel going: scored by both scorers, interleaved once clicks judge."""
        rid = request.request_id
        memo = getattr(self, "_sample_memo", None)  # asked up to 3 times per request
        if memo is None or memo[0] != rid:
            h = stable_hash64(f"shadow:{rid}")
            memo = self._sample_memo = (rid, (h & 0xFFFFFFFF) / 2**32)
        return memo[1] < self.config.scorer_shadow_rate

    def pool_columns(self, request: Any, ctx: UserContext, pool: CandidatePool,
                     covis: dict[str, SparseScores] | None) -> ItemColumns:
        """The pool's candidate features as columns (``PointInTime.item_columns`` on the
        pool's rows): what a scorer of the whole pool consumes beside ``pool.items``,
        ``pool.rows`` and the retrieval scores (``pool.scores``, blend in ``pool.score``)."""
        if pool.columns is None:
            pool.columns = self.context.item_columns(ctx, pool.items, request.ts, covis,
                                                     attrs=pool.attrs, rows=pool.rows,
                                                     space=self._space())
        return pool.columns

    def _ranker_scores(self, ranker: Any, request: Any, ctx: UserContext, pool: CandidatePool,
                       covis: dict[str, SparseScores] | None) -> np.ndarray:
        """Calibrated P(positive) per candidate: vectorised for River LR (``ColumnScorer``
        on the pool's ``ItemColumns``, within 1e-9 of River), else through the feature
        dicts (``LinearScorer``: bitwise River; other rankers: their own
        ``predict_many``)."""
        items = pool.items
        scorer = linear_scorer(ranker)
        if scorer is not None:
            cols = self.pool_columns(request, ctx, pool, covis)
            p = column_scorer(scorer).predict(ctx.user_id, request.ts, request.context,
                                              SERVING_POSITION, ctx.profile, cols)
            if p is not None:
                return p
        extras = self.context.item_features(ctx, items, request.ts, covis)
        if scorer is not None:
            return scorer.predict_many(ctx.user_id, items, request.ts, request.context,
                                       SERVING_POSITION, ctx.profile, extras)
        return ranker.predict_many(ranking_features_many(
            ctx.user_id, items, request.ts, request.context, SERVING_POSITION,
            ctx.profile, extras))

    def _objects_needed(self, pool: CandidatePool) -> bool:
        """Whether ordering needs the list as ``Candidate`` objects: a hook (it may read
        or change them), objects a hook returned (what it set stays), diversity or
        exploration (they move or add candidates, set propensities)."""
        return (bool(self.hooks) or pool.objs is not None or self.config.diversity > 0
                or self.config.exploration > 0)

    def order(self, request: Any, cands: list[Candidate], k: int,
              consumed: dict[str, int] | None = None) -> list[Candidate]:
        """Top k by score with a category-diversity penalty and an exploration slot."""
        ranked = sorted(cands, key=lambda c: c.score, reverse=True)
        return self._rerank(request, ranked[: self._depth(k)], k, consumed)

    def _depth(self, k: int) -> int:
        """How many of the best candidates ordering looks at (diversity: 5 k)."""
        return 5 * k if self.config.diversity > 0 else k

    def _rerank(self, request: Any, ranked: list[Candidate], k: int,
                consumed: dict[str, int] | None) -> list[Candidate]:
        """Diversity and exploration over the best candidates, best first."""
        if self.config.diversity > 0:
            ranked = self._diversify(ranked, k)
        if self.config.exploration > 0 and ranked:
            ranked = self._explore(request, ranked, k, consumed)
        return ranked[:k]

    def _diversify(self, ranked: list[Candidate], k: int) -> list[Candidate]:
        keep = 1.0 - self.config.diversity
        chosen: list[Candidate] = []
        counts: dict[str | None, int] = {}
        pool = ranked[: 5 * k]
        while pool and len(chosen) < k:
            best = max(pool, key=lambda c: c.score * keep ** counts.get(c.category, 0))
            pool.remove(best)
            chosen.append(best)
            counts[best.category] = counts.get(best.category, 0) + 1
        return chosen + [c for c in ranked if c not in chosen]

    def _explore(self, request: Any, ranked: list[Candidate], k: int,
                 consumed: dict[str, int] | None) -> list[Candidate]:
        """Epsilon-greedy (deterministic per request id): the last slot goes to a new item,
        drawn uniformly, with probability ``exploration``; the propensity of the slot's item
        is logged on the record (``epsilon / new items`` for an explored one, ``1 - epsilon``
        for the ranked one it replaces otherwise; 1 for every other slot), so off-policy
        estimators (IPS) can reweight the logged clicks."""
        epsilon = self.config.exploration
        h = stable_hash64(f"explore:{request.request_id}")
        slot = min(k, len(ranked)) - 1
        if (h & 0xFFFFFFFF) / 2**32 >= epsilon:
            # Logged as if a new item had been eligible (not looked up when not exploring).
            ranked[slot].propensity *= 1.0 - epsilon  # times category sampling's, if any
            return ranked
        fresh = self._new_items(request, {c.item_id for c in ranked[:k]} | set(consumed or ()))
        if not fresh:
            return ranked
        pick = fresh[(h >> 32) % len(fresh)]
        pick.sources.append("explore")
        pick.propensity = epsilon / len(fresh)
        return ranked[:slot] + [pick] + ranked[slot:]

    def _new_items(self, request: Any, shown: set[str]) -> list[Candidate]:
        """Available items first seen within ``new_item_ms``, not shown/consumed/excluded."""
        horizon = request.ts - self.config.new_item_ms
        excluded = set(request.exclude)
        out = []
        unavailable = self.context.unavailable
        for table in self.views.loaded_tables():
            for item, entry in table.catalog.items():
                if (entry.available and entry.first_seen_ms >= horizon and item not in shown
                        and item not in excluded and not unavailable(item)):
                    out.append(Candidate(item, [], {}, 0.0, entry.category))
        out.sort(key=lambda c: c.item_id)
        # Business rules apply to the exploration pick too.
        return self._hook("after_retrieval", request, out)

    def _hook(self, stage: str, request: Any, cands: list[Candidate]) -> list[Candidate]:
        hook = self.hooks.get(stage)
        return cands if hook is None else list(hook(request, cands))
