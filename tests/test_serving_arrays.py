"""Serving on arrays of candidates (operators/candidates.py, state/item_rows.py).

The array path must answer exactly as the per-candidate definitions: a stable sort by
score, a merge keyed by item in retrieval order, and the ranker's scores on the full
feature dicts (River), also after the per-row memos were filled from older item tables,
an older catalog or another index. The world and helpers: tests/serving_world.py.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serving_world import (
    CATEGORY,
    DAY,
    ITEMS,
    SEED,
    T0,
    World,
    ask,
    click,
    feed,
)

from events.model import Item
from models.category_bandit import CategoryLifts, CodedCategories
from operators.candidates import SOURCES, Candidate, MergeScratch, merge, top_indices
from operators.point_in_time import member_mask
from operators.serving import blocked_mask, log1p_retrieved
from operators.trainer import RankerConfig, Trainer
from state.covis_view import CovisView
from state.covisitation import CoVisConfig, CoVisitation
from state.item_rows import ItemRows, dense_codes
from state.item_table import CatalogEntry, ItemTable


@pytest.mark.parametrize("seed", range(8))
def test_blocked_mask_is_the_member_mask(seed: int) -> None:
    """The filter's mask of blocked candidates by rows equals ``member_mask`` by name for
    dicts and sets of few items (some without a row, some not in the pool), for larger
    ones and for other containers."""
    rng = np.random.default_rng(seed)
    names = [f"i{j}" for j in range(400)]
    ids = {name: j for j, name in enumerate(names)}
    rows = rng.choice(300, 120, replace=False).astype(np.int64)
    items = [names[r] for r in rows.tolist()]
    for n in (1, 2, 5, 8, 9, 40):
        picked = [names[j] for j in rng.choice(400, n, replace=False).tolist()] + ["unknown"]
        for blocked in (dict.fromkeys(picked, 1), set(picked), frozenset(picked), tuple(picked)):
            got = blocked_mask(blocked, rows, items, ids)
            assert got.dtype == bool
            assert np.array_equal(got, member_mask(blocked, items))
    assert blocked_mask({items[3]: 0}, rows, items, ids).nonzero()[0].tolist() == [3]


@pytest.mark.parametrize("seed", range(6))
def test_log1p_retrieved_is_log1p_of_the_whole_row_bit_for_bit(seed: int) -> None:
    """log1p of a source's pool row taken only where the source retrieved a candidate (the
    other entries are 0.0) is ``np.log1p`` of the whole row, bit for bit."""
    rng = np.random.default_rng(seed)
    retrieved = rng.random(300) < 0.3
    scores = np.where(retrieved, rng.random(300) * 10.0 ** rng.integers(-3, 4, 300), 0.0)
    scores[retrieved.nonzero()[0][:2]] = 0.0  # retrieved with a score of 0
    got = log1p_retrieved(scores, retrieved)
    assert got.tobytes() == np.log1p(scores).tobytes()


@pytest.mark.parametrize("seed", range(6))
def test_top_indices_is_a_stable_sort_by_score_descending(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randrange(1, 300)
    values = np.array([float(rng.randrange(12)) for _ in range(n)])  # many ties
    for k in (1, 3, 10, n - 1, n, n + 5):
        want = sorted(range(n), key=values.__getitem__, reverse=True)[:max(k, 0)]
        assert top_indices(values, k).tolist() == want


def _partition_top(values: np.ndarray, k: int) -> np.ndarray:
    """``top_indices`` as it was before short arrays were sorted whole (the reference)."""
    n = values.size
    if k < n:
        kth = np.partition(values, n - k)[n - k]
        pick = np.flatnonzero(values >= kth)
    else:
        pick = np.arange(n)
    return pick[np.argsort(-values[pick], kind="stable")][:k]


@pytest.mark.parametrize("seed", range(4))
def test_top_indices_sorting_all_equals_the_partition_path(seed: int) -> None:
    """Short arrays (sorted whole) and long ones (partition first) give the reference's
    positions, ties, signed zeros and NaN included (NaN: the partition path)."""
    rng = np.random.default_rng(seed)
    for n in (1, 7, 300, 511, 512, 513, 2_000):
        values = rng.integers(0, 9, n).astype(np.float64) / 4.0
        values[rng.random(n) < 0.2] = -0.0
        for k in (1, 10, 150, n - 1, n, n + 3):
            if k > 0:
                assert top_indices(values, k).tolist() == _partition_top(values, k).tolist()
        with_nan = values.copy()
        with_nan[rng.integers(0, n, 1 + n // 50)] = np.nan
        for k in (1, 10, n):
            assert top_indices(with_nan, k).tolist() == _partition_top(with_nan, k).tolist()


@pytest.mark.parametrize("spread", [1, 50_000])
@pytest.mark.parametrize("seed", range(6))
def test_merge_is_the_dict_merge_in_retrieval_order(seed: int, spread: int) -> None:
    """Each item once, in order of first retrieval, with every source's score: what
    adding the sources' lists one after the other into a dict by item gives (rows dense,
    and rows spread far over the id space: ``merge``'s scratch array and its sort)."""
    rng = random.Random(seed)
    names = {j * spread: f"i{j}" for j in range(60)}
    parts = []
    for source in SOURCES:
        picked = [j * spread for j in rng.sample(range(60), rng.randrange(0, 25))]
        parts.append((source, np.array(picked, np.int64),
                      np.array([rng.random() for _ in picked])))
    want: dict[str, Candidate] = {}
    for source, rows, scores in parts:
        for r, s in zip(rows.tolist(), scores.tolist(), strict=True):
            c = want.setdefault(names[r], Candidate(names[r]))
            c.sources.append(source)
            c.scores[source] = s
    pool = merge(parts, lambda rows: [names[r] for r in rows.tolist()])
    got = pool.candidates()
    assert [(c.item_id, c.sources, c.scores) for c in got] == \
        [(c.item_id, c.sources, c.scores) for c in want.values()]
    assert pool.items == [names[r] for r in pool.rows.tolist()]


@pytest.mark.parametrize("kept", [0, 1, 2, 17, 40])
def test_pool_take_is_the_per_position_pick(kept: int) -> None:
    """``CandidatePool.take`` by a mask or by indices gives each kept position's row,
    item, scores, categories, attributes and objects in pool order (none, one and many
    kept)."""
    rng = np.random.default_rng(kept)
    n = 40
    parts = [(source, rng.integers(0, 500, 30), rng.random(30)) for source in SOURCES]
    pool = merge(parts, lambda rows: [f"i{r}" for r in rows.tolist()])
    n = len(pool)
    pool.score = rng.random(n)
    pool.category = [f"c{j % 3}" for j in range(n)]
    pool.attrs = [{"k": j} for j in range(n)]
    pool.objs = [Candidate(item) for item in pool.items]
    pool.coded = CodedCategories(rng.integers(0, 4, n), ["a", "b", "c", "d"])
    idx = np.sort(rng.choice(n, min(kept, n), replace=False))
    mask = np.zeros(n, bool)
    mask[idx] = True
    for got in (pool.take(mask), pool.take(idx)):
        assert np.array_equal(got.rows, pool.rows[idx])
        assert got.items == [pool.items[i] for i in idx.tolist()]
        assert np.array_equal(got.scores, pool.scores[:, idx])
        assert np.array_equal(got.has, pool.has[:, idx])
        assert np.array_equal(got.score, pool.score[idx])
        assert got.category == [pool.category[i] for i in idx.tolist()]
        assert got.attrs == [pool.attrs[i] for i in idx.tolist()]
        assert got.objs is not None and all(
            a is pool.objs[i] for a, i in zip(got.objs, idx.tolist(), strict=True))
        assert got.coded is not None
        assert np.array_equal(got.coded.codes, pool.coded.codes[idx])
        assert got.scores.shape == (len(SOURCES), idx.size)


def test_merge_with_reused_scratch_is_merge_without() -> None:
    """``merge`` with the server's ``MergeScratch`` (first appearances without a pass over
    the id space) gives the same pool as without, request after request on one scratch
    (which is left clean: every id back at its mark), as the id space grows."""
    rng = random.Random(3)
    scratch = MergeScratch()
    for request in range(40):
        top = 50 + 400 * request
        parts = []
        for source in SOURCES:
            picked = [rng.randrange(top) for _ in range(rng.randrange(0, 120))]
            parts.append((source, np.array(picked, np.int64),
                          np.array([rng.random() for _ in picked])))
        name = lambda rows: [f"i{r}" for r in rows.tolist()]  # noqa: E731
        a, b = merge(parts, name), merge(parts, name, scratch)
        assert a.items == b.items and np.array_equal(a.rows, b.rows)
        assert np.array_equal(a.scores, b.scores) and np.array_equal(a.has, b.has)
        assert (scratch.earliest == np.iinfo(np.int32).max).all()


def test_item_rows_follow_new_table_versions() -> None:
    """Per-row values equal the current table's dict lookups, after a table is replaced
    and after a shard's table disappears."""
    def table(shard: str, ts: int, pop: float, category: str, available: bool) -> ItemTable:
        return ItemTable(shard, ts, CoVisitation(CoVisConfig()), {"x1": pop, "y1": 2.0},
                         {"x1": pop / 2}, {"x1": CatalogEntry(category, available, 0)})

    space = ItemRows(CovisView(), lambda item: "s" + item[0], min_slots=4)
    rows = space.rows(["x1", "y1", "x2"])
    first = {"sx": table("sx", T0, 10.0, "c1", True)}
    space.sync(first)
    slots = space.fill(rows)
    assert space.pop[slots].tolist() == [10.0, 0.0, 0.0]  # y1 is not in shard sx's table
    assert space.entry[slots].tolist() == [True, False, False]
    assert [space.categories[c] for c in space.category[slots]] == ["c1", None, None]
    second = {"sx": table("sx", T0 + 1, 7.0, "c2", False)}
    space.sync(second)
    slots = space.fill(rows)
    assert space.pop[slots].tolist() == [7.0, 0.0, 0.0]
    assert space.trend[slots].tolist() == [3.5, 0.0, 0.0]
    assert space.available[slots].tolist() == [False, True, True]
    assert [space.categories[c] for c in space.category[slots]] == ["c2", None, None]
    assert space.table_list(space.shard[slots]) == [second["sx"], None, second["sx"]]  # y1: shard sy
    space.sync({})
    slots = space.fill(rows)
    assert space.pop[slots].tolist() == [0.0, 0.0, 0.0] and space.available[slots].all()
    # Slots are bounded: more candidates than min_slots (and 2 x the tables' items) drop
    # every slot, and the values are read again.
    space.sync(second)
    more = space.rows([f"x{j}" for j in range(3, 9)])
    space.fill(more)
    assert space.n_slots == len(more)  # the 3 earlier slots were dropped
    slots = space.fill(rows)
    assert space.pop[slots].tolist() == [7.0, 0.0, 0.0] and space.n_slots == 9


def _ranker_on_item_features(world: World) -> None:
    """A real LR serving copy whose weights cover the item-side features serving builds
    (category from the table, the catalog's brand, popularity, the item id): items of
    category c0 and brand b1 are clicked."""
    trainer = Trainer(RankerConfig(kind="lr", delay_to_labels=False, sync_interval_ms=10**12,
                                   sync_every_examples=10**9, metrics_every_examples=10**9),
                      1.0, world.store)
    rng = random.Random(3)
    examples: list[dict[str, Any]] = []
    for n in range(3000):
        item = rng.choice(ITEMS)
        category, brand = rng.choice(["c0", "c1", "c2", "c3"]), rng.choice(["b0", "b1", "b2"])
        label = int(rng.random() < 0.1 + 0.4 * (category == "c0") + 0.3 * (brand == "b1"))
        examples.append({
            "example_id": f"e{n}", "ts": T0 - DAY + n, "user_id": f"t{n % 7}", "item_id": item,
            "label": label, "weight": 1.0, "position": 0, "context": {},
            "features": {"i:category": category, "i:brand": brand, "pop": rng.uniform(0, 100)}})
    trainer.process(examples)
    trainer.sync()


def _both_paths(shard: Any, monkeypatch: pytest.MonkeyPatch, ts: int) -> tuple[dict[str, float], ...]:
    """Every candidate's score through the array path and through River's dicts."""
    import operators.serving as serving

    fast = ask(shard, "u", ts=ts, k=100, request_id=f"fast{ts}")
    with monkeypatch.context() as m:
        m.setattr(serving, "linear_scorer", lambda ranker: None)
        river = ask(shard, "u", ts=ts, k=100, request_id=f"river{ts}")
    return ({i["item_id"]: i["score"] for i in fast["items"]},
            {i["item_id"]: i["score"] for i in river["items"]})


def test_array_scores_equal_river_after_tables_and_catalog_change(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-row memos (table values, static item terms, catalog attributes) are
    refreshed when a new table version changes an item's category and popularity and
    when an ``item`` event changes its attributes: the array path's scores stay River's."""
    world.publish_tables()
    world.publish_index()
    _ranker_on_item_features(world)
    shard = world.user_shard()
    feed(shard, [Item(T0 - 2 * DAY, item, {"brand": f"b{j % 3}"}) for j, item in enumerate(ITEMS)]
         + [click("u", SEED, T0 - 10_000)])
    target = "a02"  # category c2, brand b2
    assert CATEGORY[target] == "c2"
    fast, river = _both_paths(shard, monkeypatch, T0)
    assert len(fast) > 30 and fast.keys() == river.keys()
    np.testing.assert_allclose([fast[i] for i in river], list(river.values()), atol=2e-6)
    before = fast[target]

    world.popular[target] = 500.0
    world.publish_tables(T0 + 1_000, **{target: {"category": "c0"}})
    fast, river = _both_paths(shard, monkeypatch, T0 + 2_000)
    np.testing.assert_allclose([fast[i] for i in river], list(river.values()), atol=2e-6)
    after_table = fast[target]
    assert after_table > before + 0.05, "the new table's category and popularity count"

    feed(shard, [Item(T0 + 3_000, target, {"brand": "b1"})])
    fast, river = _both_paths(shard, monkeypatch, T0 + 4_000)
    np.testing.assert_allclose([fast[i] for i in river], list(river.values()), atol=2e-6)
    assert fast[target] > after_table + 0.05, "the catalog's new brand counts"

    feed(shard, [Item(T0 + 5_000, target, {"brand": "b1"}, available=False)])
    fast, river = _both_paths(shard, monkeypatch, T0 + 6_000)
    assert target not in fast and target not in river


def test_identity_hooks_answer_as_the_array_path(world: World) -> None:
    """Candidates materialised for hooks (and taken back from them) give the answers the
    array path gives without hooks: same items, order, scores, sources."""
    world.publish_all()
    plain = world.user_shard()
    hooked = world.user_shard(hooks={stage: f"{__name__}:identity"
                                     for stage in ("after_retrieval", "after_scoring",
                                                   "after_ordering")})
    for shard in (plain, hooked):
        feed(shard, [click("u", SEED, T0 - 10_000), click("u", "a01", T0 - 9_000)])
    for k in (5, 10, 30):
        a, b = ask(plain, "u", k=k), ask(hooked, "u", k=k)
        assert a["items"] == b["items"] and len(a["items"]) == k


def identity(request: Any, cands: list[Candidate]) -> list[Candidate]:
    """A hook that changes nothing."""
    return cands


def test_covis_view_ids_stay_bounded_under_item_churn(world: World) -> None:
    """Items churn through the tables (each version replaces 20 popular items by new
    ones): the serving view's id space is started anew once it holds more than
    ``max(min_view_ids, 2 x the loaded tables' items)`` ids, so it stays bounded, while
    a server that never starts anew grows by 20 ids a version; both answer every
    request identically (items, order, scores, sources)."""
    world.publish_index()
    _ranker_on_item_features(world)
    bounded, unbounded = world.user_shard(), world.user_shard()
    for shard in (bounded, unbounded):
        feed(shard, [click("u", SEED, T0 - 10_000), click("u", "a01", T0 - 9_000)])
    assert bounded.server is not None and unbounded.server is not None
    bounded.server.min_view_ids = 64
    unbounded.server.min_view_ids = 10**9
    churn: list[str] = []
    most = 0
    for version in range(15):
        for item in churn:
            del world.popular[item], world.catalog[item]
        churn = [f"z{version:02d}_{j:02d}" for j in range(20)]
        for j, item in enumerate(churn):
            world.popular[item] = 1_000.0 + 50 * version + j  # distinct: no ties
            world.catalog[item] = CatalogEntry(f"c{j % 4}", True, T0 - DAY)
        ts = T0 + version * 1_000
        world.publish_tables(ts - 500)
        for user in ("u", "v"):
            a = ask(bounded, user, ts=ts, k=30)
            b = ask(unbounded, user, ts=ts, k=30)
            assert a["items"] == b["items"] and len(a["items"]) == 30
        assert any(i["item_id"] in churn for i in a["items"])
        most = max(most, len(bounded.server.covis_view.names))
    loaded = sum(len(t.catalog) for t in bounded.server.views.loaded_tables())
    assert bounded.server.view_resets >= 2
    assert most <= max(64, 2 * loaded) + 20 + 30  # the bound, plus one request's new ids
    assert len(unbounded.server.covis_view.names) >= 40 + 15 * 20
    assert unbounded.server.view_resets == 0


@pytest.mark.parametrize("scorer", ["pool", "ranker"])
def test_cross_profiles_are_queried_only_for_the_ranker(
        world: World, monkeypatch: pytest.MonkeyPatch, scorer: str) -> None:
    """The user x category profiles are LR features: a request the pool ranker orders
    alone queries none of them (its features read only the numeric columns); one the
    LR scores queries them (the control)."""
    from operators.point_in_time import PointInTime

    world.publish_tables()
    world.publish_index()
    _ranker_on_item_features(world)
    shard = world.user_shard(scorer=scorer)
    feed(shard, [Item(T0 - DAY, item, {"category": CATEGORY[item]}) for item in ITEMS]
         + [click("u", SEED, T0 - 10_000), click("u", "a31", T0 - 5_000)])
    queried: list[str] = []
    query = PointInTime._cross_queries

    def counting(user_id: str, store: Any, values: list[str], ts_ms: int | None) -> Any:
        queried.extend(values)
        return query(user_id, store, values, ts_ms)

    monkeypatch.setattr(PointInTime, "_cross_queries", staticmethod(counting))
    record = ask(shard, "u", ts=T0, k=10)
    assert len(record["items"]) == 10
    server = shard.server
    assert server is not None and server.served_by[scorer] == 1
    assert (queried == []) == (scorer == "pool")


@pytest.mark.parametrize("seed", range(3))
def test_item_rows_read_loaded_tables_as_the_tables_they_were_saved_from(
        tmp_path: Path, seed: int) -> None:
    """``ItemRows.fill`` on loaded tables (the catalog's columns read as arrays) gives
    the values it reads from the in-process tables entry by entry: presence,
    availability, category (none or empty: code 0), first sighting, popularity and
    trending, across a new version of one shard."""
    rng = random.Random(seed)
    items = [f"{'xy'[j % 2]}{j}" for j in range(60)]

    def table(shard: str, ts: int) -> ItemTable:
        mine = [i for i in items if i[0] == shard[1]]
        return ItemTable(
            shard, ts, CoVisitation(CoVisConfig()),
            {i: rng.uniform(0, 9) for i in mine if rng.random() < 0.7},
            {i: rng.uniform(0, 3) for i in mine if rng.random() < 0.5},
            {i: CatalogEntry(rng.choice(["c1", "c2", None, ""]), rng.random() < 0.8,
                             T0 - rng.randrange(10**9)) for i in mine if rng.random() < 0.8})

    def loaded(t: ItemTable) -> ItemTable:
        path = tmp_path / f"{t.shard}-{t.ts}.npz"
        t.save(path)
        return ItemTable.load(path)

    def values(space: ItemRows, slots: np.ndarray) -> list[Any]:
        return [space.entry[slots].tolist(), space.available[slots].tolist(),
                [space.categories[c] or None for c in space.category[slots].tolist()],
                space.first_seen[slots].tolist(), space.pop[slots].tolist(),
                space.trend[slots].tolist()]

    plain = {"sx": table("sx", T0), "sy": table("sy", T0)}
    spaces = [ItemRows(CovisView(), lambda item: "s" + item[0]) for _ in range(2)]
    for version in range(2):
        if version:
            plain["sy"] = table("sy", T0 + 1)
        maps = [dict(plain), {shard: loaded(t) for shard, t in plain.items()}]
        pool = rng.sample(items, 40) + ["z-unknown"]
        got = []
        for space, table_map in zip(spaces, maps, strict=True):
            space.sync(table_map)
            got.append(values(space, space.fill(space.rows(pool))))
        assert got[0] == got[1] and any(got[0][0]) and not all(got[0][1])


def _pool_ranker_shard(world: World) -> Any:
    """A shard whose pool ranker orders every request (``scorer = pool``), its user "u"
    with two organic positives, the tables, index and an LR copy on item features."""
    world.publish_tables()
    world.publish_index()
    _ranker_on_item_features(world)
    shard = world.user_shard(scorer="pool")
    feed(shard, [Item(T0 - DAY, item, {"category": CATEGORY[item]}) for item in ITEMS]
         + [click("u", SEED, T0 - 10_000), click("u", "a31", T0 - 5_000)])
    return shard


def test_pool_features_reuse_retrievals_channel_parts_bit_for_bit(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cov_liked`` / ``cov_any`` of the pool ranker read the channel parts retrieval
    computed for the blend (``SparseScores.normalized``): the same matrix, bit for bit,
    as computing them again from the raw sums."""
    import copy

    import operators.serving as serving

    shard = _pool_ranker_shard(world)
    real = serving.pool_matrix
    checked: list[int] = []

    def both(names: list[str], *args: Any, **kwargs: Any) -> np.ndarray:
        covis = args[7]
        assert any(s.normalized is not None for s in covis.values())
        fresh = {k: copy.copy(s) for k, s in covis.items()}
        for s in fresh.values():
            s.normalized = None
        again = real(names, *args[:7], fresh, *args[8:], **kwargs)
        got = real(names, *args, **kwargs)
        assert {"cov_liked", "cov_any"} & set(names)
        assert np.array_equal(got, again)
        checked.append(len(got))
        return got

    monkeypatch.setattr(serving, "pool_matrix", both)
    for ts in (T0, T0 + 60_000):
        assert len(ask(shard, "u", ts=ts, k=10)["items"]) == 10
    assert checked


def test_pool_features_of_the_numeric_columns_alone_are_the_full_columns_bit_for_bit(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request the LR ranker does not score: the pool ranker's matrix from the numeric
    columns alone (``item_columns(numeric_only=True)``: no tables, attributes or channel
    sums) and the slots the filter gave the pool (``Server._pool_scores``) is the matrix
    from the full columns with every slot looked up again, bit for bit; the numeric
    columns are the full ones but the channel sums it does not read."""
    import operators.serving as serving

    shard = _pool_ranker_shard(world)
    real = serving.pool_matrix
    checked: list[int] = []

    def both(names: list[str], context: Any, view: Any, alpha: float, ctx: Any,
             items: list[str], blend: np.ndarray, ts: int, covis: Any, *args: Any,
             **kwargs: Any) -> np.ndarray:
        assert kwargs["numeric"] is None  # the LR did not score
        assert "age" in names and "pop" in names
        rows, space, given = kwargs["rows"], kwargs["space"], kwargs["slots"]
        assert given is not None and given.dtype == np.intp
        full = context.item_columns(ctx, items, ts, covis, attrs=kwargs.get("attrs"), rows=rows,
                                    space=space)
        alone = context.item_columns(ctx, items, ts, covis, attrs=kwargs.get("attrs"), rows=rows,
                                     space=space, slots=given, numeric_only=True)
        assert np.array_equal(given, full.slots) and alone.slots is given
        assert set(alone.numeric) == set(full.numeric) - {"covis", "covis_any"}
        assert all(np.array_equal(v, full.numeric[k]) for k, v in alone.numeric.items())
        again = real(names, context, view, alpha, ctx, items, blend, ts, covis, *args,
                     **{**kwargs, "numeric": full.numeric, "slots": None})
        got = real(names, context, view, alpha, ctx, items, blend, ts, covis, *args, **kwargs)
        assert np.array_equal(got, again)
        checked.append(len(got))
        return got

    monkeypatch.setattr(serving, "pool_matrix", both)
    for ts in (T0, T0 + 60_000, T0 + 3 * DAY):
        assert len(ask(shard, "u", ts=ts, k=10)["items"]) == 10
    assert len(checked) == 3


@pytest.mark.parametrize("seed", range(3))
def test_profile_values_read_each_items_current_table_as_its_feature_dict(
        tmp_path: Path, seed: int) -> None:
    """``ItemRows.profile_values`` (category sampling's ``item_rate`` counts) gives what
    ``table.features[item].get(name, 0.0)`` reads in each candidate's current table (0.0
    without a profile, a value or a table), for in-process and loaded tables, and reads
    the new version after a shard's table is replaced (the per-table memo is the
    version's, never the shard's)."""
    rng = random.Random(seed)
    items = [f"{'xy'[j % 2]}{j}" for j in range(60)]
    names = ("item.clicks.1d", "item.impressions.1d")

    def table(shard: str, ts: int) -> ItemTable:
        mine = [i for i in items if i[0] == shard[1]]
        features = {i: {n: float(rng.randrange(50)) for n in names + ("other",)
                        if rng.random() < 0.8} for i in mine if rng.random() < 0.7}
        return ItemTable(shard, ts, CoVisitation(CoVisConfig()), features=features)

    def loaded(t: ItemTable) -> ItemTable:
        path = tmp_path / f"{t.shard}-{t.ts}.npz"
        t.save(path)
        return ItemTable.load(path)

    def expected(table_map: dict[str, ItemTable], pool: list[str]) -> list[list[float]]:
        found = [(t.features.get(i) if (t := table_map.get("s" + i[0])) else None) or {}
                 for i in pool]
        return [[f.get(n, 0.0) for f in found] for n in names]

    plain = {"sx": table("sx", T0), "sy": table("sy", T0)}
    space = ItemRows(CovisView(), lambda item: "s" + item[0])
    for version in range(3):
        if version == 1:
            plain["sy"] = table("sy", T0 + 1)
        if version == 2:
            del plain["sx"]
        for table_map in (dict(plain), {shard: loaded(t) for shard, t in plain.items()}):
            pool = rng.sample(items, 40) + ["z-unknown"]
            rows = space.rows(pool)
            space.sync(table_map)
            got = space.profile_values(space.fill(rows), rows, names)
            assert got.tolist() == expected(table_map, pool)
            assert got.any()


@pytest.mark.parametrize("seed", range(3))
def test_profile_values_kept_per_slot_equal_a_fresh_read(tmp_path: Path, seed: int) -> None:
    """``profile_values`` keeps each slot's column in the tables' side-by-side matrix
    (serve14): pools read again and again (overlapping, new items, repeats) within one
    set of tables, across replaced tables and across slot drops (a small slot bound)
    give what a fresh ``ItemRows`` reads for the same pool."""
    rng = random.Random(seed)
    items = [f"{'xy'[j % 2]}{j}" for j in range(80)]
    names = ("item.clicks.1d", "item.impressions.1d")

    def table(shard: str, ts: int) -> ItemTable:
        mine = [i for i in items if i[0] == shard[1]]
        features = {i: {n: float(rng.randrange(50)) for n in names if rng.random() < 0.8}
                    for i in mine if rng.random() < 0.7}
        t = ItemTable(shard, ts, CoVisitation(CoVisConfig()), features=features)
        path = tmp_path / f"{shard}-{ts}.npz"
        t.save(path)
        return ItemTable.load(path)

    tables = {"sx": table("sx", T0), "sy": table("sy", T0)}
    space = ItemRows(CovisView(), lambda item: "s" + item[0], min_slots=48)
    for step in range(12):
        if step % 4 == 3:
            shard = rng.choice(["sx", "sy"])
            tables = {**tables, shard: table(shard, T0 + step)}
        pool = rng.sample(items, 30) + rng.sample(items, 5)
        rows = space.rows(pool)
        space.sync(tables)
        got = space.profile_values(space.fill(rows), rows, names)
        fresh = ItemRows(CovisView(), lambda item: "s" + item[0])
        fresh_rows = fresh.rows(pool)
        fresh.sync(tables)
        want = fresh.profile_values(fresh.fill(fresh_rows), fresh_rows, names)
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_dense_codes_are_np_unique_without_the_no_value_code(seed: int) -> None:
    """``dense_codes`` (the cross profiles' attribute value codes of a pool) gives what
    ``np.unique(codes, return_inverse=True)`` gives with the code -1 (no value) left out
    of the distinct codes and kept as -1: empty, all -1, none -1, gaps."""
    rng = np.random.default_rng(seed)
    cases = [np.zeros(0, np.int64), np.full(7, -1, np.int64), rng.integers(0, 5, 40),
             rng.integers(-1, 30, 200), rng.choice([-1, 3, 17, 250], 90)]
    for codes in cases:
        uniq, inverse = np.unique(codes, return_inverse=True)
        inverse = inverse.reshape(-1)
        if uniq.size and uniq[0] < 0:
            uniq, inverse = uniq[1:], inverse - 1
        got_uniq, got = dense_codes(codes)
        assert got_uniq.tolist() == uniq.tolist() and got.tolist() == inverse.tolist()
        assert got.dtype == np.int64 and got_uniq.dtype == np.int64


@pytest.mark.parametrize("seed", range(3))
def test_category_lifts_of_coded_pools_equal_the_attribute_reads(seed: int) -> None:
    """``CategoryLifts.of`` with the pool's ``ItemRows.value_codes("category", ...)``
    (serving's array path) gives each item the lift its attributes give: string categories known
    and unknown to the lifts, a number (its ``str``), no category, no attributes."""
    rng = random.Random(seed)
    lifts = CategoryLifts({"c0": 0.5, "c1": 2.0, "7": 3.0, "": 0.25})
    choices: list[dict[str, Any] | None] = [
        {"category": "c0"}, {"category": "c1"}, {"category": "c9"}, {"category": 7},
        {"category": 7.5}, {"genre": "x"}, {"category": None}, None]
    items = [f"i{j}" for j in range(60)]
    space = ItemRows(CovisView(), lambda item: "s0")
    for _ in range(4):
        pool = rng.sample(items, 25)
        attrs = [rng.choice(choices) for _ in pool]
        slots = space.fill(space.rows(pool))
        space.fill_attrs(slots, attrs, ("category",), lambda a: False)
        got = lifts.of(attrs, space.value_codes("category", slots))
        assert got.dtype == np.float64
        assert got.tolist() == lifts.of(attrs).tolist()
        assert got.tolist() == [lifts.by_key.get(
            "" if a is None or a.get("category") is None else str(a["category"]), 1.0)
            for a in attrs]
