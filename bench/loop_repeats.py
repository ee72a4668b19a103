"""Closed-loop slots by the user's history with the item: how often a list re-shows what
this user saw before, and what those slots are worth (issue 17 points 1 and 4;
docs/evaluation.md, loop10 and loop11).

A debugging harness over one ``bench/closed_loop.py`` run of streamrec (one world, one
seed, ``--config`` overrides): every served slot of the last half is put in a group by
what the loop had shown that user before this list (the warm-up's logging policy not
counted): ``never shown``, ``shown N never clicked`` (N = 1, 2, 3-4, 5-9, 10+) or
``shown N clicked`` (clicked at one of the earlier showings; the click counted when the
simulator draws it, whether or not streamrec has seen it yet). Per group: its share of
the slots, the slots' mean true click probability at their positions
(``Simulator.click_probability``, the hidden truth, as the yardstick only) and mean
position (0-based). Nothing here feeds streamrec.

    python bench/loop_repeats.py [--seed 0] [--world default] [--requests 3000] [--config JSON]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.closed_loop as closed_loop  # noqa: E402
from events.simulator import Simulator  # noqa: E402
from flows.loop import ClosedLoop  # noqa: E402

BUCKETS = ((1, "1"), (2, "2"), (4, "3-4"), (9, "5-9"))


def group(shown: int, clicked: bool) -> str:
    """The slot's group by the item's earlier showings to the user and whether clicked."""
    if not shown:
        return "never shown"
    name = next((label for top, label in BUCKETS if shown <= top), "10+")
    return f"shown {name} {'clicked' if clicked else 'never clicked'}"


def tally(args: argparse.Namespace) -> tuple[dict[str, list[float]], float]:
    """Run streamrec in one world; return (group -> [slots, sum of P(click), sum of
    positions] over the last half, last-half expected CTR)."""
    shown: dict[tuple[str, str], int] = defaultdict(int)
    clicked: set[tuple[str, str]] = set()
    groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    respond, sim_respond = ClosedLoop.respond, Simulator.respond

    def loop_respond(self: ClosedLoop, rec: dict[str, Any]) -> Any:
        entry = self.pending.get(rec.get("request_id", ""))
        if entry is not None and self.sent > args.requests // 2:
            user = entry[0]
            for pos, item in enumerate(i["item_id"] for i in rec.get("items", [])[: args.k]):
                try:
                    p = self.sim.click_probability(user, item, pos, self.clock_ms)
                except KeyError:
                    continue
                g = groups[group(shown[(user, item)], (user, item) in clicked)]
                g[0] += 1
                g[1] += p
                g[2] += pos
        return respond(self, rec)

    def simulator_respond(self: Simulator, user: str, items: list[str], *rest: Any) -> Any:
        events = sim_respond(self, user, items, *rest)
        for ev in events:
            if ev["type"] == "impression":
                shown[(user, ev["item_id"])] += 1
            elif ev.get("action") == "click":
                clicked.add((user, ev["item_id"]))
        return events

    ClosedLoop.respond = loop_respond  # type: ignore[method-assign]
    Simulator.respond = simulator_respond  # type: ignore[method-assign]
    try:
        run = closed_loop.run(args.world, "streamrec", args)
    finally:
        ClosedLoop.respond = respond  # type: ignore[method-assign]
        Simulator.respond = sim_respond  # type: ignore[method-assign]
    return dict(groups), run.last_half()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = closed_loop.one_world_parser(__doc__.split("\n")[0])
    args = closed_loop.one_world_defaults(ap, argv)
    t0 = time.perf_counter()
    groups, ctr = tally(args)
    total = sum(g[0] for g in groups.values()) or 1
    out: dict[str, Any] = {"world": args.world, "seed": args.seed, "requests": args.requests,
                           "ctr_streamrec": round(ctr, 5), "groups": {}}
    for name in sorted(groups):
        n, p, pos = groups[name]
        out["groups"][name] = {"share": round(n / total, 4), "p_click": round(p / n, 4),
                               "position": round(pos / n, 2)}
        print(f"{name:28s} share {n / total:.3f}  P(click) {p / n:.3f}  position {pos / n:.1f}",
              file=sys.stderr)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
