"""The main streamrec dataflow, built from a config.

``python -m bytewax.run flows.recsys:flow`` runs the zero-config default (simulator
in, every output as JSONL under ``./streamrec-out/``);
``python -m bytewax.run "flows.recsys:build('my.toml')"`` runs a configured one.

Shape (docs/architecture.md has the details)::

    inputs (chained) -> parse -> dead-letters
      -> route by user shard -> user_shard [u000..]: joiner, profiles, history, MF user
         vectors, serving  -> examples, late-labels, recommendations
           examples -> ranker [one key]: score, learn, sync serving copy -> snapshots
           pool pairs -> pool_trainer [one key]: the central pool ranker -> snapshots
           item updates -> route by item shard -> item_shard [i000..]: MF item vectors,
              co-visitation, popularity -> item tables -> snapshots
              changed vectors -> index [one key]: HNSW refresh -> snapshots
      every stage -> metrics (counters, summary at end of input)

Serving reads the snapshots back from the store (nearline), so the graph stays a DAG.
"""

from __future__ import annotations

import logging
import operator
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.operators import StatefulLogic

from events.logfile import LogFileError, check_log
from events.model import EventParser, Record
from events.simulator import SimConfig
from flows.config import OUTPUTS, Config, ConfigError, InputConfig, load_config  # noqa: F401 - OUTPUTS re-exported
from flows.kafka_wait import wait_for_kafka
from flows.logs import install_excepthook, setup_logging
from flows.memory import memory_bound
from flows.runtime import GC_THRESHOLD, freeze_now, note_worker  # noqa: F401 - GC_THRESHOLD re-exported
from flows.runtime import apply as apply_runtime
from models.rankers import positive_hold_ms
from operators.crossing import PickledOnce, Unwrapped
from operators.epoch_settle import SettledAtEpochEnd
from operators.example_codec import pack_example
from operators.index_builder import IndexBuilderLogic, IndexStage
from operators.item_shard import ItemShard, ItemShardLogic, item_shard_key, route_updates
from operators.item_updates import ItemUpdate
from operators.metrics import MetricsLogic, MetricsState
from operators.placement import last_key
from operators.pool_trainer import PoolTrainer
from operators.replay_shards import (
    ParsedShardBatch,
    ShardBatch,
    ShardedReplaySource,
    parse_shard_batch,
)
from operators.sinks import JsonlFileSink, NamedSinks
from operators.snapshot_views import SnapshotViews
from operators.sources import Gate, GatedSource, OnceSource, SimulatorSource
from operators.status import StatusLog
from operators.trainer import Trainer, TrainerLogic
from operators.user_shard import UserShard, UserShardLogic, route_events
from state.hashing import ShardOf
from state.sampling import NegativeSampler
from state.snapshot_store import Manifest, SnapshotStore

log = logging.getLogger(__name__)

W = TypeVar("W")
S = TypeVar("S")

RANKER_KEY, POOL_KEY, INDEX_KEY, METRICS_KEY = (last_key(n) for n in ("ranker", "pool", "index",
                                                                      "metrics"))
"""Keys of the single-key stages: on the last worker (``operators.placement.last_key``),
away from worker 0, which reads the one-partition inputs and writes the recommendations."""


def _source(inp: InputConfig, config: Config, parser: EventParser | None = None) -> Any:
    if inp.kind == "simulator":
        sim = SimConfig(n_users=inp.n_users, n_items=inp.n_items, requests_per_s=inp.requests_per_s)
        return SimulatorSource(sim, inp.seed, inp.events or None, inp.batch_size)
    if inp.kind == "replay":
        return ShardedReplaySource(inp.path, config.shards.users,
                                   ShardOf(config.shards.users, max_cached=config.shards.routing_cache),
                                   inp.batch_size, inp.speed, config.parse.max_bytes, parser)
    from operators.kafka_io import KafkaSource

    return KafkaSource(
        config.kafka.bootstrap,
        [config.topic(t) for t in inp.topics],
        start=inp.start,
        batch_size=inp.batch_size,
        consumer_config=config.kafka.client_settings("consumer"),
        tail=inp.tail,
        discovery_timeout_s=config.kafka.startup_timeout_s,
        on_lost_offset=inp.offset_out_of_range,
        on_caught_up=((lambda part: freeze_now(f"{part} read to the end of its log"))
                      if config.runtime.gc_freeze_when_caught_up else None),
    )


def log_memory_bound(config: Config) -> float:
    """Log the resident memory (MB) the config's capacities allow above the process's
    memory at start (``flows.memory.memory_bound``), with a warning when it exceeds the
    machine's physical memory; returns it. Called when the metrics stage starts (once per
    run, in the process that runs it), not when the flow is built."""
    bound = memory_bound(config)
    total_mb = bound["total_mb"]
    parts = ", ".join(f"{k} {v:,.0f}" for k, v in bound["parts_mb"].items())
    log.info("memory bound: %s MB above the process at start (%s MB); see docs/operations.md, "
             "Bounded memory", f"{total_mb:,.0f}", parts,
             extra={"memory_bound_mb": round(total_mb, 1)})
    try:
        physical_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError):
        return total_mb
    if total_mb > physical_mb:
        log.warning("memory bound %s MB exceeds this machine's %s MB: lower the capacities "
                    "(shards.max_users, items.max_items, items.covis.max_items, ...)",
                    f"{total_mb:,.0f}", f"{physical_mb:,.0f}")
    return total_mb


def check_inputs(config: Config) -> None:
    """Fail at start (``ConfigError`` naming the key) on a replay log that cannot be read:
    missing, a directory, or a ``.gz`` that is not gzip."""
    for i, inp in enumerate(config.inputs):
        if inp.kind == "replay":
            try:
                check_log(inp.path)
            except LogFileError as err:
                raise ConfigError(f"inputs[{i}].path: {err}") from None


def _inputs(flow: Dataflow, config: Config, parser: EventParser | None = None
            ) -> Stream[list[Any]]:
    """One input step per configured input; each later one waits for the one before
    (``parser``: the flow's, for replays that parse in their reader)."""
    streams = []
    previous: Gate | None = None
    for i, inp in enumerate(config.inputs):
        done = Gate() if i + 1 < len(config.inputs) else None
        source = GatedSource(_source(inp, config, parser), done=done, wait_for=previous)
        streams.append(op.input(f"input_{i}_{inp.kind}", flow, source))
        previous = done
    return streams[0] if len(streams) == 1 else op.merge("inputs", *streams)


def _output(name: str, stream: Stream[list[Record]], config: Config) -> None:
    """Send record batches to the output topic ``name`` (file or Kafka)."""
    step = f"out_{name.replace('-', '_')}"
    if name in config.output.skip:
        return
    keyed = op.key_on(f"{step}_key", stream, lambda _batch: name)
    if config.output.kind == "files":
        op.output(step, keyed, JsonlFileSink(config.output.dir, name))
    else:
        from operators.kafka_sink import KafkaSink

        op.output(step, keyed, KafkaSink(config.kafka.bootstrap, config.topic(name),
                                         producer_config=config.kafka.client_settings("producer")))


_TS_OF = operator.attrgetter("ts")


def _parse_counts(parsed: tuple[Any, ...]) -> tuple[str, dict[str, Any]]:
    """Metrics item of one parsed batch: events by type, dead letters by reason, max event
    time, and the Kafka read positions the batch carries (consumer lag)."""
    events, dead = parsed[0], parsed[1]
    # counted by class (type() in C), then named: the same counts in the same key order,
    # without an attribute lookup per event
    by_type = Counter({cls.type: n for cls, n in Counter(map(type, events)).items()})
    if parsed[5]:  # a sharded replay's copies of item events (partition 0 counts them)
        by_type["item"] -= parsed[5]
    return "parse", {
        "events_by_type": +by_type,
        "dead_by_reason": Counter(d["reason"] for d in dead),
        "max_ts": (parsed[6] if len(parsed) > 6 and parsed[6] is not None
                   else max(map(_TS_OF, events), default=None)),
        "offsets": parsed[3],
    }


def _error_counts(dead: list[Record]) -> tuple[str, Counter[str]]:
    """Metrics item of a batch of processing-error dead letters: count per stage kind."""
    return "errors", Counter(d["stage"].split(" ", 1)[0] for d in dead)


def _shard_counts(kv: tuple[str, dict[str, list[Any]]]) -> tuple[str, tuple[str, Any]]:
    """The metrics item (keyed for the metrics stage) of one user-shard output: its
    outputs, examples by label, serving latencies, the shard's counters and processing
    errors as one ``("items", [...])`` (``MetricsState.add`` folds them in order)."""
    out = kv[1]
    items: list[tuple[str, Any]] = [
        ("outputs", {k: len(out[k]) for k in ("examples", "late-labels", "recommendations")
                     if k in out})]
    if "examples" in out:
        by_label: Any = out.get("example-counts")  # the joiner's, in emission order
        if by_label is None:
            by_label = {}
            for ex in out["examples"]:
                key = str(ex["label"])
                acc = by_label.get(key)
                if acc is None:
                    acc = by_label[key] = [0, 0.0]
                acc[0] += 1
                acc[1] += ex.get("weight", 1.0)
        items.append(("examples", by_label))
    if "recommendations" in out:
        items.append(("latency", [r["latency_ms"] for r in out["recommendations"]]))
    if "serving-cost" in out:
        items.append(("serving_cost", out["serving-cost"]))
    items.extend(("shard", c) for c in out.get("counters", ()))
    if out.get("dead-letters"):
        items.append(_error_counts(out["dead-letters"]))
    return METRICS_KEY, ("items", items)


def build(config: str | Path | dict[str, Any] | Config | None = None,
          progress: Callable[[int], None] | None = None) -> Dataflow:
    """Build the main flow from a TOML path, a dict or a Config (env overrides apply);
    ``progress(events_in)`` is called from the metrics stage about twice a second
    (``streamrec eval``'s progress bar).

    Side effects: installs the configured log handler (``log``), waits for the Kafka
    broker when the config uses Kafka (``kafka.startup_timeout_s``; ``BrokerUnavailable``
    after it), makes uncaught config and broker errors print one line
    (``flows.logs.install_excepthook``), sets this process's GC thresholds and GIL
    switch interval (``runtime``; Kafka inputs freeze the heap once caught up:
    ``flows.runtime``) and, with ``metrics.port``, starts the metrics endpoint.
    """
    install_excepthook()
    config = load_config(config)
    setup_logging(config.log)
    check_inputs(config)
    wait_for_kafka(config, f"the {config.app} flow's topics")
    apply_runtime(config.runtime)
    if config.metrics.port:  # /healthz from the start, before the metrics stage has items
        from operators import health
        from operators.prometheus import MetricsServer

        health.restart()
        MetricsServer.serve(config.metrics)
    flow = Dataflow(config.app)
    store = config.snapshot_store()
    # Versions are made durable and visible off the worker thread (their fsyncs stalled
    # requests, and a replay's batches); a reader in the process waits for the versions
    # of its kind still settling, so a replay's reads by event time meet the same
    # versions at the same batch as if they were written in place, and in a replay each
    # writing stage waits for them when its epoch ends (``_publishing``), so the readers
    # of a cluster's other processes meet them at the next epoch too.
    store.background = True
    parser = EventParser(config.parse.max_bytes, config.parse.max_future_skew_ms,
                         min_ts_ms=config.parse.min_ts_ms)
    raw = _inputs(flow, config, parser)  # a one-process replay parses in its reader
    n_users, n_items = config.shards.users, config.shards.items
    user_shard_of = ShardOf(n_users, max_cached=config.shards.routing_cache)

    def parse(batch: list[Any]) -> tuple[Any, ...]:
        """(events, dead letters, ingest wall ns, Kafka offsets, user shard of a sharded
        replay batch, item events in it that are copies, not counted[, the events' largest
        ts when the reader took it])."""
        if isinstance(batch, ParsedShardBatch):  # parsed in the replay's reader
            return (batch.events, batch.dead, time.time_ns(), None, batch.shard, batch.copies,
                    batch.max_ts)
        if isinstance(batch, ShardBatch):
            events, dead, copies = parse_shard_batch(parser, batch, user_shard_of)
            return events, dead, time.time_ns(), None, batch.shard, copies
        return (*parser.parse_batch(batch), time.time_ns(), getattr(batch, "offsets", None),
                None, 0)

    parsed = op.map("parse", raw, parse)

    item_shard_of = ShardOf(n_items, item_shard_key,  # kept in user-shard state: picklable
                            config.shards.routing_cache)
    routed = op.flat_map("route_users", parsed,
                         lambda p: route_events(p[0], n_users, user_shard_of, p[2], p[4]))
    sampler = NegativeSampler(config.sampler.negative_rate, config.sampler.seed)
    item_keys = [item_shard_key(i) for i in range(n_items)]

    # Replays and the simulator read snapshots by event time at every micro-batch (a
    # replay gives the same answers at any speed); live Kafka input polls by wall time.
    poll_ms = config.serving.poll_ms if _live(config) else 0

    wire = not config.ranker.enabled
    """No stage reads the full example records (the in-flow trainer is the one that does):
    the user shards write them in their wire form directly."""

    def user_shard_builder(resume: UserShard | None) -> UserShardLogic:
        note_worker()  # a cluster process's main thread parks (flows.runtime)
        if resume is None:
            views = SnapshotViews(store, item_keys, poll_ms)
            items_on = config.items.enabled
            resume = UserShard(
                config.join, sampler, features=config.features,
                mf=config.items.mf_config() if items_on else None,
                covis=config.items.covis_config() if items_on else None,
                serving=config.serving, views=views,
                item_shard_of=item_shard_of, max_users=config.shards.max_users,
                max_items=config.shards.max_items, hot_profiles=config.shards.hot_profiles,
                covis_any=items_on and config.items.covis_any)
        resume.write_wire(wire)  # this run's config decides, resumed state included
        resume.item_updates = config.items.enabled  # without an item side nothing reads them
        return UserShardLogic(resume)

    shard_out = op.stateful("user_shard", routed, user_shard_builder)
    # Bytewax runs a worker's steps in the order they were added, so the answers are
    # handed to their sink first, before the trainer, the item side, the metrics and the
    # other outputs run.
    skip = frozenset(config.output.skip)
    if "recommendations" not in skip:
        answers = op.filter_map(  # pickled once if they cross to the file's process
            "recommendations", shard_out,
            lambda kv: ("recommendations", PickledOnce(kv[1]["recommendations"]))
            if "recommendations" in kv[1] else None)
        op.output("out_recommendations", answers, _sinks(("recommendations",), config))
    pack = None if wire else pack_example  # wire: the shards wrote them in their wire form
    written = tuple(n for n in ("late-labels", "examples", "dead-letters") if n not in skip)

    def shard_files(kv: tuple[str, dict[str, list[Any]]]) -> list[tuple[str, list[Any]]]:
        """The user shard's records for the output files (examples in their wire form),
        each batch pickled once if it crosses to the process writing its file."""
        out = kv[1]
        items = [(n, out[n]) for n in written if n in out]
        if pack is not None and "examples" in out and "examples" in written:
            items = [(n, [pack(e) for e in b] if n == "examples" else b) for n, b in items]
        return [(n, PickledOnce(b)) for n, b in items]

    files = [op.flat_map("user_shard_files", shard_out, shard_files),
             op.filter_map("parse_dead_letters", parsed,
                           lambda p: ("dead-letters", p[1]) if p[1] else None)]
    metric_streams = [
        op.input("metrics_start", flow, OnceSource((METRICS_KEY, ("start", None)))),  # a summary even for empty input
        op.map("count_parse", parsed, lambda p: (METRICS_KEY, _parse_counts(p))),
        op.map("count_outputs", shard_out, _shard_counts),
    ]
    stage_files = []  # (output name, records) of the stages after the user shards
    if config.items.enabled:
        def route(kv: tuple[str, dict[str, Any]]
                  ) -> list[tuple[str, tuple[str, list[ItemUpdate], int]]]:
            out = kv[1]
            if "item-updates" not in out:
                return []
            batch_id = out["batch"]
            return [(key, PickledOnce((key, part, batch_id)))
                    for key, part in route_updates(out["item-updates"], item_shard_of).items()]

        stage_files.extend(_item_side(op.flat_map("route_items", shard_out, route), config, store))
    ranker_out = _trainer(shard_out, config, store)
    if ranker_out is not None:
        stage_files.append(op.flat_map("ranker_files", ranker_out, _stage_files))
    pool_out = _pool_trainer(shard_out, config, store)
    if pool_out is not None:
        stage_files.append(op.flat_map("pool_files", pool_out, _stage_files))
    if stage_files:
        staged = op.merge("stage_files", *stage_files)
        metric_streams.append(op.flat_map("count_stage_files", staged, _stage_counts))
        files.append(staged)
    metrics = op.stateful(
        "metrics", op.merge("metrics_in", *metric_streams),
        lambda resume: MetricsLogic(
            resume or MetricsState(config.app, config.metrics.latency_buckets_ms), config.metrics,
            StatusLog(config.log.status_interval_s, progress),
            on_start=lambda: log_memory_bound(config)),
    )
    files.append(op.map("metrics_records", metrics, lambda kv: ("metrics", kv[1])))
    names = tuple(n for n in OUTPUTS if n not in skip and n != "recommendations")
    if names:
        every = op.merge("all_files", *files)
        if skip:  # the stages' records of skipped outputs were counted; not written
            every = op.filter("skip_outputs", every, lambda nb: nb[0] not in skip)
        op.output("out_files", every, _sinks(names, config))
    return flow


def _sinks(names: tuple[str, ...], config: Config) -> NamedSinks:
    """One sink for the outputs ``names`` (files or Kafka topics); items ``(name, records)``."""
    if config.output.kind == "files":
        return NamedSinks({n: JsonlFileSink(config.output.dir, n) for n in names})
    from operators.kafka_sink import KafkaSink

    return NamedSinks({n: KafkaSink(config.kafka.bootstrap, config.topic(n),
                                    producer_config=config.kafka.client_settings("producer"))
                       for n in names})


STAGE_FILES = ("snapshots", "dead-letters", "metrics")
"""Outputs of the stages after the user shards (item shards, index, trainers)."""


def _stage_files(kv: tuple[str, dict[str, list[Record]]]) -> list[tuple[str, list[Record]]]:
    """(output name, records) of a stage's output dict, for the output files."""
    out = kv[1]
    return [(n, out[n]) for n in STAGE_FILES if out.get(n)]


def _stage_counts(named: tuple[str, list[Record]]) -> list[tuple[str, tuple[str, Any]]]:
    """Metrics items of the stages' output records: snapshot manifests and processing
    errors (their own metrics records are not counted)."""
    name, records = named
    if name == "snapshots":
        return [(METRICS_KEY, ("snapshots", records))]
    if name == "dead-letters":
        return [(METRICS_KEY, _error_counts(records))]
    return []


def _publishing(logic: StatefulLogic[Any, W, S], store: SnapshotStore, config: Config
                ) -> Unwrapped[W, S]:
    """The logic of a stage that publishes snapshots through ``store``, fed ``PickledOnce``
    items. Replays and the simulator wait for its versions still settling when each epoch
    ends (``SettledAtEpochEnd``: a cluster's other processes meet them at the next
    micro-batch); live Kafka input does not (serving polls by wall time there, and the
    worker would hold requests while the fsyncs finish)."""
    return Unwrapped(logic) if _live(config) else SettledAtEpochEnd(logic, store)


def _live(config: Config) -> bool:
    """Whether the flow reads live Kafka input (wall-clock polls and publication), not a
    replay or the simulator (event-time ones)."""
    return any(i.kind == "kafka" for i in config.inputs)


def _item_side(routed: Stream[tuple[str, tuple[str, list[ItemUpdate], int]]], config: Config,
               store: SnapshotStore) -> list[Stream[tuple[str, list[Record]]]]:
    """Item shards and the index builder, fed ``(item shard key, PickledOnce((key,
    updates, source micro-batch id)))``; returns the streams of their ``(output name,
    records)`` (snapshot manifests, the item shards' processing-error dead letters)."""

    def item_builder(resume: ItemShard | None) -> Unwrapped[dict[str, list[Any]], ItemShard]:
        note_worker()
        shard = resume or ItemShard(config.items, store, config.features,
                                    hot_profiles=config.shards.hot_profiles)
        shard.one_table_per_batch = _live(config)  # how the input runs now, not state
        return _publishing(ItemShardLogic(shard), shard.store, config)

    item_out = op.stateful("item_shard", routed, item_builder)
    dim = config.items.mf_config().dim

    # Changed items between refreshes: at most what the item tables hold, twice over
    # (items leaving and entering) before an early refresh.
    max_pending = 2 * config.shards.items * config.items.mf_config().max_items

    def index_builder(resume: IndexStage | None) -> Unwrapped[list[Manifest], IndexStage]:
        stage = resume or IndexStage(config.index, dim, store, max_pending)
        return _publishing(IndexBuilderLogic(stage), stage.store, config)

    changes = op.flat_map("index_changes", item_out,
                          lambda kv: [(INDEX_KEY, c) for c in kv[1].get("index", ())])
    index_out = op.stateful("index", changes, index_builder)
    return [op.flat_map("item_shard_files", item_out, _stage_files),
            op.map("index_files", index_out, lambda kv: ("snapshots", kv[1]))]


def _trainer(shard_out: Stream[tuple[str, dict[str, list[Any]]]], config: Config,
             store: SnapshotStore) -> Stream[tuple[str, dict[str, list[Record]]]] | None:
    """The ranker trainer on one key, fed the user shards' examples; None when training
    runs in its own flow."""
    if not config.ranker.enabled:
        return None
    rate = config.sampler.negative_rate

    def builder(resume: Trainer | None) -> Unwrapped[Any, Trainer]:
        trainer = resume or Trainer(config.ranker, rate, store, positive_hold_ms(config.join))
        return _publishing(TrainerLogic(trainer), trainer.store, config)

    examples = op.filter_map("ranker_examples", shard_out,
                             lambda kv: (RANKER_KEY, PickledOnce(kv[1]["examples"]))
                             if kv[1].get("examples") else None)
    return op.stateful("ranker", examples, builder)


def _pool_trainer(shard_out: Stream[tuple[str, dict[str, list[Any]]]], config: Config,
                  store: SnapshotStore) -> Stream[tuple[str, dict[str, list[Record]]]] | None:
    """The central pool ranker trainer on one key, fed the user shards' ``pool-pairs``;
    None when serving or the pool ranker is off, or it learns per shard."""
    pool = config.serving.pool
    if not (config.serving.enabled and pool.enabled and pool.training == "central"):
        return None

    def builder(resume: PoolTrainer | None) -> Unwrapped[Any, PoolTrainer]:
        trainer = resume or PoolTrainer(pool, store)
        return _publishing(TrainerLogic(trainer), trainer.store, config)

    pairs = op.filter_map("pool_pairs", shard_out,
                          lambda kv: (POOL_KEY, PickledOnce(kv[1]["pool-pairs"]))
                          if kv[1].get("pool-pairs") else None)
    return op.stateful("pool_trainer", pairs, builder)



flow = build()
"""The zero-config flow: simulator in, JSONL outputs under ./streamrec-out/."""
