"""Cost of central pool-ranker training: what a (pool, target) pair weighs on the way to
the pool trainer and what the trainer spends on it, beside the per-shard model's own
learning step (the rival: no pair leaves the shard).

Synthetic pools of the default shape (``serving.pool.pool_size`` 100 rows x the 11
default features, float32 as the shards send them). Measured per pair:

* payload bytes (the float32 matrix and two integers) and pickled bytes (what crosses
  processes when Bytewax exchanges the pair between workers);
* central: ``PoolTrainer.process`` (scale update + Adagrad step, a copy written into a
  real snapshot store every ``sync_every_pairs``) in microseconds per pair;
* rival: ``PoolModel.outcome`` with ``training = "shard"`` (take + Adagrad step on the
  shard), and with ``"central"`` (take + queue the pair), microseconds per pair.

    python bench/pool_pairs.py [--pairs 20000]

Prints readable lines and, last, one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from models.pool_ranker import PoolModel, PoolRankerConfig  # noqa: E402
from operators.pool_trainer import PoolTrainer  # noqa: E402
from state.snapshot_store import SnapshotStore  # noqa: E402


def pools(n: int, size: int, width: int, seed: int = 0):
    """(user, items, x, target) with a target that depends on two columns."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        x = rng.normal(size=(size, width)).astype(np.float32)
        x[:, 0] = np.sort(rng.random(size))[::-1]
        logits = x[:, 0] + 1.5 * x[:, 3]
        p = np.exp(logits - logits.max())
        yield f"u{k}", [f"i{k}-{j}" for j in range(size)], x, int(rng.choice(size, p=p / p.sum()))


def shard_side(config: PoolRankerConfig, data: list) -> tuple[float, list]:
    """Serve every pool, then time the outcomes alone (us per pair); the queued pairs."""
    model = PoolModel(config)
    for k, (user, items, x, _) in enumerate(data):
        model.serve(user, items, x, k)
    t0 = time.perf_counter()
    for k, (user, items, _, target) in enumerate(data):
        model.outcome(user, items[target], k)
    us = (time.perf_counter() - t0) / len(data) * 1e6
    return us, model.take_pairs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    args = parser.parse_args()
    base = PoolRankerConfig()
    n, size, width = args.pairs, base.pool_size, len(base.features)
    data = list(pools(n, size, width))
    common = {"max_pending": n + 1}
    shard_us, _ = shard_side(PoolRankerConfig(training="shard", **common), data)
    queue_us, pairs = shard_side(PoolRankerConfig(training="central", **common), data)
    payload = float(np.mean([p.nbytes for p in pairs]))
    pickled = float(np.mean([len(pickle.dumps(p, protocol=5)) for p in pairs[:2_000]]))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = PoolTrainer(PoolRankerConfig(training="central"), SnapshotStore(Path(tmp)))
        t0 = time.perf_counter()
        for k in range(0, n, 20):  # micro-batches of 20 pairs, as shards send them
            trainer.process(pairs[k:k + 20])
        central_us = (time.perf_counter() - t0) / n * 1e6
        versions = trainer.version
    print(f"{n:,} pairs of {size} x {width} float32")
    print(f"  payload {payload:,.0f} B/pair, pickled {pickled:,.0f} B/pair")
    print(f"  shard (rival): outcome + learn on the shard  {shard_us:8.1f} us/pair")
    print(f"  central: outcome + queue on the shard         {queue_us:8.1f} us/pair")
    print(f"  central: pool trainer learn (+ {versions} copies) {central_us:8.1f} us/pair")
    print(json.dumps({
        "pairs": n, "pool_rows": size, "features": width,
        "pair_payload_bytes": round(payload), "pair_pickled_bytes": round(pickled),
        "shard_learn_us_per_pair": round(shard_us, 2),
        "central_queue_us_per_pair": round(queue_us, 2),
        "central_trainer_us_per_pair": round(central_us, 2),
        "central_copies": versions,
        "central_trainer_pairs_per_s": round(1e6 / central_us),
    }))


if __name__ == "__main__":
    main()
