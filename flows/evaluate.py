"""``streamrec eval``: replay a log through the real flow and write a JSON report.

The report keys are fixed by DESIGN section 9; metrics that do not apply to a log
(or whose stage has not run) are ``null``. The flow runs in this process (one
worker) with the log as its only input and JSONL outputs under ``out_dir``.
"""

from __future__ import annotations

import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import orjson
from bytewax.testing import run_main

from flows.config import InputConfig, load_config

REPORT_KEYS = (
    "events", "positives", "hr_at_10", "ndcg_at_10", "auc", "logloss", "calibration",
    "events_per_s", "latency_ms_p50", "latency_ms_p99", "examples_positive",
    "examples_negative_weighted", "config", "version",
)


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


def evaluate(log: str | Path, report_path: str | Path, config: Any = None,
             out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the flow over ``log``, write the report JSON to ``report_path``, return it."""
    from flows.recsys import build

    report_path = Path(report_path)
    out = Path(out_dir) if out_dir else report_path.with_suffix("").with_name(report_path.stem + "-out")
    if out.exists():
        shutil.rmtree(out)
    cfg = load_config(config)
    batch = cfg.inputs[0].batch_size if cfg.inputs else 1000
    cfg.inputs = [InputConfig(kind="replay", path=str(log), batch_size=batch)]
    cfg.output.kind = "files"
    cfg.output.dir = str(out)
    start = time.perf_counter()
    run_main(build(cfg))
    elapsed = time.perf_counter() - start

    summary = next((m for m in reversed(read_jsonl(out / "metrics.jsonl"))
                    if m.get("kind") == "summary"), {})
    examples = read_jsonl(out / "examples.jsonl")
    events = summary.get("events_in", 0)
    report: dict[str, Any] = {key: None for key in REPORT_KEYS}
    report.update({
        "events": events,
        "dead_letters": summary.get("dead_letters", 0),
        "positives": summary.get("join", {}).get("positives", 0),
        "events_per_s": round(events / elapsed, 1) if elapsed > 0 else None,
        "examples": len(examples),
        "examples_positive": sum(1 for e in examples if e["label"] == 1),
        "examples_negative_weighted": round(sum(e["weight"] for e in examples if e["label"] == 0), 3),
        "late_labels": summary.get("outputs", {}).get("late-labels", 0),
        "elapsed_s": round(elapsed, 3),
        "outputs_dir": str(out),
        "config": cfg.to_dict(),
        "version": _version(),
    })
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report
