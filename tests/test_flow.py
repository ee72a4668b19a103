"""The main flow end to end on small logs: exact outputs in the JSONL files."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from bytewax.testing import run_main

from flows.evaluate import evaluate, read_jsonl
from flows.importers import obd_events, write_events
from flows.recsys import build

T0 = 1_767_225_600_000
OBD = Path(__file__).resolve().parents[2] / "shared" / "data" / "open-bandit" / "random" / "all" / "all.csv"


def small_log(path: Path) -> list[bytes]:
    events = [
        {"type": "item", "ts": T0, "item_id": "a", "attrs": {"category": "c1"}},
        {"type": "impression", "ts": T0 + 1, "impression_id": "i1", "user_id": "u1", "item_id": "a"},
        {"type": "impression", "ts": T0 + 2, "impression_id": "i2", "user_id": "u2", "item_id": "b",
         "position": 3},
        {"type": "feedback", "ts": T0 + 500, "user_id": "u1", "item_id": "a", "action": "click",
         "impression_id": "i1"},
        {"type": "request", "ts": T0 + 600, "request_id": "r1", "user_id": "u1"},
    ]
    lines = [orjson.dumps(e) for e in events]
    bad = [b"{nope", b"[1]", orjson.dumps({"type": "bogus", "ts": T0}),
           orjson.dumps({"type": "user", "ts": "x", "user_id": "u"})]
    path.write_bytes(b"\n".join(lines[:2] + bad + lines[2:]) + b"\n")
    return bad


def config(log: Path, out: Path, **extra) -> dict:
    return {"inputs": [{"kind": "replay", "path": str(log), "batch_size": 3}],
            "output": {"dir": str(out)}, "shards": {"users": 3},
            "sampler": {"negative_rate": 1.0}, **extra}


def test_flow_exact_outputs_on_a_small_log(tmp_path) -> None:
    bad = small_log(tmp_path / "log.jsonl")
    run_main(build(config(tmp_path / "log.jsonl", tmp_path / "out")))
    dead = read_jsonl(tmp_path / "out" / "dead-letters.jsonl")
    assert [(d["raw"].encode(), d["reason"]) for d in dead] == list(
        zip(bad, ["malformed_json", "not_object", "unknown_type", "bad_ts"], strict=True))
    examples = read_jsonl(tmp_path / "out" / "examples.jsonl")
    assert sorted((e["example_id"], e["user_id"], e["item_id"], e["label"], e["weight"], e["position"])
                  for e in examples) == [("imp:i1", "u1", "a", 1, 1.0, -1), ("imp:i2", "u2", "b", 0, 1.0, 3)]
    [summary] = [m for m in read_jsonl(tmp_path / "out" / "metrics.jsonl") if m["kind"] == "summary"]
    assert summary["events_in"] == 9 and summary["dead_letters"] == 4
    assert summary["events_by_type"] == {"item": 1, "impression": 2, "feedback": 1, "request": 1}
    assert summary["outputs"]["examples"] == 2


def test_zero_config_flow_builds_from_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("STREAMREC__INPUTS", '[{kind="simulator", events=3000, seed=1}]')
    monkeypatch.setenv("STREAMREC__OUTPUT__DIR", str(tmp_path / "out"))
    run_main(build())
    examples = read_jsonl(tmp_path / "out" / "examples.jsonl")
    [summary] = [m for m in read_jsonl(tmp_path / "out" / "metrics.jsonl") if m["kind"] == "summary"]
    assert summary["events_in"] == 3000
    assert len(examples) == summary["outputs"]["examples"] > 0
    assert len({e["example_id"] for e in examples}) == len(examples)


def test_eval_report_on_a_small_log(tmp_path) -> None:
    small_log(tmp_path / "log.jsonl")
    report = evaluate(tmp_path / "log.jsonl", tmp_path / "report.json",
                      config={"sampler": {"negative_rate": 1.0}})
    on_disk = orjson.loads((tmp_path / "report.json").read_bytes())
    assert on_disk == report
    for key in ("events", "positives", "hr_at_10", "ndcg_at_10", "auc", "logloss", "calibration",
                "events_per_s", "latency_ms_p50", "latency_ms_p99", "examples_positive",
                "examples_negative_weighted", "config", "version"):
        assert key in report
    assert report["events"] == 9 and report["examples_positive"] == 1
    assert report["examples_negative_weighted"] == 1.0
    assert report["config"]["inputs"][0]["path"] == str(tmp_path / "log.jsonl")


@pytest.mark.data
@pytest.mark.skipif(not OBD.exists(), reason="../shared/data (Open Bandit Dataset) is absent")
def test_obd_join_reproduces_every_label(tmp_path) -> None:
    log = tmp_path / "obd.jsonl"
    write_events(obd_events(OBD), log)
    rows = {}
    import csv

    with OBD.open() as f:
        for n, row in enumerate(csv.DictReader(f)):
            rows[f"imp:obd-{row[''] or n}"] = int(row["click"])
    report = evaluate(log, tmp_path / "r1.json", config={"sampler": {"negative_rate": 1.0}},
                      examples=True)
    examples = read_jsonl(Path(report["outputs_dir"]) / "examples.jsonl")
    assert len(examples) == len(rows) == 10_000
    assert {e["example_id"]: e["label"] for e in examples} == rows
    true_negatives = sum(1 for v in rows.values() if v == 0)
    report = evaluate(log, tmp_path / "r2.json", config={"sampler": {"negative_rate": 0.1}})
    assert report["examples_positive"] == sum(rows.values())
    assert abs(report["examples_negative_weighted"] - true_negatives) / true_negatives <= 0.05


def test_profiles_flow_into_examples_and_item_tables(tmp_path) -> None:
    """User, user x category and item profile features reach examples (impression time)."""
    import glob

    from operators.example_codec import unpack_example
    from state.item_table import ItemTable

    run_main(build({"inputs": [{"kind": "simulator", "events": 20_000, "seed": 2}],
                    "output": {"dir": str(tmp_path)}, "sampler": {"negative_rate": 1.0},
                    "items": {"refresh_interval_ms": 30_000}}))
    examples = [unpack_example(e) for e in read_jsonl(tmp_path / "examples.jsonl")]
    late = examples[len(examples) // 2:]
    # Zero counts are left out of examples (models.features.compact); most users have some.
    assert sum("user.impressions.1h" in e["features"] for e in late) > 0.5 * len(late)
    assert any(e["features"].get("user_x_category.impressions.1d", 0) > 0 for e in late)
    with_items = [e for e in late if "item.impressions.1h" in e["features"]]
    assert with_items and any(e["features"]["item.impressions.1h"] > 0 for e in with_items)
    tables = sorted(glob.glob(str(tmp_path / "snapshots" / "streamrec" / "items-*" / "v*.npz")))
    table = ItemTable.load(tables[-1])
    assert table.features and all("item.impressions.1d" in f for f in table.features.values())


def test_answers_are_handed_to_their_sink_before_the_batch_s_other_work(tmp_path) -> None:
    """A worker runs its steps in the order they were added to the flow (one step after
    the other in each activation round), so the recommendations sink comes right after
    the user shards: an answer does not wait for the batch's examples to be packed and
    written, the trainers, the item side or the metrics (docs/architecture.md, batches
    and latency). The other outputs share one sink step, added last."""
    flow = build({"inputs": [{"kind": "simulator", "events": 10}],
                  "output": {"dir": str(tmp_path)}})
    steps = [s.step_id.split(".", 1)[1] for s in flow.substeps]
    first_after_shards = steps[steps.index("user_shard") + 1:][:2]
    assert first_after_shards == ["recommendations", "out_recommendations"]
    for later in ("user_shard_files", "out_files", "item_shard", "index", "ranker",
                  "pool_trainer", "metrics"):
        assert steps.index(later) > steps.index("out_recommendations"), later


def test_the_flow_has_one_step_per_destination_and_two_sink_steps(tmp_path) -> None:
    """Bytewax pays scheduling and progress work per step and message (twice over in a
    cluster): the zero-config flow adds no identity step (a ``map`` unwrapping a stateful
    step's ``(key, value)``, a ``key_on`` before a sink), and every output but the
    recommendations goes through one sink step (docs/architecture.md, The step graph)."""
    from operators.sinks import NamedSinks

    flow = build({"inputs": [{"kind": "simulator", "events": 10}],
                  "output": {"dir": str(tmp_path)}})
    steps = {s.step_id.split(".", 1)[1]: s for s in flow.substeps}
    outputs = {name: s for name, s in steps.items() if type(s).__name__ == "output"}
    assert sorted(outputs) == ["out_files", "out_recommendations"]
    assert sorted(outputs["out_files"].sink.sinks) == ["dead-letters", "examples", "late-labels",
                                                       "metrics", "snapshots"]
    assert all(isinstance(s.sink, NamedSinks) for s in outputs.values())
    assert not [n for n, s in steps.items() if type(s).__name__ == "key_on"]
    assert len(steps) <= 30, sorted(steps)
