"""The ranker trainer as its own flow: Monolith's joiner -> Kafka -> trainer split.

For when training outgrows the joiner's processes: run the main flow with
``ranker.enabled = false`` (it still writes ``<app>.examples``), and this flow with
the same config::

    python -m bytewax.run "flows.trainer:build('my.toml')"

It reads the ``examples`` topic (Kafka), trains and syncs the serving copy into the
same snapshot store, and writes ``snapshots``, ``metrics`` and ``dead-letters`` like
the main flow (a line that is not a training example is a ``bad_example`` dead letter;
the flow goes on). With ``output.kind = "files"`` it reads
``<output.dir>/examples.jsonl`` instead (a replay of a previous run's examples) and
writes ``trainer-snapshots.jsonl``, ``trainer-metrics.jsonl`` and
``trainer-dead-letters.jsonl`` beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bytewax.operators as op
import orjson
from bytewax.dataflow import Dataflow

from events.model import Record, dead_letter
from flows.config import Config, load_config
from flows.kafka_wait import wait_for_kafka
from flows.logs import install_excepthook
from flows.recsys import _output
from models.rankers import positive_hold_ms
from operators.example_codec import unpack_example
from operators.sources import ReplaySource
from operators.trainer import Trainer, TrainerLogic


def build(config: str | Path | dict[str, Any] | Config | None = None) -> Dataflow:
    """The trainer flow: examples in, serving-copy snapshots and metrics out."""
    install_excepthook()
    config = load_config(config)
    wait_for_kafka(config, f"the {config.app} trainer's topics")
    flow = Dataflow(f"{config.app}-trainer")
    if config.output.kind == "kafka":
        from operators.kafka_io import KafkaSource

        source: Any = KafkaSource(config.kafka.bootstrap, [config.topic("examples")],
                                  consumer_config=config.kafka.client_settings("consumer"),
                                  discovery_timeout_s=config.kafka.startup_timeout_s)
    else:
        source = ReplaySource(Path(config.output.dir) / "examples.jsonl")
    raw = op.input("examples_in", flow, source)
    decoded = op.map("decode", raw, decode_examples)
    examples = op.map("valid", decoded, lambda pair: pair[0])
    store = config.snapshot_store()
    rate = config.sampler.negative_rate

    def builder(resume: Trainer | None) -> TrainerLogic:
        return TrainerLogic(resume or Trainer(config.ranker, rate, store,
                                              positive_hold_ms(config.join)))

    out = op.map("ranker_out", op.stateful("ranker", op.key_on("ranker_key", examples,
                                                               lambda _: "ranker"), builder),
                 lambda kv: kv[1])
    prefix = "" if config.output.kind == "kafka" else "trainer-"
    for name in ("snapshots", "metrics"):
        _output(prefix + name, op.filter_map(name, out, lambda o, n=name: o.get(n)), config)
    dead = op.merge("all_dead_letters", op.filter_map("bad_examples", decoded, lambda p: p[1] or None),
                    op.filter_map("ranker_dead_letters", out, lambda o: o.get("dead-letters")))
    _output(prefix + "dead-letters", dead, config)
    return flow


EXAMPLE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "ts": int, "user_id": str, "item_id": str, "label": (int, float), "weight": (int, float)}
"""Fields every training example must have, with their types (``bool`` is not a number)."""


def decode_examples(batch: list[bytes | str | Record]) -> tuple[list[Record], list[Record]]:
    """(examples, dead letters) of a batch of ``examples`` lines: each line parsed and
    unpacked (``operators.example_codec``), or dead-lettered with reason ``bad_example``
    when it is not JSON, not an object, or misses a field of ``EXAMPLE_FIELDS`` or has
    the wrong type there (then ``Trainer`` would fail on it). Records already decoded
    (dicts) are checked the same way."""
    good: list[Record] = []
    bad: list[Record] = []
    for line in batch:
        try:
            record = line if isinstance(line, dict) else orjson.loads(line)
        except orjson.JSONDecodeError as err:
            bad.append(dead_letter(line, "bad_example", f"not JSON: {err}"))
            continue
        problem = _example_problem(record)
        if problem:
            bad.append(dead_letter(line, "bad_example", problem))
            continue
        try:
            good.append(unpack_example(record))
        except Exception as err:  # a features object the codec cannot unpack
            bad.append(dead_letter(line, "bad_example", f"features: {type(err).__name__}: {err}"))
    return good, bad


def _example_problem(record: Any) -> str | None:
    """Why ``record`` cannot be a training example (None if it can)."""
    if not isinstance(record, dict):
        return f"not an object but {type(record).__name__}"
    for name, kind in EXAMPLE_FIELDS.items():
        value = record.get(name)
        if value is None:
            return f"missing field {name!r}"
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"field {name!r} is {type(value).__name__}"
    features = record.get("features")
    if features is not None and not isinstance(features, dict):
        return f"field 'features' is {type(features).__name__}"
    return None
