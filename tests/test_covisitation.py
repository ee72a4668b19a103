"""Co-visitation: exact decayed counts on a hand-made log, position weights, the top-M
bound, candidates with popularity normalisation, merge/select and persistence."""

from __future__ import annotations

import heapq
import pickle

import numpy as np
import pytest

from state.covisitation import CoVisConfig, CoVisitation, decayed

H = 3_600_000  # one hour in ms
T0 = 1_767_225_600_000


def test_pairs_for_position_decay_symmetric_and_windowed() -> None:
    cv = CoVisitation(CoVisConfig(position_decay=0.5, window=3))
    pairs = cv.pairs_for(["c", "b", "c", "x", "a", "z"], "x", T0)
    # distinct recent items other than the new one, newest first: c (k=0), b (1), a (2); z is
    # beyond the window of 3
    assert pairs == [
        ("x", "c", 1.0), ("c", "x", 1.0),
        ("x", "b", 0.5), ("b", "x", 0.5),
        ("x", "a", 0.25), ("a", "x", 0.25),
    ]
    assert cv.pairs_for([], "x", T0) == []


def _pairs_by_loop(recent: list[str], new: str, window: int, decay: float
                   ) -> list[tuple[str, str, float]]:
    """``pairs_for`` as the loop over recent items it was: the reference."""
    out: list[tuple[str, str, float]] = []
    seen, w = {new}, 1.0
    for r in recent:
        if r in seen:
            continue
        seen.add(r)
        out += [(new, r, w), (r, new, w)]
        if len(seen) > window:
            break
        w *= decay
    return out


@pytest.mark.parametrize("decay", [0.95, 0.8, 0.5, 1.0, 0.3333])
def test_pairs_for_equals_the_loop_over_recent_items(decay: float) -> None:
    """Random histories (repeats, the new item among them, shorter and longer than the
    window): the pairs, their order and each weight's bits equal the loop's."""
    import random

    rnd = random.Random(int(decay * 1000))
    names = [f"i{k}" for k in range(60)]
    for _ in range(300):
        window = rnd.randint(1, 45)
        cv = CoVisitation(CoVisConfig(position_decay=decay, window=window))
        recent = [rnd.choice(names[:rnd.randint(1, 60)]) for _ in range(rnd.randint(0, 70))]
        new = rnd.choice(names)
        got = cv.pairs_for(recent, new)
        want = _pairs_by_loop(recent, new, window, decay)
        assert got == want
        assert [p[2].hex() for p in got] == [p[2].hex() for p in want]
        assert cv.pairs_for(iter(recent), new) == want  # any iterable


def test_decayed_counts_exact_on_a_small_log() -> None:
    cv = CoVisitation(CoVisConfig(half_life_ms=2 * H, position_decay=0.5, window=10))
    # user 1 consumes a, b, c one hour apart; user 2 consumes c then a at hour 3
    log = [("u1", "a", T0), ("u1", "b", T0 + H), ("u1", "c", T0 + 2 * H),
           ("u2", "c", T0 + 3 * H), ("u2", "a", T0 + 3 * H)]
    recent: dict[str, list[str]] = {}
    for user, item, ts in log:
        hist = recent.setdefault(user, [])
        cv.add(cv.pairs_for(hist, item, ts), ts)
        hist.insert(0, item)
    now = T0 + 5 * H

    def expect(*terms: tuple[float, int]) -> float:
        return sum(decayed(w, t, now, 2 * H) for w, t in terms)

    # (a, b): u1 at T0+H with weight 1 (b after a, a at k=0)
    assert cv.score("a", "b", now) == pytest.approx(expect((1.0, T0 + H)), rel=1e-12)
    assert cv.score("b", "a", now) == pytest.approx(cv.score("a", "b", now), rel=1e-12)
    # (a, c): u1 at T0+2H, a at k=1 -> 0.5; u2 at T0+3H, c at k=0 -> 1
    ac = expect((0.5, T0 + 2 * H), (1.0, T0 + 3 * H))
    assert cv.score("a", "c", now) == pytest.approx(ac, rel=1e-12)
    assert cv.score("c", "a", now) == pytest.approx(ac, rel=1e-12)
    # numerically: 0.5 * 2**-1.5 + 2**-1
    assert ac == pytest.approx(0.5 * 2**-1.5 + 0.5, rel=1e-12)
    assert cv.score("b", "c", now) == pytest.approx(expect((1.0, T0 + 2 * H)), rel=1e-12)
    assert cv.score("a", "zz", now) == 0.0 and cv.score("zz", "a", now) == 0.0
    # neighbours, strongest first, with the same decayed values
    nb = cv.neighbors("a", 5, now)
    assert [b for b, _ in nb] == ["c", "b"]
    assert [s for _, s in nb] == pytest.approx([ac, expect((1.0, T0 + H))], rel=1e-12)
    # half a half-life later every score shrinks by 2**-0.5
    later = cv.score("a", "c", now + H)
    assert later == pytest.approx(ac * 2**-0.5, rel=1e-12)


def test_out_of_order_and_rebase_keep_exact_values() -> None:
    hl = 1000  # 1 s half-life: 600 half-lives pass in 10 minutes of event time
    cv = CoVisitation(CoVisConfig(half_life_ms=hl))
    cv.add([("a", "b", 1.0)], T0 + 5_000)
    cv.add([("a", "b", 2.0)], T0)  # late event
    now = T0 + 6_000
    assert cv.score("a", "b", now) == pytest.approx(decayed(1, T0 + 5_000, now, hl) + decayed(2, T0, now, hl))
    far = T0 + 700_000  # forces a rebase of the reference time
    cv.add([("a", "c", 1.0)], far)
    assert cv.score("a", "c", far) == pytest.approx(1.0)
    old = decayed(1, T0 + 5_000, far, hl) + decayed(2, T0, far, hl)
    assert cv.score("a", "b", far) == pytest.approx(old, rel=1e-9) and old > 0


def test_top_m_bound_keeps_the_strongest() -> None:
    m = 5
    cv = CoVisitation(CoVisConfig(max_neighbors=m, half_life_ms=10 * H))
    for j in range(50):
        # neighbour n{j} gets weight j (stronger later), all at the same time
        cv.add([("hub", f"n{j}", float(j + 1))], T0)
        assert cv.row_size("hub") <= m
    assert {b for b, _ in cv.neighbors("hub", 10, T0)} == {f"n{j}" for j in range(45, 50)}
    assert cv.stats()["evicted_neighbors"] == 45
    # a weak newcomer is not admitted into a full row of stronger ones
    cv.add([("hub", "weak", 0.5)], T0)
    assert cv.score("hub", "weak", T0) == 0.0 and cv.row_size("hub") == m
    # a much later pair outweighs decayed old ones
    cv.add([("hub", "fresh", 1.0)], T0 + 100 * H)
    assert cv.score("hub", "fresh", T0 + 100 * H) == pytest.approx(1.0)
    assert cv.row_size("hub") == m


def test_a_slack_prune_keeps_the_m_strongest_strongest_first_ties_in_row_order() -> None:
    """A row past ``M * (1 + slack)`` neighbours is cut to its M strongest, strongest
    first, equal weights in the order they were in the row (``heapq.nlargest``'s order)."""
    m = 5
    cv = CoVisitation(CoVisConfig(max_neighbors=m, prune_slack=0.4, half_life_ms=10 * H))
    weights = [2.0, 1.0, 3.0, 2.0, 1.0, 3.0, 2.0, 0.5]  # 8 > 5 + 2: one prune at the last
    cv.add([("hub", f"n{j}", w) for j, w in enumerate(weights)], T0)
    g = cv._grow(T0)
    want = heapq.nlargest(m, [(f"n{j}", w * g) for j, w in enumerate(weights)],
                          key=lambda kv: kv[1])
    assert list(cv._rows["hub"].items()) == want
    assert [b for b, _ in want] == ["n2", "n5", "n0", "n3", "n6"]
    assert cv.stats()["evicted_neighbors"] == 3


def test_rows_bounded_by_max_items() -> None:
    cv = CoVisitation(CoVisConfig(max_items=10, max_neighbors=3))
    for j in range(100):
        cv.observe([f"x{j - 1}", f"x{j - 2}"] if j >= 2 else [], f"x{j}", T0 + j)
    assert len(cv) <= 10
    assert sum(cv.row_size(f"x{j}") for j in range(100)) <= 10 * 3


def test_candidates_position_weights_and_popularity() -> None:
    cv = CoVisitation(CoVisConfig(position_decay=0.5, pop_alpha=1.0))
    cv.add([("r0", "p", 1.0), ("r0", "q", 1.0), ("r1", "q", 1.0), ("r1", "s", 3.0)], T0)
    # p: 1 (via r0, k=0); q: 1 + 0.5 = 1.5; s: 0.5 * 3 = 1.5 ; r1 itself never returned
    cands = dict(cv.candidates(["r0", "r1"], 10, T0))
    assert cands == pytest.approx({"p": 1.0, "q": 1.5, "s": 1.5})
    # normalised by popularity**1: s is very popular, p rare
    pop = {"p": 0.5, "q": 1.0, "s": 10.0}
    ranked = cv.candidates(["r0", "r1"], 10, T0, popularity=pop)
    assert [c for c, _ in ranked] == ["p", "q", "s"]
    assert dict(ranked)["s"] == pytest.approx(0.15)
    assert [c for c, _ in cv.candidates(["r0", "r1"], 1, T0, exclude={"q"})] == ["s"]
    assert cv.candidates(["unknown"], 5, T0) == []


def test_merge_of_shards_equals_one_table_and_select_splits() -> None:
    cfg = CoVisConfig(max_neighbors=4, half_life_ms=H)
    full = CoVisitation(cfg)
    shards = [CoVisitation(cfg), CoVisitation(cfg)]
    owner = {f"i{j}": j % 2 for j in range(12)}
    hist: list[str] = []
    for t in range(40):
        item = f"i{(t * 7) % 12}"
        pairs = full.pairs_for(hist, item, T0 + t * 60_000)
        full.add(pairs, T0 + t * 60_000)
        for s in (0, 1):  # route each pair to the shard owning its row's item
            shards[s].add([p for p in pairs if owner[p[0]] == s], T0 + t * 60_000)
        hist.insert(0, item)
    merged = CoVisitation(cfg).merge(shards[1]).merge(shards[0])
    now = T0 + 50 * 60_000
    for a in owner:
        got, want = merged.neighbors(a, 4, now), full.neighbors(a, 4, now)
        assert [b for b, _ in got] == [b for b, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-9)
    even = full.select(lambda i: owner[i] == 0)
    assert set(even._rows) == {a for a in owner if owner[a] == 0 and a in full}


def test_pickle_and_save_load_roundtrip(tmp_path) -> None:
    cv = CoVisitation(CoVisConfig(max_neighbors=3, half_life_ms=H))
    hist: list[str] = []
    for t, item in enumerate(["a", "b", "c", "é", "a", "d", "b"]):
        cv.observe(hist, item, T0 + t * 1000)
        hist.insert(0, item)
    now = T0 + 10_000
    for other in (pickle.loads(pickle.dumps(cv)), None):
        if other is None:
            cv.save(tmp_path / "cv.npz")
            other = CoVisitation.load(tmp_path / "cv.npz")
        assert other.config == cv.config and other.stats() == cv.stats()
        for a in "abcd":
            assert other.neighbors(a, 3, now) == cv.neighbors(a, 3, now)
        assert other.score("é", "c", now) == cv.score("é", "c", now) > 0
    empty = pickle.loads(pickle.dumps(CoVisitation()))
    assert len(empty) == 0 and empty.candidates(["a"], 3, T0) == []


def test_round_trip_keeps_rows_whose_neighbours_are_not_rows() -> None:
    """Rows are named by the first ``n_rows`` vocabulary entries: a neighbour that is not
    a row itself must not shift the names of later rows."""
    cv = CoVisitation(CoVisConfig())
    cv.add([("a", "x", 1.0), ("a", "y", 2.0), ("b", "z", 3.0), ("c", "a", 4.0)], T0)
    back = pickle.loads(pickle.dumps(cv))
    assert back._rows == cv._rows
    assert CoVisitation.from_arrays(cv.to_arrays())._rows == {
        "a": {"x": 1.0, "y": 2.0}, "b": {"z": 3.0}, "c": {"a": 4.0}}


def _random_table(seed: int) -> CoVisitation:
    import random

    rng = random.Random(seed)
    c = CoVisitation(CoVisConfig(max_neighbors=8, window=5, half_life_ms=50_000))
    items = [f"i{j}" for j in range(40)]
    for t in range(300):
        recent = rng.sample(items, 4)
        # equal weights on purpose (ties keep the stored order in both readers)
        c.add(c.pairs_for(recent, rng.choice(items)), 1_000 * t)
    c.add([("only-neighbour-row", "i1", 1.0)], 300_000)
    return c


def test_frozen_table_reads_like_the_table_it_was_saved_from_without_decoding_rows() -> None:
    """``from_arrays(frozen=True)`` (published item tables): the same rows, order, decayed
    weights, sizes, scores and arrays, while no row dict is built until a write."""
    plain = _random_table(3)
    arrays = plain.to_arrays()
    frozen = CoVisitation.from_arrays(arrays, frozen=True)
    loaded = CoVisitation.from_arrays(arrays)
    now = 420_000
    assert len(frozen) == len(plain)
    for item in [*plain._rows, "i1", "absent"]:
        assert (item in frozen) == (item in plain)
        assert frozen.row_size(item) == plain.row_size(item)
        for n in (1, 3, plain.row_size(item) or 1):
            assert frozen.neighbors(item, n, now) == loaded.neighbors(item, n, now)
        names, weights = frozen.row_arrays(item, now)
        assert list(zip(names, weights.tolist(), strict=True)) == plain.neighbors(
            item, plain.row_size(item), now)
    assert frozen._full is None, "reads decoded the rows"
    got = frozen.to_arrays()
    assert got.keys() == arrays.keys() and all(
        np.array_equal(got[k], arrays[k]) for k in arrays)
    assert frozen.score("i1", "i2", now) == plain.score("i1", "i2", now)
    # a write decodes every row once; from then on it is an ordinary table
    frozen.add([("i1", "new", 2.0)], now)
    plain.add([("i1", "new", 2.0)], now)
    assert frozen._rows == plain._rows
    assert frozen.neighbors("i1", 20, now) == plain.neighbors("i1", 20, now)
    assert pickle.loads(pickle.dumps(frozen))._rows == plain._rows


def test_row_weights_are_the_sorted_neighbours_unsorted_bit_for_bit() -> None:
    """``row_weights`` (the item tables' lookup rows): every neighbour's decayed weight,
    exactly the floats of ``neighbors`` but in stored order, from a live table and from a
    frozen one without decoding its rows."""
    plain = _random_table(3)
    frozen = CoVisitation.from_arrays(plain.to_arrays(), frozen=True)
    now = 420_000
    unsorted = 0
    for item in [*plain._rows, "absent"]:
        want = dict(plain.neighbors(item, plain.row_size(item), now))
        for table in (plain, frozen):
            got = table.row_weights(item, now)
            assert got == want and list(got) == list(plain._rows.get(item, {}))
        unsorted += list(want) != list(plain._rows.get(item, {}))
    assert unsorted > 0, "every row was already in weight order: the test shows nothing"
    assert frozen._full is None, "reads decoded the rows"


def _same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("slack", [0.5, 0.0])
def test_published_arrays_built_from_the_previous_version_equal_a_full_build(
        slack: float, keep: bool) -> None:
    """Issue 18 point 4: a new table's arrays are built from the last published ones
    and the rows written since (``publish_arrays``) and equal ``to_arrays`` bit for bit,
    through new names, neighbour-only names, pruned (slack) and cut (no slack) and
    evicted rows, removed rows and a rebase (a new ``t_ref``: every row rebuilt); the
    reuse is what runs, also for written rows that only appended neighbours (their
    leading ids taken from the last version). ``keep``: the previous arrays are the kept
    ones (their vocabulary list reused, not decoded), else a copy as read back from a
    file."""
    import random

    rnd = random.Random(11)
    cv = CoVisitation(CoVisConfig(max_neighbors=6, prune_slack=slack, window=4, max_items=40,
                                  half_life_ms=H))
    names = [f"n{i}" for i in range(90)]
    previous = None
    reused = appended = from_kept = 0
    original = CoVisitation._csr_since

    def spy(self: CoVisitation, *args: object) -> object:
        nonlocal reused, from_kept
        from_kept += self._kept is not None and args[0] is self._kept[0]
        out = original(self, *args)  # type: ignore[arg-type]
        reused += out is not None
        return out

    CoVisitation._csr_since = spy  # type: ignore[method-assign]
    try:
        ts = T0
        for round_ in range(60):
            hot = rnd.sample(names, rnd.randint(1, 8)) if round_ % 7 else names[:50]
            for _ in range(rnd.randint(1, 12)):
                item = rnd.choice(hot)
                cv.add(cv.pairs_for(rnd.sample(names, 5), item, ts), ts)
            if round_ % 9 == 4:
                cv.remove(rnd.sample(names, 3))
            ts += 50 * H if round_ == 30 else rnd.randint(0, H)  # past 600 half-lives: a rebase
            if previous is not None and cv._written:
                appended += sum(not v and a in cv for a, v in cv._written.items())
            published = cv.publish_arrays(previous, keep=keep)
            _same_arrays(published, cv.to_arrays())
            previous = (cv.kept_arrays() if keep
                        else {k: v.copy() for k, v in published.items()})  # as read back
    finally:
        CoVisitation._csr_since = original  # type: ignore[method-assign]
    assert reused > 30 and appended > 30
    assert from_kept > 30 if keep else from_kept == 0


def test_published_arrays_fall_back_to_a_full_build_when_previous_does_not_fit() -> None:
    cv = CoVisitation(CoVisConfig(max_neighbors=5, window=3))
    cv.observe(["a", "b"], "c", T0)
    first = cv.publish_arrays()
    cv.observe(["c"], "d", T0 + 1)
    other = CoVisitation(CoVisConfig(max_neighbors=5, window=3))
    other.observe(["x"], "y", T0 + 5)  # another table's arrays (another t_ref)
    _same_arrays(cv.publish_arrays(other.to_arrays()), cv.to_arrays())
    untracked = CoVisitation.from_arrays(cv.to_arrays())  # restored: written rows unknown
    untracked.observe(["a"], "d", T0 + 2)
    _same_arrays(untracked.publish_arrays(first), untracked.to_arrays())


@pytest.mark.parametrize("slack", [0.5, 0.0])
def test_a_batch_of_pairs_adds_as_the_pairs_one_by_one(slack: float) -> None:
    """``add`` reads a row once for a run of pairs of the same item: rows, their order
    (least recently written first), evictions, prunes and counters equal adding the pairs
    one call each."""
    import random

    rnd = random.Random(5)
    cfg = CoVisConfig(max_neighbors=5, prune_slack=slack, window=6, max_items=12,
                      half_life_ms=H)
    batch, single = CoVisitation(cfg), CoVisitation(cfg)
    names = [f"n{i}" for i in range(30)]
    ts = T0
    for _ in range(40):
        pairs = []
        for _ in range(rnd.randint(1, 6)):
            new = rnd.choice(names[:18])
            pairs += batch.pairs_for(rnd.sample(names, 7), new)
            pairs += [(new, rnd.choice(names), 0.5)] * rnd.randint(0, 3)  # runs of one row
        batch.add(pairs, ts)
        for p in pairs:
            single.add([p], ts)
        ts += rnd.randint(0, H // 4)
    assert list(batch._rows.items()) == list(single._rows.items())
    assert batch.stats() == single.stats() and batch.stats()["evicted_rows"] > 0
    assert batch.stats()["evicted_neighbors"] > 0


def _dict_rows_reference(pairs_at: list[tuple[list[tuple[str, str, float]], int]],
                         config: CoVisConfig) -> dict[str, list[tuple[str, float]]]:
    """The rows as the dict-of-dicts table built them before the row store (its ``add``
    and ``_rebase`` transcribed), for the row store's equality test."""
    from collections import OrderedDict

    rows: OrderedDict[str, dict[str, float]] = OrderedDict()
    t_ref: int | None = None
    m = config.max_neighbors
    limit = m + int(m * config.prune_slack)
    for pairs, ts in pairs_at:
        if t_ref is None:
            t_ref = ts
        e = (ts - t_ref) / config.half_life_ms
        if e > 600.0:
            f = 2.0 ** (-(ts - t_ref) / config.half_life_ms)
            for row in rows.values():
                for k in row:
                    row[k] *= f
            t_ref, e = ts, 0.0
        g = 2.0**e
        for a, b, w in pairs:
            row = rows.get(a)
            if row is None:
                row = rows[a] = {}
                if len(rows) > config.max_items:
                    rows.popitem(last=False)
            else:
                rows.move_to_end(a)
            if b in row:
                row[b] = row[b] + w * g
                continue
            row[b] = w * g
            if len(row) > limit:
                if limit == m:
                    del row[min(row, key=row.__getitem__)]
                else:
                    rows[a] = dict(sorted(row.items(), key=lambda kv: kv[1], reverse=True)[:m])
    return {a: list(r.items()) for a, r in rows.items()}


@pytest.mark.parametrize("slack", [0.0, 0.5])
def test_the_row_store_holds_the_dict_tables_rows_bit_for_bit(slack: float) -> None:
    """Random pairs (repeated weights, so ties in the prunes; a rebase past 600
    half-lives; rows evicted): every row, its neighbours' order and each weight's bits
    equal the dict-of-dicts table's, and the published arrays equal a full build."""
    rng = np.random.default_rng(7)
    config = CoVisConfig(max_neighbors=6, prune_slack=slack, max_items=25, half_life_ms=H)
    cv = CoVisitation(config)
    items = [f"i{k}" for k in range(40)]
    log: list[tuple[list[tuple[str, str, float]], int]] = []
    prev = None
    for step in range(300):
        ts = T0 + step * H // 4 + (700 * H if step >= 250 else 0)
        pairs = [(items[a], items[b], [1.0, 0.5, 0.25][int(w)])
                 for a, b, w in rng.integers(0, [40, 40, 3], size=(int(rng.integers(1, 30)), 3))
                 if a != b]
        cv.add(pairs, ts)
        log.append((pairs, ts))
        if step % 7 == 0:
            prev = cv.publish_arrays(prev)
            full = cv.to_arrays()
            assert all(np.array_equal(prev[k], full[k]) for k in full)
    want = _dict_rows_reference(log, config)
    assert list(cv._rows) == list(want)
    for a, row in cv._rows.items():
        got = list(row.items())
        assert [b for b, _ in got] == [b for b, _ in want[a]]
        assert np.array_equal(np.array([v for _, v in got]), np.array([v for _, v in want[a]]))
    assert cv.evicted_rows > 0 and cv.evicted_neighbors > 0


def test_rows_longer_than_the_shared_slots_grow_them() -> None:
    """A row past the 1,024 preallocated slots grows the shared slot list (slot k is k)
    and holds the dict table's row."""
    from state import covisitation

    rng = np.random.default_rng(3)
    config = CoVisConfig(max_neighbors=1_100, prune_slack=0.0)
    pairs = [("hub", f"n{k}", float(w)) for k, w in enumerate(rng.integers(1, 50, 1_300))]
    cv = CoVisitation(config)
    cv.add(pairs, T0)
    want = _dict_rows_reference([(pairs, T0)], config)["hub"]
    assert list(cv._rows["hub"].items()) == want and cv.evicted_neighbors == 200
    assert all(k == s for k, s in enumerate(covisitation._SLOTS))


@pytest.mark.parametrize("slack", [0.0, 0.5])
def test_a_call_of_pairs_equals_the_pairs_one_by_one_also_when_one_raises(slack: float) -> None:
    """Random calls with repeated weights (ties in the prunes), a rebase past 600
    half-lives, calls that evict rows and calls that do not, a weight that cannot be
    added part-way through some (the pairs before it applied, its row left as it was):
    rows, their order, each weight's bits, the rows written since the last arrays and the
    counters equal adding the pairs one call each, and the published arrays equal a full
    build."""
    rng = np.random.default_rng(11)
    config = CoVisConfig(max_neighbors=5, prune_slack=slack, max_items=30, half_life_ms=H)
    cv, one = CoVisitation(config), CoVisitation(config)
    prev = cv.publish_arrays()
    one.publish_arrays()
    items = [f"i{k}" for k in range(45)]
    ways = {"grouped": 0, "evicting": 0}
    for step in range(400):
        ts = T0 + step * H // 3 + (700 * H if step >= 320 else 0)
        hot = 12 if step % 3 else 45  # mostly a few rows (no eviction), sometimes many
        pairs: list = [(items[a], items[b], [1.0, 0.5, 0.25][int(w)])
                       for a, b, w in rng.integers(0, [hot, 45, 3], size=(int(rng.integers(1, 40)), 3))
                       if a != b]
        if step % 50 == 49:  # a weight that cannot be added: raises part-way
            pairs.insert(len(pairs) // 2, (items[1], items[2], "x"))
        new_rows = len({a for a, _, _ in pairs} - set(cv._rows))
        ways["grouped" if len(cv._rows) + new_rows <= config.max_items else "evicting"] += 1
        errors = []
        for table, calls in ((cv, [pairs]), (one, [[p] for p in pairs])):
            for call in calls:
                try:
                    table.add(call, ts)
                except TypeError:
                    errors.append(table)
                    if table is one:
                        break
        assert (cv in errors) == (one in errors)
        assert list(cv._rows) == list(one._rows)
        assert cv._written == one._written
        if step % 9 == 0:
            prev = cv.publish_arrays(prev)
            full = cv.to_arrays()
            assert all(np.array_equal(prev[k], full[k]) for k in full)
            one.publish_arrays()
    for a, row in cv._rows.items():
        assert [b for b in row] == [b for b in one._rows[a]]
        assert np.array_equal(row.weights(), one._rows[a].weights())
    assert cv.stats() == one.stats()
    assert cv.evicted_rows > 0 and cv.evicted_neighbors > 0
    assert ways["grouped"] > 100 and ways["evicting"] > 20
