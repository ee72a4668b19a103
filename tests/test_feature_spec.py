"""Feature specs (state/feature_spec.py): declared features parse from TOML and dicts, and
every bad key is refused by name."""

from __future__ import annotations

from typing import Any

import pytest

from state.feature_spec import FeatureSpecError, load_features, parse_features

MIN = 60_000
HOUR = 3_600_000


def test_toml_specs(tmp_path: Any) -> None:
    p = tmp_path / "f.toml"
    p.write_text('[[features]]\nname = "clicks"\nentity = "user"\naggregate = "count"\n'
                 'windows = ["5m", "1h"]\nfilter = { type = "feedback", action = ["click", "like"] }\n')
    (spec,) = load_features(p)
    assert spec.output_names == ("user.clicks.5m", "user.clicks.1h")
    assert spec.windows == (5 * MIN, HOUR) and spec.actions == frozenset({"click", "like"})


OK = {"name": "x", "entity": "user", "filter": {"type": "feedback", "action": "click"},
      "aggregate": "count", "windows": ["1h"]}


@pytest.mark.parametrize(("patch", "key"), [
    ({"aggregate": "median"}, "aggregate"),
    ({"windows": ["5x"]}, "windows"),
    ({"windows": "1h"}, "windows"),
    ({"windows": ["1h", "60m"]}, "windows"),
    ({"windows": ["0s"]}, "windows"),
    ({"entity": "shop"}, "entity"),
    ({"name": "Bad Name"}, "name"),
    ({"filter": {"type": "click"}}, "filter.type"),
    ({"filter": {"type": "impression", "action": "click"}}, "filter.action"),
    ({"filter": {"type": "feedback", "action": []}}, "filter.action"),
    ({"filter": {"type": "feedback", "kind": "x"}}, "filter.kind"),
    ({"filter": {"type": "item"}}, "filter.type"),
    ({"filter": {"type": "feedback", "min_value": "4"}}, "filter.min_value"),
    ({"value": "value"}, "value"),
    ({"aggregate": "sum", "value": "item_id"}, "value"),
    ({"aggregate": "sum", "value": {"a": 1}}, "value"),
    ({"aggregate": "decay_sum"}, "half_life"),
    ({"aggregate": "decay_sum", "half_life": "soon"}, "half_life"),
    ({"half_life": "1h"}, "half_life"),
    ({"aggregate": "last_k", "k": 0}, "k"),
    ({"k": 5}, "k"),
    ({"aggregate": "mean", "default": "zero"}, "default"),
    ({"colour": "red"}, "colour"),
])
def test_spec_validation_names_the_offending_key(patch: dict[str, Any], key: str) -> None:
    raw = dict(OK) | patch
    with pytest.raises(FeatureSpecError, match=rf"features\[0\] .*key '{key}'"):
        parse_features([raw])


CLICKS = {"name": "clicks", "entity": "item", "filter": {"type": "feedback", "action": "click"},
          "aggregate": "count", "windows": ["1h", "1d"]}
EXPOSURE = {"name": "exposure", "entity": "item", "filter": {"type": "impression"},
            "aggregate": "sum", "value": "position", "transform": "position_discount",
            "windows": ["1h", "1d"]}
RATE = {"name": "ctr", "entity": "item", "aggregate": "rate", "of": ["clicks", "exposure"],
        "windows": ["1h", "1d"]}


def test_a_rate_names_two_stored_features_of_its_entity() -> None:
    *_, rate = parse_features([CLICKS, EXPOSURE, RATE])
    assert rate.derived and rate.of == ("clicks", "exposure") and rate.prior == 10.0
    assert rate.output_names == ("item.ctr.1h", "item.ctr.1d")
    assert not rate.matches({"type": "impression", "item_id": "i"})


@pytest.mark.parametrize(("patch", "key"), [
    ({"of": ["clicks"]}, "of"),
    ({"of": ["clicks", "clicks"]}, "of"),
    ({"of": ["clicks", "views"]}, "of"),  # no such feature of the entity
    ({"of": ["clicks", "last_ts"]}, "of"),  # not additive
    ({"windows": ["1h", "7d"]}, "windows"),  # the parts have no 7d window
    ({"prior": -1}, "prior"),
    ({"filter": {"type": "impression"}}, "filter"),
    ({"entity": "user"}, "of"),  # the parts are item features
])
def test_rate_validation_names_the_offending_key(patch: dict[str, Any], key: str) -> None:
    last = {"name": "last_ts", "entity": "item", "filter": {"type": "impression"},
            "aggregate": "last", "value": "ts", "windows": ["1h", "1d"]}
    with pytest.raises(FeatureSpecError, match=rf"features\[3\] .*key '{key}'"):
        parse_features([CLICKS, EXPOSURE, last, RATE | patch])


@pytest.mark.parametrize(("patch", "key"), [
    ({"transform": "log"}, "transform"),
    ({"aggregate": "count", "value": None}, "transform"),
    ({"aggregate": "last", "transform": "position_discount"}, "transform"),
    ({"of": ["a", "b"]}, "of"),
])
def test_transform_and_rate_keys_are_refused_where_they_do_not_apply(
        patch: dict[str, Any], key: str) -> None:
    raw = {k: v for k, v in (EXPOSURE | patch).items() if v is not None}
    with pytest.raises(FeatureSpecError, match=rf"key '{key}'"):
        parse_features([raw])
