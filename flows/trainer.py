"""The ranker trainer as its own flow: Monolith's joiner -> Kafka -> trainer split.

For when training outgrows the joiner's processes: run the main flow with
``ranker.enabled = false`` (it still writes ``<app>.examples``), and this flow with
the same config::

    python -m bytewax.run "flows.trainer:build('my.toml')"

It reads the ``examples`` topic (Kafka), trains and syncs the serving copy into the
same snapshot store, and writes ``snapshots`` and ``metrics`` like the main flow.
With ``output.kind = "files"`` it reads ``<output.dir>/examples.jsonl`` instead (a
replay of a previous run's examples) and writes ``trainer-snapshots.jsonl`` and
``trainer-metrics.jsonl`` beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bytewax.operators as op
import orjson
from bytewax.dataflow import Dataflow

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
    examples = op.map("decode", raw,
                      lambda batch: [unpack_example(orjson.loads(line)) for line in batch])
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
    return flow
