"""Where streamrec's LR falls short of the oracle in the closed loop: optimisation, model
or data (issue 17 point 1; docs/evaluation.md, "Which limit: optimisation, model or data").

A debugging harness over one ``bench/closed_loop.py`` run of streamrec (one world, one
seed): it records the examples the trainer learns from and, for the requests the serving
LR scores, the candidates and the LR's probabilities (every ``--sample-every``-th request
also their feature dicts). Then, on the requests of the last half, with the simulator's
hidden truth as the yardstick only (never an input):

* ``ectr_*``: expected CTR (mean true click probability at positions 0..9) of the top 10
  of the candidates in some order: the serving copy's (``lr_copy``), the best order of
  the candidates (``candidates_best``), the oracle's top 10 of the catalogue
  (``oracle``), the candidates ordered by the user's true favourite-category rank and
  the true item bias (``true_category_and_bias``), by the user's own click share of the
  item's category and the true item bias (``own_click_share_and_bias``);
* on the sampled requests, models fitted on the examples of the first half (by ts):
  the serving copy in the loop (``sampled_lr_copy``), a batch logistic regression on
  the same features (full-batch Adam, ``--epochs``; ``sampled_batch_lr``), one online
  pass of the default LR (``sampled_online_lr``) and of the LR with
  ``numeric_lr = 0.03`` (``sampled_online_numeric_lr``);
* ``recall_oracle_top10``: share of the oracle's top 10 among the candidates;
  ``favourite_category_from_clicks``: how often the category a user clicked most so far
  is their true favourite.

    python bench/loop_diagnosis.py [--seed 0] [--world default] [--requests 3000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.closed_loop as closed_loop  # noqa: E402
from models.features import SERVING_POSITION, example_features, ranking_features_many  # noqa: E402
from models.rankers import make_ranker  # noqa: E402
from operators import serving  # noqa: E402
from operators.trainer import Trainer  # noqa: E402

Scored = tuple[str, int, list[str], np.ndarray, list[dict[str, float]] | None]


def capture(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[Scored], Any, float]:
    """Run streamrec in one world; return (examples learned, LR-scored requests, the
    simulator, last-half expected CTR)."""
    examples: list[dict[str, Any]] = []
    scored: list[Scored] = []
    sims: list[Any] = []
    process, ranker_scores = Trainer.process, serving.Server._ranker_scores
    loop_init = closed_loop.ClosedLoop.__init__

    def trainer_process(self: Trainer, batch: list[dict[str, Any]]) -> Any:
        examples.extend(batch)
        return process(self, batch)

    def server_scores(self: Any, ranker: Any, request: Any, ctx: Any, pool: Any, covis: Any
                      ) -> np.ndarray:
        p = ranker_scores(self, ranker, request, ctx, pool, covis)
        items = list(pool.items)
        feats = None
        if len(scored) % args.sample_every == 0:
            extras = self.context.item_features(ctx, items, request.ts, covis)
            feats = ranking_features_many(ctx.user_id, items, request.ts, request.context,
                                          SERVING_POSITION, ctx.profile, extras)
        scored.append((ctx.user_id, request.ts, items, np.asarray(p, np.float64).copy(), feats))
        return p

    def init(self: Any, settings: Any) -> None:
        loop_init(self, settings)
        sims.append(self.sim)

    Trainer.process = trainer_process  # type: ignore[method-assign]
    serving.Server._ranker_scores = server_scores  # type: ignore[method-assign]
    closed_loop.ClosedLoop.__init__ = init  # type: ignore[method-assign]
    try:
        run = closed_loop.run(args.world, "streamrec", args)
    finally:
        Trainer.process = process  # type: ignore[method-assign]
        serving.Server._ranker_scores = ranker_scores  # type: ignore[method-assign]
        closed_loop.ClosedLoop.__init__ = loop_init  # type: ignore[method-assign]
    return examples, scored, sims[-1], run.last_half()


class Truth:
    """The simulator's hidden click model, as a yardstick."""

    def __init__(self, sim: Any) -> None:
        self.sim = sim
        cfg = sim.config
        self.pos = -cfg.position_bias_eta * np.log1p(np.arange(10))

    def parts(self, user: str, items: list[str], ts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(affinity term, item bias, rank of the item's category for the user) per item."""
        sim = self.sim
        u = sim._user_index(user)
        taste = sim._tastes_at(ts)[u]
        idx = np.array([sim._item_index(i) for i in items], np.int64)
        aff = sim.config.affinity_scale * (sim._V[idx] @ taste)
        by_category = sim._centroids @ taste
        cat_rank = (by_category[None, :] > by_category[sim._item_cat[idx]][:, None]).sum(axis=1)
        return aff, np.asarray(sim._item_bias(idx), np.float64), cat_rank

    def ectr(self, logits_in_order: np.ndarray) -> float:
        """Mean true click probability of the first 10 at positions 0..9."""
        top = logits_in_order[:10]
        x = self.sim._b0 + top + self.pos[: len(top)]
        return float(np.mean(1.0 / (1.0 + np.exp(-x))))

    def favourite(self, user: str, ts: int) -> int:
        sim = self.sim
        return int(np.argmax(sim._centroids @ sim._tastes_at(ts)[sim._user_index(user)]))


def batch_lr(examples: list[dict[str, Any]], epochs: int, l2: float = 1e-3
             ) -> tuple[dict[str, int], np.ndarray, float]:
    """Logistic regression on the examples' features fitted in batch (full-batch Adam over
    the thinned stream, as the online LR sees it): (vocabulary, weights, intercept)."""
    vocab: dict[str, int] = {}
    rows, cols, vals = [], [], []
    for r, e in enumerate(examples):
        for name, v in example_features(e).items():
            rows.append(r)
            cols.append(vocab.setdefault(name, len(vocab)))
            vals.append(v)
    rows_a, cols_a = np.array(rows, np.int64), np.array(cols, np.int64)
    vals_a = np.array(vals, np.float64)
    y = np.array([float(e["label"]) for e in examples])
    n, d = len(examples), len(vocab)
    theta = np.zeros(d + 1)
    m, v = np.zeros(d + 1), np.zeros(d + 1)
    for t in range(1, epochs + 1):
        z = np.bincount(rows_a, vals_a * theta[cols_a], n) + theta[d]
        g_ex = (1.0 / (1.0 + np.exp(-z)) - y) / n
        grad = np.empty(d + 1)
        grad[:d] = np.bincount(cols_a, vals_a * g_ex[rows_a], d) + 2 * l2 * theta[:d]
        grad[d] = g_ex.sum()
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad**2
        theta -= 0.05 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return vocab, theta[:d], float(theta[d])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = closed_loop.one_world_parser(__doc__.split("\n")[0])
    ap.add_argument("--sample-every", type=int, default=2,
                    help="record the candidates' features of every n-th LR-scored request")
    ap.add_argument("--epochs", type=int, default=1000, help="batch LR: full-batch steps")
    args = closed_loop.one_world_defaults(ap, argv)
    t0 = time.perf_counter()
    examples, scored, sim, last_half = capture(args)
    truth = Truth(sim)
    examples.sort(key=lambda e: e["ts"])
    mid = float(np.median([s[1] for s in scored]))
    late = [s for s in scored if s[1] > mid]
    item_category = {e["item_id"]: (e.get("features") or {}).get("i:category") for e in examples}
    clicks_by_user: dict[str, list[tuple[int, str | None]]] = defaultdict(list)
    for e in examples:
        if e["label"]:
            clicks_by_user[e["user_id"]].append((e["ts"], item_category.get(e["item_id"])))
    sums: dict[str, list[float]] = defaultdict(list)
    for user, ts, items, p, _ in late:
        aff, bias, cat_rank = truth.parts(user, items, ts)
        logit = aff + bias
        sums["lr_copy"].append(truth.ectr(logit[np.argsort(-p, kind="stable")]))
        sums["candidates_best"].append(truth.ectr(np.sort(logit)[::-1]))
        top = sim.top_items(user, 10, ts)
        a2, b2, _ = truth.parts(user, top, ts)
        sums["oracle"].append(truth.ectr(a2 + b2))
        sums["recall"].append(len(set(top) & set(items)) / 10)
        sums["true_category_and_bias"].append(truth.ectr(logit[np.argsort(-(bias - 3.0 * cat_rank))]))
        own = Counter(c for t, c in clicks_by_user[user] if t < ts)
        total = sum(own.values())
        share = np.log([(own[item_category.get(i)] + 1.0) / (total + 10.0) for i in items])
        sums["own_click_share_and_bias"].append(truth.ectr(logit[np.argsort(-(share + bias))]))
        if own:
            sums["favourite"].append(own.most_common(1)[0][0] == f"c{truth.favourite(user, ts)}")
    first = [e for e in examples if e["ts"] <= mid]
    sampled = [s for s in late if s[4] is not None]
    vocab, w, b = batch_lr(first, args.epochs)
    online = make_ranker("lr")
    online.learn_many(first)
    grouped = make_ranker("lr", numeric_lr=0.03)
    grouped.learn_many(first)
    for user, ts, items, p, feats in sampled:
        assert feats is not None
        aff, bias, _ = truth.parts(user, items, ts)
        logit = aff + bias
        batch_z = np.array([sum(w[vocab[k]] * x for k, x in f.items() if k in vocab) + b
                            for f in feats])
        for key, score in (("sampled_lr_copy", p), ("sampled_batch_lr", batch_z),
                           ("sampled_online_lr", online.predict_many(feats, calibrated=False)),
                           ("sampled_online_numeric_lr",
                            grouped.predict_many(feats, calibrated=False))):
            sums[key].append(truth.ectr(logit[np.argsort(-np.asarray(score), kind="stable")]))
    figures: dict[str, Any] = {"seed": args.seed, "world": args.world, "requests": args.requests,
                               "ctr_streamrec_last_half": round(last_half, 5),
                               "examples": len(examples), "examples_first_half": len(first),
                               "late_requests": len(late), "sampled_requests": len(sampled),
                               "candidates_mean": round(float(np.mean([len(s[2]) for s in late])), 1)}
    for key in ("lr_copy", "candidates_best", "oracle", "true_category_and_bias",
                "own_click_share_and_bias", "sampled_lr_copy", "sampled_batch_lr",
                "sampled_online_lr", "sampled_online_numeric_lr"):
        figures[f"ectr_{key}"] = round(float(np.mean(sums[key])), 4)
    figures["recall_oracle_top10"] = round(float(np.mean(sums["recall"])), 4)
    figures["favourite_category_from_clicks"] = round(float(np.mean(sums["favourite"])), 4)
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
