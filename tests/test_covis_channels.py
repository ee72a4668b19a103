"""Two co-visitation channels end to end: user shard pairs -> item shards -> item tables
-> serving's retrieval blend, checked against a from-scratch reference computation."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from events.model import Feedback, Request
from operators.item_shard import ItemsConfig, ItemShard, item_shard_key, route_updates
from operators.item_updates import CovisPairs, Interaction
from operators.serving import ServingConfig
from operators.snapshot_views import SnapshotViews
from operators.user_shard import UserShard
from state.covisitation import CoVisConfig, CoVisitation
from state.hashing import shard_of
from state.item_table import ItemTable
from state.join_state import JoinConfig
from state.sampling import NegativeSampler
from state.snapshot_store import SnapshotStore

T0 = 1_767_225_600_000
N_ITEM_SHARDS = 3
ITEM_KEYS = [item_shard_key(i) for i in range(N_ITEM_SHARDS)]
NO_DECAY = 10**15  # half-life (ms): weights stay put within a test
WINDOW, PAIR_DECAY, QUERY_DECAY, ALPHA, SEEDS = 4, 0.5, 0.7, 0.5, 3


def item_shard_of(item: str) -> str:
    return item_shard_key(shard_of(item, N_ITEM_SHARDS))


def rating(ts: int, user: str, item: str, value: float) -> Feedback:
    return Feedback(ts, user, item, "rating", value=value)


def covis_config(**kw: Any) -> CoVisConfig:
    return CoVisConfig(window=WINDOW, position_decay=PAIR_DECAY, half_life_ms=NO_DECAY, **kw)


def user_shard(store: SnapshotStore | None = None) -> UserShard:
    serving = ServingConfig(poll_ms=0, recent_items=SEEDS, covis_query_decay=QUERY_DECAY,
                            covis_pop_alpha=ALPHA, sources={"covis": 1000})
    views = SnapshotViews(store, ITEM_KEYS, 0) if store is not None else None
    return UserShard(JoinConfig(interaction_negatives=0), NegativeSampler(1.0, 0),
                     covis=covis_config(), covis_any=True, serving=serving, views=views,
                     item_shard_of=item_shard_of)


def test_user_shard_emits_pairs_of_both_channels() -> None:
    shard = user_shard()
    out = shard.process("u000", [rating(T0, "u", "a", 5), rating(T0 + 1, "u", "b", 2),
                                 rating(T0 + 2, "u", "c", 4), rating(T0 + 3, "v", "a", 1)])
    assert out["item-updates"] == [
        Interaction("a", T0, True),
        Interaction("b", T0 + 1, False),
        CovisPairs("b", [("b", "a", 1.0), ("a", "b", 1.0)], T0 + 1, "any"),
        Interaction("c", T0 + 2, True),
        # any interaction: c with b (k = 0) and a (k = 1)
        CovisPairs("c", [("c", "b", 1.0), ("b", "c", 1.0), ("c", "a", PAIR_DECAY),
                         ("a", "c", PAIR_DECAY)], T0 + 2, "any"),
        # liked: c with the recent positives only (a; b was rated 2)
        CovisPairs("c", [("c", "a", 1.0), ("a", "c", 1.0)], T0 + 2, "liked"),
        Interaction("a", T0 + 3, False),  # v's first interaction pairs with nothing
    ]
    assert shard.liked.recent("u", 10) == ["c", "a"]
    assert shard.history.recent("u", 10) == ["c", "b", "a"]


def test_an_interactions_pairs_are_split_per_item_shard_in_order() -> None:
    """A ``CovisPairs`` message reaches each item shard as one message holding the pairs
    whose row item it owns, in their order (what one message per pair, routed by its row
    item, gave the shard), among the other updates in batch order."""
    items = [f"m{j}" for j in range(30)]
    pairs = CoVisitation(CoVisConfig(window=20, position_decay=PAIR_DECAY)).pairs_for(items[1:], items[0])
    updates = [Interaction("m0", T0, True), CovisPairs("m0", pairs, T0, "any"),
               Interaction("m5", T0 + 1, True), CovisPairs("m0", pairs[:2], T0 + 1, "liked")]
    routed = route_updates(updates, item_shard_of)
    assert len(routed) == N_ITEM_SHARDS
    for key in ITEM_KEYS:
        want: list[Any] = []
        for u in updates:
            if isinstance(u, CovisPairs):
                owned = [p for p in u.pairs if item_shard_of(p[0]) == key]
                if owned:
                    want.append(CovisPairs(owned[0][0], owned, u.ts, u.channel))
            elif item_shard_of(u.item_id) == key:
                want.append(u)
        assert routed[key] == want


def _log(seed: int) -> list[Feedback]:
    rng = random.Random(seed)
    items = [f"m{j}" for j in range(25)]
    events, ts = [], T0
    for _ in range(400):
        user = f"u{rng.randrange(12)}"
        item = items[min(int(rng.expovariate(0.12)), len(items) - 1)]
        ts += rng.randrange(1, 5_000)
        events.append(rating(ts, user, item, float(rng.randint(1, 5))))
    return events


def _reference(events: list[Feedback], user: str) -> dict[str, float]:
    """The recipe's blend from scratch: dense pair sums, counts, seeds, max-normalised."""
    covis: dict[str, dict[tuple[str, str], float]] = {"liked": {}, "any": {}}
    counts: dict[str, dict[str, float]] = {"liked": {}, "any": {}}
    hist: dict[str, dict[str, list[str]]] = {"liked": {}, "any": {}}
    for fb in events:
        channels = ["any"] + (["liked"] if fb.value >= 4 else [])
        for ch in channels:
            recent = [r for r in hist[ch].get(fb.user_id, []) if r != fb.item_id][:WINDOW]
            for k, r in enumerate(recent):
                for pair in ((fb.item_id, r), (r, fb.item_id)):
                    covis[ch][pair] = covis[ch].get(pair, 0.0) + PAIR_DECAY**k
            counts[ch][fb.item_id] = counts[ch].get(fb.item_id, 0.0) + 1
            h = hist[ch].setdefault(fb.user_id, [])
            if fb.item_id in h:
                h.remove(fb.item_id)
            h.insert(0, fb.item_id)
    parts = []
    for ch in ("liked", "any"):
        seeds = hist[ch].get(user, [])[:SEEDS]
        acc: dict[str, float] = {}
        for k, s in enumerate(seeds):
            for (a, b), w in covis[ch].items():
                if a == s:
                    acc[b] = acc.get(b, 0.0) + QUERY_DECAY**k * w
        if acc:
            norm = {c: v / max(counts[ch].get(c, 0.0), 1.0) ** ALPHA for c, v in acc.items()}
            top = max(norm.values())
            parts.append({c: v / top for c, v in norm.items()})
    blend: dict[str, float] = {}
    for part in parts:
        for c, v in part.items():
            blend[c] = blend.get(c, 0.0) + v / len(parts)
    return blend


@pytest.mark.parametrize("seed", [1, 2])
def test_serving_blend_equals_the_reference(tmp_path: Path, seed: int) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    shard = user_shard(store)
    config = ItemsConfig(refresh_interval_ms=10**12, covis={"window": WINDOW, "position_decay":
                                                             PAIR_DECAY, "half_life_ms": NO_DECAY})
    items = {key: ItemShard(config, store) for key in ITEM_KEYS}
    events = _log(seed)
    cuts = [0, len(events) // 2, len(events)]
    for begin, end in zip(cuts[:-1], cuts[1:], strict=True):  # a second table version replaces the first
        for start in range(begin, end, 50):  # micro-batches, like the flow
            out = shard.process("u000", events[start:min(start + 50, end)])
            for key, updates in route_updates(out.get("item-updates", []), item_shard_of).items():
                items[key].process(key, updates)
        for item_shard in items.values():
            item_shard.publish()
        shard.server.views.poll()
        _check(shard, events[:end])


def _check(shard: UserShard, events: list[Feedback]) -> None:
    """Serving's blend and top list equal the reference over ``events``."""
    now = events[-1].ts
    for user in ("u0", "u3", "u7"):
        want = _reference(events, user)
        best, raw = shard.server.covis_channels(shard.context.user(user, now), now, 10**6)
        blend = dict(best)
        assert set(raw) == {"liked", "any"}
        assert blend.keys() == want.keys() and want
        assert [v for _, v in best] == sorted(blend.values(), reverse=True)
        top3, _ = shard.server.covis_channels(shard.context.user(user, now), now, 3)
        assert top3 == best[:3]
        for item, value in want.items():
            assert blend[item] == pytest.approx(value, rel=1e-6), item
        # the retrieval source serves that order (consumed items filtered)
        rec = shard.process("u000", [Request(now, f"r-{user}-{now}", user, 5)])
        [record] = rec["recommendations"]
        expected = [c for c, _ in sorted(want.items(), key=lambda kv: -kv[1])
                    if c not in shard.history.consumed(user)][:5]
        assert [i["item_id"] for i in record["items"]] == expected


def test_item_table_round_trips_both_channels_and_counts(tmp_path: Path) -> None:
    liked, any_ = CoVisitation(covis_config()), CoVisitation(covis_config())
    liked.observe(["a"], "b", T0)
    any_.observe(["a", "c"], "b", T0)
    table = ItemTable("i000", T0, liked, covis_any=any_, liked_counts={"a": 2.0, "b": 1.0},
                      interactions={"a": 3.0, "b": 2.0, "c": 1.0}, popular={"a": 0.5, "b": 0.25},
                      trending={"b": 4.0, "a": 1.0})  # the liked keys in their order, then not
    table.save(tmp_path / "t.npz")
    back = ItemTable.load(tmp_path / "t.npz")
    assert back.liked_counts == table.liked_counts and back.interactions == table.interactions
    assert list(back.popular.items()) == list(table.popular.items())  # an ids array shared
    assert list(back.trending.items()) == list(table.trending.items())
    assert back.covis_row("liked", "b") == {"a": pytest.approx(1.0)}
    assert back.covis_row("any", "b") == {"a": pytest.approx(1.0), "c": pytest.approx(PAIR_DECAY)}
    assert back.channel("any")[1] is back.interactions
    with pytest.raises(ValueError, match="channel"):
        back.channel("nope")
    for name, item in [("liked", "b"), ("any", "b"), ("any", "a"), ("liked", "zz")]:
        row = back.covis_row(name, item)  # a read is kept per table: the same dict again
        assert row == back.channel(name)[0].row_weights(item, back.ts)
        assert back.covis_row(name, item) is row
    assert back.covis_row("liked", "b") is not back.covis_row("any", "b")
    with pytest.raises(ValueError, match="channel"):
        back.covis_row("nope", "b")
    with (tmp_path / "f.npz").open("wb") as f:  # into an open file: the same bytes
        table.save(f)
    assert (tmp_path / "f.npz").read_bytes() == (tmp_path / "t.npz").read_bytes()


def test_prune_slack_bounds_rows_and_keeps_the_strongest() -> None:
    m = 10
    cv = CoVisitation(covis_config(max_neighbors=m, prune_slack=0.5))
    for j in range(100):
        cv.add([("hub", f"n{j}", float(j + 1))], T0)
        assert cv.row_size("hub") <= m + m // 2
    kept = {b for b, _ in cv.neighbors("hub", 100, T0)}
    assert {f"n{j}" for j in range(90, 100)} <= kept
    assert cv.stats()["evicted_neighbors"] == 100 - cv.row_size("hub")
    with pytest.raises(ValueError):
        covis_config(prune_slack=-1.0)


def test_sparse_sum_dense_and_sorted_paths_agree() -> None:
    import numpy as np

    from state.covis_view import sparse_sum

    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50, 200)
    w = rng.random(200)
    want: dict[int, float] = {}
    for i, v in zip(ids.tolist(), w.tolist(), strict=True):
        want[i] = want.get(i, 0.0) + v
    for n in (50, 10_000):  # bincount path, then the sort path
        got_ids, got = sparse_sum(ids, w, n)
        assert got_ids.tolist() == sorted(want)
        assert got.tolist() == pytest.approx([want[i] for i in sorted(want)])


def test_sums_at_reads_the_full_sums_bit_for_bit() -> None:
    """``sums_at`` (serving's ``long_liked``/``last_liked``) gives, for each wanted id
    (repeats, -1 and ids no entry reaches included), exactly ``sparse_sum``'s float."""
    import numpy as np

    from state.covis_view import sparse_sum, sums_at

    rng = np.random.default_rng(7)
    for size, space in ((5_000, 20_000), (300, 40), (1, 5)):
        ids = rng.integers(0, space, size)
        w = rng.random(size) * 10.0 ** rng.integers(-6, 6, size)  # order matters in floats
        wanted = np.concatenate([rng.integers(-1, space + 3, 150), ids[:20], ids[:5]])
        all_ids, sums = sparse_sum(ids, w, space)
        full = dict(zip(all_ids.tolist(), sums.tolist(), strict=True))
        got = sums_at(ids, w, wanted)
        assert got.tolist() == [full.get(i, 0.0) for i in wanted.tolist()]
        assert sums_at(ids, w, wanted, space + 3).tolist() == got.tolist()  # scratch size given
        assert sums_at(ids, w, np.unique(wanted[wanted >= 0])).tolist() == [
            full.get(i, 0.0) for i in np.unique(wanted[wanted >= 0]).tolist()]
    assert sums_at(np.zeros(0, np.int64), np.zeros(0), np.array([1, 2])).tolist() == [0.0, 0.0]


def test_a_detached_capture_gives_the_tables_snapshot_columns(tmp_path: Path) -> None:
    """What a detach captures of a version (``_VersionCapture.capture_tables``: each
    table's times and its seed rows cut to the version's items) gives the snapshot
    columns of the loaded tables themselves, both channels, over three item shards, bit
    for bit; the capture holds no table."""
    import gc
    import weakref
    from types import SimpleNamespace

    from operators.point_in_time import PointInTime, UserContext, _Taken, _VersionCapture

    rnd = random.Random(5)
    items = [f"i{n}" for n in range(40)]
    liked, any_ = CoVisitation(covis_config()), CoVisitation(covis_config())
    for k in range(300):
        recent = rnd.sample(items, 5)
        (liked if k % 2 else any_).observe(recent[1:], recent[0], T0 + k)
        any_.observe(recent[1:], recent[0], T0 + k)
    loaded: dict[str, ItemTable] = {}
    for n, shard in enumerate(ITEM_KEYS):
        mine = [i for i in items if item_shard_of(i) == shard]
        table = ItemTable(shard, T0 + 1_000 + n, liked, popular={i: 1.0 + len(i) for i in mine},
                          trending={i: 2.0 for i in mine[::2]}, covis_any=any_)
        table.save(tmp_path / f"{shard}.npz")
        loaded[shard] = ItemTable.load(tmp_path / f"{shard}.npz")
    context = PointInTime(item_shard_of=item_shard_of)
    takens = []
    for u in range(4):  # four groups (requests) on the version
        ctx = UserContext(f"u{u}", rnd.sample(items, 12), {}, None, {}, rnd.sample(items, 9))
        taken = _Taken(ctx, T0 + 5_000_000 * u, None)
        taken.items = rnd.sample(items, 6)
        takens.append(taken)
    version_items = list(dict.fromkeys(i for t in takens for i in t.items))
    rows = context._count_rows(version_items, loaded)
    views = SimpleNamespace(index=SimpleNamespace(index=None),
                            loaded_tables=list(loaded.values()).copy)
    version = _VersionCapture(version_items, views, False, rows)  # type: ignore[arg-type]
    version.capture_tables(loaded, rows, context._seed_rows(takens, loaded, True,
                                                            set(version_items)))
    assert version.any_channel and version.tables is not None
    want = [context._snapshot_columns(t.ctx, t.items, t.ts, True, loaded,
                                      context._count_rows(t.items, loaded)) for t in takens]
    refs = [weakref.ref(t) for t in loaded.values()]
    del loaded, rows, views
    gc.collect()
    assert all(ref() is None for ref in refs), "the capture holds a table"
    held = [row for row in version.counts.values() if row is not None]
    assert held and not any(map(gc.is_tracked, held)), "count rows of atomic values"
    got = [context._snapshot_columns(t.ctx, t.items, t.ts, True, version.tables,
                                     version.count_rows(t.items)) for t in takens]
    assert got == want
    assert any(any(values) for t in want for name, values in t if name == "covis_any")
    assert any(any(values) for t in want for name, values in t if name == "covis")
