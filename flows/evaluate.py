"""``streamrec eval``: replay a log through the real flow and write a JSON report.

The report keys are fixed (docs/evaluation.md, "The eval report"); metrics that do not apply to a log
(or whose stage has not run) are ``null``. The flow runs in this process (one
worker) with the log as its only input and JSONL outputs under ``out_dir``.

Prequential HR@10 / NDCG@10 (docs/evaluation.md, "Protocols") apply to logs whose requests name the
item the user consumed next (``context.eval_item``, written by ``streamrec import
movielens --with-requests``): each such request is answered by the serving path
before the flow learns from that positive; a hit is the item in the top 10.
Progressive AUC, log loss and calibration are the trainer's score-before-learn
figures; latency is request ingest to recommendation emit (wall ms).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from bytewax.testing import run_main

from flows.config import InputConfig, load_config

REPORT_KEYS = (
    "events", "positives", "hr_at_10", "ndcg_at_10", "auc", "logloss", "calibration",
    "events_per_s", "latency_ms_p50", "latency_ms_p99", "examples_positive",
    "examples_negative_weighted", "config", "version",
)
CURVE_POINTS = 50


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All records of a JSONL output file ([] when it does not exist)."""
    if not path.exists():
        return []
    with path.open("rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]


def _version() -> str:
    try:
        return version("streamrec")
    except PackageNotFoundError:
        return "unknown"


def hit_rates(recommendations: list[dict[str, Any]], k: int = 10) -> dict[str, Any]:
    """HR@k, NDCG@k and the HR curve over the evaluated requests (in event-time order)."""
    evaluated = sorted((r for r in recommendations if "eval_item" in r), key=lambda r: r["ts"])
    if not evaluated:
        return {"positives": 0, "hr": None, "ndcg": None, "curve": []}
    hits, gains = [], []
    for rec in evaluated:
        items = [i["item_id"] for i in rec["items"][:k]]
        rank = items.index(rec["eval_item"]) if rec["eval_item"] in items else -1
        hits.append(rank >= 0)
        gains.append(1.0 / math.log2(rank + 2) if rank >= 0 else 0.0)
    n = len(hits)
    step = max(1, n // CURVE_POINTS)
    cum = np.cumsum(hits)
    curve = [{"positives": i + 1, "ts": evaluated[i]["ts"], "hr": round(float(cum[i]) / (i + 1), 5)}
             for i in range(step - 1, n, step)]
    return {"positives": n, "hr": round(sum(hits) / n, 5), "ndcg": round(sum(gains) / n, 5),
            "curve": curve}


def scorer_counts(join: dict[str, Any]) -> dict[str, Any]:
    """Requests served by each scorer and the duel's shadow HR@k of both (the share of
    outcomes, a user's next positive after a request, that each one's top k held)."""
    n = join.get("duel_outcomes", 0)
    return {
        "served_by_ranker": join.get("served_by_ranker", 0),
        "served_by_retrieval": join.get("served_by_retrieval", 0),
        "duel_outcomes": n,
        "duel_hr_ranker": round(join.get("duel_hits_ranker", 0) / n, 5) if n else None,
        "duel_hr_retrieval": round(join.get("duel_hits_retrieval", 0) / n, 5) if n else None,
    }


def evaluate(log: str | Path, report_path: str | Path, config: Any = None,
             out_dir: str | Path | None = None, plots: bool = True,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the flow over ``log``, write the report JSON (and PNG plots) next to
    ``report_path``, return the report; ``progress(events_in)`` as in ``build``."""
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
    cfg.snapshots.dir = ""
    # Deterministic replay: snapshots are read by event time at every micro-batch (no
    # wall-clock polling), one micro-batch per epoch (every stage drains it before the
    # next is read, so a request sees exactly the snapshots of the events before its
    # batch), and the HNSW graph is built by one thread (insertion order fixed).
    cfg.serving = replace(cfg.serving, poll_ms=0)
    cfg.index = replace(cfg.index, threads=1)
    start = time.perf_counter()
    run_main(build(cfg, progress=progress), epoch_interval=timedelta(0))
    elapsed = time.perf_counter() - start

    metrics = read_jsonl(out / "metrics.jsonl")
    summary = next((m for m in reversed(metrics) if m.get("kind") == "summary"), {})
    ranker = next((m for m in reversed(metrics) if m.get("kind") == "ranker_final"), {})
    examples = read_jsonl(out / "examples.jsonl")
    recs = read_jsonl(out / "recommendations.jsonl")
    rates = hit_rates(recs)
    latency = np.array([r["latency_ms"] for r in recs], float)
    events = summary.get("events_in", 0)
    report: dict[str, Any] = {key: None for key in REPORT_KEYS}
    report.update({
        "events": events,
        "dead_letters": summary.get("dead_letters", 0),
        "positives": rates["positives"] or summary.get("join", {}).get("positives", 0),
        "hr_at_10": rates["hr"],
        "ndcg_at_10": rates["ndcg"],
        "auc": ranker.get("auc"),
        "logloss": ranker.get("logloss"),
        "calibration": ranker.get("calibration"),
        "events_per_s": round(events / elapsed, 1) if elapsed > 0 else None,
        "latency_ms_p50": round(float(np.percentile(latency, 50)), 3) if latency.size else None,
        "latency_ms_p99": round(float(np.percentile(latency, 99)), 3) if latency.size else None,
        "requests": len(recs),
        "examples": len(examples),
        "examples_positive": sum(1 for e in examples if e["label"] == 1),
        "examples_negative_weighted": round(sum(e["weight"] for e in examples if e["label"] == 0), 3),
        "late_labels": summary.get("outputs", {}).get("late-labels", 0),
        "hr_curve": rates["curve"],
        "reliability": ranker.get("reliability"),
        "scorers": scorer_counts(summary.get("join", {})),
        "empty_answers": summary.get("join", {}).get("empty_answers", 0),
        "backfilled_items": summary.get("join", {}).get("backfilled", 0),
        "elapsed_s": round(elapsed, 3),
        "outputs_dir": str(out),
        "config": cfg.redacted(),
        "version": _version(),
    })
    report_path.parent.mkdir(parents=True, exist_ok=True)
    if plots:
        report["plots"] = write_plots(report, latency, report_path)
    report_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report


def write_plots(report: dict[str, Any], latency: np.ndarray, report_path: Path) -> list[str]:
    """HR@10 over time, latency histogram, calibration curve as PNGs beside the report
    (needs matplotlib; returns the paths written, [] without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    stem = report_path.with_suffix("")
    if report["hr_curve"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([p["positives"] for p in report["hr_curve"]], [p["hr"] for p in report["hr_curve"]])
        ax.set(xlabel="positives evaluated", ylabel="cumulative HR@10", title="Prequential HR@10")
        ax.grid(alpha=0.3)
        path = f"{stem}-hr.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if latency.size:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(latency, bins=50)
        ax.set(xlabel="request ingest -> emit (ms)", ylabel="requests", title="Serving latency")
        path = f"{stem}-latency.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if report.get("reliability"):
        pts = report["reliability"]
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([p["p_mean"] for p in pts], [p["y_rate"] for p in pts], "o-", label="ranker")
        top = max(max(p["p_mean"] for p in pts), max(p["y_rate"] for p in pts))
        ax.plot([0, top], [0, top], "--", color="grey", label="perfect")
        ax.set(xlabel="mean predicted", ylabel="observed rate", title="Calibration")
        ax.legend()
        path = f"{stem}-calibration.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
