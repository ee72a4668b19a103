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
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream

from events.logfile import LogFileError, check_log
from events.model import EventParser, Record
from events.simulator import SimConfig
from flows.config import OUTPUTS, Config, ConfigError, InputConfig, load_config  # noqa: F401 - OUTPUTS re-exported
from flows.kafka_wait import wait_for_kafka
from flows.logs import install_excepthook, setup_logging
from flows.memory import memory_bound
from flows.runtime import GC_THRESHOLD, freeze_now  # noqa: F401 - GC_THRESHOLD re-exported
from flows.runtime import apply as apply_runtime
from models.rankers import positive_hold_ms
from operators.example_codec import pack_example
from operators.index_builder import IndexBuilderLogic, IndexStage
from operators.item_shard import ItemShard, ItemShardLogic, item_shard_key, route_updates
from operators.item_updates import ItemUpdate
from operators.metrics import MetricsLogic, MetricsState
from operators.placement import last_key
from operators.pool_trainer import PoolTrainer
from operators.replay_shards import ShardBatch, ShardedReplaySource, parse_shard_batch
from operators.sinks import JsonlFileSink
from operators.snapshot_views import SnapshotViews
from operators.sources import Gate, GatedSource, OnceSource, SimulatorSource
from operators.status import StatusLog
from operators.trainer import Trainer, TrainerLogic
from operators.user_shard import UserShard, UserShardLogic, route_events
from state.hashing import ShardOf
from state.sampling import NegativeSampler
from state.snapshot_store import SnapshotStore

log = logging.getLogger(__name__)

RANKER_KEY, POOL_KEY, INDEX_KEY, METRICS_KEY = (last_key(n) for n in ("ranker", "pool", "index",
                                                                      "metrics"))
"""Keys of the single-key stages: on the last worker (``operators.placement.last_key``),
away from worker 0, which reads the one-partition inputs and writes the output files."""


def _source(inp: InputConfig, config: Config) -> Any:
    if inp.kind == "simulator":
        sim = SimConfig(n_users=inp.n_users, n_items=inp.n_items, requests_per_s=inp.requests_per_s)
        return SimulatorSource(sim, inp.seed, inp.events or None, inp.batch_size)
    if inp.kind == "replay":
        return ShardedReplaySource(inp.path, config.shards.users,
                                   ShardOf(config.shards.users, max_cached=config.shards.routing_cache),
                                   inp.batch_size, inp.speed, config.parse.max_bytes)
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
    if name in config.output.skip:
        return
    keyed = op.key_on(f"{step}_key", stream, lambda _batch: name)
    if config.output.kind == "files":
        op.output(step, keyed, JsonlFileSink(config.output.dir, name))
    else:
        from operators.kafka_sink import KafkaSink

        op.output(step, keyed, KafkaSink(config.kafka.bootstrap, config.topic(name),
                                         producer_config=config.kafka.client_settings("producer")))


def _take(name: str, stream: Stream[dict[str, list[Any]]]) -> Stream[list[Any]]:
    """The ``name`` list of every stage-output dict that has one."""
    return op.filter_map(f"take_{name.replace('-', '_')}", stream, lambda out: out.get(name))


_TYPE_OF = operator.attrgetter("type")


def _parse_counts(parsed: tuple[Any, ...]) -> tuple[str, dict[str, Any]]:
    """Metrics item of one parsed batch: events by type, dead letters by reason, max event
    time, and the Kafka read positions the batch carries (consumer lag)."""
    events, dead = parsed[0], parsed[1]
    by_type = Counter(map(_TYPE_OF, events))
    if parsed[5]:  # a sharded replay's copies of item events (partition 0 counts them)
        by_type["item"] -= parsed[5]
    return "parse", {
        "events_by_type": +by_type,
        "dead_by_reason": Counter(d["reason"] for d in dead),
        "max_ts": max((e.ts for e in events), default=None),
        "offsets": parsed[3],
    }


def _error_counts(dead: list[Record]) -> tuple[str, Counter[str]]:
    """Metrics item of a batch of processing-error dead letters: count per stage kind."""
    return "errors", Counter(d["stage"].split(" ", 1)[0] for d in dead)


def _shard_counts(out: dict[str, list[Any]]) -> list[tuple[str, Any]]:
    """Metrics items of one user-shard output: outputs, examples by label, serving
    latencies, the shard's counters."""
    items: list[tuple[str, Any]] = [
        ("outputs", {k: len(out[k]) for k in ("examples", "late-labels", "recommendations")
                     if k in out})]
    if "examples" in out:
        by_label: dict[str, list[float]] = {}
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
    return items


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
    # Live input: versions are made durable and visible off the worker thread (their
    # fsyncs stalled requests); replays write them in place, so a replay's reads by
    # event time meet the same versions at the same batch.
    store.background = any(i.kind == "kafka" for i in config.inputs)
    raw = _inputs(flow, config)

    parser = EventParser(config.parse.max_bytes, config.parse.max_future_skew_ms,
                         min_ts_ms=config.parse.min_ts_ms)
    n_users, n_items = config.shards.users, config.shards.items
    user_shard_of = ShardOf(n_users, max_cached=config.shards.routing_cache)

    def parse(batch: list[Any]) -> tuple[Any, ...]:
        """(events, dead letters, ingest wall ns, Kafka offsets, user shard of a sharded
        replay batch, item events in it that are copies, not counted)."""
        if isinstance(batch, ShardBatch):
            events, dead, copies = parse_shard_batch(parser, batch, user_shard_of)
            return events, dead, time.time_ns(), None, batch.shard, copies
        return (*parser.parse_batch(batch), time.time_ns(), getattr(batch, "offsets", None),
                None, 0)

    parsed = op.map("parse", raw, parse)
    dead_letters = [op.filter_map("dead_letters", parsed, lambda p: p[1] or None)]

    item_shard_of = ShardOf(n_items, item_shard_key,  # kept in user-shard state: picklable
                            config.shards.routing_cache)
    routed = op.flat_map("route_users", parsed,
                         lambda p: route_events(p[0], n_users, user_shard_of, p[2], p[4]))
    sampler = NegativeSampler(config.sampler.negative_rate, config.sampler.seed)
    item_keys = [item_shard_key(i) for i in range(n_items)]

    # Replays and the simulator read snapshots by event time at every micro-batch (a
    # replay gives the same answers at any speed); live Kafka input polls by wall time.
    poll_ms = (config.serving.poll_ms if any(i.kind == "kafka" for i in config.inputs) else 0)

    wire = not config.ranker.enabled
    """No stage reads the full example records (the in-flow trainer is the one that does):
    the user shards write them in their wire form directly."""

    def user_shard_builder(resume: UserShard | None) -> UserShardLogic:
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
        return UserShardLogic(resume)

    outputs = op.map("user_shard_out", op.stateful("user_shard", routed, user_shard_builder),
                     lambda kv: kv[1])
    # Bytewax runs a worker's steps in the order they were added, so the answers are
    # handed to their sink first, before the batch's examples are packed and written and
    # before the trainer, the item side and the metrics run.
    for name in ("recommendations", "late-labels"):
        _output(name, _take(name, outputs), config)
    examples = _take("examples", outputs)
    if wire:  # already in their wire form
        _output("examples", examples, config)
    else:
        _output("examples", op.map("pack_examples", examples,
                                   lambda batch: [pack_example(e) for e in batch]), config)

    snapshots = []
    failed = [_take("dead-letters", outputs)]  # processing errors of the stateful stages
    if config.items.enabled:
        updates = op.filter_map("take_item_updates", outputs,
                                lambda out: (out["batch"], out["item-updates"])
                                if "item-updates" in out else None)
        item_snapshots, item_dead = _item_side(updates, config, store, item_shard_of)
        snapshots.append(item_snapshots)
        failed.append(item_dead)
    ranker_out = _trainer(examples, config, store)
    if ranker_out is not None:
        failed.append(op.filter_map("ranker_dead_letters", ranker_out,
                                    lambda o: o.get("dead-letters")))
    pool_out = _pool_trainer(outputs, config, store)
    if pool_out is not None:
        failed.append(op.filter_map("pool_dead_letters", pool_out,
                                    lambda o: o.get("dead-letters")))
        snapshots.append(op.filter_map("pool_snapshots", pool_out, lambda o: o.get("snapshots")))
    all_failed = op.merge("processing_errors", *failed)
    dead_letters.append(all_failed)
    _output("dead-letters", op.merge("all_dead_letters", *dead_letters), config)
    metric_streams = [
        op.input("metrics_start", flow, OnceSource(("start", None))),  # a summary even for empty input
        op.map("count_parse", parsed, _parse_counts),
        op.flat_map("count_outputs", outputs, _shard_counts),
        op.map("count_errors", all_failed, _error_counts),
    ]
    if ranker_out is not None:
        snapshots.append(op.filter_map("ranker_snapshots", ranker_out, lambda o: o.get("snapshots")))
    if snapshots:
        all_snapshots = op.merge("all_snapshots", *snapshots)
        _output("snapshots", all_snapshots, config)
        metric_streams.append(op.map("count_snapshots", all_snapshots, lambda m: ("snapshots", m)))
    metrics = op.stateful(
        "metrics",
        op.key_on("metrics_key", op.merge("metrics_in", *metric_streams), lambda _: METRICS_KEY),
        lambda resume: MetricsLogic(
            resume or MetricsState(config.app, config.metrics.latency_buckets_ms), config.metrics,
            StatusLog(config.log.status_interval_s, progress),
            on_start=lambda: log_memory_bound(config)),
    )
    metric_records = [op.map("metrics_records", metrics, lambda kv: kv[1])]
    if ranker_out is not None:
        metric_records.append(op.filter_map("ranker_metrics", ranker_out, lambda o: o.get("metrics")))
    if pool_out is not None:
        metric_records.append(op.filter_map("pool_metrics", pool_out, lambda o: o.get("metrics")))
    _output("metrics", op.merge("all_metrics", *metric_records), config)
    return flow


def _item_side(updates: Stream[tuple[int, list[ItemUpdate]]], config: Config,
               store: SnapshotStore, item_shard_of: Any
               ) -> tuple[Stream[list[Record]], Stream[list[Record]]]:
    """Item shards and the index builder; returns the streams of their snapshot manifests
    and of the item shards' processing-error dead letters. ``updates``: (source
    micro-batch id, item updates) from each user shard."""

    def route(tagged: tuple[int, list[ItemUpdate]]
              ) -> list[tuple[str, tuple[str, list[ItemUpdate], int]]]:
        batch_id, batch = tagged
        return [(key, (key, part, batch_id))
                for key, part in route_updates(batch, item_shard_of).items()]

    def item_builder(resume: ItemShard | None) -> ItemShardLogic:
        return ItemShardLogic(resume or ItemShard(config.items, store, config.features,
                                                  hot_profiles=config.shards.hot_profiles))

    item_out = op.map("item_shard_out",
                      op.stateful("item_shard", op.flat_map("route_items", updates, route),
                                  item_builder),
                      lambda kv: kv[1])
    dim = config.items.mf_config().dim

    # Changed items between refreshes: at most what the item tables hold, twice over
    # (items leaving and entering) before an early refresh.
    max_pending = 2 * config.shards.items * config.items.mf_config().max_items

    def index_builder(resume: IndexStage | None) -> IndexBuilderLogic:
        return IndexBuilderLogic(resume or IndexStage(config.index, dim, store, max_pending))

    changes = op.flat_map("index_changes", item_out, lambda o: o.get("index", []))
    index_out = op.map("index_out",
                       op.stateful("index", op.key_on("index_key", changes, lambda _: INDEX_KEY),
                                   index_builder),
                       lambda kv: kv[1])
    return (op.merge("item_snapshots", _take("snapshots", item_out), index_out),
            op.filter_map("item_dead_letters", item_out, lambda o: o.get("dead-letters")))


def _trainer(examples: Stream[list[Record]], config: Config,
             store: SnapshotStore) -> Stream[dict[str, list[Record]]] | None:
    """The ranker trainer on one key; None when training runs in its own flow."""
    if not config.ranker.enabled:
        return None
    rate = config.sampler.negative_rate

    def builder(resume: Trainer | None) -> TrainerLogic:
        return TrainerLogic(resume or Trainer(config.ranker, rate, store, positive_hold_ms(config.join)))

    keyed = op.key_on("ranker_key", examples, lambda _: RANKER_KEY)
    return op.map("ranker_out", op.stateful("ranker", keyed, builder), lambda kv: kv[1])


def _pool_trainer(outputs: Stream[dict[str, list[Any]]], config: Config,
                  store: SnapshotStore) -> Stream[dict[str, list[Record]]] | None:
    """The central pool ranker trainer on one key, fed the user shards' ``pool-pairs``;
    None when serving or the pool ranker is off, or it learns per shard."""
    pool = config.serving.pool
    if not (config.serving.enabled and pool.enabled and pool.training == "central"):
        return None

    def builder(resume: PoolTrainer | None) -> TrainerLogic:
        return TrainerLogic(resume or PoolTrainer(pool, store))

    keyed = op.key_on("pool_key", _take("pool-pairs", outputs), lambda _: POOL_KEY)
    return op.map("pool_out", op.stateful("pool_trainer", keyed, builder), lambda kv: kv[1])


flow = build()
"""The zero-config flow: simulator in, JSONL outputs under ./streamrec-out/."""
