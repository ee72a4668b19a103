"""bench/closed_loop.py on a tiny world: deterministic for a seed, the fixed JSON keys,
and the oracle above random (the protocol's sanity)."""

from __future__ import annotations

from types import ModuleType

from bench_module import load_bench


def _bench() -> ModuleType:
    return load_bench("closed_loop")


def test_closed_loop_is_deterministic_and_reports_every_figure() -> None:
    bench = _bench()
    argv = ["--users", "60", "--items", "50", "--warmup", "800", "--requests", "240",
            "--window", "40", "--out", ""]
    first, second = bench.main(argv), bench.main(argv)
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    for key in ("gap_closed", "gap_closed_organic", "gap_closed_drift", "ctr_random",
                "ctr_popular", "ctr_oracle", "ctr_streamrec", "requests",
                "gap_closed_popular", "gap_closed_popular_organic", "gap_closed_popular_drift"):
        assert key in first
    for suffix in ("", "_organic", "_drift"):
        assert first[f"ctr_oracle{suffix}"] > 2 * first[f"ctr_random{suffix}"]
        assert first[f"empty_streamrec{suffix}"] == 0
        # where the slots fall short: the oracle serves the users' favourite category and
        # items of high bias far more often than a random list does
        assert first[f"top_category_oracle{suffix}"] > 2 * first[f"top_category_random{suffix}"]
        assert first[f"item_bias_oracle{suffix}"] > first[f"item_bias_random{suffix}"] + 0.2


def test_the_run_id_changes_only_streamrecs_own_draws() -> None:
    """``--run-id`` reseeds streamrec's draws (they are seeded from the request ids): the
    world, the users' requests and responses and so every other policy's figures stay
    the same to the last digit, and streamrec stays deterministic for a run id."""
    bench = _bench()
    argv = ["--users", "60", "--items", "50", "--warmup", "800", "--requests", "240",
            "--window", "40", "--out", "", "--worlds", "drift"]
    base = bench.main(argv)
    other, again = bench.main([*argv, "--run-id", "c"]), bench.main([*argv, "--run-id", "c"])
    for figures in (base, other, again):
        figures.pop("seconds")
    assert other == again
    for key, value in base.items():
        if "streamrec" not in key and not key.startswith("gap_closed_drift"):
            assert other[key] == value, key
    assert base.keys() == other.keys()
