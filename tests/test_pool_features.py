"""The pool ranker's features (operators/pool_features.py) on published item tables."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from operators.point_in_time import PointInTime
from operators.pool_features import _long_liked
from state import covis_view
from state.covis_view import CovisView
from state.covisitation import CoVisConfig, CoVisitation
from state.item_table import ItemTable

T = 1_700_000_000_000
ITEMS = [f"i{j}" for j in range(80)]


def shard_of(item: str) -> str:
    return f"s{sum(map(ord, item)) % 2}"


def tables(seed: int, tmp: Path | None) -> dict[str, ItemTable]:
    """Two shards' tables with random co-visitation rows (loaded from files when ``tmp``)."""
    rng = random.Random(seed)
    out = {}
    for shard in ("s0", "s1"):
        covis = CoVisitation(CoVisConfig(max_neighbors=12, half_life_ms=3_600_000))
        mine = [i for i in ITEMS if shard_of(i) == shard]
        pairs = [(a, b, float(rng.choice([1, 2, 3, 0.5]))) for a in mine
                 for b in rng.sample(ITEMS + ["unseen-x", "unseen-y"], 15) if a != b]
        covis.add(pairs, T - rng.randrange(1, 10**6))
        table = ItemTable(shard, T - 1_000, covis,
                          liked_counts={i: float(rng.randrange(1, 9)) for i in mine})
        if tmp is not None:
            path = tmp / f"{shard}-{seed}.npz"
            table.save(path)
            table = ItemTable.load(path)
        out[shard] = table
    return out


@pytest.mark.parametrize(("seed", "loaded"), [(0, True), (1, True), (2, False)])
def test_long_liked_equals_the_row_by_row_sums_and_adds_no_ids(
        tmp_path: Path, seed: int, loaded: bool) -> None:
    rng = random.Random(seed)
    table_map = tables(seed, tmp_path if loaded else None)
    view = CovisView()
    view.sync(table_map)
    pool = rng.sample(ITEMS, 50)
    ids = view.intern(pool)
    seeds = rng.sample(ITEMS, 30) + ["not-an-item"]
    context = SimpleNamespace(
        views=SimpleNamespace(table_map=lambda: table_map), item_shard_of=shard_of,
        liked=SimpleNamespace(recent=lambda user, n: seeds[:n]),
        covis=SimpleNamespace(decay=0.8))
    ts = T + 5_000
    n_ids = len(view.names)
    got = _long_liked(context, view, SimpleNamespace(user_id="u"), ids, ts, 0.5, 100)
    assert len(view.names) == n_ids, "the view got new ids"
    counts = np.array([view.counts["liked"][view.ids[s]] if s in view.ids else 0.0
                       for s in seeds])
    ref = np.asarray(PointInTime._covis_lookup(
        context, seeds, "liked", pool, table_map, ts, (1.0 / np.maximum(counts, 1.0)).tolist()))
    ref = ref / np.maximum(view.counts["liked"][ids], 1.0) ** 0.5
    ref = ref / ref.max()
    assert ref.max() > 0 and np.array_equal(got, ref)


@pytest.mark.parametrize(("seed", "eager"), [(0, True), (1, True), (2, False), (3, False)])
def test_view_reads_loaded_tables_as_the_tables_they_were_saved_from(
        tmp_path: Path, seed: int, eager: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``CovisView`` on loaded (CSR) tables: the same ids in the same order, the same
    channel sums bit for bit, request after request, as on the in-process tables (ids of
    a table's items looked up all at once, or as rows are read)."""
    monkeypatch.setattr(covis_view, "_EAGER_VOCAB", 10_000 if eager else 0)
    rng = random.Random(seed)
    views = []
    for loaded in (False, True):
        view = CovisView()
        view.sync(tables(seed, tmp_path if loaded else None))
        views.append((view, tables(seed, tmp_path if loaded else None)))
    for _ in range(6):
        seeds = rng.sample(ITEMS, 20) + ["not-an-item", "unseen-x"]
        weights = np.array([rng.random() for _ in seeds])
        got = []
        for view, table_map in views:
            view.sync(table_map)
            got.append((view.channel_sums("liked", seeds, weights, table_map, shard_of, T),
                        list(view.names)))
        (ids0, sums0), names0 = got[0]
        (ids1, sums1), names1 = got[1]
        assert names0 == names1
        assert np.array_equal(ids0, ids1) and np.array_equal(sums0, sums1) and ids0.size


def test_age_from_the_serving_rows_equals_the_catalog_lookups(tmp_path: Path) -> None:
    """``_age_days`` through ``ItemRows`` (the pool's rows): the per-item catalog numbers."""
    from operators.pool_features import _age_days
    from state.item_rows import ItemRows
    from state.item_table import CatalogEntry

    table_map = tables(5, None)
    rng = random.Random(5)
    for item in ITEMS[:60]:
        table_map[shard_of(item)].catalog[item] = CatalogEntry(
            "c", True, T - rng.randrange(-3_600_000, 400 * 86_400_000))
    for shard, table in table_map.items():  # as serving reads them: loaded from files
        table.save(tmp_path / f"{shard}.npz")
        table_map[shard] = ItemTable.load(tmp_path / f"{shard}.npz")
    view = CovisView()
    view.sync(table_map)
    space = ItemRows(view, shard_of)
    pool = rng.sample(ITEMS, 70)  # some without a catalog entry
    rows = view.intern(pool)
    context = SimpleNamespace(views=SimpleNamespace(table_map=lambda: table_map),
                              item_shard_of=shard_of)
    ref = _age_days(context, pool, T)
    got = _age_days(context, pool, T, rows, space)
    assert np.array_equal(got, ref) and (ref > 0).sum() >= 40 and (ref == 0).any()


def test_loaded_catalog_reads_as_the_saved_one_and_builds_no_entries(tmp_path: Path) -> None:
    """A loaded table's catalog (``FrozenCatalog``): the same entries, order and length
    as the table it was saved from, with no object per item made at load."""
    from state.item_table import CatalogEntry, FrozenCatalog, catalog_category

    table = tables(6, None)["s0"]
    rng = random.Random(6)
    for item in ITEMS:
        table.catalog[item] = CatalogEntry(rng.choice(["c1", "c2", None]), rng.random() < 0.9,
                                           T - rng.randrange(10**9))
    table.save(tmp_path / "t.npz")
    loaded = ItemTable.load(tmp_path / "t.npz")
    assert isinstance(loaded.catalog, FrozenCatalog)
    assert not any(isinstance(v, CatalogEntry) for v in vars(loaded.catalog).values())
    assert list(loaded.catalog.items()) == list(table.catalog.items())
    assert len(loaded.catalog) == len(table.catalog) and "i3" in loaded.catalog
    assert loaded.catalog.get("absent") is None and loaded.catalog.get("i3") == table.catalog["i3"]
    for catalog in (loaded.catalog, table.catalog):  # us15: the category without an entry
        assert [catalog_category(catalog, item) for item in [*ITEMS, "absent"]] == [
            table.catalog[item].category for item in ITEMS] + [None]


def _context(table_map: dict[str, ItemTable], seeds: list[str]) -> SimpleNamespace:
    return SimpleNamespace(views=SimpleNamespace(table_map=lambda: table_map),
                           item_shard_of=shard_of,
                           liked=SimpleNamespace(recent=lambda user, n: seeds[:n]),
                           covis=SimpleNamespace(decay=0.8))


def test_last_liked_reads_the_newest_positive_only() -> None:
    """``last_liked``: the long-term profile's sums over the newest positive alone (the
    sequence's last step), not over the ``long_items`` newest."""
    from operators.pool_features import pool_matrix

    table_map = tables(7, None)
    view = CovisView()
    view.sync(table_map)
    rng = random.Random(7)
    pool = rng.sample(ITEMS, 60)
    seeds = rng.sample(ITEMS, 20)
    context = _context(table_map, seeds)
    ctx = SimpleNamespace(user_id="u", consumed={})
    x = pool_matrix(["blend", "last_liked", "long_liked"], context, view, 0.5, ctx, pool,
                    np.zeros(len(pool)), T + 5_000, None, None, 100)
    ids = np.array([view.ids[i] for i in pool])
    newest = _long_liked(_context(table_map, seeds[:1]), view, ctx, ids, T + 5_000, 0.5, 100)
    assert newest.max() == 1.0 and np.array_equal(x[:, 1], newest)
    assert not np.array_equal(x[:, 1], x[:, 2])  # the long-term profile differs


def test_views_of_one_loaded_table_share_its_rows(tmp_path: Path) -> None:
    """Two co-visitation views (two user shards) over the same loaded tables read each
    row's decayed arrays from one computation on the table (``stored_row`` in
    ``table.memo``), each in its own id space, with the neighbours and weights of the
    table's own rows (``covis_row_arrays``). A row whose neighbours all have ids comes in
    its stored order (no sort); a row with neighbours new to the view gives them ids
    strongest first (the order ``covis_row_arrays`` has), as before the stored order was
    kept: ids break the blend's ties."""
    table_map = tables(7, tmp_path)
    first, second = CovisView(), CovisView()
    first.sync(table_map)
    second.sync(table_map)
    second.intern(["unseen-y", "unseen-x", *reversed(ITEMS)])  # every neighbour has an id
    for item in ITEMS:
        table = table_map[shard_of(item)]
        names, weights = table.covis_row_arrays("liked", item)
        want = sorted(zip(names, np.asarray(weights).tolist(), strict=True))
        for view in (first, second):
            ids, w = view.row(table, "liked", item)
            assert sorted(zip([view.names[i] for i in ids.tolist()], w.tolist(),
                              strict=True)) == want
        if names:
            shared = table.memo[("covis_stored", "liked")][item]
            assert second.row(table, "liked", item)[1] is shared[1]  # one computation
    fresh = CovisView()  # no ids yet: every row read names new neighbours
    for item in ITEMS:
        table = table_map[shard_of(item)]
        names, _ = table.covis_row_arrays("liked", item)
        known = set(fresh.ids)
        before = len(fresh.names)
        ids, _ = fresh.row(table, "liked", item)
        got = [fresh.names[i] for i in ids.tolist()]
        if known.issuperset(names):
            assert sorted(got) == sorted(names) and len(fresh.names) == before
        else:
            assert got == names  # strongest first
            assert fresh.names[before:] == [n for n in names if n not in known]


@pytest.mark.parametrize(("seed", "loaded", "intern"),
                         [(0, True, True), (1, True, False), (2, False, True), (3, False, False)])
def test_gather_seeds_is_the_seed_by_seed_gather_bit_for_bit(
        tmp_path: Path, seed: int, loaded: bool, intern: bool) -> None:
    """``CovisView.gather_seeds`` (serving's per-request path: rows cached by seed, one
    concatenation and product) gives the seed-by-seed rows times their weights: the same
    ids handed out in the same order and the same arrays bit for bit, request after request,
    across a new table version of one shard, with seeds whose shard has no table, seeds
    without a row and repeated seeds."""
    rng = random.Random(seed)
    first = tables(seed, tmp_path if loaded else None)
    newer = tables(seed + 10, tmp_path if loaded else None)
    views = [CovisView(), CovisView()]
    for request in range(8):
        table_map = dict(first)
        if request >= 4:  # shard s1 moves to a new version
            table_map["s1"] = newer["s1"]
        if request == 6:  # and s0 has no table for one request
            del table_map["s0"]
        seeds = rng.sample(ITEMS, 25) + ["not-an-item", "unseen-x"] + rng.sample(ITEMS, 3)
        weights = np.array([rng.random() for _ in seeds])
        ts = T + rng.randrange(10**7)
        got = []
        for k, view in enumerate(views):
            view.sync(table_map)
            if k == 0:  # the reference: seed by seed
                get_row = view.row if intern else view._known_row
                parts = [(get_row(table_map[shard_of(s)], "liked", s),
                          w * table_map[shard_of(s)].covis_factor(ts))
                         for s, w in zip(seeds, weights.tolist(), strict=True)
                         if shard_of(s) in table_map]
                out = (np.concatenate([row[0] for row, _ in parts]),
                       np.concatenate([row[1] * w for row, w in parts]))
            else:
                out = view.gather_seeds("liked", seeds, weights, table_map, shard_of, ts,
                                        intern=intern)
            got.append((out, list(view.names)))
        ((ids0, w0), names0), ((ids1, w1), names1) = got
        assert names0 == names1
        assert ids0.size and np.array_equal(ids0, ids1) and np.array_equal(w0, w1)


@pytest.mark.parametrize(("seed", "counts"), [(0, (100, 1)), (1, (7, 2, 30)), (2, (1,))])
def test_liked_knn_of_several_seed_counts_is_each_counts_row_by_row_sums(
        tmp_path: Path, seed: int, counts: tuple[int, ...]) -> None:
    """``long_liked`` and ``last_liked`` from one gather (``_liked_knn``: the newest k
    seeds' rows are a prefix of it) equal the reference sums of each seed count alone."""
    from operators.pool_features import _liked_knn

    rng = random.Random(seed)
    table_map = tables(seed, tmp_path)
    view = CovisView()
    view.sync(table_map)
    pool = rng.sample(ITEMS, 50)
    ids = view.intern(pool)
    seeds = ["not-an-item"] + rng.sample(ITEMS, 30)  # the newest has no table row
    context = SimpleNamespace(
        views=SimpleNamespace(table_map=lambda: table_map), item_shard_of=shard_of,
        liked=SimpleNamespace(recent=lambda user, n: seeds[:n]),
        covis=SimpleNamespace(decay=0.8))
    ts = T + 5_000
    got = _liked_knn(context, view, SimpleNamespace(user_id="u"), ids, ts, 0.5, counts)
    for count, vec in zip(counts, got, strict=True):
        mine = seeds[:count]
        w = [1.0 / max(view.counts["liked"][view.ids[s]] if s in view.ids else 0.0, 1.0)
             for s in mine]
        ref = np.asarray(PointInTime._covis_lookup(context, mine, "liked", pool, table_map, ts, w))
        ref = ref / np.maximum(view.counts["liked"][ids], 1.0) ** 0.5
        ref = ref / ref.max() if ref.max() > 0 else np.zeros(len(pool))
        assert np.array_equal(vec, ref), count
    assert any(v.max() > 0 for v in got) or counts == (1,)


@pytest.mark.parametrize(("seed", "loaded"), [(0, True), (1, False)])
def test_gather_after_a_gather_without_new_ids_is_the_row_by_row_gather(
        tmp_path: Path, seed: int, loaded: bool) -> None:
    """A seed's row read without new ids (``long_liked``: ``intern=False``) that left no
    neighbour out is cached as the seed's whole row; a later gather with new ids
    (retrieval) reads it and still gives ``row``'s ids and weights bit for bit, and hands
    out new ids in the same order, across a new table version."""
    rng = random.Random(seed)
    first = tables(seed, tmp_path if loaded else None)
    newer = tables(seed + 10, tmp_path if loaded else None)
    ref, view = CovisView(), CovisView()
    complete = 0
    for request in range(10):
        table_map = dict(first)
        if request >= 5:
            table_map["s1"] = newer["s1"]
        ts = T + rng.randrange(10**7)
        long_seeds = rng.sample(ITEMS, 30)
        seeds = rng.sample(long_seeds, 10) + rng.sample(ITEMS, 10)
        for v in (ref, view):
            v.sync(table_map)
        weights = np.ones(len(long_seeds))
        view.gather_seeds("liked", long_seeds, weights, table_map, shard_of, ts, intern=False)
        complete += sum(len(v) for v in view._by_seed.values())
        w = np.array([rng.random() for _ in seeds])
        parts = [(ref.row(table_map[shard_of(s)], "liked", s),
                  x * table_map[shard_of(s)].covis_factor(ts))
                 for s, x in zip(seeds, w.tolist(), strict=True) if shard_of(s) in table_map]
        want = (np.concatenate([row[0] for row, _ in parts]),
                np.concatenate([row[1] * x for row, x in parts]))
        ids, got_w = view.gather_seeds("liked", seeds, w, table_map, shard_of, ts)
        assert ref.names == view.names
        assert np.array_equal(ids, want[0]) and np.array_equal(got_w, want[1])
    assert complete  # some rows read without new ids were whole rows
