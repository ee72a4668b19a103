"""bench/loop_repeats.py on a tiny world: the groups partition the last half's slots, the
run is the closed loop's own (the same expected CTR), and the wrapped stages are restored."""

from __future__ import annotations

import argparse

from bench_module import load_bench

TINY = ["--users", "60", "--items", "50", "--warmup", "800", "--requests", "600", "--window", "50"]


def test_loop_repeats_partitions_the_slots_and_restores_the_stages() -> None:
    from events.simulator import Simulator
    from flows.loop import ClosedLoop

    before = (ClosedLoop.respond, Simulator.respond)
    module = load_bench("loop_repeats")
    figures = module.main(TINY)
    assert (ClosedLoop.respond, Simulator.respond) == before
    groups = figures["groups"]
    assert abs(sum(g["share"] for g in groups.values()) - 1.0) < 1e-3
    assert "never shown" in groups and any(name.endswith(" clicked") for name in groups)
    assert all(0.0 < g["p_click"] < 1.0 and 0.0 <= g["position"] <= 9.0 for g in groups.values())
    assert module.group(0, False) == "never shown"
    assert module.group(3, True) == "shown 3-4 clicked"
    assert module.group(12, False) == "shown 10+ never clicked"
    # the same run as bench/closed_loop.py's streamrec for these arguments
    import bench.closed_loop as closed_loop
    args = argparse.Namespace(seed=0, users=60, items=50, warmup=800, requests=600, window=50,
                              config="{}", k=10, batch=20, step_ms=1000, views=1.0)
    assert round(closed_loop.run("default", "streamrec", args).last_half(), 5) == figures["ctr_streamrec"]
