"""The item shard applies typed item updates (operators/item_updates.py) by kind, and
publishes its item table at most once per source micro-batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from events.model import Item
from operators import item_shard
from operators.item_shard import ItemsConfig, ItemShard, route_updates
from operators.item_updates import CatalogChange, CovisPairs, Interaction, MFStep
from state import covisitation
from state.item_table import ItemTable
from state.snapshot_store import SnapshotStore

T0 = 1_767_225_600_000


def shard(tmp_path: Path) -> ItemShard:
    return ItemShard(ItemsConfig(refresh_interval_ms=10**12, mf={"dim": 4}),
                     SnapshotStore(tmp_path))


def test_each_kind_lands_in_its_state(tmp_path: Path) -> None:
    s = shard(tmp_path)
    s.process("i000", [
        CatalogChange("a", Item(T0, "a", {"category": "books"}, True)),
        Interaction("a", T0 + 1, True),
        Interaction("b", T0 + 2, False),
        CovisPairs("a", [("a", "b", 1.0)], T0 + 2, "liked"),
        CovisPairs("b", [("b", "a", 0.5)], T0 + 2, "any"),
        MFStep("a", T0 + 3, np.ones(4, np.float32), None),
    ])
    assert s.catalog["a"].category == "books" and s.catalog["b"].first_seen_ms == T0 + 2
    assert list(s.popular.scores(T0 + 2)) == ["a"]
    assert sorted(s.interactions.scores(T0 + 2)) == ["a", "b"]
    assert s.covis.score("a", "b", T0 + 2) == pytest.approx(1.0)
    assert s.covis.score("b", "a", T0 + 2) == 0.0
    assert s.covis_any is not None and s.covis_any.score("b", "a", T0 + 2) == pytest.approx(0.5)
    assert s.max_ts_ms == T0 + 2  # MF steps carry the time of the positive already counted
    assert s.factors.changed_since(0).version > 0


def test_an_unknown_kind_raises(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="unknown item update tuple"):
        shard(tmp_path).process("i000", [("fb", "a", T0, True)])


def test_updates_route_by_item_id_in_order() -> None:
    updates = [Interaction("a", 1, True), Interaction("b", 2, True), Interaction("a", 3, False)]
    assert route_updates(updates, lambda item: f"i-{item}") == {
        "i-a": [updates[0], updates[2]], "i-b": [updates[1]]}


STEP = 100_000  # event time per user-shard part: more than the refresh interval


def parts(batch: int, n_parts: int = 8) -> list[list[Interaction]]:
    """The item updates one source batch sends this shard: one part per user shard,
    each further in event time than the refresh interval."""
    base = T0 + batch * n_parts * STEP
    return [[Interaction(f"i{p}", base + p * STEP, True), Interaction("i0", base + p * STEP + 1, True)]
            for p in range(n_parts)]


def publishing_shard(tmp_path: Path) -> ItemShard:
    return ItemShard(ItemsConfig(refresh_interval_ms=60_000), SnapshotStore(tmp_path))


def published(outputs: list[dict[str, list[Any]]]) -> list[dict[str, Any]]:
    return [m for out in outputs for m in out.get("snapshots", [])]


def test_one_table_per_source_batch_with_every_part_in_it(tmp_path: Path) -> None:
    items = publishing_shard(tmp_path)
    outputs = []
    for batch in range(3):
        outputs.extend(items.process("i000", part, batch) for part in parts(batch))
    outputs.append(items.finish())
    manifests = published(outputs)
    # Batches 0 and 1 are published when the next batch's first part arrives; batch 2 at EOF.
    assert len(manifests) == 3
    ends = [max(u.ts for part in parts(b) for u in part) for b in range(3)]
    assert [m["ts"] for m in manifests] == ends
    table = ItemTable.load(SnapshotStore(tmp_path).verified_path(manifests[0]))
    assert set(table.popular) == {f"i{p}" for p in range(8)}  # every part of batch 0


def test_without_batch_ids_every_due_part_publishes(tmp_path: Path) -> None:
    """The control: called without a source batch, a shard publishes whenever due."""
    items = publishing_shard(tmp_path)
    outputs = [items.process("i000", part) for part in parts(0)]
    assert len(published(outputs)) == 8


@pytest.mark.parametrize("live", [True, False])
def test_live_item_shards_of_a_worker_publish_in_turn_not_in_one_step(
        tmp_path: Path, live: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18 point 3: the item shards of a worker come due at the same event time;
    live, one of them publishes per source batch and the others in the batches after
    (one long step each instead of one step holding them all); replays (``live``
    False) publish every due shard in the batch, as the tables must not move."""
    monkeypatch.setattr(item_shard, "_turns", item_shard._Turns())  # this thread's turns
    store = SnapshotStore(tmp_path)
    shards = [ItemShard(ItemsConfig(refresh_interval_ms=60_000), store,
                        one_table_per_batch=live) for _ in range(4)]
    per_batch = []
    for batch in range(6):
        base = T0 + batch * STEP
        out = [s.process(f"i00{j}", [Interaction(f"x{j}", base + 1, True)], batch)
               for j, s in enumerate(shards)]
        per_batch.append([j for j, o in enumerate(out) if "snapshots" in o])
    # batch 0 sets the clock (first tables), each later batch is a refresh interval on
    if live:
        assert per_batch == [[], [0], [1], [2], [3], [0]]
    else:
        assert per_batch == [[], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3],
                             [0, 1, 2, 3]]


def test_published_features_are_the_profiles_numeric_outputs_as_of_publication(
        tmp_path: Path) -> None:
    """Every profiled item's published features equal its profile query at publication
    (numbers as floats; None means and lists left out), across window roll-overs, writes
    after a first publication, LRU eviction, and a shard restored from its pickle; in
    name order (the file's), both for answers of floats only and for answers with other
    values (None means)."""
    import pickle

    from events.model import Feedback, Impression
    from flows.config import load_config
    from operators.item_updates import ProfileEvent

    features = load_config(None).features
    s = ItemShard(ItemsConfig(refresh_interval_ms=10**12, max_items=3, mf={"dim": 4}),
                  SnapshotStore(tmp_path / "a"), features)

    def events(t: int, items: str) -> list[Any]:
        out: list[Any] = []
        for n, item in enumerate(items):
            out.append(ProfileEvent(item, Impression(t + n, f"imp{t}{n}", f"u{n}", item)))
            out.append(ProfileEvent(item, Feedback(t + n, f"u{n}", item, "click")))
            if item == "a":
                out.append(ProfileEvent(item, Feedback(t + n, f"u{n}", item, "rating", 4.0)))
        return out

    def expected(shard: ItemShard) -> dict[str, dict[str, float]]:
        assert shard.profiles is not None
        return {item: {k: float(v) for k, v in shard.profiles.query(item).items()
                       if isinstance(v, int | float) and not isinstance(v, bool)}
                for item in shard.profiled}

    seen = []
    kinds = set()
    for step, items in enumerate(["ab", "bc", "abc", "d", "ad"]):
        s.process("i000", events(T0 + step * 3_600_000, items))  # an hour apart: 1h windows roll
        table = s.table()
        want = expected(s)
        assert table.features == want
        assert [list(f.items()) for f in table.features.values()] == [
            sorted(f.items()) for f in want.values()]  # in name order, as a loaded table
        assert s.profiles is not None
        kinds |= {frozenset(map(type, s.profiles.query(item).values())) for item in want}
        seen.append(table.features)
        s.publish()
        s = pickle.loads(pickle.dumps(s))  # recovery: the restored shard publishes the same
    assert frozenset((float,)) in kinds and any(len(k) > 1 for k in kinds), kinds
    mean = "item.rating_mean.all"
    assert mean in seen[0]["a"] and mean not in seen[0]["b"]  # None: left out
    assert sorted(seen[-1]) == ["a", "c", "d"]  # "b", least recently seen, evicted (max 3)
    a = seen[2]["a"]
    assert a["item.impressions.1h"] == 1.0 and a["item.impressions.7d"] == 2.0


@pytest.mark.parametrize("kept", [True, False])
def test_a_table_is_built_from_the_last_one_and_equals_a_full_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kept: bool) -> None:
    """Issue 18 point 4: an item table's co-visitation arrays are built from the shard's
    last table and the rows written since (few rows written: the reuse runs) and are the
    arrays of a full build. Small arrays are kept in memory (no file read back, so a
    version that is gone changes nothing); without keeping (larger than
    ``KEEP_ARRAYS_BYTES``) each is read back from the last file, and a version that is
    gone makes a full build."""
    if not kept:
        monkeypatch.setattr(covisitation, "KEEP_ARRAYS_BYTES", 0)
    s = ItemShard(ItemsConfig(refresh_interval_ms=10**12, mf={"dim": 4}), SnapshotStore(tmp_path))
    items = [f"it{i}" for i in range(40)]
    s.process("i000", [CovisPairs(a, [(a, b, 1.0)], T0, ch) for a in items for b in items[:9]
                       if a != b for ch in ("liked", "any")])
    store = SnapshotStore(tmp_path)
    reads = []
    original = ItemTable.covis_arrays_of

    def spy(path: Any) -> Any:
        reads.append(path)
        return original(path)

    ItemTable.covis_arrays_of = spy  # type: ignore[method-assign]
    lost = None
    try:  # (the first table was published by ``process``, due at once)
        for step in range(4):
            m = s.publish()
            table = np.load(store.verified_path(m))
            for prefix, covis in (("covis_", s.covis), ("covisany_", s.covis_any)):
                assert covis is not None
                full = covis.to_arrays()
                for k, v in full.items():
                    assert np.array_equal(table[prefix + k], v), (step, prefix, k)
            if step == 2:  # the last version disappears: the next table is a full build
                lost = store.verified_path(m)
                lost.unlink()
            s.process("i000", [
                CovisPairs(items[step], [(items[step], "new" + str(step), 1.0)], T0 + step, "liked"),
                CovisPairs("it39", [("it39", items[step], 1.0)], T0 + step, "any")])
    finally:
        ItemTable.covis_arrays_of = original  # type: ignore[method-assign]
    if kept:
        assert reads == []  # the kept arrays, never the file
    else:
        assert len(reads) == 3 and lost not in reads  # each version read back but the lost one


@pytest.mark.parametrize("min_neighbors", [0, 10**9])
def test_kept_arrays_of_a_large_table_are_reused_past_the_written_share(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_neighbors: int) -> None:
    """Issue 18 point 5 (ml21): with most rows written since the last table (~60%: past
    ``REUSE_WRITTEN``, within ``REUSE_KEPT``), a table's kept arrays are still reused when
    they hold at least ``REUSE_KEPT_NEIGHBORS`` neighbours, and the arrays equal a full
    build; a smaller table builds from every row."""
    monkeypatch.setattr(item_shard, "REUSE_KEPT_NEIGHBORS", min_neighbors)
    s = ItemShard(ItemsConfig(refresh_interval_ms=10**12, mf={"dim": 4}), SnapshotStore(tmp_path))
    items = [f"it{i}" for i in range(20)]
    s.process("i000", [CovisPairs(a, [(a, b, 1.0)], T0, ch) for a in items for b in items[:9]
                       if a != b for ch in ("liked", "any")])
    since: list[bool] = []
    original = covisitation.CoVisitation._csr_since

    def spy(self: Any, prev: Any, written: Any) -> Any:
        out = original(self, prev, written)
        since.append(out is not None)
        return out

    monkeypatch.setattr(covisitation.CoVisitation, "_csr_since", spy)
    for step in range(3):  # 12 of 20 rows written (the new name: appended, then new rows)
        s.process("i000", [CovisPairs(a, [(a, f"new{step}", 0.5 + step)], T0 + step + 1, ch)
                           for a in items[step:step + 12] for ch in ("liked", "any")])
        assert all(0.4 < (c.written_share() or 0) <= 0.75 for c in (s.covis, s.covis_any)
                   if c is not None)
        m = s.publish()
        table = np.load(SnapshotStore(tmp_path).verified_path(m))
        for prefix, covis in (("covis_", s.covis), ("covisany_", s.covis_any)):
            assert covis is not None
            for k, v in covis.to_arrays().items():
                assert np.array_equal(table[prefix + k], v), (step, prefix, k)
    assert since == ([True] * 6 if min_neighbors == 0 else [])


def test_feature_columns_equal_the_per_item_filter_whatever_the_key_order() -> None:
    """``_output_columns`` and ``_numbers`` (ml21: the published feature matrix built by
    output columns) give, per item, the numbers of its answer as floats (not bools, not
    None, not lists) and NaN elsewhere, for answers in one key order (the transposition)
    and in several (the lookups), with absent outputs."""
    import math
    import random

    rng = random.Random(7)
    pool = [1.5, 2, None, True, [1], np.float64(0.25), float("nan"), 0.0, 3]
    names = [f"o{k}" for k in range(6)]
    for shuffle in (False, True):
        answers = []
        for _ in range(30):
            keys = [n for n in names if rng.random() < (0.8 if shuffle else 2)]
            if shuffle:
                rng.shuffle(keys)
            answers.append({n: rng.choice(pool) for n in keys})
        want = [{n: float(v) for n, v in a.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)} for a in answers]
        got: dict[str, list[float]] = {}
        for name, column in item_shard._output_columns(answers):
            numbers = item_shard._numbers(column)
            if numbers is not None:
                got[name] = list(numbers)
        assert sorted(got) == sorted({n for w in want for n in w})
        for name, numbers in got.items():
            for w, x in zip(want, numbers, strict=True):
                v = w.get(name, math.nan)
                assert (x == v and type(x) is float) or (math.isnan(x) and math.isnan(v))
