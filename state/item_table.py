"""The nearline read view of one item shard: co-visitation, popularity, trending, catalog.

Co-visitation has two channels: ``liked`` (pairs among a user's positives) and ``any``
(pairs among every interaction), each with the counts that normalise its candidates.

Item shards publish an ``ItemTable`` per shard (snapshot kind ``items-<shard>``) every
refresh interval of event time; serving loads the newest verified one of each shard.
One ``.npz`` file, no pickled objects. Popularity and trending are decayed counts as
of ``ts`` (event time, ms) with the half-lives of the item config.
"""

from __future__ import annotations

import heapq
import os
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from state.covisitation import CoVisitation
from state.decay import decay_factor
from state.npz import load_npz, save_npz

T = TypeVar("T")

_COVIS = "covis_"
_COVIS_ANY = "covisany_"
_PUBLISHED = ("format", "vocab_blob", "vocab_offsets", "n_rows", "row_sizes", "neighbors",
              "values", "t_ref", "has_t_ref")
"""The co-visitation arrays a new version is built from (``CoVisitation.publish_arrays``)."""


def _score(kv: tuple[str, float]) -> float:
    return kv[1]


def category_of(attrs: dict[str, Any]) -> str | None:
    """An item's category from its attributes, as the catalog stores it (``str`` of the
    ``category`` attribute; None without one)."""
    value = attrs.get("category")
    return str(value) if value is not None else None


@dataclass
class CatalogEntry:
    """What serving needs to know of an item: category, availability, first sighting (ms)."""

    category: str | None = None
    available: bool = True
    first_seen_ms: int = 0


class FrozenCatalog(Mapping[str, CatalogEntry]):
    """A loaded table's catalog: the file's columns kept as they are, an entry made when
    it is read. Loading makes no object per item (a ``CatalogEntry`` and its ``__dict__``
    each: ~200k GC-tracked objects per round of four 25k-item tables, whose young-
    generation collections stalled requests while the loader thread ran). Read-only."""

    def __init__(self, ids: list[str], category: list[str], available: np.ndarray,
                 first_seen: np.ndarray) -> None:
        self._index = dict(zip(ids, range(len(ids)), strict=True))
        self._category = category
        self._available = available
        self._first_seen = first_seen

    def __getitem__(self, item_id: str) -> CatalogEntry:
        j = self._index[item_id]
        return CatalogEntry(self._category[j] or None, bool(self._available[j]),
                            int(self._first_seen[j]))

    def get(self, item_id: str, default: Any = None) -> Any:  # type: ignore[override]
        j = self._index.get(item_id)
        if j is None:
            return default
        return CatalogEntry(self._category[j] or None, bool(self._available[j]),
                            int(self._first_seen[j]))

    def category(self, item_id: str) -> str | None:
        """``get(item_id).category`` (None when not listed) without the entry."""
        j = self._index.get(item_id)
        return None if j is None else self._category[j] or None

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    def columns(self) -> tuple[list[str], list[str], np.ndarray]:
        """(item ids, categories ("" = none), availability) as loaded (callers must not
        modify them)."""
        return list(self._index), self._category, self._available

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


RawProfile = tuple[Any, ...]
"""An item profile as one flat tuple: a loaded table's names (a tuple of str), then the
item's row of values (NaN: none): ``row_profile(raw[0], raw[1:])``."""


def row_profile(names: Sequence[str], row: Sequence[float]) -> dict[str, float]:
    """An item profile's dict from its row: the non-NaN values by name, in name order."""
    return {n: v for n, v in zip(names, row, strict=True) if v == v}


def catalog_category(catalog: Mapping[str, CatalogEntry], item_id: str) -> str | None:
    """The item's category in a table's catalog (None: no category, or not listed),
    without making a ``FrozenCatalog`` entry."""
    if type(catalog) is FrozenCatalog:
        return catalog.category(item_id)
    entry = catalog.get(item_id)
    return entry.category if entry else None


class FrozenFeatures(Mapping[str, dict[str, float]]):
    """A loaded table's item profile features: the file's matrix kept as it is, an item's
    dict (its non-NaN values by name, in the matrix's name order) made when it is first
    read and kept. Loading makes no dict per item (the joiner reads a few items per
    version; serving reads the matrix). Read-only."""

    def __init__(self, index: dict[str, int], names: list[str], values: np.ndarray) -> None:
        self.matrix = (index, names, values)
        """The arrays as given: ``ItemTable.feature_matrix`` of a table holding these."""
        self._index = index
        self._names = tuple(names)
        self._values = values
        self._made: dict[str, dict[str, float]] = {}

    def __getitem__(self, item_id: str) -> dict[str, float]:
        found = self._made.get(item_id)
        if found is None:
            found = self._made[item_id] = row_profile(
                self._names, self._values[self._index[item_id]].tolist())
        return found

    def raw(self, item_id: str) -> dict[str, float] | RawProfile | None:
        """The item's profile without making its dict: its dict when made already, else
        its ``RawProfile`` (the names, then its row's values) for ``row_profile`` (None
        when the table lacks it): one flat tuple of atomic values and the names tuple,
        which the collector untracks at the first collection that meets it (a capture
        holds it while its impressions wait for labels; a nested tuple of values would
        be untracked one collection later, and young collections would scan it till then)."""
        found = self._made.get(item_id)
        if found is not None:
            return found
        j = self._index.get(item_id)
        return None if j is None else (self._names, *self._values[j].tolist())

    def get(self, item_id: str, default: Any = None) -> Any:  # type: ignore[override]
        found = self._made.get(item_id)
        if found is not None:
            return found
        return self[item_id] if item_id in self._index else default

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


@dataclass
class ItemTable:
    """Immutable once published; readers never mutate it."""

    shard: str
    ts: int
    covis: CoVisitation
    popular: dict[str, float] = field(default_factory=dict)
    trending: dict[str, float] = field(default_factory=dict)
    catalog: dict[str, CatalogEntry] | FrozenCatalog = field(default_factory=dict)
    features: dict[str, dict[str, float]] | FrozenFeatures = field(default_factory=dict)
    """Item profile features (IPS ``item`` entity) per item, numeric ones, as of ``ts``."""
    popular_half_life_ms: int = 7 * 86_400_000
    trending_half_life_ms: int = 6 * 3_600_000
    covis_any: CoVisitation | None = None
    """The "any interaction" co-visitation channel (``covis`` is the "liked" one)."""
    liked_counts: dict[str, float] = field(default_factory=dict)
    """Positives per item, decayed with the co-visitation half-life, as of ``ts``."""
    interactions: dict[str, float] = field(default_factory=dict)
    """Interactions per item, decayed with the co-visitation half-life, as of ``ts``."""

    def decay_factor(self, source: str, now_ms: int) -> float:
        """Multiplier that decays this table's ``popular``/``trending`` counts (as of
        ``ts``) to ``now_ms``, so tables published at different times compare."""
        half_life = self.popular_half_life_ms if source == "popular" else self.trending_half_life_ms
        return decay_factor(now_ms - self.ts, half_life)
    _top: dict[str, tuple[int, list[tuple[str, float]]]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _rows: dict[str, dict[str, dict[str, float]]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    """``covis_row``'s rows by channel, then item (no key tuple made per read)."""
    _matrix: tuple[dict[str, int], list[str], np.ndarray] | None = field(
        default=None, init=False, repr=False, compare=False)
    memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Readers' caches of values derived from this version (e.g. a serving ranker's item
    terms), keyed by their owner; dropped with the table, never saved."""

    def feature_matrix(self) -> tuple[dict[str, int], list[str], np.ndarray]:
        """``features`` as (item -> row, feature names, float64 matrix items x names, NaN =
        no value): the arrays its ``FrozenFeatures`` hold (a loaded table's file arrays, an
        item shard's as built), else built once from the dicts (a published table is
        immutable). Callers must not modify them."""
        if self._matrix is None and type(self.features) is FrozenFeatures:
            self._matrix = self.features.matrix
        elif self._matrix is None:
            ids = list(self.features)
            names = sorted({n for feats in self.features.values() for n in feats})
            self._matrix = (dict(zip(ids, range(len(ids)), strict=True)), names,
                            _matrix_of(self.features, names))
        return self._matrix

    def feature_columns(self, names: tuple[str, ...]) -> tuple[dict[str, int], np.ndarray]:
        """The features ``names`` of every item as (item -> column, float64 array names x
        (items + 1)): ``feature_matrix`` transposed, 0.0 where an item has no value (as
        ``features[item].get(name, 0.0)`` reads; the last column: an item without a
        profile), once per table version (``memo``; shared by every reader of it)."""
        key = ("feature_columns", names)
        found = self.memo.get(key)
        if found is None:
            index, have, matrix = self.feature_matrix()
            values = np.zeros((len(names), len(index) + 1))
            for k, name in enumerate(names):
                if name in have:
                    col = matrix[:, have.index(name)]
                    values[k, :-1] = np.where(np.isnan(col), 0.0, col)
            found = self.memo[key] = (index, values)
        return found

    def channel(self, name: str) -> tuple[CoVisitation | None, dict[str, float]]:
        """Co-visitation table and normalising counts of channel ``liked`` or ``any``."""
        if name == "liked":
            return self.covis, self.liked_counts
        if name == "any":
            return self.covis_any, self.interactions
        raise ValueError(f"unknown co-visitation channel {name!r} (liked or any)")

    def covis_row(self, name: str, item_id: str) -> dict[str, float]:
        """Every neighbour of ``item_id`` in channel ``name`` -> its weight decayed to
        ``ts``, in stored order (for lookups by neighbour: ``neighbors`` sorts); cached per
        table (published tables are immutable, so callers must not modify the dict)."""
        rows = self._rows.get(name)
        if rows is None:
            self.channel(name)  # raises on an unknown channel
            rows = self._rows[name] = {}
        row = rows.get(item_id)
        if row is None:
            covis = self.channel(name)[0]
            row = rows[item_id] = covis.row_weights(item_id, self.ts) if covis is not None else {}
        return row

    def covis_row_arrays(self, name: str, item_id: str) -> tuple[list[str], np.ndarray]:
        """``covis_row`` as (neighbour ids, weights) in the same order, without a dict
        (serving's ``CovisView`` turns them into id arrays; not cached here)."""
        covis = self.channel(name)[0]
        if covis is None:
            return [], np.zeros(0)
        return covis.row_arrays(item_id, self.ts)

    def covis_factor(self, now_ms: int) -> float:
        """Multiplier that decays this table's co-visitation weights and counts (as of
        ``ts``) to ``now_ms``."""
        return decay_factor(now_ms - self.ts, self.covis.config.half_life_ms)

    def top(self, source: str, n: int) -> list[tuple[str, float]]:
        """The ``n`` best ``(item, score)`` of ``popular`` or ``trending``, best first;
        equal scores keep the dict's order (as a stable sort would).

        Computed once per table and cached (a published table is immutable; tables are
        loaded once per snapshot version, so this costs one pass per version instead
        of a sort per request). Only ask on tables that are no longer written to.
        """
        if source not in ("popular", "trending"):
            raise ValueError(f"unknown source {source!r} (popular or trending)")
        cached = self._top.get(source)
        if cached is not None and (n <= cached[0] or len(cached[1]) < cached[0]):
            return cached[1][:n]
        best = heapq.nlargest(n, getattr(self, source).items(), key=_score)
        self._top[source] = (n, best)
        return best

    def save(self, path: str | os.PathLike | BinaryIO,
             covis_arrays: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray] | None]
             | None = None) -> None:
        """Write one uncompressed ``.npz`` file (to ``path``, or into an open binary
        file). ``covis_arrays``: the two channels' ``to_arrays`` when the caller has them
        (an item shard's ``publish_arrays``)."""
        if covis_arrays is None:
            covis_arrays = (self.covis.to_arrays(),
                            None if self.covis_any is None else self.covis_any.to_arrays())
        liked, any_ = covis_arrays
        arrays = {f"{_COVIS}{k}": v for k, v in liked.items()}
        if any_ is not None:
            arrays.update({f"{_COVIS_ANY}{k}": v for k, v in any_.items()})
        made: list[tuple[list[str], np.ndarray]] = []
        for name in ("liked_counts", "interactions"):
            counts = getattr(self, name)
            arrays[f"{name}_ids"] = _ids_array(list(counts), made)
            arrays[name] = np.fromiter(counts.values(), np.float64, len(counts))
        cat_ids, entries = list(self.catalog), list(self.catalog.values())
        index, names, matrix = self.feature_matrix()
        feat_ids = list(index)
        save_npz(path, dict(
            shard=np.asarray(self.shard),
            ts=np.asarray(self.ts, np.int64),
            popular_ids=_ids_array(list(self.popular), made),
            popular=np.fromiter(self.popular.values(), np.float64, len(self.popular)),
            trending_ids=_ids_array(list(self.trending), made),
            trending=np.fromiter(self.trending.values(), np.float64, len(self.trending)),
            catalog_ids=np.asarray(cat_ids, dtype=np.str_),
            catalog_category=np.asarray([e.category or "" for e in entries], dtype=np.str_),
            catalog_available=np.asarray([e.available for e in entries], bool),
            catalog_first_seen=np.asarray([e.first_seen_ms for e in entries], np.int64),
            half_lives=np.asarray([self.popular_half_life_ms, self.trending_half_life_ms],
                                  np.int64),
            feature_ids=np.asarray(feat_ids, dtype=np.str_),
            feature_names=np.asarray(names, dtype=np.str_),
            feature_values=matrix,
            **arrays,
        ))

    @staticmethod
    def covis_arrays_of(path: str | os.PathLike | Path
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """The co-visitation arrays of both channels of a saved table (``to_arrays``'s
        keys; the "any" channel None when absent), read without the rest of the file."""
        z = load_npz(path, {f"{prefix}{k}" for prefix in (_COVIS, _COVIS_ANY)
                            for k in _PUBLISHED})
        channels = tuple({k: z[f"{prefix}{k}"] for k in _PUBLISHED if f"{prefix}{k}" in z}
                         for prefix in (_COVIS, _COVIS_ANY))
        return channels[0], channels[1] or None

    @classmethod
    def load(cls, path: str | os.PathLike | Path) -> ItemTable:
        """Read a table written by :meth:`save`."""
        z = load_npz(path)
        covis = CoVisitation.from_arrays({k[len(_COVIS):]: z[k] for k in z.files
                                          if k.startswith(_COVIS)}, frozen=True)
        any_arrays = {k[len(_COVIS_ANY):]: z[k] for k in z.files if k.startswith(_COVIS_ANY)}
        covis_any = CoVisitation.from_arrays(any_arrays, frozen=True) if any_arrays else None
        matrix = _feature_arrays(z)
        catalog = FrozenCatalog(z["catalog_ids"].tolist(), z["catalog_category"].tolist(),
                                z["catalog_available"], z["catalog_first_seen"])
        return cls(
            shard=str(z["shard"]),
            ts=int(z["ts"]),
            covis=covis,
            popular=dict(zip(z["popular_ids"].tolist(), z["popular"].tolist(), strict=True)),
            trending=dict(zip(z["trending_ids"].tolist(), z["trending"].tolist(), strict=True)),
            catalog=catalog,
            features=_features(matrix),
            **_half_lives(z),
            covis_any=covis_any,
            liked_counts=_counts(z, "liked_counts"),
            interactions=_counts(z, "interactions"),
        )


def set_memo(tables: Sequence[ItemTable], key: Hashable, make: Callable[[], T]) -> T:
    """``make()`` computed once per sequence of table versions (order counts) for every
    reader in the process (the user shards of a process load the same versions): kept
    in the first table's ``memo`` with weak references to the others, one entry per
    ``key`` (a new sequence replaces it; it goes with the first table). Callers must not
    modify the value."""
    if not tables:
        return make()
    memo_key = ("table_set", key)
    found = tables[0].memo.get(memo_key)
    rest = tables[1:]
    if found is not None and len(found[0]) == len(rest) and all(
            ref() is t for ref, t in zip(found[0], rest, strict=True)):
        return found[1]
    value = make()
    tables[0].memo[memo_key] = (tuple(weakref.ref(t) for t in rest), value)
    return value


def _ids_array(ids: list[str], made: list[tuple[list[str], np.ndarray]]) -> np.ndarray:
    """``ids`` as a fixed-width str array, the one already ``made`` for an equal list when
    there is one (a table's popular, trending and liked counts share their keys and order);
    the arrays are written, never modified."""
    for seen, array in made:
        if seen == ids:
            return array
    array = np.asarray(ids, dtype=np.str_)
    made.append((ids, array))
    return array


def _matrix_of(features: dict[str, dict[str, float]], names: list[str]) -> np.ndarray:
    """One row per item of ``features`` (in its order), one column per name, NaN = no value."""
    matrix = np.full((len(features), len(names)), np.nan)
    if features:  # one row list per item (numpy assigns a row at once)
        nan = float("nan")
        matrix[:] = [[feats.get(n, nan) for n in names] for feats in features.values()]
    return matrix


def _feature_arrays(z: Any) -> tuple[dict[str, int], list[str], np.ndarray] | None:
    """``feature_matrix`` as saved; None for old files."""
    if "feature_ids" not in z.files:
        return None
    ids = z["feature_ids"].tolist()
    return (dict(zip(ids, range(len(ids)), strict=True)), z["feature_names"].tolist(),
            np.asarray(z["feature_values"], np.float64))


def _features(matrix: tuple[dict[str, int], list[str], np.ndarray] | None
              ) -> dict[str, dict[str, float]] | FrozenFeatures:
    """Per-item feature dicts over the saved matrix (NaN = no value; made as read); {} for
    old files."""
    if matrix is None:
        return {}
    return FrozenFeatures(*matrix)


def _counts(z: Any, name: str) -> dict[str, float]:
    if name not in z.files:
        return {}
    return dict(zip(z[f"{name}_ids"].tolist(), z[name].tolist(), strict=True))


def _half_lives(z: Any) -> dict[str, int]:
    if "half_lives" not in z.files:
        return {}
    popular, trending = (int(x) for x in z["half_lives"].tolist())
    return {"popular_half_life_ms": popular, "trending_half_life_ms": trending}
