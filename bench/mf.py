"""Prequential HR@10 of the retrieval models: ISGD vs BPR (the MF default), co-visitation,
popularity - on seeded simulator data and on MovieLens 100k (when present).

Protocol (docs/evaluation.md, "Protocols"): events in time order (stable on ties); for each positive,
before learning from it, the model's top 10 excluding items the user already
interacted with; hit if the item is in it. Only the first positive of a (user, item)
pair is a trial (a like after a click on the same item cannot be new). MF runs split
exactly as in the flow (UserFactors steps with the serving copy of the item vectors,
ItemFactors steps with the user vector sent over), the serving copy refreshed every
``--refresh`` positives (staleness).

    python bench/mf.py [--events 1000000] [--seed 0] [--refresh 1] [--full] [--no-movielens]

Prints readable lines and, last, one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from events.simulator import SimConfig, Simulator  # noqa: E402
from models.mf import ItemFactors, MFConfig, UserFactors  # noqa: E402
from state.covisitation import CoVisConfig, CoVisitation  # noqa: E402

ML_PATH = ROOT.parent / "shared" / "data" / "movielens-100k" / "u.data"
POSITIVE_ACTIONS = {"click", "like", "purchase"}
K = 10

Event = tuple[int, str, str, bool]  # ts_ms, user, item, positive


def simulator_events(n: int, seed: int) -> list[Event]:
    """Feedback of a seeded simulator run: (ts, user, item, positive action?)."""
    sim = Simulator(SimConfig(), seed=seed, max_events=n)
    out: list[Event] = []
    while batch := sim.next_batch(10_000):
        for e in batch:
            if e["type"] == "feedback":
                out.append((e["ts"], e["user_id"], e["item_id"], e["action"] in POSITIVE_ACTIONS))
    return out


def movielens_events(path: Path) -> list[Event]:
    """u.data rows in time order (stable on ties); positive = rating >= 4."""
    rows = []
    with path.open() as f:
        for line in f:
            u, i, r, t = line.split("\t")
            rows.append((int(t) * 1000, u, i, int(r) >= 4))
    rows.sort(key=lambda r: r[0])
    return rows


class Recommender:
    def recommend(self, user: str, k: int, exclude: set[str], ts: int) -> list[str]:
        raise NotImplementedError

    def learn(self, user: str, item: str, ts: int, positive: bool, history: list[str]) -> None:
        raise NotImplementedError


class Vocab:
    """Items seen so far, dense indices (the catalogue a model can recommend from)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}

    def add(self, item: str) -> int:
        j = self.index.get(item)
        if j is None:
            j = self.index[item] = len(self.ids)
            self.ids.append(item)
        return j

    def top_excluding(self, scores: np.ndarray, k: int, exclude: set[str]) -> list[str]:
        scores = scores.copy()
        for e in exclude:
            j = self.index.get(e)
            if j is not None:
                scores[j] = -np.inf
        kk = min(k, scores.size)
        if kk == 0:
            return []
        top = np.argpartition(-scores, kk - 1)[:kk]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [self.ids[j] for j in top if np.isfinite(scores[j])]


class Popularity(Recommender):
    """Count of positives so far (no decay)."""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self.counts = np.zeros(1024)

    def recommend(self, user: str, k: int, exclude: set[str], ts: int) -> list[str]:
        return self.vocab.top_excluding(self.counts[: len(self.vocab.ids)], k, exclude)

    def learn(self, user: str, item: str, ts: int, positive: bool, history: list[str]) -> None:
        j = self.vocab.index[item]
        if j >= self.counts.size:
            self.counts = np.concatenate((self.counts, np.zeros(self.counts.size)))
        if positive:
            self.counts[j] += 1


class CoVis(Recommender):
    """Co-visitation candidates over the user's recent positives, popularity fill."""

    def __init__(self, vocab: Vocab, config: CoVisConfig, normalise: bool) -> None:
        self.vocab = vocab
        self.table = CoVisitation(config)
        self.pop = Popularity(vocab)
        self.normalise = normalise
        self.pop_map: dict[str, float] = defaultdict(float)

    def recommend(self, user: str, k: int, exclude: set[str], ts: int) -> list[str]:
        recent = self.history[user]
        cands = self.table.candidates(
            recent, k, ts, popularity=self.pop_map if self.normalise else None, exclude=exclude
        )
        out = [c for c, _ in cands]
        if len(out) < k:
            seen = set(out) | exclude
            out += [c for c in self.pop.recommend(user, k + len(seen), seen, ts) if c not in seen][: k - len(out)]
        return out

    def learn(self, user: str, item: str, ts: int, positive: bool, history: list[str]) -> None:
        self.pop.learn(user, item, ts, positive, history)
        if positive:
            self.table.observe(history, item, ts)
            self.pop_map[item] += 1.0

    history: dict[str, list[str]]


class MF(Recommender):
    """ISGD or BPR split into UserFactors / ItemFactors; serving copy of V refreshed
    every ``refresh`` positives; new users folded in from their recent items."""

    def __init__(self, vocab: Vocab, config: MFConfig, refresh: int, fold_in: bool, seed: int) -> None:
        self.vocab = vocab
        self.cfg = config
        self.users = UserFactors(config)
        self.items = ItemFactors(config)
        self.V = np.zeros((1024, config.dim), np.float32)  # serving copy (possibly stale)
        self.refresh = refresh
        self.fold_in = fold_in
        self.version = 0
        self.n_pos = 0
        self.rng = np.random.default_rng(seed)

    def _sync(self) -> None:
        ch = self.items.changed_since(self.version)
        if ch.upserted:
            idx = [self.vocab.index[i] for i in ch.upserted]
            self.V[idx] = self.items.vectors(ch.upserted)
        self.version = ch.version

    def recommend(self, user: str, k: int, exclude: set[str], ts: int) -> list[str]:
        n = len(self.vocab.ids)
        u = self.users.vector(user)
        if u is None:
            recent = self.history[user][:20]
            if self.fold_in and recent:
                u = self.users.fold_in(user, self.V[[self.vocab.index[i] for i in recent]], ts)
            else:
                u = self.users.vectors([user])[0][0]
        return self.vocab.top_excluding(self.V[:n] @ u, k, exclude)

    def learn(self, user: str, item: str, ts: int, positive: bool, history: list[str]) -> None:
        j = self.vocab.index[item]
        if j >= self.V.shape[0]:
            self.V = np.concatenate((self.V, np.zeros_like(self.V)))
        if item not in self.items and not self.V[j].any():
            self.V[j] = self.items.initial_vectors([item])[0]
        if not positive:
            return
        v = self.V[j]
        if self.cfg.algorithm == "isgd":
            u0 = self.users.update(user, v, ts)
            self.items.update(item, u0, ts)
        else:
            n = len(self.vocab.ids)
            negs = self.rng.integers(0, n, self.cfg.negatives)
            u0, g = self.users.bpr_update(user, v, self.V[negs], ts)
            self.items.update(item, u0, ts, float(g.sum()))
            for jj, gj in zip(negs, g, strict=True):
                self.items.update(self.vocab.ids[jj], u0, ts, -float(gj))
        self.n_pos += 1
        if self.n_pos % self.refresh == 0:
            self._sync()

    history: dict[str, list[str]]


def prequential(events: list[Event], make: type | object, **kw: object) -> dict[str, float]:
    """Run one model over ``events``; returns hr_at_10, ndcg_at_10, trials, seconds."""
    vocab = Vocab()
    model = make(vocab, **kw)  # type: ignore[operator]
    consumed: dict[str, set[str]] = defaultdict(set)
    positives_seen: set[tuple[str, str]] = set()
    history: dict[str, list[str]] = defaultdict(list)  # positives, newest first
    model.history = history
    hits = 0
    trials = 0
    ndcg = 0.0
    t0 = time.perf_counter()
    for ts, user, item, pos in events:
        vocab.add(item)
        if pos and (user, item) not in positives_seen:
            positives_seen.add((user, item))
            rec = model.recommend(user, K, consumed[user], ts)
            trials += 1
            if item in rec:
                hits += 1
                ndcg += 1.0 / math.log2(rec.index(item) + 2)
            model.learn(user, item, ts, True, history[user])
            h = history[user]
            h.insert(0, item)
            del h[50:]
        elif not pos:
            model.learn(user, item, ts, False, history[user])
        consumed[user].add(item)
    return {
        "hr_at_10": hits / max(trials, 1),
        "ndcg_at_10": ndcg / max(trials, 1),
        "trials": trials,
        "seconds": time.perf_counter() - t0,
    }


def models(refresh: int, full: bool) -> Iterator[tuple[str, type, dict]]:
    """(label, class, kwargs) of every model compared; the MF default is MFConfig()."""
    yield "popularity", Popularity, {}
    cv = CoVisConfig()  # defaults: 30-day half-life, window 20, position decay 0.8
    yield "covis", CoVis, {"config": cv, "normalise": False}
    yield "covis_pop_norm", CoVis, {"config": cv, "normalise": True}
    mf = {"refresh": refresh, "fold_in": True, "seed": 0}
    yield "isgd_k10_lr0.05", MF, {"config": MFConfig(algorithm="isgd", lr=0.05), **mf}
    yield "isgd_k10_lr0.1", MF, {"config": MFConfig(algorithm="isgd", lr=0.1), **mf}
    yield "bpr_k10_neg4 (default)", MF, {"config": MFConfig(), **mf}
    if full:
        yield "bpr_k10_neg8", MF, {"config": MFConfig(negatives=8), **mf}
        yield "bpr_k10_neg4_lr0.05", MF, {"config": MFConfig(lr=0.05), **mf}
        yield "bpr_k32_neg4", MF, {"config": MFConfig(dim=32), **mf}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="simulator events")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refresh", type=int, default=1, help="positives between serving-copy refreshes")
    ap.add_argument("--full", action="store_true", help="also BPR variants (8 negatives, lr 0.05, k=32)")
    ap.add_argument("--no-movielens", action="store_true")
    args = ap.parse_args(argv)
    figures: dict[str, object] = {"refresh_positives": args.refresh}
    datasets: list[tuple[str, list[Event]]] = [
        (f"simulator(n={args.events},seed={args.seed})", simulator_events(args.events, args.seed))
    ]
    if ML_PATH.exists() and not args.no_movielens:
        datasets.append(("movielens-100k", movielens_events(ML_PATH)))
    else:
        print(f"MovieLens not found at {ML_PATH}: skipped")
    for name, events in datasets:
        key = "ml100k" if name.startswith("movielens") else "sim"
        print(f"== {name}: {len(events)} feedback events, {sum(e[3] for e in events)} positive")
        for label, make, kw in models(args.refresh, args.full):
            r = prequential(events, make, **kw)
            print(f"  {label:24s} HR@10 {r['hr_at_10']:.4f}  NDCG@10 {r['ndcg_at_10']:.4f}  "
                  f"trials {r['trials']}  {r['seconds']:.1f} s")
            figures[f"{key}_{label.split()[0]}_hr_at_10"] = round(r["hr_at_10"], 4)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
