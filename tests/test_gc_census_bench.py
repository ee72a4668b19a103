"""bench/gc_census.py: a small replay's collection log and survivor census."""

from __future__ import annotations

import gc
import sys

from bench_module import load_bench


def test_replay_logs_collections_and_names_the_survivors_allocation_lines() -> None:
    census = load_bench("gc_census")
    common = load_bench("common")
    log = common.simulated_log(3_000, 0)
    thresholds, switch = gc.get_threshold(), sys.getswitchinterval()
    try:
        figures = census.replay(log, warm=1_000, live=2_000, batch=70, sites=5)
    finally:
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(switch)
        gc.unfreeze()
    assert figures["events"] == 3_000
    assert figures["gen1_objects"] > 0 and figures["gen1_collect_ms"] >= 0.0
    sites = figures["sites"]
    assert 0 < len(sites) <= 5
    assert all(site.endswith(tuple("0123456789")) and ":" in site for site, _, _ in sites)
    shares = [share for _, share, _ in sites]
    assert shares == sorted(shares, reverse=True) and 0.0 < sum(shares) <= 1.0
