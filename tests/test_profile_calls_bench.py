"""bench/profile_calls.py: the profile-store calls of a replay, recorded and replayed
alone, give the stores' answers and final states of the flow, reproducibly."""

from __future__ import annotations

from bench_module import load_bench


def test_recorded_calls_replay_to_one_digest_that_a_missing_write_changes() -> None:
    bench, throughput, common = (load_bench("profile_calls"), load_bench("throughput"),
                                 load_bench("common"))
    world, seed, _ = throughput.zero_config_world()
    calls = bench.record(common.simulated_log(1_500, seed, world), 1_500)
    kinds = {args[1] for _, name, args in calls if name == "__init__"}
    assert kinds == {"user", "user_x_category", "item"}
    names = {name for _, name, _ in calls}
    assert {"apply", "query_key"} <= names
    cross = [args for idx, name, args in calls if name == "apply" and len(args) == 2]
    assert cross and all(isinstance(read, list) for _, read in cross)  # the attributes read

    digest = bench.play(calls, True)
    assert digest == bench.play(calls, True) and bench.play(calls, False) is None
    first_apply = next(i for i, (_, name, _) in enumerate(calls) if name == "apply")
    assert bench.play(calls[:first_apply] + calls[first_apply + 1:], True) != digest
