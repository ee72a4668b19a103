"""Item ANN index: incremental refresh vs full rebuild, snapshot size/load, recall, latency.

    python bench/index.py [--items 100000] [--dim 32] [--threads 2] [--seed 0]

In one run, on MF-like item vectors (Gaussian directions, log-normal norms: norms vary
like popularity does in MF) and Gaussian queries:

* refresh time of 1% and 10% changed items (new vectors; incremental hnswlib update)
  vs a full rebuild of the graph;
* snapshot bytes, publish time, load time (SnapshotStore + IndexReader: sha256 check
  plus load) for the published index;
* recall@100 (and @10) of the serving ef against exact inner-product search, on the
  served snapshot after the updates, plus a small ef sweep;
* single-query latency p50/p99 (ms) at k=100 and k=10.

Goals: recall@100 >= 0.95; incremental refresh of 1% >= 10x faster than a rebuild.
The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from state.item_index import IndexBuilder, IndexConfig, IndexReader, ItemIndex, exact_topk  # noqa: E402
from state.snapshot_store import SnapshotStore  # noqa: E402


def item_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Gaussian directions scaled by log-normal norms (MF item vectors' norms vary)."""
    x = rng.normal(size=(n, dim)) / np.sqrt(dim)
    return (x * rng.lognormal(0.0, 0.5, size=(n, 1))).astype(np.float32)


def recall(index: ItemIndex, matrix: np.ndarray, ids: list[str], queries: np.ndarray, k: int) -> float:
    rows, _ = exact_topk(matrix, queries, k)
    hits = 0
    for q, truth in zip(queries, rows, strict=True):
        got = {i for i, _ in index.query(q, k)}
        hits += len(got & {ids[j] for j in truth})
    return hits / (k * len(queries))


def latency_ms(index: ItemIndex, queries: np.ndarray, k: int) -> tuple[float, float]:
    times = np.empty(len(queries))
    for n, q in enumerate(queries):
        t = time.perf_counter()
        index.query(q, k)
        times[n] = time.perf_counter() - t
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="hnswlib build threads")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    n, dim = args.items, args.dim
    cfg = IndexConfig(dim=dim, threads=args.threads, ef=400, rebuild_fraction=0.5)
    print(f"index: {n} items, dim {dim}, space {cfg.space}, M {cfg.M}, ef_construction "
          f"{cfg.ef_construction}, serving ef {cfg.ef}, {args.threads} build threads")
    ids = [f"item{j}" for j in range(n)]
    x = item_vectors(rng, n, dim)

    builder = IndexBuilder(cfg)
    t = time.perf_counter()
    builder.apply(ids, x)
    build_s = time.perf_counter() - t
    print(f"initial build          {build_s:8.2f} s")

    def refresh(fraction: float) -> float:
        m = int(n * fraction)
        changed = rng.choice(n, m, replace=False)
        x[changed] = item_vectors(rng, m, dim)
        t = time.perf_counter()
        how = builder.apply([ids[j] for j in changed], x[changed])
        dt = time.perf_counter() - t
        assert how == "incremental", how
        print(f"refresh {fraction:4.0%} changed    {dt:8.2f} s  ({m} items, {dt / m * 1e3:.3f} ms/item)")
        return dt

    refresh_1 = refresh(0.01)
    refresh_10 = refresh(0.10)
    queries = rng.normal(size=(args.queries, dim)).astype(np.float32)
    recall_after_updates = recall(builder.index, x, ids, queries[:100], 100)
    t = time.perf_counter()
    builder.rebuild()
    rebuild_s = time.perf_counter() - t
    print(f"full rebuild           {rebuild_s:8.2f} s  (1% refresh is {rebuild_s / refresh_1:.1f}x faster)")
    per_item = refresh_10 / (0.10 * n)
    crossover = rebuild_s / (per_item * n)
    print(f"incremental costs {per_item * 1e3:.3f} ms per changed item: break-even with a rebuild "
          f"at ~{crossover:.0%} changed (policy rebuild_fraction={cfg.rebuild_fraction})")

    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        store = SnapshotStore(tmp)
        t = time.perf_counter()
        manifest = builder.publish(store, ts_ms=0)
        publish_s = time.perf_counter() - t
        reader = IndexReader(store)
        t = time.perf_counter()
        assert reader.offer(manifest), reader.last_error
        load_s = time.perf_counter() - t
        served = reader.index
        assert served is not None
        snapshot_bytes = int(manifest["bytes"])
        print(f"snapshot               {snapshot_bytes / 1e6:8.1f} MB  publish {publish_s:.2f} s, "
              f"verified load {load_s:.2f} s")

        r100 = recall(served, x, ids, queries, 100)
        r10 = recall(served, x, ids, queries, 10)
        r100_sub = recall(served, x, ids, queries[:100], 100)
        print(f"recall@100 ef={cfg.ef}      {r100:8.4f}  (recall@10 {r10:.4f}; first 100 queries: "
              f"{recall_after_updates:.4f} after the incremental updates, {r100_sub:.4f} after the rebuild)")
        p50, p99 = latency_ms(served, queries, 100)
        p50_10, p99_10 = latency_ms(served, queries, 10)
        print(f"query k=100            p50 {p50:.3f} ms  p99 {p99:.3f} ms   (k=10: p50 {p50_10:.3f} "
              f"ms, p99 {p99_10:.3f} ms)")
        sweep = {}
        for ef in (100, 200, 800):
            served._index.set_ef(ef)  # private copy in this process; no concurrent readers here
            sweep[ef] = (recall(served, x, ids, queries[:100], 100), latency_ms(served, queries[:100], 100)[0])
        served._index.set_ef(cfg.ef)
        print("ef sweep (recall@100, p50 ms): " + ", ".join(
            f"ef={ef}: {r:.4f} / {ms:.3f}" for ef, (r, ms) in sweep.items()))
        reader.close()

    figures = {
        "items": n,
        "dim": dim,
        "threads": args.threads,
        "ef": cfg.ef,
        "build_s": round(build_s, 3),
        "refresh_1pct_s": round(refresh_1, 3),
        "refresh_10pct_s": round(refresh_10, 3),
        "rebuild_s": round(rebuild_s, 3),
        "rebuild_over_refresh_1pct": round(rebuild_s / refresh_1, 1),
        "recall_at_100": round(r100, 4),
        "recall_at_10": round(r10, 4),
        "recall_at_100_before_rebuild": round(recall_after_updates, 4),
        "query_p50_ms": round(p50, 3),
        "query_p99_ms": round(p99, 3),
        "query_k10_p50_ms": round(p50_10, 3),
        "query_k10_p99_ms": round(p99_10, 3),
        "snapshot_bytes": snapshot_bytes,
        "publish_s": round(publish_s, 3),
        "load_s": round(load_s, 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
