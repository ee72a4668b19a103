"""Serving on the user shard: retrieve -> filter -> score -> order -> top k.

The user shard answers each ``request`` with the user's own state (recent items,
consumed set, MF vector, profile features) and the newest verified nearline
snapshots (serving ranker copy, HNSW index, one item table per item shard), which it
reads from the snapshot store (``SnapshotViews``; polled every ``serving.poll_ms`` of
wall time). Stages, each with a hook for business rules (``"module:function"``,
called as ``hook(request, candidates) -> candidates``):

1. retrieve: ANN over the user vector, co-visitation of recent items, trending,
   popular (always as backfill, alone for cold users); candidates keep their sources;
2. filter: consumed items, unavailable items, the request's ``exclude``; hook
   ``after_retrieval``;
3. score: the serving ranker on the user shard's feature function (the same one the
   joiner uses at impression time, so training and serving features agree); without
   a ranker yet, the blended retrieval score; hook ``after_scoring``;
4. order: diversity across categories and an epsilon-greedy exploration slot (a new
   item), both configurable and off-able; hook ``after_ordering``.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.features import SERVING_POSITION, ranking_features_many
from operators.trainer import load_ranker
from state.hashing import stable_hash64
from state.item_index import IndexReader
from state.item_table import CatalogEntry, ItemTable
from state.settings import doc
from state.snapshot_store import SnapshotReader, SnapshotStore

Record = dict[str, Any]
Hook = Callable[[Any, list["Candidate"]], list["Candidate"]]


@dataclass
class ServingConfig:
    """The serving operator on the user shard."""

    enabled: bool = doc("Answer requests (false: requests are only counted).", True)
    sources: dict[str, int] = doc(
        "Candidates per retrieval source: ann (MF user vector over the HNSW index), covis "
        "(co-visitation of recent items), trending, popular.",
        factory=lambda: {"ann": 100, "covis": 200, "trending": 50, "popular": 100},
    )
    recent_items: int = doc("Recent items of the user used as co-visitation seeds.", 20)
    diversity: float = doc("Score penalty factor per item of an already chosen category "
                           "(0 = off; 0.2 = each repeat costs 20%).", 0.0)
    exploration: float = doc("Probability that the last slot goes to a new item "
                             "(epsilon-greedy; 0 = off).", 0.0)
    new_item_ms: int = doc("Items first seen within this much event time are 'new' (ms).",
                           86_400_000)
    poll_ms: int = doc("Wall time between checks of the snapshot store for new versions "
                       "(ms; 0 = every micro-batch).", 1_000)
    use_ranker: bool = doc("Score with the serving ranker (false: blended retrieval score).", True)
    hooks: dict[str, str] = doc("Business-rule hooks by stage (after_retrieval, after_scoring, "
                                "after_ordering): 'module:function'.", factory=dict)


@dataclass(slots=True)
class Candidate:
    """An item under consideration; ``scores`` holds each retrieval source's score."""

    item_id: str
    sources: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    score: float = 0.0
    category: str | None = None

    @property
    def source(self) -> str:
        return "+".join(self.sources)


@dataclass
class UserContext:
    """What the user shard knows of the user at request (or impression) time."""

    user_id: str
    recent: list[str]
    consumed: dict[str, int]
    vector: np.ndarray | None
    profile: dict[str, Any]


def load_hook(spec: str) -> Hook:
    """Import ``module:function``."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"hook {spec!r} must look like 'module:function'")
    return getattr(importlib.import_module(module), name)


class SnapshotViews:
    """The newest verified serving ranker, index and item tables, polled from the store."""

    def __init__(self, store: SnapshotStore, item_shards: list[str], poll_ms: int) -> None:
        self.store = store
        self.poll_ms = poll_ms
        self.ranker = SnapshotReader(store, "ranker", load_ranker)
        self.index = IndexReader(store)
        self.tables = {s: SnapshotReader(store, f"items-{s}", ItemTable.load) for s in item_shards}
        self._next_poll = 0.0

    def poll(self) -> None:
        """Pick up new snapshot versions (at most every ``poll_ms`` of wall time)."""
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self.poll_ms / 1000.0
        self.ranker.refresh()
        self.index.refresh()
        for reader in self.tables.values():
            reader.refresh()

    def loaded_tables(self) -> list[ItemTable]:
        return [r.current for r in self.tables.values() if r.current is not None]

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "item_shards": list(self.tables), "poll_ms": self.poll_ms}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["store"], state["item_shards"], state["poll_ms"])


class Server:
    """Retrieval, filtering, scoring and ordering for one user shard."""

    def __init__(self, config: ServingConfig, views: SnapshotViews,
                 item_shard_of: Callable[[str], str]) -> None:
        self.config = config
        self.views = views
        self.item_shard_of = item_shard_of
        self.features: Callable[..., list[dict[str, Any]]] = self.item_extras
        """(ctx, item_ids, ts_ms, covis) -> extra features per item; the user shard sets it
        to its own function, which the joiner also uses at impression time."""
        self.hooks = {stage: load_hook(spec) for stage, spec in config.hooks.items()}
        self.served = 0

    # -- features shared by training (impression time) and serving ---------------------
    def item_extras(self, ctx: UserContext, item_ids: list[str], ts_ms: int,
                    covis: dict[str, float] | None = None) -> list[dict[str, Any]]:
        """Per-item features from the snapshots: category, co-visitation with the recent
        items, popularity, trending, MF score (the user's own features are separate).

        ``covis``: precomputed co-visitation scores of every candidate (serving);
        None computes them per item (one impression at a time).
        """
        tables = {t.shard: t for t in self.views.loaded_tables()}
        mf = self._mf_scores(ctx.vector, item_ids)
        seeds = ctx.recent[: self.config.recent_items]
        out = []
        for n, item in enumerate(item_ids):
            table = tables.get(self.item_shard_of(item))
            extra: dict[str, Any] = {}
            if table is not None:
                entry = table.catalog.get(item)
                extra["i:category"] = entry.category if entry else None
                extra["pop"] = table.popular.get(item, 0.0)
                extra["trend"] = table.trending.get(item, 0.0)
            if covis is not None:
                extra["covis"] = covis.get(item, 0.0)
            else:
                extra["covis"] = self._covis_score(seeds, item, tables, ts_ms)
            if mf is not None:
                extra["mf"] = float(mf[n])
            out.append(extra)
        return out

    def _covis_score(self, seeds: list[str], item: str, tables: dict[str, ItemTable],
                     ts_ms: int) -> float:
        total, weight = 0.0, 1.0
        for seed in seeds:
            table = tables.get(self.item_shard_of(seed))
            if table is not None:
                total += weight * table.covis.score(seed, item, ts_ms)
                weight *= table.covis.config.position_decay
        return total

    def _covis_scores(self, recent: list[str], tables: dict[str, ItemTable],
                      ts_ms: int) -> dict[str, float]:
        """sum_k decay**k * covis(recent_k, c) over the user's recent items (newest first)."""
        acc: dict[str, float] = {}
        if not recent or not tables:
            return acc
        weight = 1.0
        for seed in recent[: self.config.recent_items]:
            table = tables.get(self.item_shard_of(seed))
            if table is not None:
                for item, score in table.covis.neighbors(seed, table.covis.config.max_neighbors, ts_ms):
                    acc[item] = acc.get(item, 0.0) + weight * score
                weight *= table.covis.config.position_decay
        return acc

    def _mf_scores(self, vector: np.ndarray | None, item_ids: list[str]) -> np.ndarray | None:
        if vector is None or self.views.index.index is None or not item_ids:
            return None
        vecs, found = self.views.index.vectors(item_ids)
        scores = vecs @ np.asarray(vector, np.float32)
        return np.where(found, scores, 0.0)

    # -- the four stages ---------------------------------------------------------------
    def recommend(self, request: Any, ctx: UserContext, ingest_ns: int) -> Record:
        """Answer one request with its top k."""
        self.views.poll()
        cands, covis = self.retrieve(ctx, request.ts)
        cands = self.filter(request, ctx, cands)
        cands = self._hook("after_retrieval", request, cands)
        self.score(request, ctx, cands, covis)
        cands = self._hook("after_scoring", request, cands)
        ranked = self.order(request, cands, request.k, ctx.consumed)
        ranked = self._hook("after_ordering", request, ranked)
        self.served += 1
        ranker, index = self.views.ranker, self.views.index
        return {
            "request_id": request.request_id,
            "user_id": request.user_id,
            "ts": request.ts,
            "items": [{"item_id": c.item_id, "score": round(c.score, 6), "source": c.source}
                      for c in ranked[: request.k]],
            "model_version": ranker.version,
            "index_version": index.version,
            "latency_ms": round((time.time_ns() - ingest_ns) / 1e6, 3),
            **({"eval_item": request.context["eval_item"]} if "eval_item" in request.context else {}),
        }

    def retrieve(self, ctx: UserContext, ts_ms: int) -> tuple[dict[str, Candidate], dict[str, float]]:
        """Candidates from every source, merged by item (sources and scores kept), and the
        co-visitation score of every item reachable from the recent items."""
        sizes = self.config.sources
        tables = self.views.loaded_tables()
        cands: dict[str, Candidate] = {}

        def add(source: str, scored: list[tuple[str, float]]) -> None:
            for item, score in scored:
                c = cands.get(item)
                if c is None:
                    c = cands[item] = Candidate(item)
                c.sources.append(source)
                c.scores[source] = score

        n = sizes.get("ann", 0)
        if n and ctx.vector is not None and self.views.index.index is not None:
            add("ann", self.views.index.query(ctx.vector, n))
        covis = self._covis_scores(ctx.recent, {t.shard: t for t in tables}, ts_ms)
        n = sizes.get("covis", 0)
        if n and covis:
            add("covis", sorted(covis.items(), key=lambda kv: kv[1], reverse=True)[:n])
        for source, attr in (("trending", "trending"), ("popular", "popular")):
            n = sizes.get(source, 0)
            if n and tables:
                merged: list[tuple[str, float]] = []
                for t in tables:
                    merged.extend(getattr(t, attr).items())
                merged.sort(key=lambda kv: kv[1], reverse=True)
                # Fetch extra to make up for the consumed items the filter will drop.
                add(source, merged[: n + min(len(ctx.consumed), 5 * n)])
        return cands, covis

    def filter(self, request: Any, ctx: UserContext, cands: dict[str, Candidate]) -> list[Candidate]:
        """Drop consumed, unavailable and excluded items; attach categories."""
        excluded = set(request.exclude)
        catalog = self._catalog_lookup()
        out = []
        for item, c in cands.items():
            if item in ctx.consumed or item in excluded:
                continue
            entry = catalog(item)
            if entry is not None:
                if not entry.available:
                    continue
                c.category = entry.category
            out.append(c)
        return out

    def _catalog_lookup(self) -> Callable[[str], CatalogEntry | None]:
        tables = {t.shard: t for t in self.views.loaded_tables()}

        def lookup(item: str) -> CatalogEntry | None:
            table = tables.get(self.item_shard_of(item))
            return table.catalog.get(item) if table else None

        return lookup

    def score(self, request: Any, ctx: UserContext, cands: list[Candidate],
              covis: dict[str, float] | None = None) -> None:
        """Set ``score``: the serving ranker's calibrated probability, else a blended score."""
        if not cands:
            return
        ranker = self.views.ranker.current if self.config.use_ranker else None
        if ranker is not None:
            items = [c.item_id for c in cands]
            extras = self.features(ctx, items, request.ts, covis)
            feats = ranking_features_many(ctx.user_id, items, request.ts, request.context,
                                          SERVING_POSITION, ctx.profile, extras)
            for c, p in zip(cands, ranker.predict_many(feats), strict=True):
                c.score = float(p)
            return
        for c in cands:
            s = c.scores
            c.score = (s.get("covis", 0.0) * 10.0 + s.get("ann", 0.0)
                       + math.log1p(s.get("trending", 0.0)) + 0.1 * math.log1p(s.get("popular", 0.0)))

    def order(self, request: Any, cands: list[Candidate], k: int,
              consumed: dict[str, int] | None = None) -> list[Candidate]:
        """Top k by score with a category-diversity penalty and an exploration slot."""
        ranked = sorted(cands, key=lambda c: c.score, reverse=True)
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
        """Epsilon-greedy (deterministic per request id): the last slot goes to a new item."""
        h = stable_hash64(f"explore:{request.request_id}")
        if (h & 0xFFFFFFFF) / 2**32 >= self.config.exploration:
            return ranked
        fresh = self._new_items(request, {c.item_id for c in ranked[:k]} | set(consumed or ()))
        if not fresh:
            return ranked
        pick = fresh[(h >> 32) % len(fresh)]
        pick.sources.append("explore")
        slot = min(k, len(ranked)) - 1
        return ranked[:slot] + [pick] + ranked[slot:]

    def _new_items(self, request: Any, shown: set[str]) -> list[Candidate]:
        """Available items first seen within ``new_item_ms``, not shown/consumed/excluded."""
        horizon = request.ts - self.config.new_item_ms
        excluded = set(request.exclude)
        out = []
        for table in self.views.loaded_tables():
            for item, entry in table.catalog.items():
                if (entry.available and entry.first_seen_ms >= horizon and item not in shown
                        and item not in excluded):
                    out.append(Candidate(item, [], {}, 0.0, entry.category))
        out.sort(key=lambda c: c.item_id)
        return out

    def _hook(self, stage: str, request: Any, cands: list[Candidate]) -> list[Candidate]:
        hook = self.hooks.get(stage)
        return cands if hook is None else list(hook(request, cands))
