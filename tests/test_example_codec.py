"""Compact examples (issue 18 point 8): features without terms that add nothing, floats
at float32 precision, and the wire form (a versioned feature vocabulary, fields that can
be rebuilt left out) that unpacks to the exact record."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
from serving_world import T0, World
from test_impression_features import run, stream

from events.model import Feedback, Impression
from models.features import compact, ranking_features
from models.rankers import make_ranker
from operators.example_codec import (
    VOCABULARY,
    WIRE_ROWS,
    encoded_part,
    join_parts,
    pack_example,
    pack_impression,
    pack_impressions,
    unpack_example,
)
from state.join_state import Example, float32_features
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
    full = joiner_record(features=features)
    got = unpack_example(wire(pack_example(full)))
    assert got == full and list(got) == list(full)
    assert list(got["features"].items()) == list(features.items())


def joiner_record(**fields: object) -> dict:
    """An example as the joiner writes it (``Example.record``), ``fields`` replaced."""
    base = {"example_id": "imp:q-3", "ts": 1_767_225_600_000, "user_id": "u1", "item_id": "i9",
            "label": 0, "labels": {}, "weight": 10.0, "position": 3, "request_id": "q",
            "impression_id": "q-3", "context": {}, "features": {}, "source": "impression"}
    return Example(**{**base, **fields}).record()  # type: ignore[arg-type]


V = VOCABULARY
EDGES = [
    {V[0]: 110.0, V[1]: 2.5, V[32]: ["i1", "i2"], V[33]: ["i1", "i2"], V[39]: "18-24",
     V[58]: "c7", V[60]: 1e300, V[61]: -3.0, V[62]: 0.1 + 0.2},
    {V[5]: 1.0, "u:gender": "F", V[1]: 2.0},  # a name outside the vocabulary, out of order
    {V[3]: 7, V[4]: True, V[6]: -0.0, V[7]: 2.0 ** 60, V[8]: [], V[9]: [1, "x", 2.0],
     V[10]: [1, "x", 2.0], V[11]: "", V[12]: [1, "x", 2.0]},  # ints, bools, repeated lists
    {"custom.a": 1.0, "custom.b": {"nested": 1}},  # a dict value: the row stays plain
    {},
]


@pytest.mark.parametrize("features", EDGES)
@pytest.mark.parametrize("fields", [
    {},
    {"example_id": "int:00ff", "impression_id": None, "request_id": None, "position": -1,
     "source": "interaction", "labels": {"view": 1.0}, "context": {"device": "tv"}},
    {"example_id": "neg:00ff:1", "impression_id": None, "source": "sampled", "label": 1},
    {"impression_id": "other", "source": "odd"},  # not what the id implies: written
])
def test_joiner_records_round_trip_exactly(features: dict, fields: dict) -> None:
    record = joiner_record(features=features, **fields)
    packed = wire(pack_example(record))
    got = unpack_example(packed)
    assert got == record and list(got) == list(record)
    assert [(k, type(v)) for k, v in got["features"].items()] == [
        (k, type(v)) for k, v in features.items()]
    for name in ("example_id", "ts", "user_id", "item_id", "label", "weight", "position"):
        assert packed[name] == record[name]  # what readers filter on stays readable


@pytest.mark.parametrize("features", EDGES)
@pytest.mark.parametrize("fields", [{}, {"labels": {"click": 1.0}, "context": {"device": "tv"},
                                        "request_id": None, "position": -1, "label": 1}])
def test_impression_rows_built_directly_equal_the_packed_records(features: dict,
                                                                 fields: dict) -> None:
    """``pack_impression`` (the joiner's wire rows) is ``pack_example`` of the record."""
    record = joiner_record(features=features, **fields)
    imp = Impression(record["ts"], record["impression_id"], record["user_id"],
                     record["item_id"], record["request_id"], record["position"],
                     record["context"])
    row = pack_impression(imp, record["label"], record["labels"], record["weight"], features)
    assert orjson.dumps(row) == orjson.dumps(pack_example(record))


@pytest.mark.parametrize("fields", [
    {},  # no context
    {"context": {"device": "tv"}},  # the common row: no labels, a request, a context
    {"labels": {"click": 1.0}, "context": {"device": "tv"}},
    {"request_id": None, "context": {"device": "tv"}},
    {"request_id": None, "position": -1, "labels": {"view": 1.0}},
])
def test_impression_rows_of_encoded_parts_equal_the_packed_records(fields: dict) -> None:
    """``pack_impressions`` with features already encoded (``join_parts``: the joiner's
    deferred rows) writes ``pack_example`` of the record, byte for byte, whichever of
    labels, request and context a row has."""
    user = {V[0]: 110.0, V[1]: 2.5, V[39]: "18-24"}
    item = {V[58]: "c7", V[61]: -3.0}
    record = joiner_record(features={**user, **item}, **fields)
    imp = Impression(record["ts"], record["impression_id"], record["user_id"],
                     record["item_id"], record["request_id"], record["position"],
                     record["context"])
    encoded = join_parts(encoded_part(user), encoded_part(item))
    [row] = pack_impressions([imp], [record["labels"]], record["label"], record["weight"],
                             [encoded])
    assert orjson.dumps(row) == orjson.dumps(pack_example(record))


def test_a_shard_writing_wire_rows_writes_the_packed_records(tmp_path: Path) -> None:
    """The same stream (features from snapshots, clicks, interactions, sampled negatives,
    downsampling) through a shard writing full records and one writing wire rows
    (``WIRE_ROWS``: the flow without an in-flow trainer): the rows are the packed records,
    byte for byte, in the same order."""
    world = World(tmp_path)
    world.publish_all()
    events = stream()
    events += [Feedback(T0 + 500_000 + n, f"u{n % 3 + 1}", f"i{n % 40}", "view")
               for n in range(30)]  # organic interactions: their examples and negatives
    records = world.user_shard()
    records.joiner.sampler = NegativeSampler(0.3, 0)
    wired = world.user_shard()
    wired.joiner.sampler = NegativeSampler(0.3, 0)
    wired.joiner.rows = WIRE_ROWS
    expected = [pack_example(e) for e in run(records, events)]
    rows = run(wired, events)
    assert {e["example_id"][:4] for e in rows} == {"imp:", "int:", "neg:"}
    assert [orjson.dumps(r) for r in rows] == [orjson.dumps(e) for e in expected]


def test_old_grouped_rows_still_unpack() -> None:
    row = {"example_id": "imp:1", "label": 1, "features": {
        "user.": {"clicks.": {"1h": 2.0, "1d": 3.0}}, "pop": 1.5}}
    assert unpack_example(row)["features"] == {"user.clicks.1h": 2.0, "user.clicks.1d": 3.0,
                                               "pop": 1.5}


def test_rows_of_the_first_vocabulary_still_unpack_with_its_positions() -> None:
    """Version 2 inserted names before ``user_x_category.clicks.1d``: an ``f1`` row must
    read its names at version 1's positions, not the shifted ones."""
    from operators.example_codec import VOCABULARY_1

    shifted = VOCABULARY_1.index("user_x_category.clicks.1d")
    assert VOCABULARY[shifted] != VOCABULARY_1[shifted]
    row = {"example_id": "imp:i7", "ts": 1, "user_id": "u1", "item_id": "a", "label": 1,
           "weight": 1.0, "position": 0, "f1": [format(1 << shifted | 1 << 4, "x"), 2, 3]}
    assert unpack_example(row)["features"] == {"user.requests.5m": 2.0,
                                               "user_x_category.clicks.1d": 3.0}
    assert "f1" not in orjson.dumps(pack_example(unpack_example(row))).decode()


def test_rows_of_the_second_vocabulary_still_unpack_with_its_positions() -> None:
    """Version 3 inserted ``category_posterior`` after ``ui.liked``: an ``f2`` row reads
    the names after it at version 2's positions."""
    from operators.example_codec import VOCABULARY_2

    shifted = VOCABULARY_2.index("ui.liked") + 1
    assert VOCABULARY[shifted] == "category_posterior" != VOCABULARY_2[shifted]
    row = {"example_id": "imp:i7", "ts": 1, "user_id": "u1", "item_id": "a", "label": 1,
           "weight": 1.0, "position": 0, "f2": [format(1 << shifted | 1 << 4, "x"), 2, 3]}
    assert unpack_example(row)["features"] == {"user.requests.5m": 2.0,
                                               VOCABULARY_2[shifted]: 3.0}
    assert "f2" not in orjson.dumps(pack_example(unpack_example(row))).decode()


def test_the_vocabulary_holds_every_default_feature_name() -> None:
    """A default feature outside the vocabulary would make every row spell its names."""
    from operators.point_in_time import NUMERIC_ITEM_FEATURES
    from state.feature_spec import default_features

    names = [n for spec in default_features() for n in spec.output_names]
    assert set(names) | set(NUMERIC_ITEM_FEATURES) <= set(VOCABULARY)
    assert len(set(VOCABULARY)) == len(VOCABULARY)


def test_float32_features_round_to_eight_digits_in_order() -> None:
    features = {"b": 0.1 + 0.2, "a": 2.9991600647463437, "n": 110.0, "s": "x", "i": 3,
                "big": 123456789.123, "l": [0.30000000000000004]}
    got = float32_features(features)
    assert list(got) == list(features)
    assert got == {"b": 0.3, "a": 2.9991601, "n": 110.0, "s": "x", "i": 3, "big": 123456790.0,
                   "l": [0.30000000000000004]}
    for name in ("a", "big"):
        assert abs(got[name] - features[name]) <= 5e-8 * abs(features[name])


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
    assert sum(map(len, packed)) < 0.45 * flat
    assert all(b'"f3":["' in b for b in packed)  # every name in the vocabulary, in its order
    floats = 0
    for e in examples:  # nothing that adds no term to the model is written
        for value in e["features"].values():
            assert value is not None and value != 0 and value != [] and type(value) is not dict
            if type(value) is float:  # at float32 precision (the joiner rounds)
                floats += 1
                assert value == float(f"{value:.8g}")
    assert floats > 100


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

    record = joiner_record(features={"user.clicks.1h": 2.0, "user.clicks.1d": 3.0,
                                     "user.recent_positives.1h": ["i1"],
                                     "user.recent_positives.all": ["i1"], "pop": 1.5})
    other = joiner_record(example_id="imp:q-4", impression_id="q-4",
                          features={"user.clicks.1d": 1.0, "pop": 2.5})
    (tmp_path / "examples.jsonl").write_bytes(
        b"".join(orjson.dumps(pack_example(r)) + b"\n" for r in (record, other)))
    assert b'"f3":' in (tmp_path / "examples.jsonl").read_bytes()
    assert main(["tap", "examples", "--dir", str(tmp_path),
                 "--filter", "features['user.clicks.1d'] == 3.0"]) == 0
    assert orjson.loads(capsys.readouterr().out) == record
    assert main(["tap", "examples", "--dir", str(tmp_path), "--from", "-1"]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert shown == other and shown["source"] == "impression" and shown["features"]["pop"] == 2.5
