"""Serving latency benchmark: one user shard answering requests against a 100k-item setup.

Builds, in one run and in a temp snapshot store, what the user shard's serving path
reads in the real flow:

* an HNSW index snapshot of ``--items`` item vectors (``IndexBuilder.publish``; dim =
  the flow's MF dim), vector norms growing with popularity;
* one ``ItemTable`` per item shard (4): co-visitation rows of ``--covis-rows`` items
  (the popular head, where users' recent items come from) with M = 100 neighbours
  each, decayed popularity and trending counts, a catalog with categories,
  availability (2% unavailable) and first sightings (0.5% new);
* a ``UserShard`` built as ``flows.recsys`` builds it (default config: profile
  features, BPR MF, serving), fed the item catalog (``item`` events), user attributes
  and, per user, ~200 consumed items (organic ratings/clicks/likes/purchases, and
  impressions of which some are clicked), so each user has 50 recent items, ~210
  consumed ones, an MF vector and 44 profile entries (the flow's default feature set:
  counts, decayed sums, means, ages, two 20-item lists, 5 user attributes), which with
  the item's own features make ~100 ranking features per candidate;
* a serving ranker snapshot (River LR, the flow's default) trained by the real
  ``Trainer`` on the examples that the shard's joiner emitted (features taken by the
  shard's own feature hook, exactly as in the flow).

Then ``--requests`` requests (after ``--warmup`` untimed ones) are answered the way
``UserShard._request`` does it: ``context.user(user, ts)`` then ``Server.recommend``. The
latency of a request is context + recommend (wall time, ``perf_counter``); the stage
times come from ``Server.stage_ns`` (optional profiling, off in the flow). The same
requests run again with the ranker off (``scorer="retrieval"``, the blended retrieval
score) as a baseline.

Also measured once, outside the figures: publishing new versions of the four item
tables, the poll that verifies and loads them (once per micro-batch in the flow; how
replays load) and the first request on them; then the same with the views loading in
the background (live mode): the poll that starts the round, the slowest request
answered while the loader thread works, the poll that installs the round, and the
first request after it (``refresh.background_*``).

``--sources`` defaults to about 200 candidates per request after filtering (the flow's
default ``serving.sources`` asks for 350). ``gc`` thresholds are the flow's
(``flows.recsys.GC_THRESHOLD``).

Usage: ``python bench/serving.py [--items N] [--users U] [--requests R] [--sources S]
[--seed S]`` (~45 s). The last line is one JSON object: the ranker run's figures
(latency = context + recommend, ms; stage times are means per request, ms),
``baseline`` (ranker off) and ``refresh``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from events.model import Feedback, Impression, Item, Request, User  # noqa: E402
from flows.config import load_config  # noqa: E402
from flows.recsys import GC_THRESHOLD  # noqa: E402
from models.rankers import positive_hold_ms  # noqa: E402
from operators.item_shard import item_shard_key  # noqa: E402
from operators.snapshot_views import SnapshotViews  # noqa: E402
from operators.trainer import Trainer  # noqa: E402
from operators.user_shard import UserShard  # noqa: E402
from state.covisitation import CoVisitation  # noqa: E402
from state.hashing import shard_of  # noqa: E402
from state.item_index import IndexBuilder  # noqa: E402
from state.item_table import CatalogEntry, ItemTable  # noqa: E402
from state.sampling import NegativeSampler  # noqa: E402
from state.snapshot_store import SnapshotStore  # noqa: E402

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: the requests start here
DAY_MS = 86_400_000
CATEGORIES = ["action", "adventure", "animation", "children", "comedy", "crime", "documentary",
              "drama", "fantasy", "film-noir", "horror", "musical", "mystery", "romance",
              "sci-fi", "thriller", "war", "western"]
ITEM_SHARDS = 4
NEIGHBORS = 100


def log(msg: str) -> None:
    print(msg, flush=True)


class World:
    """The synthetic catalog: ids, popularity ranks, categories, vectors."""

    def __init__(self, n_items: int, dim: int, rng: np.random.Generator) -> None:
        self.n = n_items
        self.ids = [f"m{j}" for j in range(n_items)]
        # Zipf-like popularity over a random permutation of the ids.
        self.rank_of = rng.permutation(n_items)  # item j has popularity rank rank_of[j]
        self.by_rank = np.argsort(self.rank_of)  # by_rank[r] = item of rank r
        weight = 1.0 / (self.rank_of + 10.0) ** 0.9
        self.p = weight / weight.sum()
        self.cdf = np.cumsum(self.p)
        self.category = rng.integers(0, len(CATEGORIES), n_items)
        norms = 0.5 + 2.0 * (1.0 - self.rank_of / n_items) ** 4
        vecs = rng.normal(0.0, 1.0, (n_items, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        self.vectors = (vecs * norms[:, None] * 0.3).astype(np.float32)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Item indices drawn by popularity (with replacement)."""
        return np.minimum(np.searchsorted(self.cdf, rng.random(n)), self.n - 1)


def item_tables(world: World, rng: np.random.Generator, covis_rows: int, covis_config: Any,
                item_shard_of: Any) -> dict[str, ItemTable]:
    """One ItemTable per item shard, as the item shards would publish them at NOW_MS."""
    keys = [item_shard_key(i) for i in range(ITEM_SHARDS)]
    covis = {k: CoVisitation(covis_config) for k in keys}
    pairs: dict[str, list[tuple[str, str, float]]] = {k: [] for k in keys}
    ids = world.ids
    heads = world.by_rank[:covis_rows]
    draws = world.sample(rng, len(heads) * (NEIGHBORS * 2))
    weights = rng.exponential(1.0, len(draws)) * 3.0
    for row, a in enumerate(heads.tolist()):
        a_id = ids[a]
        seen: set[int] = {a}
        bucket = pairs[item_shard_of(a_id)]
        base = row * NEIGHBORS * 2
        for j in range(NEIGHBORS * 2):
            b = int(draws[base + j])
            if b in seen:
                continue
            seen.add(b)
            bucket.append((a_id, ids[b], float(weights[base + j])))
            if len(seen) > NEIGHBORS:
                break
    for k in keys:
        covis[k].add(pairs[k], NOW_MS - DAY_MS)
    tables: dict[str, ItemTable] = {k: ItemTable(k, NOW_MS, covis[k]) for k in keys}
    counts = world.p * 2_000_000.0
    trend_mask = rng.random(world.n) < 0.3
    avail = rng.random(world.n) >= 0.02
    fresh = rng.random(world.n) < 0.005
    first_seen = NOW_MS - rng.integers(DAY_MS, 400 * DAY_MS, world.n)
    first_seen[fresh] = NOW_MS - rng.integers(0, DAY_MS // 2, int(fresh.sum()))
    for j, item in enumerate(ids):
        t = tables[item_shard_of(item)]
        t.popular[item] = float(counts[j])
        if trend_mask[j]:
            t.trending[item] = float(counts[j] * rng.random() * 0.2)
        t.catalog[item] = CatalogEntry(CATEGORIES[world.category[j]], bool(avail[j]),
                                       int(first_seen[j]))
    return tables


def user_events(world: World, rng: np.random.Generator, n_users: int, consumed: int,
                impressions: int) -> list[Any]:
    """Per user over the 30 days before NOW_MS: attributes, organic feedback on distinct
    items (ratings, clicks, likes, purchases, dwell) and impressions (some clicked)."""
    events: list[Any] = []
    for u in range(n_users):
        user = f"u{u}"
        start = NOW_MS - 30 * DAY_MS + int(rng.integers(0, DAY_MS))
        events.append(User(start - 1, user, {
            "age_bucket": str(rng.choice(["18-24", "25-34", "35-44", "45-54", "55+"])),
            "gender": str(rng.choice(["f", "m", "x"])),
            "country": str(rng.choice(["de", "fr", "us", "jp", "br"])),
            "occupation": f"occ{int(rng.integers(0, 20))}",
            "device": str(rng.choice(["ios", "android", "web"]))}))
        likes = set(rng.choice(len(CATEGORIES), 3, replace=False).tolist())
        picked: list[int] = []
        seen: set[int] = set()
        while len(picked) < consumed + impressions:
            for j in world.sample(rng, 64).tolist():
                if j in seen or (world.category[j] not in likes and rng.random() < 0.5):
                    continue
                seen.add(j)
                picked.append(j)
        picked = picked[:consumed + impressions]
        times = np.sort(start + rng.integers(0, 29 * DAY_MS, consumed + impressions))
        for n, (j, ts) in enumerate(zip(picked, times.tolist(), strict=True)):
            item = world.ids[j]
            if n % 5 == 4 and n // 5 < impressions:
                imp = f"{user}:{n}"
                events.append(Impression(ts, imp, user, item, None, int(rng.integers(0, 10)),
                                         {"device": "web"}))
                if rng.random() < 0.3:
                    events.append(Feedback(ts + 20_000, user, item, "click", imp))
                continue
            r = rng.random()
            if r < 0.6:
                events.append(Feedback(ts, user, item, "rating", None,
                                       float(rng.integers(1, 6))))
            elif r < 0.85:
                events.append(Feedback(ts, user, item, "click"))
            elif r < 0.92:
                events.append(Feedback(ts, user, item, "dwell", None, float(rng.integers(5, 300))))
            elif r < 0.97:
                events.append(Feedback(ts, user, item, "like"))
            else:
                events.append(Feedback(ts, user, item, "purchase"))
    events.sort(key=lambda e: e.ts)
    return events


def run_requests(shard: UserShard, requests: list[Request], warmup: int) -> dict[str, Any]:
    """Answer the requests as UserShard._request does; wall-time latencies and stage times."""
    server = shard.server
    assert server is not None
    for req in requests[:warmup]:
        server.recommend(req, shard.context.user(req.user_id, req.ts), time.time_ns())
    timed = requests[warmup:]
    server.stage_ns = {}
    ctx_ms = np.zeros(len(timed))
    rec_ms = np.zeros(len(timed))
    sizes = np.zeros(len(timed))
    gc0 = sum(s["collections"] for s in gc.get_stats())
    clock = time.perf_counter
    start = clock()
    for n, req in enumerate(timed):
        t0 = clock()
        ctx = shard.context.user(req.user_id, req.ts)
        t1 = clock()
        out = server.recommend(req, ctx, time.time_ns())
        t2 = clock()
        ctx_ms[n] = (t1 - t0) * 1e3
        rec_ms[n] = (t2 - t1) * 1e3
        sizes[n] = len(out["items"])
    elapsed = clock() - start
    stages = server.stage_ns
    server.stage_ns = None
    total = ctx_ms + rec_ms
    n = len(timed)
    return {
        "requests": n,
        "p50_ms": round(float(np.percentile(total, 50)), 3),
        "p99_ms": round(float(np.percentile(total, 99)), 3),
        "max_ms": round(float(total.max()), 3),
        "mean_ms": round(float(total.mean()), 3),
        "requests_per_s": round(n / elapsed, 1),
        "recommend_p50_ms": round(float(np.percentile(rec_ms, 50)), 3),
        "recommend_p99_ms": round(float(np.percentile(rec_ms, 99)), 3),
        "context_ms": round(float(ctx_ms.mean()), 3),
        **{f"{s}_ms": round(stages.get(s, 0) / n / 1e6, 3)
           for s in ("retrieve", "filter", "score", "order")},
        "candidates": round(stages.get("candidates", 0) / n, 1),
        "items_returned": round(float(sizes.mean()), 2),
        "gc_collections": sum(s["collections"] for s in gc.get_stats()) - gc0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--covis-rows", type=int, default=20_000,
                    help="items (the popular head) with a full co-visitation row")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--consumed", type=int, default=200, help="organic interactions per user")
    ap.add_argument("--impressions", type=int, default=40, help="impressions per user")
    ap.add_argument("--requests", type=int, default=2_000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--sources", default="ann=70,covis=110,trending=15,popular=25",
                    help="candidates per retrieval source (ServingConfig.sources)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    gc.set_threshold(*GC_THRESHOLD)  # as flows.recsys.build does for flow processes
    t_setup = time.perf_counter()

    config = load_config({"shards": {"items": ITEM_SHARDS}})
    sources = {k: int(v) for k, v in (kv.split("=") for kv in args.sources.split(","))}
    serving = replace(config.serving, sources=sources)
    mf = config.items.mf_config()
    item_shard_of = lru_cache(maxsize=1 << 18)(
        lambda iid: item_shard_key(shard_of(iid, ITEM_SHARDS)))
    tmp = tempfile.TemporaryDirectory(prefix="streamrec-bench-serving-")
    store = SnapshotStore(Path(tmp.name) / "snapshots")

    world = World(args.items, mf.dim, rng)
    t = time.perf_counter()
    builder = IndexBuilder(config.index.with_dim(mf.dim))
    builder.upsert(world.ids, world.vectors)
    builder.publish(store, NOW_MS)
    log(f"index: {args.items} items, dim {mf.dim}, built in {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    tables = item_tables(world, rng, args.covis_rows, config.items.covis_config(), item_shard_of)
    for key, table in tables.items():
        store.write(f"items-{key}", "npz", table.save, NOW_MS,
                    {"items": len(table.catalog), "covis_rows": len(table.covis)})
    del tables
    log(f"item tables: {ITEM_SHARDS} shards, {args.covis_rows} co-visitation rows x "
        f"{NEIGHBORS} in {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    views = SnapshotViews(store, [item_shard_key(i) for i in range(ITEM_SHARDS)], serving.poll_ms,
                          background=False)
    shard = UserShard(config.join, NegativeSampler(config.sampler.negative_rate, config.sampler.seed),
                      features=config.features, mf=mf, covis=config.items.covis_config(),
                      serving=serving, views=views, item_shard_of=item_shard_of)
    views.poll()
    items = [Item(NOW_MS - 400 * DAY_MS, item, {
        "category": CATEGORIES[world.category[j]], "year": int(1950 + world.rank_of[j] % 75),
        "language": ["en", "fr", "de", "ja"][j % 4]}) for j, item in enumerate(world.ids)]
    for start in range(0, len(items), 10_000):
        shard.process("u000", items[start:start + 10_000])
    del items
    events = user_events(world, rng, args.users, args.consumed, args.impressions)
    examples: list[dict[str, Any]] = []
    for start in range(0, len(events), 1_000):
        out = shard.process("u000", events[start:start + 1_000])
        examples.extend(out.get("examples", []))
    examples.extend(shard.flush().get("examples", []))
    log(f"user shard: {args.users} users, {len(events)} events, {len(examples)} examples "
        f"in {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    trainer = Trainer(config.ranker, config.sampler.negative_rate, store,
                      positive_hold_ms(config.join))
    trainer.process(examples)
    trainer.finish()
    views._next_poll = 0.0
    views.poll()
    ranker = views.ranker.current
    assert ranker is not None
    n_weights = len(ranker.model._weights) if ranker.kind == "lr" else None
    log(f"ranker: {ranker!r}, {n_weights} weights, trained in {time.perf_counter() - t:.1f} s")

    users = [f"u{u}" for u in range(args.users)]
    ctx0 = shard.context.user(users[0], NOW_MS)
    log(f"user context: {len(ctx0.recent)} recent, {len(ctx0.consumed)} consumed, "
        f"vector {None if ctx0.vector is None else ctx0.vector.shape}, "
        f"{len(ctx0.profile)} profile entries")
    pick = rng.integers(0, args.users, args.warmup + args.requests)
    requests = [Request(NOW_MS + 50 * n, f"r{n}", users[u], 10,
                        {"device": ["ios", "android", "web"][n % 3]})
                for n, u in enumerate(pick.tolist())]
    setup_s = time.perf_counter() - t_setup
    log(f"setup {setup_s:.1f} s; timing {args.requests} requests "
        f"(+{args.warmup} warm-up), load average {os.getloadavg()[0]:.2f}")

    base = run_requests(_with(shard, scorer="retrieval"), requests, args.warmup)
    res = run_requests(_with(shard, scorer="ranker"), requests, args.warmup)
    refresh = snapshot_refresh(shard, store, requests[:3])
    log(f"new item-table versions: poll (verify + load 4 tables) {refresh['poll_ms']:.0f} ms, "
        f"first request after it {refresh['first_request_ms']:.2f} ms, "
        f"next {refresh['next_request_ms']:.2f} ms (not in the figures above)")
    log(f"the same loaded in the background (live mode): poll starting the round "
        f"{refresh['background_start_poll_ms']:.2f} ms, {refresh['background_requests_during_load']}"
        f" requests answered meanwhile (slowest {refresh['background_max_request_ms_during_load']:.2f}"
        f" ms), poll installing it {refresh['background_install_poll_ms']:.2f} ms, first request "
        f"after it {refresh['background_first_request_ms']:.2f} ms")
    for name, r in (("ranker off (baseline)", base), ("ranker on", res)):
        log(f"{name:22s} p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
            f"max {r['max_ms']:.2f} ms  {r['requests_per_s']:.0f} req/s  "
            f"| context {r['context_ms']:.2f}  retrieve {r['retrieve_ms']:.2f}  "
            f"filter {r['filter_ms']:.2f}  score {r['score_ms']:.2f}  order {r['order_ms']:.2f} "
            f"(ms mean)  candidates {r['candidates']:.0f}")
    load = os.getloadavg()
    result = {**res, "baseline": base, "refresh": refresh, "items": args.items, "covis_rows": args.covis_rows,
              "users": args.users, "dim": mf.dim, "ranker": ranker.kind,
              "load_avg_1m": round(load[0], 2), "cpus": os.cpu_count(),
              "setup_s": round(setup_s, 1)}
    print(json.dumps(result))
    tmp.cleanup()


def snapshot_refresh(shard: UserShard, store: SnapshotStore, requests: list[Request]
                     ) -> dict[str, float]:
    """Publish a new version of every item table (same content, ts + 1) and time the poll
    that verifies and loads them, then the first request on them (which builds the
    cached top lists) and the next one. In the flow the user shard polls once per
    micro-batch, at most every ``serving.poll_ms`` of wall time.

    Then the same with the views loading in the background (live mode): publish again,
    time the poll that starts the round, answer requests while the loader thread
    verifies and loads (the slowest of them is the stall a batch would see), then time
    the poll that installs the round and the first request after it."""
    server = shard.server
    assert server is not None
    views = server.views
    clock = time.perf_counter

    def publish() -> None:
        for key, t in views.table_map().items():
            fresh = ItemTable(key, t.ts + 1, t.covis, t.popular, t.trending, t.catalog)
            store.write(f"items-{key}", "npz", fresh.save, t.ts + 1)

    def answer(req: Request) -> float:
        t2 = clock()
        server.recommend(req, shard.context.user(req.user_id, req.ts), time.time_ns())
        return (clock() - t2) * 1e3

    publish()
    views._next_poll = 0.0
    t0 = clock()
    views.poll()
    t1 = clock()
    times = [answer(req) for req in requests[:2]]

    publish()
    before = views.table_map()
    views.background = True
    views._next_poll = 0.0
    t2 = clock()
    views.poll()  # starts the round
    start_ms = (clock() - t2) * 1e3
    pending = views._pending
    during: list[float] = []
    while pending is not None and not pending.done():
        during.append(answer(requests[len(during) % len(requests)]))
    t3 = clock()
    views.poll()  # installs it
    install_ms = (clock() - t3) * 1e3
    assert views.table_map() is not before, "the background round installed nothing"
    after = [answer(req) for req in requests[:2]]
    views.background = False
    return {"poll_ms": round((t1 - t0) * 1e3, 1), "first_request_ms": round(times[0], 3),
            "next_request_ms": round(times[1], 3),
            "background_start_poll_ms": round(start_ms, 3),
            "background_install_poll_ms": round(install_ms, 3),
            "background_requests_during_load": len(during),
            "background_max_request_ms_during_load": round(max(during, default=0.0), 3),
            "background_first_request_ms": round(after[0], 3),
            "background_next_request_ms": round(after[1], 3)}


def _with(shard: UserShard, **changes: Any) -> UserShard:
    assert shard.server is not None
    shard.server.config = replace(shard.server.config, **changes)
    return shard


if __name__ == "__main__":
    main()
