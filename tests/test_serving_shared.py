"""Per-version work done once per process and kept exact (issue 18 point 2, serve7):
``set_memo`` (values of a set of loaded tables shared by the user shards), the category
source's rows (``CategoryItems.rows``), the slots' feature rows (``ItemRows.feat_row``),
and snapshot loading (``state/npz.load_npz``, ``FrozenFeatures``). Every cache here is
checked against the value computed from scratch after what invalidates it."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import numpy as np
import pytest
from serving_world import T0
from test_category_items import RATE, table
from test_serving_fast import _reference_retrieve, _server, _table

from models.category_bandit import CategoryExploreConfig
from operators.category_items import CategoryItems, merge_categories, table_categories
from operators.point_in_time import (
    UserContext,
    shared_capture,
    static_features_of,
    static_item_features,
    table_capture,
)
from state.covis_view import CovisView
from state.covisitation import CoVisConfig, CoVisitation
from state.item_rows import ItemRows, table_columns
from state.item_table import FrozenFeatures, ItemTable, row_profile, set_memo
from state.npz import load_npz


def test_set_memo_is_one_value_per_sequence_of_table_versions() -> None:
    """The same sequence of table objects gets the value made once; a new version of any
    table, another order or a shorter sequence makes it again (never another set's)."""
    a, b, c = (ItemTable(s, T0, CoVisitation(CoVisConfig())) for s in ("i0", "i1", "i2"))
    made: list[tuple[str, ...]] = []

    def make(tables: list[ItemTable]):
        made.append(tuple(t.shard for t in tables))
        return object()

    first = set_memo([a, b, c], "k", lambda: make([a, b, c]))
    assert set_memo([a, b, c], "k", lambda: make([a, b, c])) is first
    assert len(made) == 1
    b2 = ItemTable("i1", T0 + 1, CoVisitation(CoVisConfig()))  # a new version of shard i1
    assert set_memo([a, b2, c], "k", lambda: make([a, b2, c])) is not first
    assert set_memo([a, c, b2], "k", lambda: make([a, c, b2])) is not first
    assert set_memo([a, c], "k", lambda: make([a, c])) is not first
    assert len(made) == 4
    assert set_memo([a, c], "other", lambda: make([a, c])) is not None and len(made) == 5


def test_top_lists_are_shared_by_the_shards_and_follow_each_shards_versions() -> None:
    """Two user shards of a process on the same tables share one merged top list; a shard
    that sees a new version of one table gets that version's list (the reference sort
    of every table's items), while the other shard keeps serving its own tables' list."""
    rng = random.Random(3)
    tables = []
    for s in range(3):
        items = [f"x{s}-{n}" for n in range(80)]
        tables.append(_table(f"i00{s}", {i: float(rng.randrange(40)) for i in items},
                             {i: float(rng.randrange(9)) for i in items}))
    sources = {"trending": 20, "popular": 15}
    one, two = _server(tables, sources), _server(tables, sources)
    assert one._top_cached(tables, "popular", 15)[1] is two._top_cached(tables, "popular", 15)[1]
    newer = list(tables)
    newer[1] = _table("i001", {f"x1-{n}": float(rng.randrange(40)) for n in range(80)}, {})
    two.views.tables["i001"].current = newer[1]
    ctx = UserContext("u", [], {}, None, {})
    for server, current in ((two, newer), (one, tables), (two, newer), (one, tables)):
        got = server.retrieve(ctx, T0)[0]
        want = _reference_retrieve(current, sources, 0)
        assert [(c.item_id, c.sources, c.scores) for c in got.values()] == want


def test_category_rows_follow_new_lists_and_new_id_spaces() -> None:
    """``CategoryItems.rows`` are the category's items' rows in the given space for the
    current lists: after new tables (new lists) and in a new id space they are the new
    items' rows, never the cached ones."""
    config = CategoryExploreConfig(retrieve_per_category=3)
    finder = CategoryItems(config)
    v1 = [table("i000", {"x1": ("a", 20.0, 100.0), "x2": ("a", 2.0, 100.0)})]
    v2 = [table("i000", {"y1": ("a", 30.0, 100.0), "x1": ("a", 1.0, 100.0)})]
    space = ItemRows(CovisView(), lambda item: "i000")
    for tables in (v1, v2, v1):
        lists = finder.lists(tables)
        assert space.names(finder.rows("a", space)) == lists["a"].items
    other = ItemRows(CovisView(), lambda item: "i000")
    other.rows(["unrelated", "ids", "first"])  # the same items have other ids here
    rows = finder.rows("a", other)
    assert other.names(rows) == finder.lists(v1)["a"].items
    assert rows.tolist() != finder.rows("a", space).tolist()


def test_category_lists_are_shared_by_the_shards_of_a_process() -> None:
    """Two shards' finders on the same tables hold one merged list object, the merge of
    the tables' lists; another set of tables gets its own."""
    config = CategoryExploreConfig(retrieve_per_category=2)
    one = table("i000", {"x1": ("a", 20.0, 100.0), "x2": ("a", 2.0, 100.0)})
    two = table("i001", {"y1": ("a", 30.0, 100.0), "y2": ("b", 1.0, 100.0)})
    three = table("i001", {"y1": ("b", 30.0, 100.0)})
    a, b = CategoryItems(config), CategoryItems(config)
    assert a.lists([one, two]) is b.lists([one, two])
    want = merge_categories([table_categories(t, config) for t in (one, three)], config)
    got = b.lists([one, three])
    assert {k: v.items for k, v in got.items()} == {k: v.items for k, v in want.items()}
    assert a.lists([one, two]) is not got


def test_profile_values_read_a_refilled_slots_new_feature_row(tmp_path: Path) -> None:
    """A slot's feature row is looked up again after its table is replaced: the new
    version lists the items' profiles in another order, and the values read are the new
    version's (a stale row would read another item's)."""
    items = [f"x{j}" for j in range(40)]
    space = ItemRows(CovisView(), lambda item: "s")
    rows = space.rows(items)
    for version, order in enumerate((items, items[::-1], items[5:] + items[:5])):
        features = {i: dict(zip(RATE, (float(version), float(j)), strict=True))
                    for j, i in enumerate(order)}
        t = ItemTable("s", T0 + version, CoVisitation(CoVisConfig()), features=features)
        t.save(tmp_path / f"v{version}.npz")
        loaded = ItemTable.load(tmp_path / f"v{version}.npz")
        for current in ((loaded, t) if version % 2 == 0 else (t, loaded)):  # both refills
            space.sync({"s": current})
            got = space.profile_values(space.fill(rows), rows, RATE)
            assert got.tolist() == [[features[i][n] for i in items] for n in RATE]


def test_load_npz_gives_what_np_load_gives(tmp_path: Path) -> None:
    """Every dtype and shape the snapshots use (and a Fortran-ordered, an empty, a 0-d
    and a string array), writable; a compressed file goes through ``np.load``."""
    rng = np.random.default_rng(0)
    arrays = {
        "f": rng.random(17), "nan": np.array([1.0, np.nan, 3.0]), "i": np.arange(5, dtype=np.int32),
        "u8": np.frombuffer(b"abc\xff", np.uint8), "b": np.array([True, False]),
        "s": np.asarray(["a", "\u00e9t\u00e9", ""], dtype=np.str_), "scalar": np.asarray(7, np.int64),
        "empty": np.zeros(0), "m": rng.random((3, 4)), "fortran": np.asfortranarray(rng.random((3, 2))),
        "u64": np.array([2**63 + 5], np.uint64),
    }
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        with path.open("wb") as f:
            save(f, **arrays)
        got = load_npz(path)
        with np.load(path, allow_pickle=False) as z:
            assert got.files == z.files
            for name in z.files:
                want = z[name]
                assert got[name].dtype == want.dtype and got[name].shape == want.shape
                assert np.array_equal(got[name], want, equal_nan=want.dtype.kind == "f")
                assert got[name].flags.writeable
                assert got[name].flags.f_contiguous == want.flags.f_contiguous


def test_load_npz_reads_only_the_named_members(tmp_path: Path) -> None:
    """``names``: those members only, equal to the full read's (both read paths)."""
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        with path.open("wb") as f:
            save(f, a=np.arange(4), b=np.ones(3), c=np.asarray(["x"], dtype=np.str_))
        got = load_npz(path, {"a", "c", "absent"})
        assert got.files == ["a", "c"]
        assert np.array_equal(got["a"], np.arange(4)) and got["c"].tolist() == ["x"]


def test_load_npz_refuses_a_damaged_file_as_np_load_does(tmp_path: Path) -> None:
    path = tmp_path / "cut.npz"
    with path.open("wb") as f:
        np.savez(f, x=np.arange(1000))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(Exception) as err:
        np.load(path)["x"]
    with pytest.raises(type(err.value)):
        load_npz(path)


def test_a_loaded_tables_features_are_the_saved_dicts(tmp_path: Path) -> None:
    """``FrozenFeatures`` reads as the dict the table was saved from: each item's values
    without NaN in name order, ``get`` of an item without a profile, ``in``, length and
    order; an item's dict is made once."""
    features = {"a": {"x": 1.0, "y": 2.5}, "b": {"y": 0.0}, "c": {}, "d": {"x": -3.0}}
    t = ItemTable("s", T0, CoVisitation(CoVisConfig()), features=features)
    t.save(tmp_path / "t.npz")
    loaded = ItemTable.load(tmp_path / "t.npz")
    assert isinstance(loaded.features, FrozenFeatures)
    assert loaded.features == features and dict(loaded.features) == features
    assert list(loaded.features) == list(features) and len(loaded.features) == 4
    assert loaded.features.get("zz") is None and loaded.features.get("zz", {}) == {}
    assert "a" in loaded.features and "zz" not in loaded.features
    assert loaded.features["a"] is loaded.features.get("a")
    with pytest.raises(KeyError):
        loaded.features["zz"]
    # raw (us15: a detached version's capture): the row until the dict is made, then it
    again = ItemTable.load(tmp_path / "t.npz")
    for item, want in features.items():
        raw = again.features.raw(item)
        names, row = raw[0], raw[1:]
        assert row_profile(names, row) == want and list(row_profile(names, row)) == list(want)
    assert again.features.raw("zz") is None and loaded.features.raw("a") is loaded.features["a"]
    # (names, *row): one flat tuple of atomic values and the names, untracked at the first
    # collection after the names tuple is (a nested row would take one more)
    gc.collect()
    held = again.features.raw("d")
    assert type(held[0]) is tuple and all(type(v) is float for v in held[1:])
    gc.collect(0)
    assert not gc.is_tracked(held)
    # a detached version's capture of it (table_capture raw): one flat tuple with the
    # category, untracked at its first collection, the same static features in order
    for item in [*features, "zz"]:
        got = static_features_of(table_capture(item, again, raw=True), None)
        want = static_item_features(item, loaded, None)
        assert got == want and list(got) == list(want)
    capture = table_capture("c", again, raw=True)
    assert capture is not None and type(capture[0]) is tuple
    gc.collect(0)
    assert not gc.is_tracked(capture)
    # shared_capture (pit22): the raw capture, one object per item and table version for
    # every shard of the process, kept in the table's memo
    other = ItemTable.load(tmp_path / "t.npz")
    for item in [*features, "zz"]:
        first = shared_capture(item, other)
        assert repr(first) == repr(table_capture(item, again, raw=True))  # (NaN: no value)
        assert shared_capture(item, other) is first
    assert shared_capture("c", again) is not shared_capture("c", other)  # per version
    assert loaded.feature_columns(("x",))[1].tolist() == t.feature_columns(("x",))[1].tolist()


def test_profile_values_share_one_side_by_side_copy_whatever_order_shards_were_seen() -> None:
    """Two id spaces that met the item shards in opposite orders read every item's own
    table through the one side-by-side copy of the tables' columns made per set of
    table versions (``table_columns``, shard-key order); a shard without a table reads
    0.0, and a new version of one table makes a new copy."""
    names = RATE
    items = [f"{s}{j}" for s in "abc" for j in range(30)]

    def version(shard: str, ts: int) -> ItemTable:
        features = {i: {names[0]: float(j + ts - T0), names[1]: float(100 * j)}
                    for j, i in enumerate(items) if i[0] == shard[1] and j % 4}
        return ItemTable(shard, ts, CoVisitation(CoVisConfig()), features=features)

    tables = {"sa": version("sa", T0), "sb": version("sb", T0)}  # no table for "sc"
    spaces = [ItemRows(CovisView(), lambda item: "s" + item[0]) for _ in range(2)]
    copies = []
    for step in range(2):
        if step:
            tables["sb"] = version("sb", T0 + 7)
        for n, space in enumerate(spaces):
            pool = items if n == 0 else items[::-1]  # shard order c, b, a in the second
            rows = space.rows(pool)
            space.sync(dict(tables))
            got = space.profile_values(space.fill(rows), rows, names)
            want = [[(tables[t].features.get(i) or {}).get(name, 0.0)
                     if (t := "s" + i[0]) in tables else 0.0 for i in pool] for name in names]
            assert got.tolist() == want
        copies.append(table_columns(list(tables.values()), names)[1])
        assert table_columns(list(tables.values())[::-1], names)[1] is copies[-1]
    assert copies[0] is not copies[1] and copies[0].any()
