"""How often serving's inputs repeat across one user's requests: the hit rate an exact
per-user memo of each stage could have (measure before building one).

Replays ``LOG`` through the in-process flow as ``bench/serving_cpu.py`` does and, for
every request whose user was served before on the same user shard, compares what each
stage reads with that previous request (equal values, and the same snapshot objects):

* ``retrieve``: event time (ms), loaded item tables, ANN index, MF vector,
  co-visitation seeds per channel, the consumed and finished counts, the category
  source's picks (names and posterior means); ``retrieve_but_ts`` and
  ``retrieve_but_ts_picks`` leave those out;
* ``filter``: the retrieved rows (in order), id space and tables;
* ``shared``: the LR ranker's user-side features (``shared_features``), ``profile`` the
  user's profile dict, ``cross``: the user x attribute profile answers;
* ``posterior``: category sampling's Beta parameters (a, b) per user and category list
  (retrieval's picks and ordering each against their own previous call);
* ``pool_knn``: the pool ranker's liked seeds, candidate rows and table map (its
  ``_liked_knn`` inputs but the event time).

Beside them, per user-shard micro-batch: requests, events between consecutive requests,
requests whose user already requested in the batch (what batching several requests
would find). Diagnostic only: it wraps private methods of serving.

Usage: ``python bench/serving_repeats.py LOG [-n EVENTS]``; the last line is JSON: per
key ``{"repeats": ..., "equal": ...}``, the per-field ``differs`` counts of ``retrieve``
and the ``batches`` figures.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_cpu import replay  # noqa: E402

from models import category_bandit  # noqa: E402
from operators import linear_scorer, point_in_time, pool_features, serving, user_shard  # noqa: E402


class Repeats:
    """Per key: requests that follow one of the same user (``repeats``) and those whose
    inputs equal that request's (``equal``)."""

    def __init__(self) -> None:
        self.last: dict[str, dict[Any, Any]] = defaultdict(dict)
        self.repeats: Counter[str] = Counter()
        self.equal: Counter[str] = Counter()
        self.differs: Counter[str] = Counter()
        self.batches: Counter[str] = Counter()
        self.quiet = False
        """Set while the harness itself calls a wrapped function (not counted)."""

    def note(self, key: str, who: Any, value: Any) -> None:
        prev = self.last[key].get(who)
        if prev is not None:
            self.repeats[key] += 1
            self.equal[key] += prev == value
        self.last[key][who] = value

    def fields(self, who: Any, parts: dict[str, Any]) -> None:
        """``retrieve``'s inputs field by field (and without the event time / picks)."""
        prev = self.last["retrieve"].get(who)
        if prev is not None:
            for name in parts:
                self.differs[name] += parts[name] != prev[name]
            others = [n for n in parts if parts[n] != prev[n]]
            self.repeats["retrieve_but_ts"] += 1
            self.equal["retrieve_but_ts"] += not [n for n in others if n != "ts"]
            self.repeats["retrieve_but_ts_picks"] += 1
            self.equal["retrieve_but_ts_picks"] += not [n for n in others
                                                        if n not in ("ts", "picks")]
        self.note("retrieve", who, parts)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: {"repeats": self.repeats[k], "equal": self.equal[k]}
                               for k in sorted(self.repeats)}
        out["retrieve_differs"] = dict(self.differs)
        out["batches"] = dict(self.batches)
        return out


def instrument(rep: Repeats) -> None:
    """Wrap the stages' functions to record their inputs (for the rest of the process)."""
    server_cls = serving.Server
    retrieve, filt = server_cls._retrieve, server_cls._filter

    def _retrieve(self: Any, ctx: Any, ts_ms: int) -> Any:
        tables = self.views.loaded_tables()
        picks = None
        if self.categories is not None and self.category_items is not None and tables:
            lists = self.category_items.lists(tables)
            rep.quiet = True
            picks = [(n, float(m)) for n, m in self.categories.pick(
                ctx.user_id, self.config.sources.get("category", 0), lists,
                serving.attrs_of(ctx.profile))]
            rep.quiet = False
        rep.fields((id(self), ctx.user_id), {
            "ts": ts_ms, "tables": [id(t) for t in tables],
            "index": id(self.views.index.index),
            "vector": None if ctx.vector is None else ctx.vector.tobytes(),
            "seeds": self.context.seeds(ctx), "consumed": len(ctx.consumed),
            "finished": len(ctx.finished), "picks": picks})
        return retrieve(self, ctx, ts_ms)

    def _filter(self: Any, request: Any, ctx: Any, pool: Any) -> Any:
        rep.note("filter", (id(self), ctx.user_id), (
            pool.rows.tobytes(), id(self._space()),
            [id(t) for t in self.views.loaded_tables()]))
        return filt(self, request, ctx, pool)

    server_cls._retrieve, server_cls._filter = _retrieve, _filter  # type: ignore[method-assign]

    shared = linear_scorer.shared_features

    def shared_features(user_id: str, ts: int, context: Any, position: Any, extra: Any) -> Any:
        out = shared(user_id, ts, context, position, extra)
        rep.note("shared", user_id, sorted(out.items(), key=repr))
        rep.note("profile", user_id, sorted((extra or {}).items(), key=repr))
        return out

    linear_scorer.shared_features = shared_features  # type: ignore[assignment]

    cross = point_in_time.PointInTime._cross_codes

    def _cross_codes(self: Any, user_id: str, coded: Any, ts_ms: Any) -> Any:
        out = cross(self, user_id, coded, ts_ms)
        rep.note("cross", user_id, [sorted(repr(sorted(f.items(), key=repr)) for f in feats)
                                    for _, feats in out])
        return out

    point_in_time.PointInTime._cross_codes = _cross_codes  # type: ignore[method-assign]

    posterior = category_bandit.CategoryBandit.posterior

    def _posterior(self: Any, user_id: str, names: list[str], history: Any = None,
                   attrs: Any = None) -> Any:
        a, b = posterior(self, user_id, names, history, attrs)
        if not rep.quiet:  # by user and category list (retrieval's and ordering's apart)
            rep.note("posterior", (id(self), user_id, tuple(names)), (a.tobytes(), b.tobytes()))
        return a, b

    category_bandit.CategoryBandit.posterior = _posterior  # type: ignore[method-assign]

    knn = pool_features._liked_knn

    def _liked_knn(context: Any, view: Any, ctx: Any, ids: Any, ts: int, alpha: float,
                   counts: tuple[int, ...], pool_liked: Any = None) -> Any:
        rep.note("pool_knn", (id(context), ctx.user_id), (
            context.liked.recent(ctx.user_id, max(counts)) if context.liked is not None
            else None, ids.tobytes(), id(context.views.table_map())))
        return knn(context, view, ctx, ids, ts, alpha, counts, pool_liked)

    pool_features._liked_knn = _liked_knn  # type: ignore[assignment]

    process = user_shard.UserShard.process

    def _process(self: Any, shard: str, events: list[Any], ingest_ns: Any = None) -> Any:
        at = [i for i, e in enumerate(events) if e.type == "request"]
        users = Counter(events[i].user_id for i in at)
        b = rep.batches
        b["shard_batches"] += 1
        b["requests"] += len(at)
        b["user_again_in_batch"] += sum(v - 1 for v in users.values())
        b["gaps"] += max(len(at) - 1, 0)
        b["events_between"] += sum(j - i - 1 for i, j in zip(at, at[1:], strict=False))
        return process(self, shard, events, ingest_ns)

    user_shard.UserShard.process = _process  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("-n", type=int, default=10**9, help="events to replay")
    args = parser.parse_args()
    rep = Repeats()
    instrument(rep)
    events, _ = replay(args.log, args.n)
    out = rep.report()
    out["events"] = events
    for key, v in out.items():
        if isinstance(v, dict) and "repeats" in v:
            share = v["equal"] / v["repeats"] if v["repeats"] else 0.0
            print(f"{key:>22}: {v['equal']:>6,} of {v['repeats']:>6,} equal ({share:.1%})")
    print(orjson.dumps(out).decode())


if __name__ == "__main__":
    main()
