"""Tests for the IPS-style profile store and the declarative feature specs.

Every aggregate and window is checked against a brute-force reference (a scan of the
raw events) over random streams: exactly at day-aligned query times (where every window
edge falls on a slice boundary), and within the documented slice-rounding bounds at
arbitrary times.
"""

from __future__ import annotations

import math
import pickle
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_feature_spec import OK

from state.feature_spec import (
    DEFAULT_FEATURES,
    RATE_FEATURES,
    FeatureSpecError,
    default_features,
    parse_duration,
    parse_features,
)
from state.profile_codec import NO_SLICES, RAW, SLICES, decode, encode
from state.profile_plan import DEFAULT_TIERS, FAR
from state.profiles import ProfileStore, stores_for

SEC, MIN, HOUR, DAY = 1_000, 60_000, 3_600_000, 86_400_000
BASE = 19_675 * DAY  # a day boundary (2023-11-14)
WINDOWS = ["30s", "5m", "1h", "1d", "7d", "all"]
WIN_MS: dict[str, int | None] = {"30s": 30 * SEC, "5m": 5 * MIN, "1h": HOUR, "1d": DAY,
                                 "7d": 7 * DAY, "all": None}
HYP = settings(max_examples=75, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _spec(name: str, flt: dict[str, Any], agg: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "entity": "user", "filter": flt, "aggregate": agg,
            "windows": WINDOWS, **kw}


FB = {"type": "feedback"}
SPECS = [
    _spec("imps", {"type": "impression"}, "count"),
    _spec("fb_sum", {"type": "feedback", "action": ["click", "rating"]}, "sum"),
    _spec("r_mean", {"type": "feedback", "action": "rating"}, "mean"),
    _spec("r_min", {"type": "feedback", "action": "rating"}, "min"),
    _spec("r_max", {"type": "feedback", "action": "rating"}, "max"),
    _spec("r_last", {"type": "feedback", "action": "rating"}, "last"),
    _spec("fb_last_ts", FB, "last", value="ts"),
    _spec("click_decay", {"type": "feedback", "action": "click"}, "decay_sum", half_life="1h"),
    _spec("imp_items", {"type": "impression"}, "distinct_count", k=10_000),
    _spec("recent", FB, "last_k", k=5),
]


# ----------------------------------------------------------------- reference


def _matches(spec: dict[str, Any], ev: dict[str, Any]) -> bool:
    f = spec["filter"]
    if ev["type"] != f["type"]:
        return False
    act = f.get("action")
    if act is not None:
        acts = [act] if isinstance(act, str) else act
        if ev.get("action") not in acts:
            return False
    return not ("min_value" in f and ev.get("value", 1.0) < f["min_value"])


def reference(spec: dict[str, Any], events: list[dict[str, Any]], key_field: str, key: Any,
              t: int, lo: int | None) -> Any:
    """Brute force: the feature over events of entity ``key`` with lo <= ts < t.

    ``events`` are in application order: among equal ts the later applied is newer."""
    sel = [e for e in events if e.get(key_field) == key and _matches(spec, e)
           and e["ts"] < t and (lo is None or e["ts"] >= lo)]
    agg = spec["aggregate"]
    field = spec.get("value", "value" if agg not in ("distinct_count", "last_k") else "item_id")
    vals = [(e["ts"], e.get(field, 1.0) if field == "value" else e[field]) for e in sel]
    if agg == "count":
        return float(len(sel))
    if agg == "sum":
        return float(sum(v for _, v in vals))
    if agg == "decay_sum":
        hl = parse_duration(spec["half_life"])
        return sum(v * 2.0 ** (-(t - ts) / hl) for ts, v in vals)
    if agg == "distinct_count":
        return float(len({v for _, v in vals}))
    if agg == "last_k":  # distinct items by their newest occurrence, newest first
        latest: dict[Any, int] = {}
        for ts, v in vals:
            if latest.get(v, ts) <= ts:
                latest.pop(v, None)
                latest[v] = ts  # dict order = order of the newest occurrences' application
        return sorted(reversed(latest), key=lambda v: -latest[v])[: spec["k"]]
    if not vals:
        return None
    if agg == "mean":
        return sum(v for _, v in vals) / len(vals)
    if agg == "min":
        return min(v for _, v in vals)
    if agg == "max":
        return max(v for _, v in vals)
    if agg == "last":
        best = vals[0]
        for tv in vals:
            if tv[0] >= best[0]:
                best = tv
        return best[1]
    raise AssertionError(agg)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b


# ----------------------------------------------------------------- event streams

USERS = ["u0", "u1"]


@st.composite
def streams(draw: Any, max_size: int = 60) -> list[dict[str, Any]]:
    """Events with non-decreasing ts (ties included) over up to ~12 days (mixed gaps)."""
    n = draw(st.integers(1, max_size))
    gap = st.one_of(st.just(0), st.integers(1, 20 * SEC), st.integers(1, 2 * HOUR),
                    st.integers(1, 2 * DAY))
    ts = BASE + draw(st.integers(0, DAY))
    out = []
    for i in range(n):
        ts += draw(gap)
        kind = draw(st.sampled_from(["impression", "click", "rating", "like"]))
        ev: dict[str, Any] = {"ts": ts, "user_id": draw(st.sampled_from(USERS)),
                              "item_id": f"it{draw(st.integers(0, 7))}"}
        if kind == "impression":
            ev.update(type="impression", impression_id=f"i{i}")
        else:
            ev.update(type="feedback", action=kind)
            if kind == "rating":
                ev["value"] = float(draw(st.integers(1, 5)))
            elif draw(st.booleans()):
                ev["value"] = draw(st.floats(0.0, 3.0, allow_nan=False))
        out.append(ev)
    return out


def _check_exact(store: ProfileStore, events: list[dict[str, Any]], t: int) -> None:
    for u in USERS:
        got = store.query(u, t)
        for spec in SPECS:
            for win in WINDOWS:
                w = WIN_MS[win]
                want = reference(spec, events, "user_id", u, t, None if w is None else t - w)
                if want is None and spec["aggregate"] != "last_k":
                    want = None
                name = f"user.{spec['name']}.{win}"
                assert _same(got[name], want), (name, u, t, got[name], want)


# ----------------------------------------------------------------- exactness


@HYP
@given(streams())
def test_every_aggregate_and_window_exact_at_aligned_times(events: list[dict[str, Any]]) -> None:
    store = ProfileStore(SPECS, "user", batch_size=7)
    applied: list[dict[str, Any]] = []
    for i, ev in enumerate(events):
        store.apply(ev)
        applied.append(ev)
        nxt = events[i + 1]["ts"] if i + 1 < len(events) else ev["ts"] + 2 * DAY
        b = (ev["ts"] // DAY + 1) * DAY
        while b <= nxt:  # day boundaries before the next event: every edge slice-aligned
            _check_exact(store, applied, b)
            b += DAY


@HYP
@given(streams(), st.randoms(use_true_random=False))
def test_out_of_order_and_late_events_land_in_the_right_slice(
        events: list[dict[str, Any]], rnd: random.Random) -> None:
    """Late events (older than watermark - lateness) still count where their slice is kept."""
    shuffled = list(events)
    # displace events by up to ~1 day: many arrive behind the watermark
    shuffled.sort(key=lambda e: e["ts"] + rnd.randint(0, DAY))
    store = ProfileStore(SPECS, "user", batch_size=3)
    for ev in shuffled:
        store.apply(ev)
    t = (max(e["ts"] for e in events) // DAY + 1) * DAY
    _check_exact(store, shuffled, t)
    _check_exact(store, shuffled, t + DAY)
    for u in USERS:
        if store.inspect(u) is not None:
            _check_layout(store, u, False)  # slices disjoint and aligned


def test_last_k_tie_in_overlapping_slices() -> None:
    """A case hypothesis found (shrunk by hand): ``it2`` then ``it0`` clicked at the same
    ts, then events ~14 h later; ties on ts make the later-applied event the newer one
    (docs/profiles.md), so ``it0`` comes before ``it2``. Was a bug: compaction moved raw
    ``it2`` into the hour tier but kept its minute slice (the hour's last minute: the same
    end), and the late ``it0`` made an hour slice overlapping it, merged first by a window."""
    t0, t1 = BASE + 53_989_564, BASE + 104_264_483

    def click(ts: int, item: str) -> dict[str, Any]:
        return {"ts": ts, "user_id": "u0", "item_id": item, "type": "feedback", "action": "click"}

    def shown(ts: int, user: str, item: str, imp: str) -> dict[str, Any]:
        return {"ts": ts, "user_id": user, "item_id": item, "type": "impression",
                "impression_id": imp}

    events = [click(t0, "it2"), shown(t1, "u1", "it3", "i7"), click(t0, "it0"),
              shown(t1, "u0", "it3", "i8"), click(BASE + 93_820_430, "it1"),
              shown(BASE + 98_215_339, "u0", "it2", "i3"), click(BASE + 104_254_216, "it1"),
              click(BASE + 104_244_303, "it3"), click(BASE + 104_254_216, "it1")]
    recent = _spec("recent", FB, "last_k", k=5)
    store = ProfileStore([recent], "user", batch_size=3)
    for ev in events:
        store.apply(ev)
    t = (t1 // DAY + 1) * DAY
    want = reference(recent, events, "user_id", "u0", t, None)
    assert want == ["it1", "it3", "it0", "it2"]
    assert store.query("u0", t)["user.recent.all"] == want
    _check_layout(store, "u0", False)  # slices disjoint and aligned


def test_late_event_older_than_lateness_goes_to_existing_slice() -> None:
    spec = _spec("clicks", {"type": "feedback", "action": "click"}, "count")
    store = ProfileStore([spec], "user", batch_size=1)
    t0 = BASE + 10 * HOUR
    for i in range(30):
        store.apply({"type": "feedback", "ts": t0 + i * MIN, "user_id": "u", "item_id": "a",
                     "action": "click"})
    info = store.inspect("u")
    assert info is not None
    before = info["features"]["clicks"]["slices"]
    late_ts = t0 + 3 * MIN + 5 * SEC  # 26 minutes behind the watermark
    store.apply({"type": "feedback", "ts": late_ts, "user_id": "u", "item_id": "a",
                 "action": "click"})
    after = store.inspect("u")["features"]["clicks"]["slices"]  # type: ignore[index]
    assert after == before  # merged into the existing 1-minute slice, none created
    assert store.stats()["late_writes"] == 1
    t = t0 + 30 * MIN
    assert store.query("u", t)["user.clicks.1h"] == 31.0
    assert store.query("u", t0 + 4 * MIN)["user.clicks.5m"] == 5.0  # slice-aligned, exact


def test_point_in_time_never_includes_the_label_event() -> None:
    specs = [_spec("clicks", {"type": "feedback", "action": "click"}, "count"),
             _spec("recent", FB, "last_k", k=5)]
    store = ProfileStore(specs, "user", batch_size=1000)
    t = BASE + 5 * HOUR + 12_345

    def click(ts: int, item: str) -> None:
        store.apply({"type": "feedback", "ts": ts, "user_id": "u", "item_id": item,
                     "action": "click"})

    click(t - 40 * MIN, "old")
    click(t - 2 * SEC, "a")
    click(t, "label")
    click(t + 20 * SEC, "later")
    got = store.query("u", t)  # t is inside the raw region: exact at both edges
    assert got["user.clicks.1h"] == 2.0 and got["user.clicks.all"] == 2.0
    assert got["user.recent.all"] == ["a", "old"]
    now = store.query("u")
    assert now["user.clicks.all"] == 4.0
    assert now["user.recent.all"] == ["later", "label", "a", "old"]
    # once t is older than the raw region its minute slice is cut off (rounded inward):
    # the event at t - 2s is lost, the label still never counts
    click(t + 10 * MIN, "much-later")
    got = store.query("u", t)
    assert got["user.clicks.all"] == 1.0 and got["user.recent.all"] == ["old"]
    assert store.query("u", t - t % MIN)["user.clicks.1h"] == 1.0  # slice-aligned: exact


# ----------------------------------------------------------------- bounds


def _gran_at(store: ProfileStore, cf: int, x: int) -> int:
    """Coarsest slice granularity that can contain time x (0 = raw, exact)."""
    raw_cut = (cf - store.params.raw_ms) // store.params.tiers[0][0] * store.params.tiers[0][0]
    if x >= raw_cut:
        return 0
    for g, span in store.params.tiers:
        if span is None or x >= cf - span:
            return g
    return store.params.tiers[-1][0]


@HYP
@given(streams(), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4))
def test_bounded_approximation_at_arbitrary_times(events: list[dict[str, Any]],
                                                  fracs: list[float]) -> None:
    store = ProfileStore(SPECS, "user", batch_size=5)
    for ev in events:
        store.apply(ev)
    lo_ts, hi_ts = events[0]["ts"], events[-1]["ts"]
    times = [int(lo_ts + f * (hi_ts + 3 * DAY - lo_ts)) for f in fracs] + [None]
    sandwich = {"count", "sum", "distinct_count", "max"}
    for u in USERS:
        info = store.inspect(u)
        if info is None:
            continue
        cf = info["watermark"]
        for t in times:
            got = store.query(u, t)
            tq = store.now + 1 if t is None else t  # type: ignore[operator]
            full = tq > info["max_ts"]
            gr = 0 if full else _gran_at(store, cf, tq)
            kept = tq >= cf - store.params.retention_ms
            for spec in SPECS:
                if spec["aggregate"] not in sandwich:
                    continue
                for win in WINDOWS:
                    w = WIN_MS[win]
                    val = got[f"user.{spec['name']}.{win}"]
                    x = None if w is None else tq - w
                    gx = 0 if x is None else _gran_at(store, cf, x)
                    outer = reference(spec, events, "user_id", u, tq, None if x is None else x - gx)
                    inner = reference(spec, events, "user_id", u, tq - gr, x)
                    if spec["aggregate"] == "max":
                        if val is not None:
                            assert outer is not None and val <= outer
                        if inner is not None and kept:
                            assert val is not None and val >= inner
                        continue
                    assert val <= outer + 1e-9, (spec["name"], win, t, val, outer)
                    if kept:
                        assert val >= inner - 1e-9, (spec["name"], win, t, val, inner)


# ----------------------------------------------------------------- memoisation


@HYP
@given(streams(max_size=80), st.randoms(use_true_random=False))
def test_memoised_reads_equal_cold_recomputation(events: list[dict[str, Any]],
                                                 rnd: random.Random) -> None:
    """Memoised hot values == values recomputed from a freshly decoded profile."""
    hot = ProfileStore(SPECS, "user", batch_size=4)
    cold = ProfileStore(SPECS, "user", batch_size=4, hot_capacity=1)
    for ev in events:
        hot.apply(ev)
        cold.apply(ev)
        if rnd.random() < 0.5:
            t = None if rnd.random() < 0.7 else ev["ts"] + rnd.randint(-HOUR, 3 * DAY)
            _compare(hot, cold, rnd.choice(USERS), t)
    for u in USERS:
        _compare(hot, cold, u, None)
    assert cold.stats()["decodes"] > 0 or cold.stats()["entities"] < 2


def _compare(hot: ProfileStore, cold: ProfileStore, u: str, t: int | None) -> None:
    a, b = hot.query(u, t), cold.query(u, t)
    cold.query(USERS[1 - USERS.index(u)])  # evicts u from cold's one-profile hot set
    assert a == b  # bit for bit: memoised values equal a recomputation


# ----------------------------------------------------------------- compaction / truncation


def _check_layout(store: ProfileStore, uid: str, strict: bool) -> None:
    info = store.inspect(uid)
    assert info is not None
    cf = info["watermark"]
    g_last = store.params.tiers[-1][0]
    raw_cut = (cf - store.params.raw_ms) // store.params.tiers[0][0] * store.params.tiers[0][0]
    for spec in store.specs:
        feat = info["features"].get(spec.name)
        if feat is None:
            continue
        slices = feat["slices"]
        if feat["raw_oldest"] is not None:
            assert feat["raw_oldest"] >= raw_cut, "raw event older than the raw cut"
        horizon = spec.longest_window_ms + store.params.retention_ms
        for (_, e0), (s1, _) in zip(slices, slices[1:], strict=False):
            assert e0 <= s1, "slices overlap or are unsorted"
        bound = 0
        for i, (g, span) in enumerate(store.params.tiers):
            if span is None:
                bound += (horizon + g) // g + 1
            else:
                nxt = store.params.tiers[i + 1][0]
                bound += (span + nxt) // g + 1
        assert len(slices) <= bound
        for s, e in slices:
            g = e - s
            assert g in {t[0] for t in store.params.tiers} and s % g == 0
            assert e <= raw_cut
            assert e > cf - horizon, "slice past the truncation horizon"
            if strict:  # no slice older than the longest window + one coarse slice
                assert s >= cf - spec.longest_window_ms - g_last
            # data younger than a tier's span is at that tier's granularity or finer
            for tg, span in store.params.tiers:
                if span is not None and s >= cf - span:
                    assert g <= tg


@pytest.mark.parametrize("retention_ms", [0, HOUR])
def test_compaction_and_truncation_invariants(retention_ms: int) -> None:
    rng = random.Random(7)
    specs = [_spec("clicks", {"type": "feedback", "action": "click"}, "count") | {"windows": ["5m", "1d"]},
             _spec("rsum", {"type": "feedback", "action": "rating"}, "sum") | {"windows": ["7d"]},
             _spec("decay", {"type": "feedback", "action": "click"}, "decay_sum", half_life="1d")
             | {"windows": ["all"]},
             _spec("recent", FB, "last_k", k=3) | {"windows": ["1h", "all"]}]
    store = ProfileStore(specs, "user", batch_size=50, retention_ms=retention_ms)
    events = []
    ts = BASE
    for i in range(4000):  # ~2 weeks, dense bursts and idle gaps
        ts += rng.choice([rng.randint(1, 30 * SEC), rng.randint(1, 20 * MIN), rng.randint(1, 6 * HOUR)])
        ev = {"type": "feedback", "ts": ts - rng.randint(0, 2 * HOUR) * (rng.random() < 0.1),
              "user_id": "u", "item_id": f"it{rng.randint(0, 30)}",
              "action": rng.choice(["click", "rating"]), "value": float(rng.randint(1, 5))}
        events.append(ev)
        store.apply(ev)
        if i % 2:  # (inspect merges the buffered writes first)
            _check_layout(store, "u", strict=retention_ms == 0)
    _check_layout(store, "u", strict=retention_ms == 0)
    t = (ts // DAY + 1) * DAY
    got = store.query("u", t)
    for spec in specs:
        for win in spec["windows"]:
            w = WIN_MS[win]
            want = reference(spec, events, "user_id", "u", t, None if w is None else t - w)
            assert _same(got[f"user.{spec['name']}.{win}"], want), (spec["name"], win)
    st_ = store.stats()
    assert st_["hot_slices"] < 400
    assert st_["tail_writes"] + st_["dropped_writes"] + st_["late_writes"] > 0


# ----------------------------------------------------------------- snapshot / compression


@HYP
@given(streams())
def test_write_buffer_survives_snapshot_and_restore(events: list[dict[str, Any]]) -> None:
    store = ProfileStore(SPECS, "user", batch_size=10**9, flush_interval_ms=10**12)
    half = len(events) // 2
    for ev in events[:half]:
        store.apply(ev)
    store.flush()
    for ev in events[half:]:
        store.apply(ev)
    assert store.stats()["buffered_writes"] > 0 or len(events) - half == 0
    snap = store.snapshot()
    assert store.stats()["buffered_writes"] == sum(len(w) for _, w in snap["buffer"])
    restored = ProfileStore.restore(pickle.loads(pickle.dumps(snap)))
    direct = pickle.loads(pickle.dumps(store))  # the store itself pickles via snapshot
    t = (events[-1]["ts"] // DAY + 1) * DAY
    for u in USERS:
        for tq in (None, t, events[-1]["ts"], events[0]["ts"] + 1):
            a, b, c = store.query(u, tq), restored.query(u, tq), direct.query(u, tq)
            assert a == b == c
    _check_exact(restored, events, t)
    # both keep evolving identically after the restore
    later = [dict(e, ts=e["ts"] + 3 * DAY) for e in events[: max(1, len(events) // 3)]]
    for ev in later:
        store.apply(ev)
        restored.apply(ev)
        u = ev["user_id"]
        assert store.query(u) == restored.query(u)
        assert store.query(u, ev["ts"] - HOUR) == restored.query(u, ev["ts"] - HOUR)


def test_write_buffer_flushes_by_count_and_event_time() -> None:
    spec = _spec("clicks", {"type": "feedback", "action": "click"}, "count")
    store = ProfileStore([spec], "user", batch_size=3, flush_interval_ms=10 * SEC)

    def click(ts: int, user: str = "u") -> None:
        store.apply({"type": "feedback", "ts": ts, "user_id": user, "item_id": "a",
                     "action": "click"})

    click(BASE)
    click(BASE + SEC)
    assert store.stats()["buffered_writes"] == 2 and store.stats()["flushes"] == 0
    click(BASE + 2 * SEC)  # third write: batch full
    assert store.stats()["buffered_writes"] == 0 and store.stats()["flushes"] == 1
    click(BASE + 3 * SEC, "v")
    store.apply({"type": "request", "ts": BASE + 14 * SEC, "user_id": "w", "request_id": "r"})
    assert store.stats()["buffered_writes"] == 0  # 10 s of event time after the first write
    click(BASE + 15 * SEC, "v")
    store.advance(BASE + 30 * SEC)  # idle stream: the wall-clock fallback flushes too
    assert store.stats()["buffered_writes"] == 0 and store.stats()["flushes"] == 3
    click(BASE + 31 * SEC)
    assert store.stats()["buffered_writes"] == 1
    assert store.query("u")["user.clicks.all"] == 4.0  # reads merge the entity's own writes
    assert store.stats()["buffered_writes"] == 0


def test_compression_round_trip_and_lru() -> None:
    rng = random.Random(3)
    specs = default_features("user")
    big = ProfileStore(specs, "user", hot_capacity=10_000)
    small = ProfileStore(specs, "user", hot_capacity=3)
    users = [f"u{i}" for i in range(40)]
    ts = BASE
    for i in range(4000):
        ts += rng.randint(1, 90 * SEC)
        u = rng.choice(users)
        act = rng.choice(["impression", "click", "like", "purchase", "rating", "dwell"])
        ev: dict[str, Any] = {"ts": ts, "user_id": u, "item_id": f"it{rng.randint(0, 99)}"}
        if act == "impression":
            ev.update(type="impression", impression_id=str(i))
        else:
            ev.update(type="feedback", action=act, value=float(rng.randint(1, 5)))
        big.apply(ev)
        small.apply(ev)
    big.flush()
    small.flush()
    assert small.stats()["hot"] <= 3 and small.stats()["cold"] >= 37
    for u in users:
        for t in (None, ts - 30 * MIN, ts + DAY):
            assert big.query(u, t) == small.query(u, t)
    # every profile round-trips through zlib(orjson(...)) unchanged
    snap = big.snapshot()
    for key, blob in snap["profiles"].items():
        p = decode(blob, len(big.specs))
        assert decode(encode(p, 6), len(big.specs)).feats == p.feats
        assert big._table.hot[key].feats == p.feats
    info = big.inspect("u1")
    assert info is not None and 0 < info["encoded_bytes"] < 20_000


# ----------------------------------------------------------------- user x category



def test_raw_events_and_slices_are_tuples_the_collector_untracks() -> None:
    """Long-lived profile state is not rescanned by every collection: raw events,
    slices and their mean, last and distinct_count accumulators are tuples (decoded
    ones too), untracked by the collector unless an accumulator is a list (last_k)."""
    import gc

    rng = random.Random(5)
    specs = default_features("user")
    store = ProfileStore(specs, "user", hot_capacity=10_000)
    ts = BASE
    for i in range(3000):
        ts += rng.randint(1, 90 * SEC)
        late = ts - rng.randint(0, 3 * HOUR) if i % 7 == 0 else ts  # late events: place_late
        store.apply({"ts": late, "user_id": f"u{rng.randint(0, 19)}", "type": "feedback",
                     "action": rng.choice(["click", "like", "rating"]), "item_id": f"it{i % 50}",
                     "value": float(rng.randint(1, 5))})
    store.flush()
    gc.collect()
    decoded = [decode(store._table.encode(p), len(store.specs)) for p in store._table.hot.values()]
    gc.collect()
    gc.collect()  # a tuple holding a tuple (a slice's sketch) is untracked one collection later
    raws = slices = 0
    for p in [*store._table.hot.values(), *decoded]:
        for fs in p.feats:
            if fs is None:
                continue
            raws += len(fs) - RAW
            slices += len(fs[SLICES])
            assert all(type(e) is tuple and not gc.is_tracked(e) for e in fs[RAW:])
            assert all(type(s) is tuple for s in fs[SLICES])
            assert all(not gc.is_tracked(s) for s in fs[SLICES] if not isinstance(s[2], list))
    assert raws > 100 and slices > 100


def test_new_slices_are_untracked_by_the_first_young_collection() -> None:
    """Slices that compaction folds from raw events holding a new tuple accumulator (a
    distinct count's sketch, a last, a mean) are untracked by the first young collection
    after them (``profile_tiers.hold_young``), not one collection later: they never
    reach generation 1."""
    import gc

    store = ProfileStore(default_features("user"), "user")
    ts = BASE

    def feed(n: int) -> None:
        nonlocal ts
        for i in range(n):
            ts += 20 * SEC
            store.apply({"ts": ts, "user_id": "u1", "type": "feedback", "action": "click",
                         "item_id": f"it{i % 7}", "value": 1.0})
        store.flush()
    feed(40)
    gc.collect()  # what exists now is old: only the next slices are young
    p = store._table.hot[store.key_of("u1")]
    before = {id(s) for fs in p.feats if fs is not None for s in fs[SLICES]}
    feed(40)
    gc.collect(0)
    new = [s for fs in p.feats if fs is not None for s in fs[SLICES] if id(s) not in before]
    assert sum(type(s[2]) is tuple for s in new) > 20  # sketches and lasts
    assert not [s for s in new if type(s[2]) is not list and gc.is_tracked(s)]


def test_a_feature_without_slices_holds_no_list() -> None:
    """A feature with raw events only holds ``NO_SLICES`` (the empty tuple, untracked),
    not an empty list: a list once compaction or a late event makes a slice, and
    ``NO_SLICES`` again when truncation empties it. Its raw events are in the feature's
    own list (``[slices, tail, tail_end, *raw]``): one tracked container per feature.
    Its bytes at rest are the old ones (raw events and slices ``[]`` apart), which read
    back as this layout; the answers are unchanged."""
    import gc
    import zlib

    import orjson

    spec = {"name": "clicks", "entity": "user", "aggregate": "count",
            "filter": {"type": "feedback", "action": "click"}, "windows": ["1h"]}
    store = ProfileStore([spec], "user")
    click = {"type": "feedback", "action": "click", "user_id": "u1"}
    store.apply({**click, "ts": BASE})
    store.flush()
    p = store._table.load(store.key_of("u1"), False)
    assert p is not None and p.feats[0][SLICES] is NO_SLICES and not gc.is_tracked(NO_SLICES)
    assert [o for o in gc.get_referents(p.feats[0]) if type(o) is list] == []  # one list
    blob = encode(p, 6)
    assert orjson.loads(zlib.decompress(blob))[3] == [[0, [[BASE, 1]], [], None, None]]
    assert decode(blob, 1).feats[0] == [NO_SLICES, None, None, (BASE, 1)]
    assert decode(blob, 1).feats[0][SLICES] is NO_SLICES
    store.apply({**click, "ts": BASE + 5 * MIN})  # the first event folds into a slice
    store.flush()
    assert p.feats[0][SLICES] == [(BASE, BASE + MIN, 1)]
    store.apply({**click, "ts": BASE + 4 * HOUR})  # both past 1 h + retention: dropped
    store.flush()
    assert p.feats[0][SLICES] is NO_SLICES and p.feats[0][RAW:] == [(BASE + 4 * HOUR, 1)]
    store.apply({**click, "ts": BASE + 3 * HOUR})  # late: placed into a new slice
    store.flush()
    assert p.feats[0][SLICES] == [(BASE + 3 * HOUR, BASE + 3 * HOUR + MIN, 1)]
    assert store.query("u1") == {"user.clicks.1h": 2.0}
    assert ProfileStore.restore(store.snapshot()).query("u1") == store.query("u1")

def test_a_hot_profiles_memo_is_one_list() -> None:
    """A hot profile's memoised outputs are one list (``Profile.memo``: a block per
    field), not one list per field, kept on the profile (no object of their own): the
    memo lives as long as the profile, and every list or object is a container the
    collector scans. Its answers equal a restored store's."""
    import gc

    store = ProfileStore(default_features("user"), "user")
    rng = random.Random(3)
    ts = BASE
    for _ in range(200):
        ts += rng.randint(1, 5 * MIN)
        store.apply({"ts": ts, "user_id": "u1", "type": "feedback",
                     "item_id": f"i{rng.randint(0, 9)}",
                     "action": rng.choice(["click", "like", "rating", "dwell"]),
                     "value": float(rng.randint(1, 5))})
        if rng.random() < 0.3:
            store.query("u1")
    answer = store.query("u1")
    p = store._table.hot[store.key_of("u1")]
    refs = gc.get_referents(p)
    lists = [o for o in refs if type(o) is list and o is not p.feats]
    assert len(lists) == 1 and len(lists[0]) == 8 * len(store.plan.out_names)
    held = [o for o in refs if type(o) in (list, dict) or type(o).__module__.startswith("state")]
    assert sorted(type(o).__name__ for o in held) == ["dict", "list", "list"]  # out, feats, memo
    assert ProfileStore.restore(store.snapshot()).query("u1") == answer


def test_user_x_category_entity() -> None:
    cats = {"a": "c1", "b": "c1", "c": "c2", "m": ["drama", "comedy"]}

    def attrs(item: Any) -> dict[str, Any] | None:
        return {"category": cats[item]} if item in cats else None

    specs = [{"name": "clicks", "entity": "user_x_category",
              "filter": {"type": "feedback", "action": "click"}, "aggregate": "count",
              "windows": ["1h", "1d", "all"]},
             {"name": "recent", "entity": "user_x_category", "filter": {"type": "feedback"},
              "aggregate": "last_k", "k": 3, "windows": ["all"]},
             {"name": "clicks", "entity": "user", "filter": {"type": "feedback", "action": "click"},
              "aggregate": "count", "windows": ["1d"]}]
    stores = stores_for(specs, batch_size=2)
    assert set(stores) == {"user_x_category", "user"}
    x = stores["user_x_category"]
    assert x.output_names == ["user_x_category.clicks.1h", "user_x_category.clicks.1d",
                              "user_x_category.clicks.all", "user_x_category.recent.all"]
    evs = [("u1", "a", 0), ("u1", "b", MIN), ("u1", "c", 2 * MIN), ("u2", "a", 3 * MIN),
           ("u1", "m", 4 * MIN), ("u1", "zzz", 5 * MIN), ("u1", "a", 3 * HOUR)]
    for u, it, dt in evs:
        ev = {"type": "feedback", "ts": BASE + dt, "user_id": u, "item_id": it, "action": "click"}
        for s in stores.values():
            s.apply(ev, attrs)
    t = BASE + DAY
    q = x.query(("u1", "c1"), t)
    assert q["user_x_category.clicks.1d"] == 3.0 and q["user_x_category.recent.all"] == ["a", "b"]
    assert x.query(("u1", "c1"), BASE + 2 * HOUR)["user_x_category.clicks.1h"] == 0.0
    assert x.query(("u1", "c2"), t)["user_x_category.clicks.all"] == 1.0
    assert x.query(("u2", "c1"), t)["user_x_category.clicks.all"] == 1.0
    assert x.query(("u1", "drama"), t)["user_x_category.recent.all"] == ["m"]  # list attr
    assert x.query(("u1", "comedy"), t)["user_x_category.clicks.all"] == 1.0
    assert x.query(("u9", "c1"), t)["user_x_category.clicks.all"] == 0.0
    assert x.stats()["skipped_no_attr"] == 1
    assert stores["user"].query("u1", t)["user.clicks.1d"] == 6.0
    with pytest.raises(TypeError, match="item_attrs"):
        x.apply({"type": "feedback", "ts": BASE, "user_id": "u", "item_id": "a", "action": "click"})
    with pytest.raises(TypeError, match="pairs"):
        x.query("u1")


def test_query_keys_answers_as_query_key_one_by_one() -> None:
    """The batched query gives each key's ``query_key`` answer (hot and cold profiles,
    pending writes, cache hits and refreshes, past queries) and the same counters; an
    unknown key gives the caller's shared answer when one is passed."""
    rng = random.Random(11)
    specs = default_features("user_x_category")
    one, many = (ProfileStore(specs, "user_x_category", hot_capacity=4, batch_size=5)
                 for _ in range(2))
    cats = [f"c{i}" for i in range(6)]

    def attrs(item: Any) -> dict[str, Any]:
        return {"category": cats[int(item[1:]) % len(cats)]}

    users = ["u1", "u2", "u3"]
    ts = BASE
    shared = one.empty_answer()
    for step in range(1500):
        ts += rng.randint(1, 5 * MIN)
        kind = rng.choice(["impression", "impression", "feedback"])
        ev = {"type": kind, "ts": ts, "user_id": rng.choice(users),
              "item_id": f"i{rng.randint(0, 30)}"}
        if kind == "feedback":
            ev["action"] = rng.choice(["click", "rating", "like"])
            ev["value"] = float(rng.randint(1, 5))
        one.apply(ev, attrs)
        many.apply(ev, attrs)
        if step % 7:
            continue
        user = rng.choice(users + ["u9"])
        keys = [one.key_of((user, c)) for c in rng.sample(cats, 4)]
        t = rng.choice([None, ts + 1, ts - rng.randint(0, HOUR)])
        want = [one.query_key(k, t) for k in keys]
        assert many.query_keys(keys, t) == want
        got = many.query_keys(keys, t, shared)
        assert got == want
        assert all((g is shared) == (not many.knows(k)) for g, k in zip(got, keys, strict=True))
        one.query_keys([k for k in keys if one.knows(k)], t)  # the second call's counters
    assert one.counters == many.counters


# ----------------------------------------------------------------- specs


def test_distinct_count_sketch_is_exact_below_k_and_bounded_above() -> None:
    spec = _spec("items", {"type": "impression"}, "distinct_count", k=256) | {"windows": ["1d", "all"]}
    store = ProfileStore([spec], "user")
    for i in range(5000):
        store.apply({"type": "impression", "ts": BASE + i * 10 * SEC, "user_id": "u",
                     "item_id": f"item-{i % 4000}", "impression_id": str(i)})
        if i == 200:
            assert store.query("u")["user.items.all"] == 201.0
    est = store.query("u")["user.items.all"]
    assert abs(est - 4000) / 4000 < 0.2  # KMV relative std error ~ 1/sqrt(k - 2) = 6 %


def test_default_set_parses_and_names() -> None:
    specs = default_features()
    names = [n for s in specs for n in s.output_names]
    assert len(names) == len(set(names))
    assert "user.clicks.1h" in names and "user.click_decay.all" in names
    assert "user.recent_positives.1h" in names and "item.viewers.7d" in names
    assert "user_x_category.clicks.7d" in names
    assert {s.entity for s in specs} == {"user", "item", "user_x_category"}
    assert {s.aggregate for s in specs} >= {"count", "sum", "mean", "last", "decay_sum",
                                            "distinct_count", "last_k"}
    # MovieLens-style feedback populates rating features
    store = ProfileStore(list(DEFAULT_FEATURES), "user")
    for i, r in enumerate([5, 3, 4]):
        store.apply({"type": "feedback", "ts": BASE + i * HOUR, "user_id": "7",
                     "item_id": str(100 + i), "action": "rating", "value": r})
    q = store.query(7)  # int and str ids hash alike
    assert q["user.ratings.all"] == 3.0 and q["user.rating_mean.all"] == 4.0
    assert q["user.recent_high_ratings.all"] == ["102", "100"]
    assert q["user.last_feedback_ts.all"] == BASE + 2 * HOUR


def test_default_user_x_category_counts_see_a_taste_that_moved() -> None:
    """The default set's short user_x_category click windows (5m, 1h) tell a user's new
    category from the old one a few minutes after the change; the long ones (1d and up)
    still weigh the old taste most (the closed loop's drift world, docs/evaluation.md)."""
    x = stores_for(list(DEFAULT_FEATURES))["user_x_category"]
    cats = {"a": "c1", "b": "c2"}
    clicks = [("a", n * MIN) for n in range(0, 40, 2)] + [("b", 50 * MIN + n * SEC)
                                                          for n in range(0, 180, 60)]
    for item, dt in clicks:
        x.apply({"type": "feedback", "ts": BASE + dt, "user_id": "u", "item_id": item,
                 "action": "click"}, lambda i: {"category": cats[i]})
    t = BASE + 55 * MIN
    old, new = x.query(("u", "c1"), t), x.query(("u", "c2"), t)
    assert new["user_x_category.clicks.5m"] == 3.0 and old["user_x_category.clicks.5m"] == 0.0
    assert old["user_x_category.clicks.1d"] > new["user_x_category.clicks.1d"] > 0


def test_spec_validation_missing_and_duplicate() -> None:

    raw = dict(OK)
    del raw["aggregate"]
    with pytest.raises(FeatureSpecError, match="key 'aggregate': missing"):
        parse_features([raw])
    with pytest.raises(FeatureSpecError, match=r"features\[1\] 'x': key 'name': duplicate"):
        parse_features([OK, OK])
    with pytest.raises(FeatureSpecError, match="key 'features'"):
        parse_features({"feature": []})
    with pytest.raises(ValueError, match="no feature spec has entity 'item'"):
        ProfileStore([OK], "item")
    with pytest.raises(ValueError, match="tiers"):
        ProfileStore([OK], "user", tiers=[(MIN, HOUR), (90 * SEC, DAY)])
    assert DEFAULT_TIERS[0] == (MIN, HOUR)


def test_bad_values_are_counted_not_applied() -> None:
    spec = _spec("s", {"type": "feedback"}, "sum")
    store = ProfileStore([spec], "user")
    store.apply({"type": "feedback", "ts": BASE, "user_id": "u", "item_id": "a", "action": "x",
                 "value": "oops"})
    store.apply({"type": "feedback", "ts": BASE, "user_id": "u", "item_id": "a", "action": "x",
                 "value": float("nan")})
    store.apply({"type": "feedback", "ts": BASE, "item_id": "a", "action": "x"})
    store.apply({"type": "feedback", "ts": BASE + 1, "user_id": "u", "item_id": "a", "action": "x"})
    s = store.stats()
    assert s["skipped_bad_value"] == 2 and s["skipped_no_id"] == 1
    assert store.query("u")["user.s.all"] == 1.0
    with pytest.raises(ValueError, match="ts"):
        store.apply({"type": "feedback", "ts": "yesterday", "user_id": "u", "action": "x"})


def test_rates_divide_clicks_by_position_discounted_exposure() -> None:
    """A ``rate`` is derived at query time from its two features of the same window:
    100 * clicks / (exposure + prior), exposure = sum of 1 / log2(2 + position) over the
    impressions, so an item shown low counts less exposure per impression than one shown
    on top, and two items with the same clicks per expected click have the same rate."""
    specs = [
        {"name": "clicks", "entity": "item", "filter": {"type": "feedback", "action": "click"},
         "aggregate": "count", "windows": ["1h", "all"]},
        {"name": "exposure", "entity": "item", "filter": {"type": "impression"},
         "aggregate": "sum", "value": "position", "transform": "position_discount",
         "windows": ["1h", "all"]},
        {"name": "ctr", "entity": "item", "aggregate": "rate", "of": ["clicks", "exposure"],
         "prior": 2, "windows": ["1h", "all"]},
    ]
    store = ProfileStore(specs, "item")
    assert store.query("top")["item.ctr.all"] == 0.0  # nothing yet: no division by the prior only
    for n in range(8):  # "top" always shown first, "low" always seventh
        store.apply({"type": "impression", "ts": BASE + n * MIN, "item_id": "top", "position": 0})
        store.apply({"type": "impression", "ts": BASE + n * MIN, "item_id": "low", "position": 6})
    low_weight = 1 / math.log2(8)  # 1/3: a seventh slot is examined a third as often
    for n in range(3):
        store.apply({"type": "feedback", "ts": BASE + 10 * MIN + n, "item_id": "top",
                     "action": "click"})
    store.apply({"type": "feedback", "ts": BASE + 11 * MIN, "item_id": "low", "action": "click"})
    top, low = store.query("top"), store.query("low")
    assert top["item.exposure.all"] == pytest.approx(8.0)
    assert low["item.exposure.all"] == pytest.approx(8 * low_weight)
    assert top["item.ctr.all"] == pytest.approx(100 * 3 / (8 + 2))
    assert low["item.ctr.all"] == pytest.approx(100 * 1 / (8 * low_weight + 2))
    assert low["item.ctr.all"] > 100 * 1 / (8 + 2)  # more than its raw clicks per impression
    assert store.output_names[-2:] == ["item.ctr.1h", "item.ctr.all"]
    # a past query divides the past outputs; a restored store gives the same rates
    past = store.query("top", BASE + 10 * MIN + 1)
    assert past["item.ctr.all"] == pytest.approx(100 * 1 / (8 + 2))
    again = pickle.loads(pickle.dumps(store))
    assert again.query("low") == low


def test_rate_features_are_position_corrected_click_rates() -> None:
    """``RATE_FEATURES`` beside the default set: ``item.ctr`` and ``user_x_category.ctr``
    are clicks per 100 of position-discounted exposure (prior 10), not raw counts."""
    stores = stores_for([*DEFAULT_FEATURES, *RATE_FEATURES])
    item, cross = stores["item"], stores["user_x_category"]
    attrs = {"a": {"category": "c1"}, "b": {"category": "c2"}}.get
    for n in range(20):
        for store in (item, cross):
            store.apply({"type": "impression", "ts": BASE + n * MIN, "user_id": "u",
                         "item_id": "a", "position": 0}, attrs)
            if n < 5:  # "b": fewer impressions, and clicked as often as "a"
                store.apply({"type": "impression", "ts": BASE + n * MIN, "user_id": "u",
                             "item_id": "b", "position": 0}, attrs)
            if n % 5 == 0:
                for i in ("a", "b"):
                    store.apply({"type": "feedback", "ts": BASE + n * MIN + 1, "user_id": "u",
                                 "item_id": i, "action": "click"}, attrs)
    t = BASE + HOUR
    a, b = item.query("a", t), item.query("b", t)
    assert a["item.clicks.1h"] == b["item.clicks.1h"] == 4.0
    assert b["item.ctr.1h"] > a["item.ctr.1h"]  # the same clicks from fewer impressions
    assert a["item.ctr.1d"] == pytest.approx(100 * 4 / (20 + 10))
    xa, xb = cross.query(("u", "c1"), t), cross.query(("u", "c2"), t)
    assert xb["user_x_category.ctr.1h"] == pytest.approx(100 * 4 / (5 + 10))
    assert xb["user_x_category.ctr.1h"] > xa["user_x_category.ctr.1h"]


@HYP
@given(streams(max_size=120), st.integers(3, 5))
def test_kmv_slices_merged_in_one_pass_equal_the_pairwise_merges(
        events: list[dict[str, Any]], k: int) -> None:
    """A distinct-count window merges its slices' KMV sketches in one pass
    (``_Distinct.merge_run``, one sort per window instead of one per slice: the item
    tables' ``viewers``, most of the publication's profile reads): every answer equals
    the slice-by-slice merge, sketches truncated to a small k included."""
    from state.aggregates import _Distinct

    class _Pairwise(_Distinct):  # not ``_Distinct`` itself: the slice-by-slice path
        pass

    specs = [_spec("items", {"type": "impression"}, "distinct_count", k=k),
             _spec("raters", {"type": "feedback"}, "distinct_count", value="item_id", k=k)]
    fast = ProfileStore(specs, "user", batch_size=3)
    pairwise = ProfileStore(specs, "user", batch_size=3)
    pairwise.plan.aggs = [_Pairwise(a.k) for a in pairwise.plan.aggs]
    assert all(type(a) is _Distinct for a in fast.plan.aggs)
    for i, ev in enumerate(events):
        fast.apply(ev)
        pairwise.apply(ev)
        if i % 5 == 0 or i == len(events) - 1:
            for t in (ev["ts"] + 1, ev["ts"] + HOUR, ev["ts"] + DAY + 7, ev["ts"] + 8 * DAY):
                for u in USERS:
                    assert fast.query(u, t) == pairwise.query(u, t), (u, t)


def _bits(x: Any) -> Any:
    """A value with its floats as their exact bits (``-0.0`` and ``0.0`` differ)."""
    if isinstance(x, float):
        return x.hex()
    if isinstance(x, (tuple, list)):
        return type(x)(map(_bits, x))
    if isinstance(x, dict):
        return {k: _bits(v) for k, v in x.items()}
    return x


def _raw_events(rnd: random.Random, n_min: int, n_max: int, max_gap: int,
                values: tuple[Any, ...]) -> tuple[list[tuple[int, Any]], int]:
    """``n_min``-``n_max`` raw ``(ts, value)`` events from a random time of a day (gaps 0, 1
    or up to ``max_gap`` ms; a value of ``values``, a float of any sign and magnitude or
    -0.0), and the last ts."""
    ts = BASE + rnd.randrange(DAY)
    events = []
    for _ in range(rnd.randint(n_min, n_max)):
        ts += rnd.choice((0, 1, rnd.randrange(1, max_gap)))
        events.append((ts, rnd.choice((*values, rnd.uniform(-1e3, 1e3), rnd.random() * 1e-9, -0.0))))
    return events, ts


def test_fold_raw_is_the_event_by_event_merge_bit_for_bit() -> None:
    """``fold_raw`` (a raw part in one call: sums, means and decayed sums in one loop)
    gives the value of ``merge(add(None, ts, v, ts), ts, acc, r, r)`` per event, newest
    first (``_Count.fold_raw``, the generic loop), bit for bit: every aggregate, prior
    accumulators, references at and after the newest event, values of every sign and
    magnitude (float sums depend on their order)."""
    from state.aggregates import _Count, make_agg

    rnd = random.Random(11)
    raw_specs = [*SPECS, _spec("d7", FB, "decay_sum", half_life="7d"),
                 _spec("d1s", FB, "decay_sum", half_life="1s"),
                 _spec("d_one", FB, "decay_sum", half_life="1d", value=1)]
    aggs = [make_agg(s) for s in parse_features(raw_specs)]
    folds = 0
    for _ in range(300):
        events, ts = _raw_events(rnd, 0, 40, 5 * MIN, (1, 1.0))
        r = (events[-1][0] if events else ts) + rnd.choice((0, 1, 2, HOUR))
        for agg in aggs:
            vals = [(e[0], abs(int(e[1] * 1e6))) if type(agg).__name__ == "_Distinct"
                    else (e[0], f"it{int(e[1]) % 5}") if type(agg).__name__ == "_LastK"
                    else e for e in events]
            prior = _Count.fold_raw(agg, reversed(vals[:2]), None, r) if rnd.random() < 0.3 else None
            want = _Count.fold_raw(agg, reversed(vals), prior, r)
            got = agg.fold_raw(reversed(vals), prior, r)
            assert _bits(got) == _bits(want), (type(agg).__name__, vals, prior, r)
            folds += type(agg).fold_raw is not _Count.fold_raw
    assert folds > 1000  # the one-loop folds were the ones compared


def _raw_part_event_by_event(store: ProfileStore, f: int, fs: list[Any], t: int, r: int
                             ) -> list[tuple[Any, int]]:
    """``ProfileStore._raw_part`` as it was before ``fold_raw``: the raw events walked
    newest first, one ``merge(add(...))`` each, window after window."""
    import bisect

    from state.aggregates import TS, _Distinct

    agg = store.plan.aggs[f]
    raw = fs[RAW:]
    i = bisect.bisect_left(raw, t, key=TS) - 1
    acc: Any = None
    oldest: int | None = None
    res: list[tuple[Any, int]] = []
    for w in store.plan.specs[f].windows:
        lo = -FAR if w is None else t - w
        while i >= 0 and raw[i][0] >= lo:
            ts, v = raw[i]
            acc = (agg.add_all(acc, (v,)) if type(agg) is _Distinct
                   else agg.merge(agg.add(None, ts, v, ts), ts, acc, r, r))
            oldest = ts
            i -= 1
        res.append((acc, FAR if w is None or oldest is None else oldest + w + 1))
    return res


def test_raw_parts_folded_in_one_call_answer_as_event_by_event() -> None:
    """A store whose raw parts fold each window's events in one call per aggregate
    (``fold_raw``) answers as one walking them event by event (the previous
    ``_raw_part``), bit for bit: current (memoised) and past reads, every window, on
    dense streams (a second apart at most: long raw lists, whose float sums depend on
    their order) crossing the raw cut."""
    import types

    rnd = random.Random(13)
    fast = ProfileStore(SPECS, "user", batch_size=3)
    generic = ProfileStore(SPECS, "user", batch_size=3)
    generic._raw_part = types.MethodType(_raw_part_event_by_event, generic)  # type: ignore[method-assign]
    ts = BASE
    for i in range(1_500):
        ts += rnd.choice((0, rnd.randrange(1, SEC)))
        kind = rnd.choice(("impression", "click", "click", "rating"))
        ev: dict[str, Any] = {"ts": ts, "user_id": rnd.choice(USERS), "item_id": f"it{i % 9}"}
        if kind == "impression":
            ev.update(type="impression", impression_id=f"i{i}")
        else:
            ev.update(type="feedback", action=kind, value=rnd.uniform(0.0, 5.0))
        fast.apply(ev)
        generic.apply(ev)
        if i % 7 == 0:
            for t in (None, ts, ts + 1, ts + 20 * SEC, ts + 40 * SEC, ts + 3 * MIN, ts + DAY + 7):
                for u in USERS:
                    assert _bits(fast.query(u, t)) == _bits(generic.query(u, t)), (u, t)
    assert fast.stats()["hot_raw_events"] > 200  # long raw lists were folded


def test_merge_run_is_the_k_smallest_of_the_union() -> None:
    from state.aggregates import _Distinct

    rnd = random.Random(5)
    agg = _Distinct(4)
    for _ in range(300):
        accs = [tuple(sorted(rnd.sample(range(30), rnd.randint(1, 4)))) if rnd.random() < 0.9
                else None for _ in range(rnd.randint(0, 6))]
        start = (None if rnd.random() < 0.3
                 else tuple(sorted(rnd.sample(range(30), rnd.randint(1, 4)))))
        pairwise = start
        for a in accs:
            pairwise = agg.merge(a, 0, pairwise, 0, 0)
        assert agg.merge_run(accs, start) == pairwise


def test_add_all_is_the_merge_of_the_values() -> None:
    """``_Distinct.add_all`` (a few hashes into a sketch, no sort of the union: the raw
    part, compaction's appended slices) gives what ``merge`` gives, full sketches and
    duplicates included."""
    from state.aggregates import _Distinct

    rnd = random.Random(7)
    for k in (1, 3, 4, 64):
        agg = _Distinct(k)
        for _ in range(300):
            acc = (None if rnd.random() < 0.2
                   else tuple(sorted(rnd.sample(range(40), rnd.randint(1, min(k, 40))))))
            values = tuple(sorted(set(rnd.choices(range(40), k=rnd.randint(1, 6))))[:k])  # a sketch
            assert agg.add_all(acc, values) == agg.merge(acc, 0, values, 0, 0)


def test_current_reads_fold_compacted_slices_instead_of_rescanning_every_window() -> None:
    """Issue 18 point 4 (item tables re-queried every publication): when compaction only
    folds raw events into new slices, a count's and a distinct count's memoised window
    parts take the new slices in (and a window whose oldest slice left is recomputed on
    its own) instead of a pass over every slice of every window; the answers stay
    equal, bit for bit, to a profile decoded and recomputed from its layout."""
    specs = [s for s in DEFAULT_FEATURES if s["entity"] == "item"]
    hot = ProfileStore(specs, "item", batch_size=1)
    cold = ProfileStore(specs, "item", batch_size=1, hot_capacity=1)
    full_passes = 0
    original = ProfileStore._slice_part

    def counting(self: ProfileStore, *args: Any) -> Any:
        nonlocal full_passes
        if self is hot and self.plan.specs[args[0]].aggregate in ("count", "distinct_count"):
            full_passes += 1
        return original(self, *args)

    rnd = random.Random(3)
    ts = BASE
    for i in range(1_000):  # a day and a half of history, then 3 hours of reads
        ts += rnd.randint(1, 4 * MIN) if i < 640 else rnd.randint(20 * SEC, 40 * SEC)
        ev = {"type": "impression", "ts": ts, "user_id": f"u{rnd.randint(0, 300)}",
              "item_id": "it", "impression_id": f"i{i}"}
        if rnd.random() < 0.2:
            ev = {"type": "feedback", "action": "click", "ts": ts, "user_id": ev["user_id"],
                  "item_id": "it"}
        for store in (hot, cold):
            store.apply(ev)
        if i == 640:
            ProfileStore._slice_part = counting  # type: ignore[method-assign]
        if i >= 640:
            a = hot.query("it")
            cold.query("other")  # evicts "it" from cold's one-profile hot set
            assert a == cold.query("it"), i
    ProfileStore._slice_part = original  # type: ignore[method-assign]
    # ~360 reads over ~3 hours, a raw fold each minute: a full pass of a count or distinct
    # count at each hourly rebuild, not at each fold (the old way: ~180 per feature)
    assert full_passes < 40, full_passes


class _EagerStore(ProfileStore):
    """The store as it was before the merge queue: a closed write buffer is merged at
    once, in the call that closes it."""

    def _close(self) -> None:
        super()._close()
        self._drain(2**62)


@pytest.mark.parametrize("hot_capacity", [7, 100])
def test_a_closed_write_buffer_is_merged_over_the_next_writes_with_the_same_answers(
        hot_capacity: int) -> None:
    """Issue 18 point 3 (a step of the shards holds every request behind it): the call
    that closes a write buffer (``batch_size`` writes or ``flush_interval_ms``) no longer
    merges all of it; the writes that follow merge a few queued entities each. Same
    answers, bit for bit, as merging the buffer at once, through snapshots, and with a
    small hot set (a queued entity leaving it is merged first) and ``max_entities``
    forgetting entities (the LRU order is kept)."""
    rnd = random.Random(11)
    params = {"batch_size": 64, "flush_interval_ms": 20 * SEC,
              "hot_capacity": hot_capacity, "max_entities": 40}
    lazy, eager = ProfileStore(SPECS, "user", **params), _EagerStore(SPECS, "user", **params)
    ts, most_merged = BASE, 0
    for i in range(3_000):
        ts += rnd.randint(0, 3 * SEC)
        user = f"u{rnd.randint(0, 60)}"
        late = ts - rnd.randint(0, 90 * SEC) if rnd.random() < 0.1 else ts
        ev = ({"type": "impression", "ts": late, "user_id": user, "item_id": f"i{i % 17}",
               "impression_id": f"m{i}"} if rnd.random() < 0.6 else
              {"type": "feedback", "ts": late, "user_id": user, "item_id": f"i{i % 13}",
               "action": rnd.choice(["click", "rating"]), "value": rnd.randint(1, 5)})
        before = lazy.counters["merged_writes"]
        lazy.apply(ev)
        eager.apply(ev)
        most_merged = max(most_merged, lazy.counters["merged_writes"] - before)
        if i % 97 == 0:
            who = f"u{rnd.randint(0, 60)}"
            assert lazy.query(who) == eager.query(who), i
        if i % 500 == 499:
            lazy = pickle.loads(pickle.dumps(lazy))  # the queue survives recovery
    assert lazy.counters["flushes"] == eager.counters["flushes"] > 40
    assert lazy.counters["evicted"] == eager.counters["evicted"]
    if hot_capacity < 61:
        assert lazy.counters["evicted"] > 0
    else:  # every entity stays hot: no merge at eviction
        assert most_merged < params["batch_size"] // 2  # eager: a whole buffer at once
    for store in (lazy, eager):
        store.apply({"type": "request", "ts": ts + 30 * SEC, "user_id": "u0",
                     "request_id": "r"})
    assert lazy.stats()["queued_writes"] > 0  # closed by time, not merged in that call
    for u in range(61):
        assert lazy.query(f"u{u}") == eager.query(f"u{u}"), u
    lazy.flush()
    eager.flush()
    assert lazy.stats()["queued_writes"] == 0
    assert lazy.snapshot()["profiles"] == eager.snapshot()["profiles"]


class _Unfolded(ProfileStore):
    """A store that never folds an event's writes into the previous event's."""

    def _fold(self, lst: list[Any], writes: list[Any]) -> bool:
        return False


@pytest.mark.parametrize(("kind", "default"), [("user", True), ("user", False),
                                               ("user_x_category", True)])
def test_same_time_writes_folded_in_the_buffer_answer_as_unfolded(kind: str,
                                                                  default: bool) -> None:
    """A request's impressions (one user, one ts) fold into one write per feature in the
    write buffer (counts add up, equal values of order-free aggregates are one): the
    answers are the unfolded store's bit for bit, now and in the past, through
    compaction, late events and snapshots; with the default features (an impression
    writes counts and its time) far fewer writes are merged. With ``SPECS`` an
    impression also writes its item (a distinct count): such events do not fold."""
    rnd = random.Random(5)
    specs = default_features(kind) if default else SPECS
    cats = {f"it{j}": {"category": f"c{j % 3}"} for j in range(12)}
    params = {"batch_size": 256, "flush_interval_ms": 30 * SEC}
    folded, plain = ProfileStore(specs, kind, **params), _Unfolded(specs, kind, **params)
    ts = BASE
    events: list[dict[str, Any]] = []
    for r in range(400):
        ts += rnd.randint(0, 40 * SEC)
        user = f"u{rnd.randint(0, 5)}"
        late = ts - rnd.randint(0, 3 * MIN) if rnd.random() < 0.1 else ts
        for p in range(rnd.randint(1, 10)):  # a request's impressions
            events.append({"type": "impression", "ts": late, "user_id": user,
                           "item_id": f"it{rnd.randint(0, 11)}", "impression_id": f"m{r}-{p}"})
        for _ in range(rnd.randint(0, 3)):  # feedback at one time, some repeated
            events.append({"type": "feedback", "ts": late + 5, "user_id": user,
                           "item_id": f"it{rnd.randint(0, 2)}",
                           "action": rnd.choice(["click", "rating"]), "value": 4.0})
    for i, ev in enumerate(events):
        folded.apply(ev, cats.get)
        plain.apply(ev, cats.get)
        if i % 61 == 0:
            for store in (folded, plain):
                store.flush() if i % 3 else None
        if i % 97 == 0:
            who = f"u{rnd.randint(0, 5)}"
            key = who if kind == "user" else (who, f"c{rnd.randint(0, 2)}")
            for t in (None, ev["ts"] - rnd.randint(0, 2 * HOUR)):
                assert folded.query(key, t) == plain.query(key, t), (i, t)
        if i % 1_000 == 999:
            folded = pickle.loads(pickle.dumps(folded))
    folded.flush()
    plain.flush()
    ids = [f"u{u}" if kind == "user" else (f"u{u}", f"c{c}") for u in range(6) for c in range(3)]
    for key in ids:
        assert folded.query(key) == plain.query(key)
        assert folded.query(key, ts - HOUR) == plain.query(key, ts - HOUR)
    assert folded.counters["writes"] == plain.counters["writes"]
    if default:
        assert folded.counters["merged_writes"] < 0.7 * plain.counters["merged_writes"]


def test_profile_keys_memoised_per_string_id_equal_the_hash() -> None:
    """``ProfilePlan.key``: a string id's memoised key is its ``stable_hash64`` (the memo
    bounded by ``MAX_KEYS``); other ids hash as they are (``1``, ``True`` and ``1.0`` are
    one dict key but three ids), an int and its decimal string one profile."""
    from state.hashing import stable_hash64
    from state.profile_plan import MAX_KEYS

    spec = {"name": "clicks", "entity": "user", "aggregate": "count",
            "filter": {"type": "feedback"}, "windows": ["all"]}
    store = ProfileStore([spec], "user")
    plan = store.plan
    for _rep in range(2):
        for i in range(0, MAX_KEYS + 100, 7):
            assert plan.key(f"u{i}") == stable_hash64(f"u{i}")
        assert len(plan.keys) <= MAX_KEYS
    assert [plan.key(x) for x in (1, True, 1.0)] == [stable_hash64(x) for x in (1, True, 1.0)]
    assert len({plan.key(x) for x in (1, True, 1.0)}) == 3
    for n, uid in enumerate(("7", 7, "7")):
        store.apply({"type": "feedback", "action": "click", "user_id": uid, "ts": n})
    assert store.query(7) == store.query("7") == {"user.clicks.all": 3.0}


def test_constant_write_values_equal_the_getter_and_prep() -> None:
    """``ProfilePlan.consts``: a feature whose value reads no event field stores
    ``prep(getter(event))`` for every event (a count's 1, a constant prepared: 2 -> 2.0
    for a sum, 1 -> 1.0 for a decayed sum); one reading a field has none (``MISSING``:
    the getter runs per event)."""
    from state.aggregates import make_prep
    from state.feature_spec import MISSING

    specs = parse_features([
        _spec("n", FB, "count"),
        _spec("two", FB, "sum", value=2),
        _spec("one", FB, "decay_sum", value=1, half_life="1h"),
        _spec("dwell", FB, "sum"),  # the event's value field
        _spec("ts_last", FB, "last", value="ts"),
    ])
    store = ProfileStore(specs, "user")
    event = {"type": "feedback", "action": "x", "user_id": "u", "ts": BASE, "value": 3}
    consts = store.plan.consts
    assert consts[3] is MISSING and consts[4] is MISSING
    for f in range(3):
        spec = store.plan.specs[f]
        expected = make_prep(spec)(spec.value_getter()(event))
        assert consts[f] == expected and type(consts[f]) is type(expected)
    assert consts[:2] == [1, 2.0] and type(consts[1]) is float
    store.apply(event)
    out = store.query("u")
    assert out["user.n.all"] == 1.0 and out["user.two.all"] == 2.0 and out["user.dwell.all"] == 3.0


def test_distinct_count_prep_hashes_each_id_as_stable_hash64() -> None:
    """A distinct count's prep keeps string ids' hashes (``_hash_prep``, at most
    ``MAX_HASHES``): every value still equals ``stable_hash64`` of its own id, through
    repeats, ids of another type that compare equal or not (1, True, "1", 1.0), bad
    values between them and a memo cleared when full."""
    from state.aggregates import BAD, MAX_HASHES, make_prep
    from state.hashing import stable_hash64

    (spec,) = parse_features([_spec("ids", FB, "distinct_count", value="item_id")])
    prep = make_prep(spec)
    ids = ["a", "a", "b", 1, 1, "1", True, 1, 2.0, "a", None, "a", 7, 7]
    ids += [f"x{i % (MAX_HASHES + 9)}" for i in range(2 * MAX_HASHES + 50)] + ["a", "b", "1", 1]
    got = [prep(v) for v in ids]
    want = [BAD if isinstance(v, (bool, float)) or v is None else stable_hash64(v) for v in ids]
    assert got == want


def _slices_by_add(agg: Any, events: list[tuple[int, Any]], g: int) -> list[Any]:
    """Raw events folded into ``g``-aligned slices as compaction did before
    ``slices_of``: one ``add`` per event, referenced at its slice's end."""
    folded: list[Any] = []
    for ts, v in events:
        start = ts - ts % g
        if folded and folded[-1][0] == start:
            last = folded[-1]
            folded[-1] = (start, last[1], agg.add(last[2], ts, v, last[1]))
        else:
            folded.append((start, start + g, agg.add(None, ts, v, start + g)))
    return folded


def test_slices_of_is_add_in_turn_bit_for_bit() -> None:
    """``slices_of`` (compaction's raw events into g0 slices; counts and sums in one
    loop of additions) gives what ``add`` per event gives, bit for bit: every aggregate,
    events sharing a minute or not, values of every sign and magnitude."""
    from state.aggregates import make_agg

    rnd = random.Random(21)
    raw_specs = [*SPECS, _spec("d1s", FB, "decay_sum", half_life="1s")]
    aggs = [make_agg(s) for s in parse_features(raw_specs)]
    additive = 0
    for _ in range(300):
        events, _ = _raw_events(rnd, 1, 30, 3 * MIN, (1, 2, 1.0))
        for agg in aggs:
            name = type(agg).__name__
            vals = [(e[0], abs(int(e[1] * 1e6))) if name == "_Distinct"
                    else (e[0], f"it{int(e[1]) % 5}") if name == "_LastK"
                    else (e[0], 1) if name == "_Count" else e for e in events]
            got = agg.slices_of(vals, MIN)
            assert _bits(got) == _bits(_slices_by_add(agg, vals, MIN)), (name, vals)
            additive += name in ("_Count", "_Sum")
    assert additive == 600  # the one-loop path was among those compared


def test_write_steps_are_the_routed_features_tables() -> None:
    """``ProfilePlan.write_steps``: per (type, action), the features ``features_for``
    routes to, in its order, with their min value, constant, getter and prep; none for
    an unrouted pair; memoised, and the memo bounded by ``MAX_ROUTES``."""
    from state.profile_plan import MAX_ROUTES

    plan = ProfileStore(SPECS, "user").plan
    pairs = [("impression", None), ("feedback", "click"), ("feedback", "rating"),
             ("feedback", "like"), ("feedback", None), ("request", None), ("item", "x")]
    for etype, action in pairs:
        fids = plan.features_for(etype, action) or []
        want = tuple((f, plan.min_values[f], plan.consts[f], *plan.fields[f], plan.getters[f],
                      plan.preps[f]) for f in fids)
        assert plan.write_steps(etype, action) == want
        assert plan.write_steps(etype, action) is plan.write_steps(etype, action)
    assert plan.write_steps("feedback", "click") != ()
    assert plan.write_steps("request", None) == ()
    for i in range(MAX_ROUTES + 10):
        assert plan.write_steps("feedback", f"a{i}") == plan.write_steps("feedback", None)
    assert len(plan.steps) <= MAX_ROUTES


def test_field_reader_reads_as_get() -> None:
    """``field_reader(type(event))(event, name, default)`` is ``event.get(name, default)``
    for records (``getattr``), dicts and other mappings, present and absent fields alike;
    a plan's top-level ``fields`` read through it give its getters' values."""
    from dataclasses import asdict
    from types import MappingProxyType

    from events.model import Feedback, Impression, Request
    from state.profile_plan import field_reader

    events: list[Any] = [
        Impression(ts=BASE, impression_id="m", user_id="u", item_id="i", position=3),
        Feedback(ts=BASE, user_id="u", item_id="i", action="click", value=2.5),
        Request(ts=BASE, request_id="r", user_id="u")]
    events += [{**asdict(e), "type": e.type} for e in events[:3]]
    events += [MappingProxyType(events[3]), {"ts": BASE, "value": None}]
    assert field_reader(type(events[0])) is getattr and field_reader(dict) is dict.get
    from state.feature_spec import MISSING

    plan = ProfileStore([*({**s, "name": f"s_{s['name']}"} for s in SPECS),
                         *default_features("user"), _spec("ctx", FB, "sum", value="context.x")],
                        "user").plan
    assert plan.fields[-1] == (None, MISSING)  # a dotted path: read by its getter
    for e in events:
        get = field_reader(type(e))
        for name in ("ts", "type", "action", "value", "user_id", "item_id", "position", "nope"):
            for default in (None, 1.0, MISSING):
                assert get(e, name, default) is e.get(name, default)
        for f, (field, default) in enumerate(plan.fields):
            if field is not None:
                assert get(e, field, default) == plan.getters[f](e)
    assert [f for f in plan.fields if f[0] is not None]  # fields read without a getter


def test_records_write_as_their_dicts() -> None:
    """A store fed ``events.model`` records (fields read by ``getattr``: ``field_reader``)
    answers and snapshots as one fed the same events as dicts (every aggregate, a cross
    store's item attributes, fields a record type lacks, e.g. a request's action)."""
    from dataclasses import asdict

    from events.model import Feedback, Impression, Request

    rnd = random.Random(3)
    cats = {f"it{j}": {"category": f"c{j % 3}"} for j in range(8)}
    specs = [*({**s, "name": f"s_{s['name']}"} for s in SPECS), *default_features("user"),
             *default_features("user_x_category"), *default_features("item")]
    for kind in ("user", "user_x_category", "item"):
        by_record, by_dict = ProfileStore(specs, kind), ProfileStore(specs, kind)
        ts = BASE
        for i in range(600):
            ts += rnd.choice((0, SEC, 30 * SEC, 10 * MIN))
            user, item = f"u{rnd.randint(0, 2)}", f"it{rnd.randint(0, 7)}"
            pick = rnd.random()
            record: Any = (
                Impression(ts=ts, impression_id=f"m{i}", user_id=user, item_id=item,
                           position=rnd.randint(0, 9)) if pick < 0.6
                else Request(ts=ts, request_id=f"r{i}", user_id=user) if pick < 0.7
                else Feedback(ts=ts, user_id=user, item_id=item,
                              action=rnd.choice(["click", "like", "rating", "dwell"]),
                              value=float(rnd.randint(1, 5))))
            as_dict = {**asdict(record), "type": record.type}
            by_record.apply(record, cats.get)
            by_dict.apply(as_dict, cats.get)
            if i % 37 == 0:
                who = {"user": user, "item": item}.get(kind, (user, cats[item]["category"]))
                assert by_record.query(who) == by_dict.query(who), i
        assert by_record.counters["writes"] > 500
        assert by_record.snapshot() == by_dict.snapshot()
