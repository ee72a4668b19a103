"""Closed loop against the oracle (docs/evaluation.md, "Protocols"), in one process, deterministic per seed.

Simulated users (``flows.loop.ClosedLoop`` over ``events.simulator.Simulator``) ask for
recommendations; each policy answers; the users respond with their hidden tastes
(impressions, clicks, likes, purchases) and those events flow back into the policy.
Policies, each in its own copy of the same world with the same request sequence:

* ``random``: k uniformly random items of the catalog (from ``item`` events);
* ``popular``: the k most clicked items so far (warm-up stream plus its own loop);
* ``oracle``: each user's true top k by ``Simulator.click_probability`` (hidden truth);
* ``streamrec``: the default config's stages (``flows.inprocess.InProcessFlow``: user
  shards, trainer, item shards, index; snapshots read back by event time), fed only
  the events, never the simulator's hidden truth.

Worlds: ``default`` (the simulator's defaults), ``organic`` (users also view items they
like before asking: ``view`` feedback without impression), ``drift`` (a third of the way
into the loop, half of the users get a new taste; the last line also splits its last
half by users with a new taste, ``ctr_<policy>_drift_shifted``, and the others,
``ctr_<policy>_drift_stable``).

Figure per window of requests: expected CTR = the mean true click probability of the
served items at their positions, over k slots per request (an empty or short answer
counts its missing slots as 0). ``gap_closed`` = (streamrec - random) / (oracle -
random) over the last half of the windows. Where a policy's slots fall short of the oracle's, over
the last half (hidden truth, ``Simulator.slot_truth``): ``top_category_<policy>`` = the
share of served slots in the user's favourite category, ``item_bias_<policy>`` = the
served items' mean log-odds bias; on stderr also the expected CTR of each position. Writes a PNG of the curves to ``--out``
(default: /tmp/streamrec-closed-loop.png) and ends with one JSON line.

    python bench/closed_loop.py [--requests 4000] [--seed 0] [--worlds default,organic,drift]

``--run-id`` (default ``b``) changes only streamrec's own random draws (they are seeded
from the request ids): one seed's spread over run ids is the loop's chaos for the same
code (docs/evaluation.md, loop13).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.inprocess import InProcessFlow  # noqa: E402
from flows.loop import ClosedLoop, LoopSettings  # noqa: E402
from flows.runtime import GC_THRESHOLD  # noqa: E402

POLICIES = ("random", "popular", "oracle", "streamrec")
WORLDS = ("default", "organic", "drift")
Event = dict[str, Any]


def world_settings(world: str, args: argparse.Namespace) -> LoopSettings:
    """The loop settings of one world (same users, items and request sequence per seed)."""
    settings = LoopSettings(seed=args.seed, n_users=args.users, n_items=args.items, k=args.k,
                            warmup_events=args.warmup, requests=args.requests,
                            window=args.window, step_ms=args.step_ms)
    if world == "organic":
        settings.views_per_request = args.views
    elif world == "drift":
        # drift_at is moved to a third of the way into the loop once the warm-up ended.
        settings.world = {"drift_at": 2**62, "drift_fraction": 0.5}
    return settings


class Policy:
    """What answers the requests: ``warm`` with the warm-up stream, then ``serve`` batches
    of events (requests among them), returning one recommendation per request."""

    def __init__(self, loop: ClosedLoop, k: int, seed: int) -> None:
        self.loop = loop
        self.k = k
        self.rng = np.random.default_rng([seed, 99])
        self.catalog: dict[str, bool] = {}

    def observe(self, events: list[Event]) -> None:
        for ev in events:
            if ev["type"] == "item":
                self.catalog[ev["item_id"]] = ev.get("available", True)

    def warm(self, events: list[Event]) -> None:
        self.observe(events)

    def serve(self, events: list[Event]) -> list[Event]:
        self.observe(events)
        return [{"request_id": ev["request_id"], "user_id": ev["user_id"],
                 "items": [{"item_id": i} for i in self.answer(ev)]}
                for ev in events if ev["type"] == "request"]

    def answer(self, request: Event) -> list[str]:
        raise NotImplementedError

    def available(self) -> list[str]:
        return [i for i, ok in self.catalog.items() if ok]


class RandomPolicy(Policy):
    def answer(self, request: Event) -> list[str]:
        items = self.available()
        pick = self.rng.choice(len(items), size=min(self.k, len(items)), replace=False)
        return [items[j] for j in pick.tolist()]


class PopularPolicy(Policy):
    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.clicks: Counter[str] = Counter()

    def observe(self, events: list[Event]) -> None:
        super().observe(events)
        self.clicks.update(ev["item_id"] for ev in events
                           if ev["type"] == "feedback" and ev.get("action") == "click")

    def answer(self, request: Event) -> list[str]:
        ok = self.catalog
        top = [i for i, _ in self.clicks.most_common(self.k + 20) if ok.get(i, False)][: self.k]
        return top


class OraclePolicy(Policy):
    def answer(self, request: Event) -> list[str]:
        return self.loop.sim.top_items(request["user_id"], self.k, request["ts"])


class StreamrecPolicy(Policy):
    def __init__(self, loop: ClosedLoop, k: int, seed: int, config: dict[str, Any]) -> None:
        super().__init__(loop, k, seed)
        self.flow = InProcessFlow(config)

    def warm(self, events: list[Event]) -> None:
        for start in range(0, len(events), 1000):
            self.flow.feed(events[start:start + 1000])

    def serve(self, events: list[Event]) -> list[Event]:
        return self.flow.feed(events)


def make_policy(name: str, loop: ClosedLoop, args: argparse.Namespace) -> Policy:
    if name == "streamrec":
        return StreamrecPolicy(loop, args.k, args.seed, json.loads(args.config))
    return {"random": RandomPolicy, "popular": PopularPolicy,
            "oracle": OraclePolicy}[name](loop, args.k, args.seed)


@dataclass
class Run:
    """Expected CTR per window of one policy in one world."""

    curve: list[float] = field(default_factory=list)
    by_group: dict[str, list[float]] = field(default_factory=dict)
    """drift world, last half: group ("shifted" / "stable" users) -> [expected clicks, slots]."""
    slots: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """last half: [served slots, of them in the user's favourite category, sum of item bias]."""
    by_position: list[list[float]] = field(default_factory=list)
    """last half: per position, [sum of the true click probabilities, slots] (stderr only)."""
    empty: int = 0
    seconds: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)

    def last_half(self) -> float:
        tail = self.curve[len(self.curve) // 2:]
        return float(np.mean(tail)) if tail else float("nan")


def run(world: str, policy_name: str, args: argparse.Namespace) -> Run:
    """One policy in one world: warm-up, then ``args.requests`` requests in batches."""
    t0 = time.perf_counter()
    settings = world_settings(world, args)
    loop = ClosedLoop(settings)
    # deterministic impression and request ids; the prefix seeds streamrec's own draws
    loop.run_id = f"{getattr(args, 'run_id', 'b')}{args.seed}"
    policy = make_policy(policy_name, loop, args)
    policy.warm(loop.warmup())
    if world == "drift":
        loop.sim.config.drift_at = loop.clock_ms + (args.requests // 3) * settings.step_ms
    result = Run()
    back: list[Event] = []
    k = args.k
    expected = 0.0
    in_window = 0
    while loop.sent < args.requests:
        batch = back + loop.requests(min(args.batch, args.requests - loop.sent))
        recs = policy.serve(batch)
        back = []
        for rec in recs:
            n_slots = result.slots[0]
            window = loop.windows[-1]
            before = window.expected_clicks
            n_before = len(loop.windows)
            back.extend(loop.respond(rec))
            # respond() may open a new window after adding this request to the old one.
            done = loop.windows[n_before - 1]
            expected += done.expected_clicks - before
            in_window += 1
            if loop.sent > args.requests // 2:
                for item in rec.get("items", [])[:k]:
                    try:
                        rank, bias = loop.sim.slot_truth(rec["user_id"], item["item_id"], loop.clock_ms)
                    except KeyError:
                        continue
                    position = int(result.slots[0] - n_slots)  # as respond() counts them
                    if position == len(result.by_position):
                        result.by_position.append([0.0, 0.0])
                    result.by_position[position][0] += loop.sim.click_probability(
                        rec["user_id"], item["item_id"], position, loop.clock_ms)
                    result.by_position[position][1] += 1
                    result.slots[0] += 1
                    result.slots[1] += rank == 0
                    result.slots[2] += bias
            if world == "drift" and loop.sent > args.requests // 2:
                group = "shifted" if loop.sim.shifted(rec["user_id"]) else "stable"
                tally = result.by_group.setdefault(group, [0.0, 0])
                tally[0] += done.expected_clicks - before
                tally[1] += k
            if not rec.get("items"):
                result.empty += 1
            if in_window == settings.window:
                result.curve.append(expected / (settings.window * k))
                expected, in_window = 0.0, 0
    if isinstance(policy, StreamrecPolicy):
        result.counters = policy.flow.counters()
        policy.flow.close()
    result.seconds = time.perf_counter() - t0
    return result


def plot(results: dict[str, dict[str, Run]], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (world, runs) in zip(axes[0], results.items(), strict=True):
        for name, r in runs.items():
            x = (np.arange(len(r.curve)) + 1) * window
            ax.plot(x, r.curve, label=name)
        ax.set_title(f"world: {world}")
        ax.set_xlabel("requests")
        ax.set_ylabel("expected CTR of served slots")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def one_world_parser(description: str) -> argparse.ArgumentParser:
    """Arguments of a harness over one world's streamrec run (bench/loop_*.py); the loop's
    other settings come from ``one_world_defaults``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", default="default", choices=WORLDS)
    ap.add_argument("--requests", type=int, default=3000)
    return ap


def one_world_defaults(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add the shared trailing arguments, parse, and set this script's defaults for the rest."""
    ap.add_argument("--config", default="{}", help="streamrec config overrides (JSON)")
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=5000, help="simulator events before the loop")
    ap.add_argument("--window", type=int, default=200, help="requests per window")
    args = ap.parse_args(argv)
    for name, value in {"k": 10, "batch": 20, "step_ms": 1000, "views": 1.0}.items():
        setattr(args, name, value)  # as main's defaults
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5000, help="simulator events before the loop")
    ap.add_argument("--requests", type=int, default=4000, help="loop requests per world")
    ap.add_argument("--window", type=int, default=200, help="requests per window")
    ap.add_argument("--batch", type=int, default=20, help="requests per micro-batch")
    ap.add_argument("--step-ms", type=int, default=1000, help="event time between requests")
    ap.add_argument("--views", type=float, default=1.0, help="organic world: views per request")
    ap.add_argument("--worlds", default=",".join(WORLDS))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--config", default="{}", help="streamrec config overrides (JSON)")
    ap.add_argument("--out", default="/tmp/streamrec-closed-loop.png", help="PNG of the curves")
    ap.add_argument("--run-id", default="b",
                    help="prefix of the request ids, which seed streamrec's own draws (category "
                         "sampling, interleaving, shadow sample); the world, the users' requests "
                         "and responses and the other policies do not change with it")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results: dict[str, dict[str, Run]] = {}
    for world in args.worlds.split(","):
        results[world] = {}
        for name in args.policies.split(","):
            r = results[world][name] = run(world, name, args)
            print(f"{world:8s} {name:10s} last-half expected CTR {r.last_half():.4f}  "
                  f"empty {r.empty}  {r.seconds:.0f} s  curve "
                  + " ".join(f"{c:.3f}" for c in r.curve), file=sys.stderr, flush=True)
            if r.by_position:
                print(f"{'':8s} {'':10s} last half by position: " + " ".join(
                    f"{p / n:.3f}" for p, n in r.by_position), file=sys.stderr, flush=True)
            if r.counters:
                print(f"{'':8s} {'':10s} {r.counters}", file=sys.stderr, flush=True)
    figures: dict[str, Any] = {"requests": args.requests, "seed": args.seed,
                               "users": args.users, "items": args.items}
    for world, runs in results.items():
        suffix = "" if world == "default" else f"_{world}"
        ctr = {name: r.last_half() for name, r in runs.items()}
        for name, value in ctr.items():
            figures[f"ctr_{name}{suffix}"] = round(value, 5)
        if {"random", "oracle"} <= ctr.keys():
            span = ctr["oracle"] - ctr["random"]
            for name in ("streamrec", "popular"):
                if name in ctr:
                    key = "gap_closed" if name == "streamrec" else "gap_closed_popular"
                    figures[f"{key}{suffix}"] = round((ctr[name] - ctr["random"]) / span, 4)
        for name, r in runs.items():
            n, top, bias = r.slots
            figures[f"top_category_{name}{suffix}"] = round(top / n, 4) if n else None
            figures[f"item_bias_{name}{suffix}"] = round(bias / n, 4) if n else None
        if "streamrec" in runs:
            figures[f"empty_streamrec{suffix}"] = runs["streamrec"].empty
        for name, r in runs.items():  # drift: users with a new taste vs the others
            for group, (clicks, slots) in sorted(r.by_group.items()):
                figures[f"ctr_{name}{suffix}_{group}"] = round(clicks / slots, 5) if slots else None
    if args.out:
        plot(results, Path(args.out), args.window)
        print(f"curves: {args.out}", file=sys.stderr)
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    gc.set_threshold(*GC_THRESHOLD)  # the flow process's collector, as flows.recsys.build sets it
    main()
