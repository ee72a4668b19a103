"""The trainer stage: score-then-learn order, sync points, verified serving copies."""

from __future__ import annotations

import pytest

from models.features import example_features
from models.rankers import positive_hold_ms
from models.synthetic import SYNTH_JOIN, simulated_examples
from operators.trainer import RankerConfig, Trainer, load_ranker
from state.snapshot_store import SnapshotReader, SnapshotStore


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return simulated_examples(40_000, seed=3)


def batches(examples: list[dict], size: int = 500) -> list[list[dict]]:
    return [examples[i:i + size] for i in range(0, len(examples), size)]


def test_serving_copy_changes_only_at_sync_points(tmp_path, examples) -> None:
    store = SnapshotStore(tmp_path)
    config = RankerConfig(sync_interval_ms=10**12, sync_every_examples=5_000,
                          metrics_every_examples=10**9, delay_to_labels=False)
    trainer = Trainer(config, 1.0, store)
    reader = SnapshotReader(store, "ranker", load_ranker)
    probe = [example_features(e) for e in examples[:50]]
    versions, seen = [], 0
    for batch in batches(examples):
        out = trainer.process(batch)
        before = reader.current.predict_many(probe).tolist() if reader.current else None
        for manifest in out.get("snapshots", []):
            assert reader.offer(manifest)
            versions.append(manifest["version"])
            # The serving copy is exactly the training copy at the sync point.
            assert reader.current.predict_many(probe).tolist() == trainer.model.predict_many(probe).tolist()
        if not out.get("snapshots") and before is not None:
            assert reader.current.predict_many(probe).tolist() == before  # unchanged between syncs
        seen += len(batch)
    assert versions == list(range(1, len(versions) + 1))
    assert len(versions) == seen // 5_000
    with pytest.raises(RuntimeError, match="frozen"):
        reader.current.learn(examples[0])  # a serving copy refuses to learn


def test_event_time_sync_and_final_metrics(tmp_path, examples) -> None:
    trainer = Trainer(RankerConfig(sync_interval_ms=60_000, sync_every_examples=10**9,
                                   metrics_every_examples=10**9), 1.0, SnapshotStore(tmp_path),
                      label_delay_ms=positive_hold_ms(SYNTH_JOIN))
    manifests = []
    for batch in batches(examples):
        manifests += trainer.process(batch).get("snapshots", [])
    final = trainer.finish()
    manifests += final.get("snapshots", [])
    ts = [m["ts"] for m in manifests]
    assert ts == sorted(ts) and all(b - a >= 60_000 for a, b in zip(ts, ts[1:-1], strict=False))
    [report] = final["metrics"]
    assert report["kind"] == "ranker_final" and report["count"] == len(examples)
    assert report["auc"] > 0.6 and 0.8 < report["calibration"] < 1.25


def test_tampered_serving_copy_is_refused(tmp_path, examples) -> None:
    store = SnapshotStore(tmp_path)
    trainer = Trainer(RankerConfig(sync_every_examples=2_000, delay_to_labels=False), 1.0, store)
    manifests = []
    for batch in batches(examples[:6_000]):
        manifests += trainer.process(batch).get("snapshots", [])
    reader = SnapshotReader(store, "ranker", load_ranker)
    assert reader.offer(manifests[0])
    path = store.verified_path(manifests[1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not reader.offer(manifests[1])
    assert reader.version == 1 and "sha256" in reader.last_error


def test_trainer_as_its_own_flow(tmp_path) -> None:
    from bytewax.testing import run_main

    from flows.evaluate import read_jsonl
    from flows.recsys import build
    from flows.trainer import build as build_trainer

    config = {"inputs": [{"kind": "simulator", "events": 20_000, "seed": 4}],
              "output": {"dir": str(tmp_path)}, "ranker": {"enabled": False}}
    run_main(build(config))
    assert not (tmp_path / "snapshots" / "streamrec" / "ranker").exists()
    examples = read_jsonl(tmp_path / "examples.jsonl")
    run_main(build_trainer(config))
    manifests = [m for m in read_jsonl(tmp_path / "trainer-snapshots.jsonl") if m["kind"] == "ranker"]
    assert manifests and (tmp_path / "snapshots" / "streamrec" / "ranker" / "LATEST").exists()
    [final] = [m for m in read_jsonl(tmp_path / "trainer-metrics.jsonl") if m["kind"] == "ranker_final"]
    assert final["count"] == len(examples)


def test_trainer_flow_learns_what_the_in_flow_trainer_learns(tmp_path) -> None:
    """The examples topic carries packed features (operators/example_codec.py); the trainer
    flow unpacks them and ends with the in-flow trainer's model, weight for weight."""
    from bytewax.testing import run_main

    from flows.recsys import build
    from flows.trainer import build as build_trainer
    from operators.trainer import load_ranker
    from state.snapshot_store import SnapshotStore

    config = {"inputs": [{"kind": "simulator", "events": 12_000, "seed": 5}],
              "output": {"dir": str(tmp_path)}}
    run_main(build(config))
    lines = (tmp_path / "examples.jsonl").read_bytes().splitlines()
    assert all(b'"f3":[' in line for line in lines)  # packed on the wire
    run_main(build_trainer({**config, "snapshots": {"dir": str(tmp_path / "apart")}}))

    def final(root) -> dict:
        store = SnapshotStore(root / "streamrec")
        return load_ranker(store.verified_path(store.latest("ranker"))).model._weights.to_dict()

    in_flow, apart = final(tmp_path / "snapshots"), final(tmp_path / "apart")
    assert len(in_flow) > 100 and in_flow == apart


def test_trainer_flow_dead_letters_bad_examples_and_learns_the_rest(tmp_path) -> None:
    """A replayed or Kafka ``examples`` stream may hold lines the trainer cannot learn
    from; each becomes a ``bad_example`` dead letter with its reason and every valid
    example is still learned (before, the first such line stopped the flow)."""
    import orjson
    from bytewax.testing import run_main

    from flows.evaluate import read_jsonl
    from flows.trainer import build as build_trainer

    good = simulated_examples(3_000, seed=7)
    bad = [b"{not json", b"[1, 2]", orjson.dumps({**good[0], "ts": "yesterday"}),
           orjson.dumps({k: v for k, v in good[1].items() if k != "user_id"}),
           orjson.dumps({**good[2], "label": True}), orjson.dumps({**good[3], "features": [1]})]
    lines = [orjson.dumps(e) for e in good]
    for i, line in enumerate(bad):
        lines.insert(500 * i + 7, line)
    (tmp_path / "examples.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    config = {"inputs": [{"kind": "simulator", "events": 10}], "output": {"dir": str(tmp_path)}}
    run_main(build_trainer(config))
    dead = read_jsonl(tmp_path / "trainer-dead-letters.jsonl")
    assert [d["reason"] for d in dead] == ["bad_example"] * len(bad)
    assert [d["detail"].split(":")[0] for d in dead] == [
        "not JSON", "not an object but list", "field 'ts' is str", "missing field 'user_id'",
        "field 'label' is bool", "field 'features' is list"]
    [final] = [m for m in read_jsonl(tmp_path / "trainer-metrics.jsonl") if m["kind"] == "ranker_final"]
    assert final["count"] == len(good)
