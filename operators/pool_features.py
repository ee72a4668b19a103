"""The pool ranker's feature matrix: one row per pool candidate, one column per feature
of ``serving.pool.features`` (``models/pool_ranker.py`` POOL_FEATURES).

Read from what serving already has for the request: the blend score of each candidate,
the raw co-visitation sums per channel (``Server.covis_channels``), ``PointInTime``'s
numeric item columns (popularity, trending, MF dot, ``ui.*``), the co-visitation view's
per-channel counts, the item tables' catalog (first sighting), and the LR ranker's
probability when it scored the request. Columns (all float64, 0.0 where unknown):

* ``blend``: the co-visitation blend (with its tie-breakers), the starting order;
* ``cov_liked`` / ``cov_any``: each channel's sum / count**alpha, divided by the
  channel's max over every reachable item (the blend's own normalisation);
* ``long_liked``: item-kNN over the user's last ``long_items`` positives, each seed
  weighted 1/its count, / count**alpha, max-normalised over the pool;
* ``pop``, ``trend``: log1p of the decayed counts; ``n_any``: log1p(interactions);
  ``pos_rate``: (positives + 1) / (interactions + 2); ``age``: log1p(days since first
  seen); ``pop_cold``: pop / (1 + log1p(the user's interactions));
* ``mf``: the MF dot product; ``ranker``: the LR ranker's probability;
  ``ui_interacted`` / ``ui_liked``: the user's own history with the item;
* ``last_liked``: ``long_liked`` over the user's newest positive only (the sequence's
  last step beside the long-term profile; measured: docs/ranker.md).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from operators.point_in_time import PointInTime, UserContext
from state.covis_view import CovisView, SparseScores, sums_at
from state.item_rows import ItemRows

DAY_MS = 86_400_000
_COLUMN = {"pop": "pop", "trend": "trend", "mf": "mf", "ui_interacted": "ui.interacted",
           "ui_liked": "ui.liked"}
"""Pool features read from ``ItemColumns.numeric`` (log1p for the counts)."""
_CHANNEL = {"cov_liked": "liked", "cov_any": "any"}
_IDS = ("cov_liked", "cov_any", "long_liked", "last_liked", "n_any", "pos_rate")
"""Features that read the co-visitation view's ids of the pool."""


def pool_matrix(names: list[str], context: PointInTime, view: CovisView, alpha: float,
                ctx: UserContext, items: list[str], blend: np.ndarray, ts: int,
                covis: dict[str, SparseScores] | None, ranker: np.ndarray | None,
                long_items: int = 100, *, rows: np.ndarray | None = None,
                space: ItemRows | None = None,
                attrs: list[dict[str, Any] | None] | None = None,
                numeric: dict[str, np.ndarray] | None = None,
                slots: np.ndarray | None = None) -> np.ndarray:
    """(len(items), len(names)) features of the pool ``items`` (see the module doc).
    ``rows``, ``space``, ``attrs``: the items' rows in serving's ``ItemRows`` and their
    catalog attributes, when the caller has them (``PointInTime.item_columns``' array
    path: the same numbers without per-item lookups); ``numeric``, ``slots``: the items'
    numeric columns and their slots in ``space`` when the request already computed them
    (the ranker's ``ItemColumns``)."""
    n = len(items)
    if numeric is None:
        cols_needed = any(name in _COLUMN or name == "pop_cold" for name in names)
        if cols_needed:  # the numeric columns alone (no tables, attributes, channels)
            cols = context.item_columns(ctx, items, ts, covis, attrs=attrs, rows=rows,
                                        space=space, slots=slots, numeric_only=True)
            numeric = cols.numeric
            if cols.space is space and cols.slots is not None:
                slots = cols.slots
        else:
            numeric = {}
    ids = None
    if any(name in _IDS for name in names):
        if rows is not None and space is not None and space.view is view:
            ids = np.asarray(rows, np.int64)  # the rows are the view's ids
        else:
            ids = np.fromiter(map(view.ids.get, items, itertools.repeat(-1)), np.int64, n)
    out = np.zeros((n, len(names)))
    knn: list[np.ndarray] | None = None
    counts: dict[str, np.ndarray] = {}  # the pool's count per channel, read once

    def count(channel: str) -> np.ndarray:
        found = counts.get(channel)
        if found is None:
            found = counts[channel] = _counts(view, channel, ids)
        return found

    log_pop = None  # log1p(pop) of "pop" and "pop_cold"
    for j, name in enumerate(names):
        if name == "blend":
            out[:, j] = blend
        elif name in _CHANNEL:
            out[:, j] = _channel(view, covis, _CHANNEL[name], ids, alpha)
        elif name in ("long_liked", "last_liked"):
            if knn is None:  # both from one gather of the user's last long_items positives
                knn = _liked_knn(context, view, ctx, ids, ts, alpha, (long_items, 1),
                                 count("liked"))
            out[:, j] = knn[0 if name == "long_liked" else 1]
        elif name in ("pop", "pop_cold") and "pop" in numeric:
            if log_pop is None:
                log_pop = np.log1p(np.maximum(numeric["pop"], 0.0))
            out[:, j] = log_pop if name == "pop" else log_pop / (1.0 + math.log1p(
                len(ctx.consumed)))
        elif name in ("pop", "trend"):
            out[:, j] = np.log1p(np.maximum(numeric.get(name, 0.0), 0.0))
        elif name == "pop_cold":
            pop = np.log1p(np.maximum(numeric.get("pop", np.zeros(n)), 0.0))
            out[:, j] = pop / (1.0 + math.log1p(len(ctx.consumed)))
        elif name in _COLUMN:
            out[:, j] = numeric.get(_COLUMN[name], 0.0)
        elif name == "n_any":
            out[:, j] = np.log1p(count("any"))
        elif name == "pos_rate":
            out[:, j] = (count("liked") + 1.0) / (count("any") + 2.0)
        elif name == "age":
            out[:, j] = _age_days(context, items, ts, rows, space, slots)
        elif name == "ranker":
            if ranker is not None:
                out[:, j] = ranker
        else:
            raise ValueError(f"unknown pool feature {name!r}")
    return out


def _counts(view: CovisView, channel: str, ids: np.ndarray | None) -> np.ndarray:
    """The channel's (decayed) count of each id (0 for -1 or beyond the array)."""
    assert ids is not None
    counts = view.counts[channel]
    if not counts.size:
        return np.zeros(ids.size)
    ok = (ids >= 0) & (ids < counts.size)
    return np.where(ok, counts[np.where(ok, ids, 0)], 0.0)


def _channel(view: CovisView, covis: dict[str, SparseScores] | None, channel: str,
             ids: np.ndarray | None, alpha: float) -> np.ndarray:
    """``sum / count**alpha`` of the pool's ids, divided by the channel's max over every
    item the seeds reach (the blend's per-channel normalisation)."""
    assert ids is not None
    out = np.zeros(ids.size)
    scores = covis.get(channel) if covis else None
    if scores is None or not len(scores):
        return out
    all_ids = scores.ids
    done = scores.normalized
    if done is not None and done[0] == alpha:  # retrieval's blend part: the same floats
        norm = done[1]
        if norm is None:
            return out
    else:
        vals = scores.values
        if alpha:
            vals = vals / np.maximum(view.counts[channel][all_ids], 1.0) ** alpha
        top = vals.max()
        if top <= 0:
            return out
        norm = vals / top
    pos = np.minimum(all_ids.searchsorted(ids), all_ids.size - 1)
    found = (ids >= 0) & (all_ids[pos] == ids)
    return np.where(found, norm[pos], 0.0)


def _long_liked(context: PointInTime, view: CovisView, ctx: UserContext,
                ids: np.ndarray | None, ts: int, alpha: float, long_items: int) -> np.ndarray:
    """Item-kNN over the user's last ``long_items`` positives (seed weight 1/count),
    divided by count**alpha, max-normalised over the pool: the seeds' rows gathered as
    arrays (``CovisView.gather_seeds`` without new ids: the co-visitation view, whose id
    order breaks the blend's ties, is left as retrieval made it), summed per item in seed
    order (the sums of ``PointInTime._covis_lookup``)."""
    return _liked_knn(context, view, ctx, ids, ts, alpha, (long_items,))[0]


def _liked_knn(context: PointInTime, view: CovisView, ctx: UserContext,
               ids: np.ndarray | None, ts: int, alpha: float,
               counts: tuple[int, ...], pool_liked: np.ndarray | None = None
               ) -> list[np.ndarray]:
    """``_long_liked`` for each seed count of ``counts`` from one gather of the most
    seeds (the rows of the newest k seeds are a prefix of it: the same sums);
    ``pool_liked``: ``_counts(view, "liked", ids)`` when the caller has it."""
    assert ids is not None
    views, shard_of = context.views, context.item_shard_of
    if context.liked is None or views is None or shard_of is None:
        return [np.zeros(ids.size) for _ in counts]
    seeds = context.liked.recent(ctx.user_id, max(counts))
    if not seeds:
        return [np.zeros(ids.size) for _ in counts]
    seed_counts = _counts(view, "liked", np.fromiter(
        map(view.ids.get, seeds, itertools.repeat(-1)), np.int64, len(seeds)))
    weights = 1.0 / np.maximum(seed_counts, 1.0)
    # sum per pool item over the seeds' rows, in seed order (PointInTime._covis_lookup's
    # sums); neighbours without an id in the view are no pool items, so left out
    gids, gw, ends = view.gather_prefixes("liked", seeds, weights, views.table_map(), shard_of,
                                          ts, tuple(min(c, len(seeds)) for c in counts),
                                          intern=False)
    if alpha:
        liked = pool_liked if pool_liked is not None else _counts(view, "liked", ids)
        norm = np.maximum(liked, 1.0) ** alpha
    else:
        norm = None
    out = []
    for end in ends:
        # only the pool's ids are summed (the same floats as summing every id)
        v = sums_at(gids[:end], gw[:end], ids, len(view.names)) if end else np.zeros(ids.size)
        if norm is not None:
            v = v / norm
        top = v.max()
        out.append(v / top if top > 0 else np.zeros(ids.size))
    return out


def _age_days(context: PointInTime, items: list[str], ts: int, rows: np.ndarray | None = None,
              space: ItemRows | None = None, slots: np.ndarray | None = None) -> np.ndarray:
    """log1p(days since each item was first seen), from its item table's catalog (through
    ``space``'s per-row values when given: the same numbers, ``math.log1p`` each;
    ``slots``: the rows' slots, filled by this request already)."""
    views, shard_of = context.views, context.item_shard_of
    out = np.zeros(len(items))
    if views is None or shard_of is None:
        return out
    if rows is not None and space is not None:
        if slots is None:
            space.sync(views.table_map())
            slots = space.fill(rows)
        days = (np.maximum(ts - space.first_seen[slots], 0) / DAY_MS).tolist()
        out = np.fromiter(map(math.log1p, days), np.float64, len(days))
        out[~space.entry[slots]] = 0.0  # no catalog entry: no age
        return out
    tables = views.table_map()
    for n, item in enumerate(items):
        table = tables.get(shard_of(item))
        entry = table.catalog.get(item) if table is not None else None
        if entry is not None:
            out[n] = math.log1p(max(ts - entry.first_seen_ms, 0) / DAY_MS)
    return out

