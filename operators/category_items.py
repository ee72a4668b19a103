"""Each category's best items by click rate, from the loaded item tables: the candidates
of the ``category`` retrieval source (``serving.sources.category``).

Category sampling (operators/category_explore.py) can only serve a category it samples
with the items retrieval found, and the other sources (co-visitation, MF, trending,
popular) follow what was shown and clicked overall, so a user's sampled category often
has few or poor candidates. This source adds, for the user's categories of highest
posterior mean, each category's best available items by their click rate over the
category's (``models.category_bandit.item_lift`` on the item tables' ``item_rate``
counts, shrunk by ``item_lift`` impressions; an item never shown has the category's
rate, lift 1, so new items of a category come before its known below-average ones).

Per item table version, ``table_categories`` keeps the ``retrieve_per_category`` best
items of each of its ``max_categories`` most clicked categories (memoised on the table:
one pass per version per process); ``CategoryItems`` merges the loaded tables' lists
once per set of loaded tables (each item lives in one shard; the category rates are
summed over the tables). Both are bounded by ``max_categories x retrieve_per_category``
entries (flows/memory.py ``category_item``). No Bytewax here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.category_bandit import CategoryExploreConfig, category_rates, rate_lift
from state.item_table import ItemTable, set_memo


@dataclass(frozen=True, slots=True)
class CategoryList:
    """One category's best items of a table (or of every loaded table, merged)."""

    clicks: float
    """Clicks of the whole category (every available item counted)."""
    shown: float
    """Impressions of the whole category."""
    items: list[str]
    """Its best items by lift, best first (at most ``retrieve_per_category``)."""
    item_clicks: np.ndarray
    item_shown: np.ndarray
    lift: np.ndarray
    """The items' click rate over the category's (shrunk; 1 = the category's rate)."""


def _strength(config: CategoryExploreConfig) -> float:
    """Impressions that shrink an item's rate toward its category's: ``item_lift`` (at
    least 1, so an item never shown has lift 1 when ``item_lift`` is off)."""
    return max(config.item_lift, 1.0)


def _catalog_columns(table: ItemTable) -> tuple[list[str], list[str], np.ndarray]:
    """(item ids, their categories ("" = none), availability) of a table's catalog."""
    catalog = table.catalog
    columns = getattr(catalog, "columns", None)
    if columns is not None:  # a loaded table: its file's columns
        return columns()
    ids = list(catalog)
    entries = [catalog[i] for i in ids]
    return (ids, [e.category or "" for e in entries],
            np.fromiter((e.available for e in entries), bool, len(ids)))


def _counts(table: ItemTable, ids: list[str], keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(clicks, impressions) per item of ``ids`` from the table's profile features
    (``keys``: their names; 0 without a value, ``ItemTable.feature_columns``, shared with
    category sampling's item counts); clicks capped at impressions."""
    index, columns = table.feature_columns(tuple(keys))
    missing = len(index)  # the last column: an item without a profile (all 0.0)
    rows = np.fromiter((index.get(i, missing) for i in ids), np.int64, len(ids))
    clicks, shown = columns[:, rows]
    return np.minimum(clicks, shown), shown


def table_categories(table: ItemTable, config: CategoryExploreConfig) -> dict[str, CategoryList]:
    """The best ``retrieve_per_category`` available items of each of the table's
    ``max_categories`` most clicked categories (ties: by name), memoised on the table."""
    key = ("category_items", tuple(config.item_rate), config.item_lift,
           config.retrieve_per_category, config.max_categories)
    cached = table.memo.get(key)
    if cached is not None:
        return cached
    ids, cats, available = _catalog_columns(table)
    keep = available.nonzero()[0]
    ids = [ids[i] for i in keep.tolist()]
    cat_names, codes = np.unique(np.asarray([cats[i] for i in keep.tolist()], dtype=np.str_),
                                 return_inverse=True) if len(ids) else (np.zeros(0, np.str_),
                                                                        np.zeros(0, np.int64))
    clicks, shown = _counts(table, ids, list(config.item_rate))
    out: dict[str, CategoryList] = {}
    if len(ids):
        n = len(cat_names)
        cat_clicks = np.bincount(codes, clicks, n)
        cat_shown = np.bincount(codes, shown, n)
        s = _strength(config)
        lift = rate_lift(clicks, shown, category_rates(codes, clicks, shown, s), s)
        per = config.retrieve_per_category
        order = np.lexsort((-lift, codes))  # by category, best lift first, stable
        starts = np.searchsorted(codes[order], np.arange(n))
        ends = np.append(starts[1:], len(order))
        top = np.lexsort((cat_names, -cat_clicks))[: config.max_categories]
        for j in top.tolist():
            best = order[starts[j]:min(ends[j], starts[j] + per)]
            out[str(cat_names[j])] = CategoryList(
                float(cat_clicks[j]), float(cat_shown[j]), [ids[i] for i in best.tolist()],
                clicks[best], shown[best], lift[best])
    table.memo[key] = out
    return out


def merge_categories(lists: list[dict[str, CategoryList]], config: CategoryExploreConfig
                     ) -> dict[str, CategoryList]:
    """The tables' lists as one per category: category counts summed, the items' lifts
    recomputed against the merged category rate, the best ``retrieve_per_category``
    kept; at most ``max_categories`` categories (most clicked first)."""
    if len(lists) == 1:
        return lists[0]
    by_cat: dict[str, list[CategoryList]] = {}
    for part in lists:
        for cat, entry in part.items():
            by_cat.setdefault(cat, []).append(entry)
    total_clicks = sum(e.clicks for parts in by_cat.values() for e in parts)
    total_shown = sum(e.shown for parts in by_cat.values() for e in parts)
    overall = (total_clicks + 1.0) / (total_shown + 2.0)
    s = _strength(config)
    merged = []
    for cat, parts in by_cat.items():
        clicks = sum(e.clicks for e in parts)
        shown = sum(e.shown for e in parts)
        rate = (clicks + s * overall) / (shown + s)
        items = [i for e in parts for i in e.items]
        ic = np.concatenate([e.item_clicks for e in parts])
        ish = np.concatenate([e.item_shown for e in parts])
        lift = rate_lift(ic, ish, np.full(len(items), rate), s)
        best = (-lift).argsort(kind="stable")[: config.retrieve_per_category]
        merged.append((-clicks, cat, CategoryList(clicks, shown, [items[i] for i in best.tolist()],
                                                 ic[best], ish[best], lift[best])))
    merged.sort(key=lambda t: (t[0], t[1]))
    return {cat: entry for _, cat, entry in merged[: config.max_categories]}


class CategoryItems:
    """The merged category lists of the currently loaded tables (one user shard's cache;
    rebuilt when the set of loaded tables changes, dropped on pickling)."""

    def __init__(self, config: CategoryExploreConfig) -> None:
        self.config = config
        self._tables: tuple[ItemTable, ...] = ()
        self._lists: dict[str, CategoryList] = {}
        self._rows: dict[str, np.ndarray] = {}
        """Each category's items as rows of ``_rows_space``, for ``_lists`` (``rows``)."""
        self._rows_space: Any = None

    def lists(self, tables: list[ItemTable]) -> dict[str, CategoryList]:
        """Category -> its best items over ``tables`` (cached per set of tables)."""
        if len(tables) != len(self._tables) or any(
                a is not b for a, b in zip(tables, self._tables, strict=True)):
            config = self.config
            key = ("category_lists", tuple(config.item_rate), config.item_lift,
                   config.retrieve_per_category, config.max_categories)
            self._lists = set_memo(tables, key, lambda: merge_categories(
                [table_categories(t, config) for t in tables], config))
            self._tables = tuple(tables)
        return self._lists

    def rows(self, category: str, space: Any) -> np.ndarray:
        """The items of the current lists' ``category`` as rows of ``space`` (an
        ``ItemRows``: ``space.rows(items)``, new items interned in list order), kept while
        the lists and the space's id space stay (ids are never reused within one)."""
        key = (space, space.view)
        if self._rows_space != key or getattr(self, "_rows_lists", None) is not self._lists:
            self._rows = {}
            self._rows_space = key
            self._rows_lists = self._lists
        rows = self._rows.get(category)
        if rows is None:
            rows = self._rows[category] = space.rows(self._lists[category].items)
        return rows

    def __getstate__(self) -> dict[str, object]:
        return {"config": self.config, "_tables": (), "_lists": {}, "_rows": {},
                "_rows_space": None}
