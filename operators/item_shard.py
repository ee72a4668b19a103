"""The item-shard stage: item-side state, keyed by item shard (``i000``..).

Each ``ItemShard`` owns, for the items hashed to it: MF item factors (the item half
of every ISGD step, with the user vector sent through the flow), co-visitation rows
(pairs routed by their first item), decayed popularity and trending counts, and the
catalog (category, availability). Inputs are micro-batches of updates produced by
the user shards, the typed messages of ``operators/item_updates.py`` (``Interaction``,
``MFStep``, ``CovisPairs``, ``CatalogChange``, ``ProfileEvent``), each with the
``item_id`` it was routed by.

Outputs per batch: changed item vectors for the index builder, and, every
``items.refresh_interval_ms`` of event time (and at end of input), a published
``ItemTable`` snapshot (kind ``items-<shard>``) whose manifest goes to ``snapshots``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np
from bytewax.operators import StatefulLogic

from events.model import Feedback, Impression, Item, Record, event_to_dict, processing_error
from models.mf import ItemFactors, MFConfig
from operators.item_updates import (
    CatalogChange,
    CovisPairs,
    Interaction,
    ItemUpdate,
    MFStep,
    ProfileEvent,
)
from operators.placement import spread_key
from state.bounded import lru_put
from state.covisitation import CoVisConfig, CoVisitation
from state.feature_spec import parse_features
from state.item_table import CatalogEntry, FrozenFeatures, ItemTable, category_of
from state.popularity import PopularityCounter
from state.profiles import ProfileStore
from state.settings import doc
from state.snapshot_store import Manifest, SnapshotError, SnapshotStore

IndexChange = tuple[list[str], np.ndarray | None, list[str], int]
"""(upsert ids, their vectors (n, dim) float32 or None, removed ids, event time ms)."""


COVIS_DEFAULTS: dict[str, Any] = {
    "window": 40, "position_decay": 0.95, "max_neighbors": 300, "prune_slack": 0.5,
    "half_life_ms": 10 * 365 * 86_400_000, "max_items": 5_000,
}
"""Co-visitation defaults of the flow (docs/movielens-recipe.md): a long, gently decayed
pair window (a page of ratings is one session), rows of 300 so they do not freeze, and
no practical time decay (bursty activity makes decayed rows fade between bursts). Rows
for the 5,000 most recently co-visited items of each shard: full rows of 300 neighbours
are the largest part of the memory bound (docs/operations.md, "Bounded memory")."""

MF_DEFAULTS: dict[str, Any] = {"max_users": 50_000, "max_items": 50_000}
"""MF table capacities of the flow (per user shard and per item shard), sized with the
other defaults so that the default config's memory bound fits a 24 GB machine."""


@dataclass
class ItemsConfig:
    """Item-side state: MF item factors, co-visitation, popularity, the item tables."""

    enabled: bool = doc("Run the item side (MF, co-visitation, popularity, item tables, index).",
                        True)
    refresh_interval_ms: int = doc("Event time between item-table snapshots of a shard (ms).",
                                   60_000)
    popular_half_life_ms: int = doc("Half-life of the popularity counts (ms).", 7 * 86_400_000)
    trending_half_life_ms: int = doc("Half-life of the trending counts (ms).", 6 * 3_600_000)
    max_items: int = doc("Items tracked per item shard: catalog entries (published in its item "
                         "table), item profiles and popularity counters; least recently seen "
                         "forgotten first.", 40_000)
    covis: dict[str, Any] = doc("Co-visitation parameters (state.covisitation.CoVisConfig: "
                                "half_life_ms, max_neighbors, window, position_decay, "
                                "prune_slack, max_items); keys not given keep the defaults shown.",
                                factory=lambda: dict(COVIS_DEFAULTS))
    covis_any: bool = doc("Keep a second co-visitation channel over every interaction (any "
                          "feedback, e.g. any rating) beside the one over positives.", True)
    mf: dict[str, Any] = doc("Incremental MF parameters (models.mf.MFConfig: dim, lr, reg, "
                             "init_scale, max_users (per user shard), max_items (per item "
                             "shard), admit_threshold); keys not given keep the defaults shown "
                             "or MFConfig's.", factory=lambda: dict(MF_DEFAULTS))

    def covis_config(self) -> CoVisConfig:
        return CoVisConfig(**{**COVIS_DEFAULTS, **self.covis})

    def mf_config(self) -> MFConfig:
        return MFConfig(**{**MF_DEFAULTS, **self.mf})


REUSE_WRITTEN = 0.4
"""The last table's co-visitation arrays are read back and reused when at most this share
of a channel's rows was written since (MovieLens: ~25% per table; the zero-config
world's ~50%, where reading and remapping cost more than walking every row)."""
REUSE_KEPT = 0.75
"""Kept arrays (``CoVisitation.kept_arrays``: no file read and hashed) of at least
``REUSE_KEPT_NEIGHBORS`` neighbours are reused up to this written share: a written row
that only appended neighbours keeps its old ids, so remapping still costs about half of
walking every row at 40-75% written (the ml20k replay's tables of 10k-70k neighbours:
3.9 vs 8.8 ms at 40-50%, 2.3 vs 3.8 ms at 60-70%; equal from 80%)."""
REUSE_KEPT_NEIGHBORS = 8_000
"""Below this many neighbours (the zero-config world's tables: ~1,400) walking every row
is as cheap as remapping (0.25 vs 0.36 ms at 50-70% written)."""


class ItemShard:
    """All item-side state of one shard (pure Python); ``process`` a batch, ``publish`` a view."""

    def __init__(self, config: ItemsConfig, store: SnapshotStore,
                 features: list[dict[str, Any]] | None = None,
                 hot_profiles: int = 10_000, one_table_per_batch: bool = False) -> None:
        self.config = config
        self.one_table_per_batch = one_table_per_batch
        """Live input: at most one item shard of a worker publishes per source batch (a
        due table of another shard waits for a later batch: ``_publish_turn``), so the
        shards' publications, due at the same event time, do not hold one step together.
        Off in replays, whose tables must be the same at any speed."""
        self.store = store
        specs = [f for f in (features or []) if f.get("entity") == "item"]
        self.profiles = (ProfileStore(parse_features(specs), "item", max_entities=config.max_items,
                                      hot_capacity=hot_profiles) if specs else None)
        self.profiled: OrderedDict[str, int | None] = OrderedDict()
        """Items with a profile, least recently seen first (at most ``max_items``), each
        with its profile key once queried (None before: ``ProfileStore.key_of`` hashes)."""
        self.shard = ""
        self.factors = ItemFactors(config.mf_config())
        self.covis = CoVisitation(config.covis_config())
        self.covis_any = CoVisitation(config.covis_config()) if config.covis_any else None
        half_life = config.covis_config().half_life_ms
        self.liked_counts = PopularityCounter(config.max_items, half_life)
        self.interactions = PopularityCounter(config.max_items, half_life)
        """Positives / interactions per item, decayed like co-visitation pairs: the
        popularity that normalises each channel's candidate scores at serving."""
        self.popular = PopularityCounter(config.max_items, config.popular_half_life_ms)
        self.trending = PopularityCounter(config.max_items, config.trending_half_life_ms)
        self.catalog: OrderedDict[str, CatalogEntry] = OrderedDict()
        """Least recently seen first; at most ``max_items`` entries."""
        self.max_ts_ms: int | None = None
        self.last_publish_ms: int | None = None
        self.sent_version = 0
        self.dirty = False
        self._dead: list[Record] = []
        """Dead letters (``processing_error``) of updates this shard failed to apply."""
        self.batch: int | None = None
        """The source micro-batch of the last updates (see ``process``)."""
        self.published: Manifest | None = None
        """The last table this shard published, while its co-visitation rows are tracked
        from it (``CoVisitation.publish_arrays``): the next one is built from its arrays."""

    def process(self, shard: str, updates: list[ItemUpdate], batch: int | None = None
                ) -> dict[str, list[Any]]:
        """Apply a batch of updates in order; return index changes and due snapshots.

        ``batch``: the source micro-batch the updates come from (its parts arrive from
        every user shard). A due table is then published when the first part of a later
        batch arrives, before applying it, so a shard publishes at most once per source
        batch (and at end of input); None publishes after these updates when due.
        """
        self.shard = shard
        out: dict[str, list[Any]] = {}
        if batch is not None and batch != self.batch:
            self.batch = batch
            if self._publish_due() and self._publish_turn(batch):
                out["snapshots"] = [self.publish()]
        mf_items: list[str] = []
        mf_vecs: list[np.ndarray] = []
        mf_coefs: list[float | None] = []
        mf_ts = 0
        pairs: list[tuple[str, str, float]] = []
        pairs_any: list[tuple[str, str, float]] = []
        removed: list[str] = []
        stage = f"item_shard {shard}"
        max_ts = self.max_ts_ms
        profiles, profiled, max_items = self.profiles, self.profiled, self.config.max_items
        for update in updates:
            kind = type(update)  # dispatch by exact type: the hot loop of the shard
            try:
                if kind is CovisPairs:
                    ts = update.ts
                    if max_ts is None or ts > max_ts:
                        max_ts = ts
                    (pairs if update.channel == "liked" else pairs_any).extend(update.pairs)
                elif kind is ProfileEvent:
                    ts = update.event.ts
                    if max_ts is None or ts > max_ts:
                        max_ts = ts
                    if profiles is not None:
                        profiles.apply(update.event)
                        item_id = update.item_id
                        lru_put(profiled, item_id, profiled.get(item_id), max_items)
                elif kind is MFStep:
                    mf_items.append(update.item_id)
                    mf_vecs.append(update.user_vec)
                    mf_coefs.append(update.coef)
                    if update.ts > mf_ts:
                        mf_ts = update.ts
                elif kind is Interaction:
                    item_id, ts, positive = update
                    if max_ts is None or ts > max_ts:
                        max_ts = ts
                    self._see(item_id, ts)
                    self.interactions.add(item_id, ts)
                    if positive:
                        self.liked_counts.add(item_id, ts)
                        self.popular.add(item_id, ts)
                        self.trending.add(item_id, ts)
                elif kind is CatalogChange:
                    item_id, event = update
                    if max_ts is None or event.ts > max_ts:
                        max_ts = event.ts
                    entry = self._see(item_id, event.ts)
                    entry.category = category_of(event.attrs) or entry.category
                    if entry.available and not event.available:
                        removed.append(item_id)
                    elif event.available and not entry.available:
                        self.factors.revive([item_id])
                    entry.available = event.available
                else:  # a programming error, not bad data
                    raise TypeError(f"unknown item update {kind.__name__}: {update!r}")
            except TypeError as err:
                if kind not in _UPDATE_TYPES:
                    raise
                self._dead.append(processing_error(stage, _update_raw(update), err))
            except Exception as err:  # one bad update must not stop the flow
                self._dead.append(processing_error(stage, _update_raw(update), err))
        self.max_ts_ms = max_ts
        now = self.max_ts_ms or 0
        if pairs:
            self._batch_step(stage + " covis", updates,
                             lambda u: isinstance(u, CovisPairs) and u.channel == "liked",
                             lambda: self.covis.add(pairs, now))
        if pairs_any and self.covis_any is not None:
            covis_any = self.covis_any
            self._batch_step(stage + " covis_any", updates,
                             lambda u: isinstance(u, CovisPairs) and u.channel != "liked",
                             lambda: covis_any.add(pairs_any, now))
        if mf_items:
            def mf_step() -> None:
                coefs = None if mf_coefs[0] is None else np.asarray(mf_coefs, np.float32)
                self.factors.update_batch(mf_items, np.stack(mf_vecs), mf_ts, coefs)
            self._batch_step(stage + " mf", updates, lambda u: isinstance(u, MFStep), mf_step)
        if removed:
            def remove_step() -> None:
                self.factors.remove(removed)
                self.covis.remove(removed)
                if self.covis_any is not None:
                    self.covis_any.remove(removed)
            self._batch_step(stage + " remove", updates,
                             lambda u: isinstance(u, CatalogChange) and u.item_id in removed,
                             remove_step)
        self.dirty = self.dirty or bool(updates)
        change = self._index_change()
        if change is not None:
            out["index"] = [change]
        if batch is None and self._publish_due():
            out["snapshots"] = [self.publish()]
        if self._dead:
            out["dead-letters"], self._dead = self._dead, []
        return out

    def _batch_step(self, stage: str, updates: list[ItemUpdate],
                    applies: Callable[[ItemUpdate], bool], step: Callable[[], None]) -> None:
        """Run a step that applies several updates of the batch at once (those for which
        ``applies`` is true); if it raises, each of them becomes a dead letter and the
        batch goes on."""
        try:
            step()
        except Exception as err:
            self._dead.extend(processing_error(stage, _update_raw(u), err)
                              for u in updates if applies(u))

    def _see(self, item_id: str, ts: int) -> CatalogEntry:
        entry = self.catalog.get(item_id)
        if entry is None:
            entry = CatalogEntry(first_seen_ms=ts)
        lru_put(self.catalog, item_id, entry, self.config.max_items)
        return entry

    def _index_change(self) -> IndexChange | None:
        changes = self.factors.changed_since(self.sent_version)
        self.sent_version = changes.version
        if not changes.upserted and not changes.removed:
            return None
        vectors = self.factors.vectors(changes.upserted) if changes.upserted else None
        return (changes.upserted, vectors, changes.removed, self.max_ts_ms or 0)

    def _publish_due(self) -> bool:
        if self.max_ts_ms is None or not self.dirty:
            return False
        return (self.last_publish_ms is None
                or self.max_ts_ms - self.last_publish_ms >= self.config.refresh_interval_ms)

    def _publish_turn(self, batch: Any) -> bool:
        """Whether this due shard publishes in source batch ``batch``: always in replays;
        live (``one_table_per_batch``), see ``_Turns``."""
        if not getattr(self, "one_table_per_batch", False):
            return True
        return _turns.take(self.shard, batch)

    def table(self) -> ItemTable:
        """The current read view, for immediate saving (it shares the live co-visitation rows)."""
        now = self.max_ts_ms or 0
        return ItemTable(self.shard, now, self.covis, self.popular.scores(now),
                         self.trending.scores(now), dict(self.catalog),
                         FrozenFeatures(*self._feature_matrix()),
                         self.config.popular_half_life_ms, self.config.trending_half_life_ms,
                         covis_any=self.covis_any, liked_counts=self.liked_counts.scores(now),
                         interactions=self.interactions.scores(now))

    def _feature_matrix(self) -> tuple[dict[str, int], list[str], np.ndarray]:
        """Numeric item-profile features of every profiled item, as of now, as
        ``ItemTable.feature_matrix`` holds them: (item -> row, in ``profiled`` order; the
        outputs that are a number for some item, sorted; float64 matrix items x outputs,
        numbers as floats, NaN for other values (None means, lists) and absent ones).
        Built by output columns, not a dict per item."""
        profiles, profiled = self.profiles, self.profiled
        if profiles is None or not profiled:
            return {}, [], np.full((0, 0), np.nan)
        for item, key in profiled.items():
            if key is None:
                profiled[item] = profiles.key_of(item)  # a value change: order kept
        answers = profiles.query_keys(list(profiled.values()))
        columns = sorted(_output_columns(answers), key=_NAME)
        names, values = [], []
        for name, column in columns:
            numbers = _numbers(column)
            if numbers is not None:
                names.append(name)
                values.append(numbers)
        matrix = np.empty((len(answers), len(names)))
        for j, numbers in enumerate(values):
            matrix[:, j] = numbers
        return dict(zip(profiled, range(len(answers)), strict=True)), names, matrix

    def publish(self) -> Manifest:
        """Write the item table of this shard as a new snapshot version (its co-visitation
        arrays built from the last version's file and the rows written since)."""
        ts = self.max_ts_ms or 0
        self.last_publish_ms = ts
        self.dirty = False
        liked, any_ = self._previous_covis()
        covis_arrays = (self.covis.publish_arrays(liked, keep=True),
                        self.covis_any.publish_arrays(any_, keep=True)
                        if self.covis_any is not None else None)
        table = self.table()
        counts = {"items": len(self.catalog), "covis_rows": len(self.covis),
                  "mf_items": len(self.factors),
                  "table": {k: int(v) for k, v in self.factors.table.stats().items()
                            if k in ("admitted", "rejected", "expired", "evicted", "rows")}}
        self.published = manifest = self.store.write_file(
            f"items-{self.shard}", "npz", lambda file: table.save(file, covis_arrays), ts, counts)
        return manifest

    def _previous_covis(self) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]:
        """The co-visitation arrays of this shard's last table: those its channels kept
        (``CoVisitation.kept_arrays``: what the file holds, without reading and hashing
        it), else read back from the store (verified by its sha256); or (None, None):
        none yet, not visible yet (a background store still settling it), refused or
        gone."""
        manifest, self.published = getattr(self, "published", None), None
        channels = [c for c in (self.covis, self.covis_any) if c is not None]
        shares = [c.written_share() for c in channels]
        if manifest is None:
            return None, None
        kept = [c.kept_arrays() for c in channels]
        if all(k is not None for k in kept):
            if not any(map(_reuse_kept, shares, kept)):
                return None, None
            return kept[0], kept[1] if len(kept) > 1 else None
        if not any(x is not None and x <= REUSE_WRITTEN for x in shares):
            return None, None
        try:
            return ItemTable.covis_arrays_of(self.store.verified_path(manifest))
        except (SnapshotError, OSError, ValueError, KeyError):
            return None, None

    def finish(self) -> dict[str, list[Any]]:
        """End of input: publish what changed since the last table."""
        return {"snapshots": [self.publish()]} if self.dirty else {}


def _reuse_kept(share: float | None, kept: dict[str, np.ndarray]) -> bool:
    """Whether a channel whose ``share`` of rows was written since its kept arrays
    (``kept``) builds its next ones cheaper from them than from every row:
    ``REUSE_WRITTEN``, or ``REUSE_KEPT`` for tables of ``REUSE_KEPT_NEIGHBORS`` or more."""
    if share is None:
        return False
    return share <= REUSE_WRITTEN or (share <= REUSE_KEPT
                                      and kept["neighbors"].size >= REUSE_KEPT_NEIGHBORS)


class _Turns(threading.local):
    """Per worker thread, which of its due item shards publishes in a source batch: at
    most one per batch; a due shard that did not waits, and the one waiting longest
    goes first (a shard that stops coming is forgotten after ``MAX_WAIT`` batches)."""

    MAX_WAIT = 4

    def __init__(self) -> None:
        self.batch: Any = None
        self.published = False
        self.waiting: dict[str, int] = {}
        """Due shards not published yet -> batches waited."""

    def take(self, shard: str, batch: Any) -> bool:
        if batch != self.batch:
            self.batch, self.published = batch, False
            self.waiting = {k: n + 1 for k, n in self.waiting.items() if n < self.MAX_WAIT}
        waited = self.waiting.get(shard, -1)
        if self.published or any(n > waited for n in self.waiting.values()):
            self.waiting.setdefault(shard, 0)
            return False
        self.waiting.pop(shard, None)
        self.published = True
        return True


_turns = _Turns()

_PLAIN_NUMBERS = frozenset((int, float))
_FLOAT = frozenset((float,))
"""A column whose values are all of this type is published as it is."""
_NAME = itemgetter(0)
_NAN = float("nan")


def _output_columns(answers: list[dict[str, Any]]) -> Iterable[tuple[str, tuple[Any, ...]]]:
    """(output name, every answer's value of it, None where absent), in the first
    answer's key order: one transposition when every answer has its keys in that order
    (a store's answers do), else a lookup per answer and output."""
    first = tuple(answers[0])
    if all(tuple(answer) == first for answer in answers):
        return zip(first, zip(*map(dict.values, answers), strict=True), strict=True)
    outputs = dict.fromkeys(chain.from_iterable(answers))
    return [(name, tuple(answer.get(name) for answer in answers)) for name in outputs]


def _numbers(column: tuple[Any, ...]) -> Sequence[float] | None:
    """An output's published column: numbers as floats (not bools), NaN for other values;
    None when no value is a number (the output is not published). Decided per type."""
    kinds = set(map(type, column))
    if kinds <= _FLOAT:
        return column
    numeric = {kind for kind in kinds if kind in _PLAIN_NUMBERS or _numeric_type(kind)}
    if not numeric:
        return None
    if kinds <= numeric:
        return list(map(float, column))
    return [float(v) if type(v) in numeric else _NAN for v in column]


def _numeric_type(kind: type) -> bool:
    """A type of numbers that is not bool (a published feature value's), such as numpy
    floats: the slow path of the ``kind in _PLAIN_NUMBERS`` test."""
    return issubclass(kind, int | float) and not issubclass(kind, bool)


_UPDATE_TYPES = (Interaction, MFStep, CovisPairs, CatalogChange, ProfileEvent)


def _update_raw(update: ItemUpdate) -> dict[str, Any]:
    """An update as a JSON-ready dict for its dead letter (events as their dicts)."""
    fields = {k: event_to_dict(v) if isinstance(v, Impression | Feedback | Item) else v
              for k, v in update._asdict().items()}
    return {"update": type(update).__name__, **fields}


class ItemShardLogic(StatefulLogic[tuple[Any, ...], dict[str, list[Any]], ItemShard]):
    """Bytewax glue for one item shard: items are ``(shard, updates[, source batch])``."""

    def __init__(self, shard: ItemShard) -> None:
        self.shard = shard

    def on_item(self, value: tuple[Any, ...]) -> tuple[list[dict[str, list[Any]]], bool]:
        out = self.shard.process(*value)
        return ([out] if out else []), StatefulLogic.RETAIN

    def on_eof(self) -> tuple[list[dict[str, list[Any]]], bool]:
        out = self.shard.finish()
        self.shard.store.flush()  # end of input: every table durable before the flow ends
        return ([out] if out else []), StatefulLogic.RETAIN

    def snapshot(self) -> ItemShard:
        return self.shard


def item_shard_key(index: int) -> str:
    """The Bytewax key of item shard ``index`` (``i<index>_<k>``: placed round robin over
    the workers, ``operators.placement``)."""
    return spread_key("i", index)


def route_updates(updates: list[ItemUpdate],
                  item_shard_of: Callable[[str], str]) -> dict[str, list[ItemUpdate]]:
    """Split a batch of updates by item shard key, order kept within each shard; a
    ``CovisPairs`` message is split by the shard of each pair's row item (``_split_pairs``)."""
    buckets: dict[str, list[ItemUpdate]] = {}
    shards: dict[str, str] = {}  # item -> shard key, for this batch's pairs
    for update in updates:
        if type(update) is CovisPairs:
            for key, part in _split_pairs(update, item_shard_of, shards):
                buckets.setdefault(key, []).append(part)
        else:
            buckets.setdefault(item_shard_of(update.item_id), []).append(update)
    return buckets


def _split_pairs(update: CovisPairs, item_shard_of: Callable[[str], str],
                 shards: dict[str, str]) -> list[tuple[str, CovisPairs]]:
    """``update``'s pairs per shard of their row item (order kept), as (shard key,
    message) in the order of each shard's first pair; ``shards`` memoises the keys."""
    parts: dict[str, list[tuple[str, str, float]]] = {}
    get = shards.get
    for pair in update.pairs:
        a = pair[0]
        key = get(a)
        if key is None:
            key = shards[a] = item_shard_of(a)
        part = parts.get(key)
        if part is None:
            parts[key] = [pair]
        else:
            part.append(pair)
    if len(parts) == 1:  # its item_id is its first pair's row item already
        return [(key, update)]
    ts, channel = update.ts, update.channel
    return [(key, CovisPairs(part[0][0], part, ts, channel)) for key, part in parts.items()]
