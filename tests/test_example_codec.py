"""Compact examples (issue 18 point 8): features without terms that add nothing, and
the wire form that groups them by name prefix and unpacks to the exact record."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
from serving_world import World
from test_impression_features import run, stream

from models.features import compact, ranking_features
from models.rankers import make_ranker
from operators.example_codec import pack_example, unpack_example
from state.sampling import NegativeSampler


def wire(record: dict) -> dict:
    return orjson.loads(orjson.dumps(record))


@pytest.mark.parametrize("features", [
    {"user.clicks.1h": 2.0, "user.clicks.1d": 3.0, "u:country": "US", "user.likes.1d": 1.0,
     "item.a": 1.0, "item.b": [1, "x"], "pop": 0.5},
    {"a.x": 1.0, "b.y": 2.0, "a.z": 3.0},  # a prefix that comes back later
    {"a.x": 1.0, "a.y": 2.0, "a.": 5.0},  # a name equal to a group key
    {"a.": 5.0, "a.x": 1.0},
    {"x..y": 1.0, "x..z": 2.0, ".q": 1.0, ".r": 2.0, "": 3.0},
    {},
])
def test_unpack_restores_the_exact_record_in_key_order(features: dict) -> None:
    record = {"example_id": "imp:1", "label": 1, "weight": 1.0, "features": features}
    got = unpack_example(wire(pack_example(record)))
    assert got == record
    assert list(got["features"].items()) == list(features.items())
    assert unpack_example(record) == record  # flat records pass through


def test_flow_examples_pack_small_and_unpack_exactly(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.publish_all()
    shard = world.user_shard()
    shard.joiner.sampler = NegativeSampler(0.3, 0)
    examples = run(shard, stream())
    assert len(examples) > 50
    packed = [orjson.dumps(pack_example(e)) for e in examples]
    assert [unpack_example(orjson.loads(b)) for b in packed] == examples
    flat = sum(len(orjson.dumps(e)) for e in examples)
    assert sum(map(len, packed)) < 0.9 * flat
    for e in examples:  # nothing that adds no term to the model is written
        for value in e["features"].values():
            assert value is not None and value != 0 and value != [] and type(value) is not dict


def test_compact_features_train_the_same_lr_model() -> None:
    """River LR (AdaGrad) learns bit for bit the same from compact features, and scores
    full serving dicts the same."""
    full = [{"user.clicks.1h": float(n % 3), "u:age": ["18-24", "25-34"][n % 2], "i:tags": [],
             "covis": 0.0, "mf": (n % 5 - 2) * 0.3, "flag": n % 4 == 0, "none": None,
             "nan": math.nan, "empty": "", "pop": 1.0 + n % 7} for n in range(400)]
    full_model, compact_model = make_ranker("lr"), make_ranker("lr")
    for n, feats in enumerate(full):
        example = {"user_id": f"u{n % 9}", "item_id": f"i{n % 13}", "ts": 1_767_225_600_000 + n,
                   "label": int(n % 5 == 0), "weight": 1.0, "position": n % 10, "context": {}}
        for model, extra in ((full_model, feats), (compact_model, compact(feats))):
            model.learn({**example, "features": extra},
                        ranking_features(example["user_id"], example["item_id"], example["ts"],
                                         {}, example["position"], extra))
    probes = [ranking_features("u1", "i2", 1_767_225_700_000, {}, 0, f) for f in full[:50]]
    assert (full_model.predict_many(probes) == compact_model.predict_many(probes)).all()
    assert len(compact(full[0])) < len(full[0])


def test_tap_prints_examples_unpacked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    record = {"example_id": "imp:1", "label": 1, "weight": 1.0,
              "features": {"user.clicks.1h": 2.0, "user.clicks.1d": 3.0, "pop": 1.5}}
    (tmp_path / "examples.jsonl").write_bytes(orjson.dumps(pack_example(record)) + b"\n")
    assert main(["tap", "examples", "--dir", str(tmp_path),
                 "--filter", "features['user.clicks.1d'] == 3.0"]) == 0
    assert orjson.loads(capsys.readouterr().out) == record
