"""What each retrieval source and the ranker contribute, through the real flow.

Every row is ``streamrec eval`` (``flows.evaluate.evaluate``: the replay source, the
user and item shards, the trainer, the snapshot store, serving; one process) on the
same MovieLens log with one change to the default configuration, on the prequential
protocol of docs/evaluation.md (a request before every positive, answered before the
flow learns from it).

    python bench/movielens_ablation.py [--path u.data] [--rows full,covis_only,...]

Rows (``--rows`` picks some; default all):

* ``full``: the default configuration (scorer ``auto``: the duel picks ranker or blend);
* ``scorer_retrieval`` / ``scorer_ranker``: the final order forced to one scorer;
* ``covis_only``: only the co-visitation source (both channels), blend order;
* ``covis_liked_only``: co-visitation without the any-interaction channel;
* ``no_covis``: ANN + trending + popular, blend order (ANN first, then trending);
* ``ann_only``, ``trending_only``, ``popular_only``: one source each.

Prints one line per row and, last, one JSON object: ``hr_at_10`` (the full row),
``<row>_hr_at_10`` / ``<row>_ndcg_at_10`` / ``<row>_seconds`` for every row run, and
the duel's shadow figures of the full row. Without the data file it prints a message
and a JSON line of nulls and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flows.evaluate import evaluate  # noqa: E402
from flows.importers import movielens_events, write_events  # noqa: E402

DEFAULT_PATH = ROOT.parent / "shared" / "data" / "movielens-100k" / "u.data"


def _sources(**n: int) -> dict[str, Any]:
    return {"serving": {"scorer": "retrieval", "sources": n}}


ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("default config (scorer auto)", {}),
    "scorer_retrieval": ("all sources, retrieval blend order", {"serving": {"scorer": "retrieval"}}),
    "scorer_ranker": ("all sources, ranker order", {"serving": {"scorer": "ranker"}}),
    "covis_only": ("co-visitation only (liked + any)", _sources(covis=150)),
    "covis_liked_only": ("co-visitation, liked channel only",
                         {**_sources(covis=150), "items": {"covis_any": False}}),
    "no_covis": ("ANN + trending + popular", _sources(ann=100, trending=50, popular=50)),
    "ann_only": ("ANN (MF user vector) only", _sources(ann=100)),
    "trending_only": ("trending only", _sources(trending=50)),
    "popular_only": ("popular only", _sources(popular=50)),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, default=DEFAULT_PATH, help="MovieLens ratings file")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if not args.path.exists():
        print(f"{args.path} not found: MovieLens ablation skipped")
        print(json.dumps({"hr_at_10": None, **{f"{r}_hr_at_10": None for r in rows}}))
        return
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="streamrec-ablation-") as tmp:
        log = Path(tmp) / "ml.jsonl"
        write_events(movielens_events(args.path, with_requests=True), log)  # streamrec import
        print(f"{'row':<18} {'HR@10':>7} {'NDCG@10':>8} {'ev/s':>7} {'s':>6}  what")
        for name in rows:
            what, config = ROWS[name]
            start = time.perf_counter()
            report = evaluate(log, Path(tmp) / f"{name}.json", config=config,
                              out_dir=Path(tmp) / name, plots=False)
            seconds = time.perf_counter() - start
            figures[f"{name}_hr_at_10"] = report["hr_at_10"]
            figures[f"{name}_ndcg_at_10"] = report["ndcg_at_10"]
            figures[f"{name}_seconds"] = round(seconds, 1)
            if name == "full":
                figures["hr_at_10"] = report["hr_at_10"]
                figures["full_scorers"] = report["scorers"]
            print(f"{name:<18} {report['hr_at_10']:>7.4f} {report['ndcg_at_10']:>8.4f} "
                  f"{report['events_per_s']:>7.0f} {seconds:>6.0f}  {what}", flush=True)
    figures.setdefault("hr_at_10", None)
    figures["positives"] = report["positives"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
