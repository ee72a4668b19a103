"""``streamrec eval``: replay a log through the real flow and write a JSON report.

The report keys are fixed (docs/evaluation.md, "The eval report"); metrics that do not apply to a
log (or whose stage has not run) are ``null``. The flow runs in this process (one
worker) with the log as its only input and JSONL outputs under ``out_dir``
(``examples.jsonl`` only when asked: the figures about examples come from the metrics
stage's counts).

* Prequential HR@10 / NDCG@10 (docs/evaluation.md, "Protocols") apply to logs whose requests name the
  item the user consumed next (``context.eval_item``, written by ``streamrec import
  movielens --with-requests``): each such request is answered by the serving path
  before the flow learns from that positive; a hit is the item in the top 10. The
  baselines of ``models.baselines`` (popularity, co-visitation) answer the same
  requests of the same log in the same run (``baselines``); ``hr_curve`` is cumulative
  and ``hr_windows`` per window of event time (``WINDOWS`` equal spans), both with the
  baselines beside the flow. ``hr_at_10_ci95`` is a Wilson interval.
* Progressive AUC (with a Hanley-McNeil ``auc_ci95``), log loss and calibration are the
  trainer's score-before-learn figures; ``reliability`` has the example count per bin.
* Latency: ``latency_ms_p50/p99`` is request ingest to recommendation emit (wall);
  in a replay that is mostly queueing behind the events of the same micro-batch and
  epoch, so it is split into ``serving_cpu_ms_p50/p99`` (CPU time of the serving call
  of one request: its cost) and ``queue_ms_p50/p99`` (the rest of the latency).
* ``warnings`` lists what makes a figure weak (few positives, missing plots).
* ``peak_rss_mb``: peak resident memory of the eval process; ``outputs_mb``: size of
  what it wrote.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from bytewax.testing import run_main

from events.logfile import open_log
from flows.config import InputConfig, load_config
from models.baselines import BASELINES, PrequentialBaselines
from models.metrics import wilson_interval
from operators.metrics import resident_mb

logger = logging.getLogger(__name__)

REPORT_KEYS = (
    "events", "positives", "hr_at_10", "ndcg_at_10", "auc", "logloss", "calibration",
    "events_per_s", "latency_ms_p50", "latency_ms_p99", "examples_positive",
    "examples_negative_weighted", "config", "version",
)
CURVE_POINTS = 50
WINDOWS = 20
"""Event-time windows of ``hr_windows``."""
FEW_POSITIVES = 200
"""Below this many positives (or a 95% interval wider than 0.1) a figure gets a warning."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All records of a JSONL output file ([] when it does not exist)."""
    return list(iter_jsonl(path))


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file one at a time (nothing when it does not exist)."""
    if not path.exists():
        return
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


def _version() -> str:
    try:
        return version("streamrec")
    except PackageNotFoundError:
        return "unknown"


def _rank(rec: dict[str, Any], k: int) -> int:
    items = [i["item_id"] for i in rec["items"][:k]]
    return items.index(rec["eval_item"]) if rec["eval_item"] in items else -1


def hit_rates(recommendations: list[dict[str, Any]], k: int = 10) -> dict[str, Any]:
    """HR@k, NDCG@k and the HR curve over the evaluated requests (in event-time order)."""
    evaluated = sorted((r for r in recommendations if "eval_item" in r), key=lambda r: r["ts"])
    if not evaluated:
        return {"positives": 0, "hr": None, "ndcg": None, "curve": []}
    ranks = np.array([_rank(r, k) for r in evaluated])
    hits = ranks >= 0
    n = len(hits)
    gains = np.where(hits, 1.0 / np.log2(np.maximum(ranks, 0) + 2), 0.0)
    step = max(1, n // CURVE_POINTS)
    cum = np.cumsum(hits)
    curve = [{"positives": i + 1, "ts": evaluated[i]["ts"], "hr": round(float(cum[i]) / (i + 1), 5)}
             for i in range(step - 1, n, step)]
    return {"positives": n, "hr": round(float(hits.sum()) / n, 5),
            "ndcg": round(float(gains.sum()) / n, 5), "curve": curve}


def scorer_counts(join: dict[str, Any]) -> dict[str, Any]:
    """Requests served by each scorer and the duel's shadow HR@k of both (the share of
    outcomes, a user's next positive after a request, that each one's top k held)."""
    n = join.get("duel_outcomes", 0)
    return {
        "served_by_ranker": join.get("served_by_ranker", 0),
        "served_by_retrieval": join.get("served_by_retrieval", 0),
        "served_by_pool": join.get("served_by_pool", 0),
        "pool_outcomes": join.get("pool_outcomes", 0),
        "pool_learned": join.get("pool_learned", 0),
        "duel_outcomes": n,
        "duel_hr_ranker": round(join.get("duel_hits_ranker", 0) / n, 5) if n else None,
        "duel_hr_retrieval": round(join.get("duel_hits_retrieval", 0) / n, 5) if n else None,
        "served_interleaved": join.get("served_interleaved", 0),
        "duel_clicks": join.get("duel_clicks", 0),
    }


def run_baselines(log: str | Path, is_positive: Any, k: int = 10) -> dict[str, dict[str, int]]:
    """Each baseline's rank of ``eval_item`` per evaluated ``request_id`` (a pass over the
    log in file order, the order the flow read it)."""
    baselines = PrequentialBaselines(is_positive, k=k)
    ranks: dict[str, dict[str, int]] = {}
    with open_log(str(log)) as f:
        for line in f:
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a dead letter for the flow too
            if isinstance(event, dict):
                try:
                    out = baselines.observe(event)
                except (KeyError, TypeError, ValueError):
                    continue  # invalid event: the flow rejects it as well
                if out is not None and "request_id" in event:
                    ranks[str(event["request_id"])] = out
    if baselines.truncated:
        logger.warning("co-visitation baseline: items beyond the first %d only count for "
                       "popularity", baselines.max_dense)
    return ranks


class _Served:
    """What eval keeps of the recommendations, read one at a time (arrays, not records)."""

    def __init__(self, path: Path, baselines: dict[str, dict[str, int]], k: int) -> None:
        latency, cpu, queue, ts, ranks = [], [], [], [], []
        base: dict[str, list[int]] = {name: [] for name in BASELINES}
        self.requests = 0
        for rec in iter_jsonl(path):
            self.requests += 1
            latency.append(rec["latency_ms"])
            if "cpu_ms" in rec:
                cpu.append(rec["cpu_ms"])
                queue.append(rec["queue_ms"])
            if "eval_item" in rec:
                ts.append(rec["ts"])
                ranks.append(_rank(rec, k))
                other = baselines.get(rec["request_id"], {})
                for name in BASELINES:
                    base[name].append(other.get(name, -1))
        self.latency, self.cpu, self.queue = (np.array(a, float) for a in (latency, cpu, queue))
        order = np.argsort(np.array(ts, np.int64), kind="stable")
        self.ts = np.array(ts, np.int64)[order]
        self.ranks = {"flow": np.array(ranks, np.int64)[order]}
        for name in BASELINES:
            self.ranks[name] = np.array(base[name], np.int64)[order]

    def figures(self, name: str) -> dict[str, Any]:
        """HR@10, NDCG@10 and the Wilson interval of HR of one ranker's ranks."""
        r = self.ranks[name]
        if not r.size:
            return {"hr_at_10": None, "ndcg_at_10": None, "hr_at_10_ci95": None}
        hits = int((r >= 0).sum())
        ci = wilson_interval(hits, int(r.size))
        gains = np.where(r >= 0, 1.0 / np.log2(np.maximum(r, 0) + 2), 0.0)
        return {"hr_at_10": round(hits / r.size, 5), "ndcg_at_10": round(float(gains.mean()), 5),
                "hr_at_10_ci95": [round(ci[0], 5), round(ci[1], 5)] if ci else None}

    def curve(self) -> list[dict[str, Any]]:
        """Cumulative HR@10 of the flow and the baselines after each step of positives."""
        n = self.ts.size
        if not n:
            return []
        step = max(1, n // CURVE_POINTS)
        cums = {name: np.cumsum(r >= 0) for name, r in self.ranks.items()}
        return [{"positives": i + 1, "ts": int(self.ts[i]),
                 **{("hr" if name == "flow" else name): round(float(c[i]) / (i + 1), 5)
                    for name, c in cums.items()}}
                for i in range(step - 1, n, step)]

    def windows(self, n_windows: int = WINDOWS) -> list[dict[str, Any]]:
        """HR@10 of the flow and the baselines per window of event time (equal spans
        from the first to the last evaluated request; empty windows left out)."""
        if not self.ts.size:
            return []
        lo, hi = int(self.ts[0]), int(self.ts[-1])
        edges = np.linspace(lo, hi + 1, n_windows + 1).astype(np.int64)
        which = np.searchsorted(edges, self.ts, side="right") - 1
        out = []
        for w in range(n_windows):
            mask = which == w
            n = int(mask.sum())
            if not n:
                continue
            row: dict[str, Any] = {"start_ts": int(edges[w]), "end_ts": int(edges[w + 1]),
                                   "positives": n}
            for name, r in self.ranks.items():
                row["hr_at_10" if name == "flow" else name] = round(float((r[mask] >= 0).mean()), 5)
            out.append(row)
        return out


def _quantile(a: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(a, q)), 3) if a.size else None


def _dir_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def _warnings(report: dict[str, Any], ranker: dict[str, Any]) -> list[str]:
    """What makes a figure weak: few positives or a wide interval."""
    out = []
    n_pos = ranker.get("positives")
    ci = ranker.get("auc_ci95")
    if report.get("auc") is not None and (n_pos is not None and n_pos < FEW_POSITIVES
                                          or ci and ci[1] - ci[0] > 0.1):
        out.append(f"auc {report['auc']} rests on {n_pos} positive examples: 95% interval "
                   f"{ci} (Hanley-McNeil); treat it as a rough figure")
    if report.get("calibration") is not None and n_pos is not None and n_pos < FEW_POSITIVES:
        out.append(f"calibration rests on {n_pos} positive examples; see the bin counts in "
                   "reliability")
    ci = report.get("hr_at_10_ci95")
    n = report.get("positives") or 0
    if report.get("hr_at_10") is not None and (n < FEW_POSITIVES or ci and ci[1] - ci[0] > 0.1):
        out.append(f"hr_at_10 {report['hr_at_10']} rests on {n} positives: 95% interval {ci} "
                   "(Wilson)")
    return out


def evaluate(log: str | Path, report_path: str | Path, config: Any = None,
             out_dir: str | Path | None = None, plots: bool = True,
             progress: Callable[[int], None] | None = None,
             examples: bool = False) -> dict[str, Any]:
    """Run the flow over ``log``, write the report JSON (and PNG plots) next to
    ``report_path``, return the report; ``progress(events_in)`` as in ``build``;
    ``examples``: also write ``examples.jsonl``."""
    from flows.recsys import build

    report_path = Path(report_path)
    out = Path(out_dir) if out_dir else report_path.with_name(report_path.stem + "-out")
    if out.exists():
        shutil.rmtree(out)
    cfg = load_config(config)
    batch = cfg.inputs[0].batch_size if cfg.inputs else 1000
    cfg.inputs = [InputConfig(kind="replay", path=str(log), batch_size=batch)]
    cfg.output.kind = "files"
    cfg.output.dir = str(out)
    if not examples and "examples" not in cfg.output.skip:
        cfg.output.skip = [*cfg.output.skip, "examples"]
    cfg.snapshots.dir = ""
    cfg.snapshots.fsync = False  # a throwaway store: no run resumes from it
    # Deterministic replay: snapshots are read by event time at every micro-batch (no
    # wall-clock polling), one micro-batch per epoch (every stage drains it before the
    # next is read, so a request sees exactly the snapshots of the events before its
    # batch), and the HNSW graph is built by one thread (insertion order fixed).
    cfg.serving = replace(cfg.serving, poll_ms=0)
    cfg.index = replace(cfg.index, threads=1)
    cfg.serving.record_cost = True
    start = time.perf_counter()
    run_main(build(cfg, progress=progress), epoch_interval=timedelta(0))
    elapsed = time.perf_counter() - start
    baseline_ranks = run_baselines(log, cfg.join.is_positive)

    metrics = read_jsonl(out / "metrics.jsonl")
    summary = next((m for m in reversed(metrics) if m.get("kind") == "summary"), {})
    ranker = next((m for m in reversed(metrics) if m.get("kind") == "ranker_final"), {})
    served = _Served(out / "recommendations.jsonl", baseline_ranks, 10)
    flow = served.figures("flow")
    by_label = summary.get("examples_by_label", {})
    weight_by_label = summary.get("examples_weight_by_label", {})
    events = summary.get("events_in", 0)
    report: dict[str, Any] = {key: None for key in REPORT_KEYS}
    report.update({
        "events": events,
        "dead_letters": summary.get("dead_letters", 0),
        "positives": int(served.ts.size) or summary.get("join", {}).get("positives", 0),
        "hr_at_10": flow["hr_at_10"],
        "hr_at_10_ci95": flow["hr_at_10_ci95"],
        "ndcg_at_10": flow["ndcg_at_10"],
        "baselines": {name: served.figures(name) for name in BASELINES} if served.ts.size else None,
        "auc": ranker.get("auc"),
        "auc_ci95": ranker.get("auc_ci95"),
        "logloss": ranker.get("logloss"),
        "calibration": ranker.get("calibration"),
        "ranker_examples": {"count": ranker.get("count"), "positives": ranker.get("positives")}
        if ranker else None,
        "events_per_s": round(events / elapsed, 1) if elapsed > 0 else None,
        "latency_ms_p50": _quantile(served.latency, 50),
        "latency_ms_p99": _quantile(served.latency, 99),
        "serving_cpu_ms_p50": _quantile(served.cpu, 50),
        "serving_cpu_ms_p99": _quantile(served.cpu, 99),
        "serving_cpu_ms_mean": round(float(served.cpu.mean()), 4) if served.cpu.size else None,
        "queue_ms_p50": _quantile(served.queue, 50),
        "queue_ms_p99": _quantile(served.queue, 99),
        "requests": served.requests,
        "examples": sum(by_label.values()),
        "examples_positive": by_label.get("1", 0),
        "examples_negative_weighted": round(weight_by_label.get("0", 0.0), 3),
        "late_labels": summary.get("outputs", {}).get("late-labels", 0),
        "hr_curve": served.curve(),
        "hr_windows": served.windows(),
        "reliability": ranker.get("reliability"),
        "scorers": scorer_counts(summary.get("join", {})),
        "empty_answers": summary.get("join", {}).get("empty_answers", 0),
        "backfilled_items": summary.get("join", {}).get("backfilled", 0),
        "elapsed_s": round(elapsed, 3),
        "peak_rss_mb": round(resident_mb()[1], 1),
        "outputs_dir": str(out),
        "config": cfg.redacted(),
        "version": _version(),
    })
    report["warnings"] = _warnings(report, ranker)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    if plots:
        report["plots"] = write_plots(report, served, report_path)
        if not report["plots"] and _matplotlib() is None:
            report["warnings"].append("no plots: matplotlib is not installed "
                                      "(pip install matplotlib)")
    report["outputs_mb"] = _dir_mb(out)
    for warning in report["warnings"]:
        logger.warning("eval: %s", warning)
    report_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report


def _matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(report: dict[str, Any], served: _Served, report_path: Path) -> list[str]:
    """PNGs beside the report: HR@10 cumulative and per event-time window with the
    baselines, serving CPU and queueing per request, calibration with bin counts.
    Returns the paths written ([] without matplotlib)."""
    plt = _matplotlib()
    if plt is None:
        return []
    written = []
    stem = report_path.with_suffix("")

    def save(fig: Any, suffix: str) -> None:
        path = f"{stem}-{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    names = {"hr": "streamrec", "hr_at_10": "streamrec", "popularity": "popularity",
             "covisitation": "co-visitation"}
    if report["hr_curve"]:
        fig, (cum, per) = plt.subplots(1, 2, figsize=(11, 3.8))
        curve = report["hr_curve"]
        for key in ("hr", *BASELINES):
            cum.plot([p["positives"] for p in curve], [p[key] for p in curve], label=names[key],
                     linestyle="-" if key == "hr" else "--")
        cum.set(xlabel="positives evaluated", ylabel="cumulative HR@10", title="Prequential HR@10")
        wins = report["hr_windows"]
        mids = [((w["start_ts"] + w["end_ts"]) / 2 - wins[0]["start_ts"]) / 86_400_000 for w in wins]
        for key in ("hr_at_10", *BASELINES):
            per.plot(mids, [w[key] for w in wins], marker="o", ms=3, label=names[key],
                     linestyle="-" if key == "hr_at_10" else "--")
        per.set(xlabel="event time (days from the first request)", ylabel="HR@10 in the window",
                title=f"HR@10 per window ({len(wins)} windows)")
        for ax in (cum, per):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "hr")
    if served.latency.size:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        if served.cpu.size:
            axes[0].hist(served.cpu, bins=50)
            axes[0].set(xlabel="serving CPU per request (ms)", ylabel="requests",
                        title=f"Serving cost (p50 {report['serving_cpu_ms_p50']} ms)")
            axes[1].hist(served.queue, bins=50)
            axes[1].set(xlabel="queueing: ingest -> emit minus serving (ms)", ylabel="requests",
                        title=f"Queueing in the flow (p50 {report['queue_ms_p50']} ms)")
        save(fig, "latency")
    if report.get("reliability"):
        pts = report["reliability"]
        fig, (ax, bars) = plt.subplots(2, 1, figsize=(5, 6.5), height_ratios=[3, 1])
        ax.plot([p["p_mean"] for p in pts], [p["y_rate"] for p in pts], "o-", label="ranker")
        top = max(max(p["p_mean"] for p in pts), max(p["y_rate"] for p in pts))
        ax.plot([0, top], [0, top], "--", color="grey", label="perfect")
        ax.set(xlabel="mean predicted", ylabel="observed rate",
               title=f"Calibration {report['calibration']} (bins of equal weight)")
        ax.legend()
        ax.grid(alpha=0.3)
        labels = [f"{p['p_mean']:.2g}" for p in pts]
        counts = [p.get("count", 0) for p in pts]
        bars.bar(range(len(pts)), counts)
        for i, n in enumerate(counts):
            bars.annotate(str(n), (i, n), ha="center", va="bottom", fontsize=7)
        bars.set_xticks(range(len(pts)), labels, fontsize=7)
        bars.set(xlabel="bin (mean predicted)", ylabel="examples")
        save(fig, "calibration")
    return written
