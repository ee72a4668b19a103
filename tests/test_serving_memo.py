"""Retrieval and filter work kept across requests and exact (issue 18 point 2, serve9):
the ANN source's answer per user (``Server._ann_rows``), the filter's slots and catalog
values handed to the candidate columns (``ItemRows.remember``), a co-visitation view's
rows per table version (``CovisView.sync``), the shard catalog's attributes re-read only
for the items written since (``ItemRows.catalog_attrs``, ``ChangeLogDict``). Every memo is checked against the
answer computed from scratch after each thing that invalidates it."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serving_world import DIM, T0, World, warm_up

from operators.point_in_time import UserContext
from operators.serving import Server
from state import item_rows
from state.bounded import lru_put
from state.change_log import LOG, ChangeLogDict
from state.covis_view import CovisView
from state.covisitation import CoVisConfig, CoVisitation
from state.item_rows import ItemRows
from state.item_table import CatalogEntry, ItemTable


def _ctx(user: str, vector: np.ndarray) -> UserContext:
    return UserContext(user, [], {}, vector, {})


def _served(world: World) -> Server:
    """A user shard's server over every snapshot of ``world``, its index loaded."""
    world.publish_all()
    shard = world.user_shard()
    warm_up(shard)
    server = shard.server
    assert server is not None and server.views.index.refresh()
    return server


def _counting(server: Server) -> list[int]:
    """Count the index's ``query_arrays`` calls of ``server`` (the reader's method)."""
    calls = [0]
    reader = server.views.index
    query = reader.query_arrays

    def counted(vec: np.ndarray, k: int) -> Any:
        calls[0] += 1
        return query(vec, k)

    reader.query_arrays = counted  # type: ignore[method-assign]
    return calls


def _fresh(server: Server, vector: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The answer from scratch: the current index's ``query_arrays``, named as rows."""
    items, scores = server.views.index.index.query_arrays(vector, n)
    return server._space().rows(items), scores


def _same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    assert got[0].dtype == np.int64 and got[1].dtype == np.float64
    assert got[0].tolist() == want[0].tolist()
    assert got[1].tobytes() == want[1].tobytes()


def test_ann_answers_are_kept_per_user_vector_and_index_version(tmp_path: Path) -> None:
    """A user asking again with the same vector on the same index version gets the kept
    answer (no search); another vector, another ``n``, a new index version or a new id
    space searches again, and every answer equals the search from scratch."""
    world = World(tmp_path)
    server = _served(world)
    calls = _counting(server)
    rng = np.random.default_rng(11)
    v1, v2 = (rng.normal(size=DIM).astype(np.float32) for _ in range(2))

    first = server._ann_rows(_ctx("u1", v1), 12, server._space())
    _same(first, _fresh(server, v1, 12))
    again = server._ann_rows(_ctx("u1", v1.copy()), 12, server._space())
    assert calls[0] == 1
    _same(again, first)
    _same(server._ann_rows(_ctx("u1", v2), 12, server._space()), _fresh(server, v2, 12))
    _same(server._ann_rows(_ctx("u1", v2), 7, server._space()), _fresh(server, v2, 7))
    _same(server._ann_rows(_ctx("u2", v2), 7, server._space()), _fresh(server, v2, 7))
    assert calls[0] == 4
    _same(server._ann_rows(_ctx("u1", v1), 12, server._space()), first)
    assert calls[0] == 5

    # a new index version whose vectors changed: the kept answer is stale
    for item in world.vectors:
        world.vectors[item] = rng.normal(size=DIM).astype(np.float32)
    world.publish_index()
    assert server.views.index.refresh()
    stale = server._ann_rows(_ctx("u1", v1), 12, server._space())
    assert calls[0] == 6
    _same(stale, _fresh(server, v1, 12))
    assert stale[0].tolist() != first[0].tolist() or stale[1].tolist() != first[1].tolist()

    # a new id space (the view's ids churned past its bound): rows of the new space
    server.min_view_ids = 0
    server.covis_view.names.extend(f"churned{j}" for j in range(10**4))
    server._bound_ids()
    assert server.view_resets == 1
    renamed = server._ann_rows(_ctx("u1", v1), 12, server._space())
    assert calls[0] == 7
    _same(renamed, _fresh(server, v1, 12))


def test_ann_memo_keeps_at_most_its_bound_of_users(tmp_path: Path) -> None:
    """The memo holds the last ``ann_memo_users`` users (the memory bound's
    ``ann_memo_user`` entries), the oldest dropped first."""
    server = _served(World(tmp_path))
    server.ann_memo_users = 3
    calls = _counting(server)
    vec = np.ones(DIM, np.float32)
    for user in ("a", "b", "c", "d"):
        server._ann_rows(_ctx(user, vec), 5, server._space())
    assert len(server._ann_memo[2]) == 3 and calls[0] == 4
    server._ann_rows(_ctx("d", vec), 5, server._space())
    server._ann_rows(_ctx("b", vec), 5, server._space())
    assert calls[0] == 4
    server._ann_rows(_ctx("a", vec), 5, server._space())  # dropped first
    assert calls[0] == 5 and len(server._ann_memo[2]) == 3


def _catalog_table(tmp_path: Path, version: int, items: list[str], available: set[str]
                   ) -> ItemTable:
    """A loaded table (``FrozenCatalog``) whose catalog makes ``available`` available,
    each item's category and popularity telling the version."""
    catalog = {i: CatalogEntry(f"c{version}-{j % 3}", i in available, T0 - version)
               for j, i in enumerate(items)}
    table = ItemTable("s", T0 + version, CoVisitation(CoVisConfig()),
                      popular={i: float(version * 100 + j) for j, i in enumerate(items)},
                      catalog=catalog)
    path = tmp_path / f"v{version}.npz"
    table.save(path)
    return ItemTable.load(path)


def _values(space: ItemRows, slots: np.ndarray) -> list[tuple[Any, ...]]:
    return list(zip(space.available[slots].tolist(), space.pop[slots].tolist(),
                    [space.categories[c] for c in space.category[slots].tolist()],
                    space.unavailable[slots].tolist(), strict=True))


def _reference(table: ItemTable, items: list[str], attrs: list[dict[str, Any] | None]
               ) -> list[tuple[Any, ...]]:
    return [(table.catalog[i].available, table.popular[i], table.catalog[i].category,
             bool(a and a.get("available") is False)) for i, a in zip(items, attrs, strict=True)]


def test_item_rows_memos_end_with_a_new_table_new_slots_or_new_attributes(tmp_path: Path
                                                                         ) -> None:
    """``ItemRows.fill`` and ``fill_attrs`` answer the same rows (or the subset the
    filter ``remember``s) without checks only while nothing changed: after a new
    version of the table, after the slots are dropped and for new catalog attributes
    objects, the values read are the new ones (the reference: the table's own dicts)."""
    items = [f"x{j}" for j in range(60)]
    unavailable = lambda a: bool(a and a.get("available") is False)  # noqa: E731
    space = ItemRows(CovisView(), lambda item: "s", min_slots=16)
    rows = space.rows(items)
    attrs: list[dict[str, Any] | None] = [{"n": j} for j in range(60)]
    v1 = _catalog_table(tmp_path, 1, items, set(items[::2]))
    space.sync({"s": v1})
    slots = space.fill(rows)
    space.fill_attrs(slots, attrs, (), unavailable)
    assert _values(space, slots) == _reference(v1, items, attrs)
    assert space.fill(rows) is slots  # the memo: no second check

    keep = np.arange(0, 60, 3)
    sub_rows, sub_attrs = rows[keep], [attrs[i] for i in keep.tolist()]
    space.remember(sub_rows, slots[keep], sub_attrs, ())
    sub = space.fill(sub_rows)
    assert sub.tolist() == slots[keep].tolist()

    v2 = _catalog_table(tmp_path, 2, items, set(items[1::2]))  # a new version
    space.sync({"s": v2})
    again = space.fill(sub_rows)
    names = [items[i] for i in keep.tolist()]
    space.fill_attrs(again, sub_attrs, (), unavailable)
    assert _values(space, again) == _reference(v2, names, sub_attrs)

    changed = [dict(a or {}, available=False) for a in sub_attrs]  # new attributes objects
    space.fill_attrs(again, changed, (), unavailable)
    assert _values(space, again) == _reference(v2, names, changed)

    space.remember(sub_rows, again, changed, ())
    many = space.rows([f"y{j}" for j in range(40)])  # past the bound: every slot dropped
    space.fill(many)
    fresh = space.fill(sub_rows)
    space.fill_attrs(fresh, changed, (), unavailable)
    assert _values(space, fresh) == _reference(v2, names, changed)
    assert space.slot_of[sub_rows].tolist() == fresh.tolist()


def test_a_views_rows_of_a_replaced_table_go_with_it(tmp_path: Path) -> None:
    """``CovisView.sync`` drops every cached row of a replaced table version at once, and
    the rows read after it are the new version's."""
    def loaded(version: int, weight: float) -> ItemTable:
        covis = CoVisitation(CoVisConfig())
        covis.add([("a", "b", weight), ("a", "c", 1.0)], T0)
        table = ItemTable("s", T0 + version, covis, liked_counts={"a": 1.0})
        table.save(tmp_path / f"t{version}.npz")
        return ItemTable.load(tmp_path / f"t{version}.npz")

    view = CovisView()
    old, new = loaded(1, 5.0), loaded(2, 0.5)
    view.sync({"s": old})
    ids, w = view.row(old, "liked", "a")
    assert dict(zip([view.names[i] for i in ids.tolist()], w.tolist(), strict=True)) == \
        dict(zip(*old.covis_row_arrays("liked", "a"), strict=True))
    assert id(old) in view._rows
    view.sync({"s": new})
    assert id(old) not in view._rows and id(old) not in view._known
    ids, w = view.row(new, "liked", "a")
    names, weights = new.covis_row_arrays("liked", "a")
    assert dict(zip([view.names[i] for i in ids.tolist()], w.tolist(), strict=True)) == \
        dict(zip(names, np.asarray(weights).tolist(), strict=True))


class _CountingCatalog(ChangeLogDict):
    """The user shard's catalog, counting the items it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def get(self, key: Any, default: Any = None) -> Any:
        self.asked.append(key)
        return super().get(key, default)


def test_change_log_counts_every_write_and_only_writes() -> None:
    """``ChangeLogDict`` logs sets, LRU evictions, pops and deletions (not
    ``move_to_end``), says when a reader is too far behind, and pickles as its items."""
    d = ChangeLogDict()
    lru_put(d, "a", {"n": 1}, 2)
    lru_put(d, "b", {"n": 2}, 2)
    v = d.version
    lru_put(d, "c", {"n": 3}, 2)  # evicts a
    d.move_to_end("b")
    assert d.changed_since(v) == ["c", "a"] and list(d) == ["c", "b"]
    d.pop("b")
    del d["c"]
    assert d.changed_since(v) == ["c", "a", "b", "c"] and d.changed_since(d.version) == []
    for j in range(LOG + 1):
        d[f"k{j}"] = j
    assert d.changed_since(v) is None and d.changed_since(d.version - LOG) is not None
    restored = pickle.loads(pickle.dumps(d))
    assert isinstance(restored, ChangeLogDict) and list(restored.items()) == list(d.items())


def test_catalog_attrs_reread_only_what_the_catalog_wrote_since(tmp_path: Path) -> None:
    """``ItemRows.catalog_attrs`` gives the catalog's attributes now (as a plain dict's
    lookups give them) and their ``unavailable`` flags, asking the catalog only for
    items written since their slot read them: a new attributes object, an item
    made unavailable, an evicted item, a log the reader fell behind."""
    items = [f"x{j}" for j in range(30)]
    catalog = _CountingCatalog()
    for item in items:
        lru_put(catalog, item, {"category": "c"}, 25)  # x0..x4 evicted
    unavailable = lambda a: bool(a and a.get("available") is False)  # noqa: E731
    space = ItemRows(CovisView(), lambda item: "s")
    rows = space.rows(items)
    slots = space.fill(rows)

    def check() -> None:
        got = space.catalog_attrs(slots, items, catalog, (), unavailable)
        assert got == [dict.get(catalog, i) for i in items]
        assert all(g is dict.get(catalog, i) for g, i in zip(got, items, strict=True))
        assert space.unavailable[slots].tolist() == [unavailable(g) for g in got]
        # the slots and the list are current for what reads them next: each slot's
        # attributes object id, without a second pass
        assert space.attr_ids(slots, got).tolist() == [id(g) for g in got]
        assert space.attr_id[slots].tolist() == [id(g) for g in got]

    check()
    assert sorted(catalog.asked) == sorted(items)
    catalog.asked.clear()
    check()
    assert catalog.asked == []  # nothing written since: no item asked for
    lru_put(catalog, "x7", {"category": "c", "available": False}, 25)
    lru_put(catalog, "x9", {"category": "d"}, 25)
    lru_put(catalog, "z1", {"category": "d"}, 25)  # evicts x5
    check()
    assert sorted(catalog.asked) == ["x5", "x7", "x9"]
    assert space.unavailable[slots].tolist()[7]
    catalog.asked.clear()
    for j in range(LOG + 5):  # the log moves past the reader
        lru_put(catalog, f"y{j}", {}, 25)
    lru_put(catalog, "x12", {"category": "e", "available": False}, 25)
    check()
    assert sorted(catalog.asked) == sorted(items)


def test_name_array_names_every_id_as_it_grows() -> None:
    """``CovisView.name_array`` (``ItemRows.names``' one gather) names every id, also ids
    added after it was made and past its growth steps."""
    view = CovisView()
    space = ItemRows(view, lambda item: "s")
    rng = np.random.default_rng(5)
    for size in (3, 700, 1_500, 4_000):
        view.intern([f"n{j}" for j in range(size)])
        ids = rng.integers(0, len(view.names), 500)
        assert space.names(ids) == [view.names[i] for i in ids.tolist()]
    assert space.names(np.zeros(0, np.int64)) == []


@pytest.mark.parametrize("columns_max", [8_192, 10])
def test_loaded_table_values_are_the_dict_lookups(tmp_path: Path, columns_max: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot's table values from a loaded table's per-version columns (``catalog_columns``:
    counts, category names and feature rows by catalog position, shared by the process;
    or, for a catalog past ``_COLUMNS_MAX``, item by item) equal the table's own lookups:
    items without a catalog entry keep their counts and profiles, categories new to the
    space and known ones, an empty category, items without a profile."""
    monkeypatch.setattr(item_rows, "_COLUMNS_MAX", columns_max)
    items = [f"x{j}" for j in range(80)]
    space = ItemRows(CovisView(), lambda item: "s")
    rows = space.rows(items)
    for version in range(3):
        catalog = {i: CatalogEntry(["", "a", "b" if version < 2 else "d", "c"][j % 4] or None,
                                   j % 5 != version, T0 - j)
                   for j, i in enumerate(items) if j % 3}
        t = ItemTable("s", T0 + version, CoVisitation(CoVisConfig()),
                      popular={i: float(j + version) for j, i in enumerate(items) if j % 2},
                      trending={i: float(j * version) for j, i in enumerate(items) if j % 7},
                      catalog=catalog,
                      features={i: {"item.clicks.1d": float(j + version)}
                                for j, i in enumerate(items) if (j + version) % 4})
        t.save(tmp_path / f"c{version}.npz")
        loaded = ItemTable.load(tmp_path / f"c{version}.npz")
        space.sync({"s": loaded})
        slots = space.fill(rows)
        want = [(i in catalog, catalog[i].available if i in catalog else True,
                 catalog[i].category if i in catalog else None,
                 catalog[i].first_seen_ms if i in catalog else 0,
                 t.popular.get(i, 0.0), t.trending.get(i, 0.0)) for i in items]
        got = list(zip(space.entry[slots].tolist(), space.available[slots].tolist(),
                       [space.categories[c] for c in space.category[slots].tolist()],
                       space.first_seen[slots].tolist(), space.pop[slots].tolist(),
                       space.trend[slots].tolist(), strict=True))
        assert got == want
        index = loaded.feature_matrix()[0]
        assert space.feature_rows(slots, rows).tolist() == [index.get(i, len(index))
                                                            for i in items]


@pytest.mark.parametrize("in_process", [None, "s2"])
def test_loaded_tables_read_at_once_equal_shard_by_shard(tmp_path: Path, in_process: str | None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Stale slots of several shards' loaded tables read in one gather (``_fill_loaded``,
    ``loaded_columns``) hold what the shard-by-shard reads (``_fill_frozen``) give: the
    same values and category codes, items without an entry keeping their counts; a shard
    whose table is built in process sends every shard's slots the shard-by-shard way."""
    items = [f"x{j}" for j in range(120)]
    merged = ItemRows(CovisView(), lambda item: f"s{int(item[1:]) % 3}")
    alone = ItemRows(CovisView(), lambda item: f"s{int(item[1:]) % 3}")
    at_once = []
    fill_loaded = ItemRows._fill_loaded

    def counted(self: ItemRows, *args: Any) -> bool:
        done = fill_loaded(self, *args)
        at_once.append(done)
        return done

    monkeypatch.setattr(ItemRows, "_fill_loaded", counted)
    alone._fill_loaded = lambda *args: False  # type: ignore[method-assign]
    for version in range(3):
        tables = {}
        for s in range(3):
            mine = [i for j, i in enumerate(items) if j % 3 == s]
            catalog = {i: CatalogEntry(["", "a", "b" if version < 2 else "d", f"c{s}"][j % 4]
                                       or None, j % 5 != version, T0 - j)
                       for j, i in enumerate(mine) if j % 7}
            t = ItemTable(f"s{s}", T0 + version, CoVisitation(CoVisConfig()),
                          popular={i: float(j + version + s) for j, i in enumerate(mine) if j % 2},
                          trending={i: float(j * version) for j, i in enumerate(mine) if j % 6},
                          catalog=catalog,
                          features={i: {"item.clicks.1d": float(j + version)}
                                    for j, i in enumerate(mine) if (j + version) % 4})
            if f"s{s}" != in_process:
                t.save(tmp_path / f"c{version}{s}.npz")
                t = ItemTable.load(tmp_path / f"c{version}{s}.npz")
            tables[f"s{s}"] = t
        got = []
        for space in (merged, alone):
            space.sync(dict(tables))
            rows = space.rows(items)
            slots = space.fill(rows)
            got.append((space.entry[slots].tolist(), space.available[slots].tolist(),
                         space.category[slots].tolist(), space.first_seen[slots].tolist(),
                         space.pop[slots].tolist(), space.trend[slots].tolist(),
                         space.feature_rows(slots, rows).tolist(), list(space.categories)))
        assert got[0] == got[1]
        want_pop = [tables[f"s{int(i[1:]) % 3}"].popular.get(i, 0.0) for i in items]
        assert got[0][4] == want_pop
    # version 0 codes new names shard by shard; version 1 knows every name; version 2
    # has a new one
    assert at_once == ([False, True, False] if in_process is None else [False] * 3)
