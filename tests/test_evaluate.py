"""The eval report a data scientist can trust (issue 20 point 4): baselines on the same
log in the same run, HR@10 cumulative and per event-time window, serving CPU apart from
queueing, calibration bin counts, intervals and warnings, outputs sized for the job."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from flows.config import load_config
from flows.evaluate import evaluate, run_baselines
from models.baselines import PrequentialBaselines
from models.metrics import ProgressiveMetrics, auc_interval, wilson_interval

DAY_MS = 86_400_000


def _rating(ts: int, user: str, item: str, value: float) -> dict:
    return {"type": "feedback", "ts": ts, "user_id": user, "item_id": item, "action": "rating",
            "value": value}


def _request(ts: int, rid: str, user: str, item: str) -> dict:
    return {"type": "request", "ts": ts, "request_id": rid, "user_id": user, "k": 10,
            "context": {"eval_item": item}}


def test_baselines_follow_the_prequential_protocol() -> None:
    """Answer before learning, exclude what the user rated, popularity by positives so far,
    co-visitation among positives with popularity filling the list."""
    is_pos = load_config({}).join.is_positive
    b = PrequentialBaselines(is_pos, k=2)
    t = 1_000
    for user, item, value in [("a", "x", 5), ("b", "x", 5), ("b", "y", 4), ("c", "z", 5),
                              ("c", "w", 2), ("d", "w", 2), ("d", "q", 1)]:
        b.observe(_rating(t, user, item, value))
        t += 1
    # x has 2 positives, y and z 1 (y first seen first), w and q none
    assert b.observe(_request(t, "r1", "e", "y")) == {"popularity": 1, "covisitation": 1}
    # a rated x: x excluded; covis of x -> y (b liked both) ranks y first, then popularity (z)
    assert b.observe(_request(t, "r2", "a", "y")) == {"popularity": 0, "covisitation": 0}
    assert b.observe(_request(t, "r3", "a", "z")) == {"popularity": 1, "covisitation": 1}
    # w has no positive: below the top 2 of both
    assert b.observe(_request(t, "r4", "a", "w")) == {"popularity": -1, "covisitation": -1}
    # the request is answered before its positive is learned: q is still unpopular
    assert b.observe(_request(t, "r5", "c", "q")) == {"popularity": -1, "covisitation": -1}
    b.observe(_rating(t, "c", "q", 5))
    assert b.evaluated == 5 and b.hits == {"popularity": 3, "covisitation": 3}
    assert b.report()["popularity"]["hr_at_10"] == 0.6


def _reference_ranks(events: list[dict], k: int, window: int = 20) -> list[dict[str, int]]:
    """The prequential baselines by their definition (module docstring of
    ``models.baselines``), item by item in plain Python: every evaluated request's ranks."""
    is_pos = load_config({}).join.is_positive
    seen: list[str] = []
    pop: dict[str, int] = {}
    consumed: dict[str, set[str]] = {}
    recent: dict[str, list[str]] = {}
    cooc: dict[tuple[str, str], int] = {}
    out = []

    def rank(score: dict[str, float], user: str, target: str) -> int:
        if target not in pop or target in consumed.get(user, ()):
            return -1
        order = sorted((i for i in seen if i not in consumed.get(user, ())),
                       key=lambda i: (-score[i], seen.index(i)))
        return order.index(target) if order.index(target) < k else -1

    for e in events:
        user = e["user_id"]
        if e["type"] == "request":
            target = e["context"]["eval_item"]
            ranks = {"popularity": rank({i: float(pop[i]) for i in seen}, user, target)}
            if recent.get(user):
                top = max(pop.values())
                f = 1e-9 / top if top > 0 else 0.0
                covis = {i: float(sum(cooc.get((r, i), 0) for r in recent[user])) + f * pop[i]
                         for i in seen}
                ranks["covisitation"] = rank(covis, user, target)
            else:
                ranks["covisitation"] = ranks["popularity"]
            out.append(ranks)
            continue
        item = e["item_id"]
        if item not in pop:
            seen.append(item)
            pop[item] = 0
        consumed.setdefault(user, set()).add(item)
        if is_pos(e["action"], float(e["value"])):
            pop[item] += 1
            mine = recent.setdefault(user, [])
            if item not in mine:
                for r in mine:
                    cooc[(r, item)] = cooc.get((r, item), 0) + 1
                    cooc[(item, r)] = cooc.get((item, r), 0) + 1
                mine.insert(0, item)
                del mine[window:]
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_baselines_rank_as_their_definition_on_a_random_log(seed: int) -> None:
    """Ties in popularity and co-visitation, users who rated the asked item, items never
    seen, users without positives: every request's ranks equal the definition's."""
    rng = random.Random(seed)
    events = []
    for t in range(3_000):
        user, item = f"u{rng.randrange(30)}", f"i{rng.randrange(80)}"
        if rng.random() < 0.3:
            events.append(_request(t, f"r{t}", user, item))
        else:
            events.append(_rating(t, user, item, rng.randint(1, 5)))
    b = PrequentialBaselines(load_config({}).join.is_positive, k=10, window=20)
    got = [r for r in map(b.observe, events) if r is not None]
    want = _reference_ranks(events, k=10)
    assert got == want
    assert {rank for r in got for rank in r.values()} >= {-1, 0, 9}
    assert b.hits == {name: sum(r[name] >= 0 for r in want) for name in ("popularity", "covisitation")}


def test_intervals() -> None:
    lo, hi = wilson_interval(38, 100)
    assert lo < 0.38 < hi and lo > 0.28 and hi < 0.49
    assert wilson_interval(0, 0) is None and wilson_interval(0, 10)[0] == 0.0
    lo, hi = auc_interval(0.42, 38, 5000)
    assert hi - lo > 0.15 and lo < 0.42 < hi  # 38 positives: wide
    lo2, hi2 = auc_interval(0.42, 3800, 500_000)
    assert hi2 - lo2 < 0.03
    m = ProgressiveMetrics()
    m.update_many([1, 0, 0, 1, 0], [0.9, 0.2, 0.3, 0.6, 0.7])
    rep = m.report()
    assert rep["positives"] == 2 and rep["auc_ci95"] is not None
    assert sum(g["count"] for g in m.reliability(3)) == 5


def _clustered_log(path: Path, seed: int = 3) -> None:
    """Users with a taste for one of four item clusters rate items of it highly: a log
    where co-visitation beats popularity; requests before every positive."""
    rng = random.Random(seed)
    items = [f"m{c}{j}" for c in range(4) for j in range(15)]
    events, t = [], 1_600_000_000_000
    for item in items:
        events.append({"type": "item", "ts": t, "item_id": item, "attrs": {"category": item[1]}})
    for n in range(1_600):
        user = f"u{rng.randrange(80)}"
        cluster = int(user[1:]) % 4
        liked = rng.random() < 0.8
        item = f"m{cluster if liked else rng.randrange(4)}{rng.randrange(15)}"
        value = 5.0 if liked else float(rng.choice([1, 2, 3]))
        t += rng.randrange(1, 4 * 3_600_000)
        if value >= 4:
            events.append(_request(t, f"r{n}", user, item))
        events.append(_rating(t, user, item, value))
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("eval")
    _clustered_log(tmp / "log.jsonl")
    return evaluate(tmp / "log.jsonl", tmp / "report.json",
                    config={"shards": {"users": 2, "items": 2}}), tmp


def test_report_has_baselines_from_the_same_log(report) -> None:
    rep, tmp = report
    assert orjson.loads((tmp / "report.json").read_bytes()) == rep
    n = rep["positives"]
    assert n > 500
    again = PrequentialBaselines(load_config({}).join.is_positive)
    for line in (tmp / "log.jsonl").read_bytes().splitlines():
        again.observe(orjson.loads(line))
    assert again.evaluated == n
    for name in ("popularity", "covisitation"):
        assert rep["baselines"][name]["hr_at_10"] == round(again.hits[name] / n, 5)
        lo, hi = rep["baselines"][name]["hr_at_10_ci95"]
        assert lo <= rep["baselines"][name]["hr_at_10"] <= hi
    assert rep["baselines"]["covisitation"]["hr_at_10"] > rep["baselines"]["popularity"]["hr_at_10"]
    assert len(run_baselines(tmp / "log.jsonl", load_config({}).join.is_positive)) == n


def test_hr_cumulative_and_per_window_agree(report) -> None:
    rep, _ = report
    windows = rep["hr_windows"]
    assert 10 <= len(windows) <= 20
    assert sum(w["positives"] for w in windows) == rep["positives"]
    assert all(w["start_ts"] < w["end_ts"] <= v["start_ts"] for w, v in zip(windows, windows[1:], strict=False))
    for key, overall in (("hr_at_10", rep["hr_at_10"]),
                         ("popularity", rep["baselines"]["popularity"]["hr_at_10"])):
        mean = sum(w[key] * w["positives"] for w in windows) / rep["positives"]
        assert mean == pytest.approx(overall, abs=1e-3)
    last = rep["hr_curve"][-1]
    assert {"hr", "popularity", "covisitation"} <= set(last)
    assert last["positives"] <= rep["positives"]
    lo, hi = rep["hr_at_10_ci95"]
    assert lo <= rep["hr_at_10"] <= hi


def test_serving_cost_apart_from_queueing(report) -> None:
    rep, _ = report
    assert rep["requests"] == rep["positives"]
    assert 0 < rep["serving_cpu_ms_p50"] <= rep["serving_cpu_ms_p99"]
    assert rep["queue_ms_p50"] is not None and rep["queue_ms_p50"] >= 0
    # each request's latency is its queueing plus its serving wall time (>= part of CPU)
    assert rep["queue_ms_p50"] <= rep["latency_ms_p50"]
    assert rep["serving_cpu_ms_p50"] < rep["latency_ms_p99"]


def test_calibration_counts_intervals_and_sizes(report) -> None:
    rep, tmp = report
    bins = rep["reliability"]
    assert bins and all(b["count"] > 0 for b in bins)
    assert sum(b["count"] for b in bins) == rep["ranker_examples"]["count"]
    lo, hi = rep["auc_ci95"]
    assert lo <= rep["auc"] <= hi
    if rep["ranker_examples"]["positives"] < 200:
        assert any(w.startswith("auc ") and "rests on" in w for w in rep["warnings"])
    out = Path(rep["outputs_dir"])
    assert not (out / "examples.jsonl").exists()  # not asked for: not written
    assert (out / "recommendations.jsonl").exists()
    assert rep["examples_positive"] > 0 and rep["examples"] >= rep["examples_positive"]
    assert rep["peak_rss_mb"] > 50 and rep["outputs_mb"] > 0
    for plot in rep["plots"]:
        assert Path(plot).stat().st_size > 5_000
    assert {Path(p).name for p in rep["plots"]} == {"report-hr.png", "report-latency.png",
                                                    "report-calibration.png"}


def test_examples_on_request_and_missing_matplotlib(tmp_path, monkeypatch) -> None:
    import flows.evaluate as ev

    _clustered_log(tmp_path / "log.jsonl")
    log = tmp_path / "small.jsonl"
    log.write_bytes(b"".join((tmp_path / "log.jsonl").read_bytes().splitlines(True)[:400]))
    monkeypatch.setattr(ev, "_matplotlib", lambda: None)
    rep = evaluate(log, tmp_path / "r.json", examples=True)
    examples = (Path(rep["outputs_dir"]) / "examples.jsonl").read_bytes().splitlines()
    assert len(examples) == rep["examples"] > 0
    assert rep["plots"] == []
    assert any("matplotlib is not installed" in w for w in rep["warnings"])


def test_the_eval_store_is_not_fsynced(report) -> None:
    """The eval's snapshot store is throwaway (no run resumes from it): versions are
    written without fsyncs (snapshots.fsync = false), still read back by the flow."""
    rep, _ = report
    assert rep["config"]["snapshots"]["fsync"] is False
    assert rep["hr_at_10"] is not None and rep["requests"] > 0
