"""The main streamrec dataflow, built from a config.

``python -m bytewax.run flows.recsys:flow`` runs the zero-config default (simulator
in, every output as JSONL under ``./streamrec-out/``);
``python -m bytewax.run "flows.recsys:build('my.toml')"`` runs a configured one.

Shape (DESIGN section 2)::

    inputs (chained) -> parse -> dead-letters
                     -> route by user shard -> user_shard (joiner, ...) -> examples, late-labels
    every stage -> metrics (counters, summary at end of input)
"""

from __future__ import annotations

import gc
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream

from flows.config import Config, InputConfig, load_config
from flows.simulator import SimConfig
from models.rankers import positive_hold_ms
from models.sampling import NegativeSampler
from operators.events import Event, EventParser
from operators.metrics import MetricsLogic, MetricsState
from operators.sinks import JsonlFileSink
from operators.sources import Gate, GatedSource, ReplaySource, SimulatorSource
from operators.trainer import Trainer, TrainerLogic
from operators.user_shard import UserShard, UserShardLogic, route_events
from state.hashing import shard_of
from state.snapshot_store import SnapshotStore

OUTPUTS = ("examples", "late-labels", "recommendations", "snapshots", "dead-letters", "metrics")
"""Every output topic (Kafka topics are prefixed with the app name)."""

Record = dict[str, Any]


def _source(inp: InputConfig, config: Config) -> Any:
    if inp.kind == "simulator":
        sim = SimConfig(n_users=inp.n_users, n_items=inp.n_items, requests_per_s=inp.requests_per_s)
        return SimulatorSource(sim, inp.seed, inp.events or None, inp.batch_size)
    if inp.kind == "replay":
        return ReplaySource(inp.path, inp.batch_size, inp.speed)
    from operators.kafka_io import KafkaSource

    return KafkaSource(
        config.kafka.bootstrap,
        [config.topic(t) for t in inp.topics],
        start=inp.start,
        batch_size=inp.batch_size,
        consumer_config=config.kafka.client,
        tail=inp.tail,
    )


def _inputs(flow: Dataflow, config: Config) -> Stream[list[Any]]:
    """One input step per configured input; each later one waits for the one before."""
    streams = []
    previous: Gate | None = None
    for i, inp in enumerate(config.inputs):
        done = Gate() if i + 1 < len(config.inputs) else None
        source = GatedSource(_source(inp, config), done=done, wait_for=previous)
        streams.append(op.input(f"input_{i}_{inp.kind}", flow, source))
        previous = done
    return streams[0] if len(streams) == 1 else op.merge("inputs", *streams)


def _output(name: str, stream: Stream[list[Record]], config: Config) -> None:
    """Send record batches to the output topic ``name`` (file or Kafka)."""
    step = f"out_{name.replace('-', '_')}"
    if config.output.kind == "files":
        keyed = op.key_on(f"{step}_key", stream, lambda _batch: name)
        op.output(step, keyed, JsonlFileSink(config.output.dir, name))
    else:
        from operators.kafka_io import KafkaSink

        op.output(step, stream, KafkaSink(config.kafka.bootstrap, config.topic(name),
                                          producer_config=config.kafka.client))


def _parse_counts(parsed: tuple[list[Event], list[Record]]) -> tuple[str, dict[str, Any]]:
    events, dead = parsed
    return "parse", {
        "events_by_type": Counter(e.type for e in events),
        "dead_by_reason": Counter(d["reason"] for d in dead),
    }


def _shard_counts(out: dict[str, list[Record]]) -> list[tuple[str, dict[str, Any]]]:
    items = [("outputs", {k: len(v) for k, v in out.items() if k != "counters"})]
    items.extend(("shard", c) for c in out.get("counters", ()))
    return items


GC_THRESHOLD = (50_000, 20, 100)
"""CPython GC thresholds for flow processes: the default (700, 10, 10) spends ~25% of the
joiner path re-scanning long-lived pending state; the flow creates few cycles."""


def build(config: str | Path | dict[str, Any] | Config | None = None) -> Dataflow:
    """Build the main flow from a TOML path, a dict or a Config (env overrides apply).

    Side effect: raises this process's GC thresholds to ``GC_THRESHOLD``.
    """
    config = load_config(config)
    gc.set_threshold(*GC_THRESHOLD)
    flow = Dataflow(config.app)
    raw = _inputs(flow, config)

    parser = EventParser(config.parse.max_bytes, config.parse.max_future_skew_ms)
    parsed = op.map("parse", raw, parser.parse_batch)
    _output("dead-letters", op.filter_map("dead_letters", parsed, lambda p: p[1] or None), config)

    n_shards = config.shards.users
    user_shard_of = lru_cache(maxsize=1 << 18)(lambda uid: shard_of(uid, n_shards))
    routed = op.flat_map("route_users", parsed, lambda p: route_events(p[0], n_shards, user_shard_of))
    sampler = NegativeSampler(config.sampler.negative_rate, config.sampler.seed)

    def user_shard_builder(resume: UserShard | None) -> UserShardLogic:
        return UserShardLogic(resume or UserShard(config.join, sampler))

    shard_out = op.stateful("user_shard", routed, user_shard_builder)
    outputs = op.map("shard_outputs", shard_out, lambda kv: kv[1])
    for name in ("examples", "late-labels"):
        _output(name, op.filter_map(f"take_{name}", outputs, lambda o, n=name: o.get(n)), config)

    examples = op.filter_map("examples_for_training", outputs, lambda o: o.get("examples"))
    trainer_out = _trainer(examples, config)

    counts = op.flat_map("count_outputs", outputs, _shard_counts)
    metrics_in = op.merge("metrics_in", op.map("count_parse", parsed, _parse_counts), counts)
    metrics = op.stateful(
        "metrics",
        op.key_on("metrics_key", metrics_in, lambda _: "metrics"),
        lambda resume: MetricsLogic(resume or MetricsState(config.app)),
    )
    metric_records = op.map("metrics_records", metrics, lambda kv: kv[1])
    if trainer_out is not None:
        metric_records = op.merge("all_metrics", metric_records,
                                  op.filter_map("ranker_metrics", trainer_out, lambda o: o.get("metrics")))
        _output("snapshots", op.filter_map("ranker_snapshots", trainer_out, lambda o: o.get("snapshots")),
                config)
    _output("metrics", metric_records, config)
    return flow


def _trainer(examples: Stream[list[Record]], config: Config) -> Stream[dict[str, list[Record]]] | None:
    """The ranker trainer on one key; None when training runs in its own flow."""
    if not config.ranker.enabled:
        return None
    store = SnapshotStore(config.snapshot_root(), keep=config.snapshots.keep)
    rate = config.sampler.negative_rate

    def builder(resume: Trainer | None) -> TrainerLogic:
        return TrainerLogic(resume or Trainer(config.ranker, rate, store, positive_hold_ms(config.join)))

    keyed = op.key_on("ranker_key", examples, lambda _: "ranker")
    return op.map("ranker_out", op.stateful("ranker", keyed, builder), lambda kv: kv[1])


flow = build()
"""The zero-config flow: simulator in, JSONL outputs under ./streamrec-out/."""
