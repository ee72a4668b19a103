"""Central vs per-shard pool ranker, replayed on the (pool, target) pairs of a real run.

Step 1 (skipped when ``--pairs`` exists): ``streamrec eval`` of ``LOG`` with the default
config (central training) through the real flow, keeping every pair the pool trainer
receives (matrix, target, event time; in arrival order) and the eval's positives.
Step 2: prequential replay of those pairs (score the pool, then learn): a hit when the
target is in the model's top 10. The pool is the blend's best 100 of the served
request, so every hit is an HR@10 hit of that request: hits / positives is the HR@10
the re-ranker adds up to (targets outside the pool are misses for every variant).
Variants, side by side in the same run:

* ``blend``: the starting weights (the blend order), never learning;
* ``central_lag<B>``: one model learning every pair, its copy replaced every ``B``
  pairs (B = 1: no publication lag; the flow's copies lag about a micro-batch);
* ``shard<S>``: the rival, S per-shard models each learning at once from the pairs of
  its own shard (pairs dealt to shards at random, seeded: a shard's users are a hash
  sample of all users);
* ``central_lag100_ranks``: the same with ``serving.pool.rank_features`` (each
  feature's rank within the pool beside it);
* ``central_lag<B>_local<S>``: the copy plus shard-local steps on the shard's own pairs
  since that copy (what a shard-local fallback between copies would add).

    python bench/pool_replay.py /tmp/mldata/ml50k.jsonl --pairs /tmp/pairs50.npz [--shards 8,32]

Prints readable lines and, last, one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from models.pool_ranker import PoolRanker, PoolRankerConfig  # noqa: E402
from operators import pool_trainer  # noqa: E402


def capture(log: Path, out: Path) -> None:
    """Run the eval and save every pair the central trainer receives."""
    from flows.evaluate import evaluate

    seen: list[tuple[int, np.ndarray, int]] = []
    process = pool_trainer.PoolTrainer.process

    def keep(self: pool_trainer.PoolTrainer, pairs: list) -> dict:
        seen.extend((p.ts, p.x.copy(), p.target) for p in pairs)
        return process(self, pairs)

    pool_trainer.PoolTrainer.process = keep  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report = evaluate(log, Path(tmp) / "r.json", plots=False)
    finally:
        pool_trainer.PoolTrainer.process = process  # type: ignore[method-assign]
    np.savez(out, ts=np.array([s[0] for s in seen], np.int64),
             target=np.array([s[2] for s in seen], np.int64),
             lens=np.array([len(s[1]) for s in seen], np.int64),
             x=np.concatenate([s[1] for s in seen]),
             names=np.array(PoolRankerConfig().features),
             positives=np.array([report["positives"]]),
             hr_at_10=np.array([report["hr_at_10"]]))
    print(f"captured {len(seen):,} pairs; eval HR@10 {report['hr_at_10']}")


def replay(xs: list[np.ndarray], targets: np.ndarray, names: list[str], lag: int = 1,
           shards: int = 1, local: bool = False, learn: bool = True, seed: int = 0,
           ranks: bool = False) -> int:
    """Hits in the top 10 (see the module docstring for the variants)."""
    rng = np.random.default_rng(seed)
    shard_of = rng.integers(0, shards, len(targets))
    lr = PoolRankerConfig().learning_rate
    central = PoolRanker(names, lr, ranks=ranks)
    served = copy.deepcopy(central)
    mine = [copy.deepcopy(central) for _ in range(shards)]
    per_shard = shards > 1 and not local
    hits = 0
    for n, (x, target) in enumerate(zip(xs, targets.tolist(), strict=True)):
        s = int(shard_of[n])
        model = mine[s] if (per_shard or local) else served
        hits += target in np.argsort(-model.scores(x), kind="stable")[:10]
        if not learn:
            continue
        if per_shard or local:
            mine[s].observe(x)
            mine[s].learn(x, target)
        if not per_shard:
            central.observe(x)
            central.learn(x, target)
            if (n + 1) % lag == 0:
                served = copy.deepcopy(central)
                if local:
                    mine = [copy.deepcopy(central) for _ in range(shards)]
    return int(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--pairs", type=Path, required=True, help="pairs file (made if absent)")
    parser.add_argument("--shards", default="8,32",
                        help="user shard counts of the per-shard rival (comma-separated)")
    args = parser.parse_args()
    if not args.pairs.exists():
        capture(args.log, args.pairs)
    with np.load(args.pairs) as z:
        off = np.concatenate([[0], np.cumsum(z["lens"])])
        x = z["x"].astype(np.float64)
        xs = [x[off[i]:off[i + 1]] for i in range(len(z["lens"]))]
        targets, positives = z["target"], int(z["positives"][0])
        flow_hr = float(z["hr_at_10"][0])
        # the features the pairs were captured with (older files: the default's first columns)
        names = ([str(n) for n in z["names"]] if "names" in z
                 else list(PoolRankerConfig().features)[:x.shape[1]])
    counts = [int(c) for c in args.shards.split(",")]
    variants: dict[str, dict] = {
        "blend": {"learn": False},
        "central_lag1": {},
        "central_lag50": {"lag": 50},
        "central_lag100": {"lag": 100},
        "central_lag100_ranks": {"lag": 100, "ranks": True},
        **{f"shard{s}": {"shards": s} for s in counts},
        f"central_lag100_local{counts[0]}": {"lag": 100, "shards": counts[0], "local": True},
    }
    figures: dict[str, float | int] = {"pairs": len(targets), "positives": positives,
                                       "flow_hr_at_10": flow_hr}
    print(f"{len(targets):,} pairs, {positives:,} positives (flow HR@10 {flow_hr})")
    for name, kw in variants.items():
        hits = replay(xs, targets, names, **kw)
        figures[f"{name}_hits"] = hits
        print(f"  {name:24s} hits {hits:6,}  in-pool HR@10 contribution {hits / positives:.4f}",
              flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
