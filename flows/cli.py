"""The ``streamrec`` console script: run, replay, evaluate and inspect the flow.

Subcommands: run, simulate, import {movielens,obd}, replay, tap, broker, loop, eval,
config-reference. Long-running commands report progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from events.logfile import LogFileError, LongLine, check_log, count_lines, iter_lines, open_log
from flows.config import (
    ConfigError,
    InputConfig,
    KafkaConfig,
    generated_docs,
    load_config,
    reference_markdown,
)
from flows.kafka_wait import wait_for_broker
from flows.logs import LogConfig, StreamrecError, setup_logging
from flows.progress import Progress

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def _kafka(args: argparse.Namespace) -> tuple[str, KafkaConfig]:
    """Bootstrap (``--bootstrap``, else the config's) and the Kafka config (security)."""
    kafka = load_config(getattr(args, "config", None)).kafka
    return getattr(args, "bootstrap", None) or kafka.bootstrap, kafka


def cmd_run(args: argparse.Namespace) -> int:
    """The main flow, as ``python -m bytewax.run flows.recsys:build(CONFIG)`` would run it,
    with a Bytewax epoch of ``--epoch-ms`` (that CLI only takes whole seconds)."""
    from datetime import timedelta

    from bytewax.recovery import RecoveryConfig
    from bytewax.run import cli_main

    from flows.recsys import build

    config = load_config(args.config)
    if args.process_id is not None and not args.addresses:
        raise ConfigError("run: -i/--process-id needs -a/--addresses")
    if args.epoch_ms < 0:
        raise ConfigError("run: --epoch-ms must be >= 0")
    recovery = None
    if args.recovery_directory is not None:
        recovery = RecoveryConfig(args.recovery_directory, timedelta(seconds=args.backup_s))
    cli_main(build(config), workers_per_process=args.workers, process_id=args.process_id,
             addresses=args.addresses.split(";") if args.addresses else None,
             epoch_interval=timedelta(milliseconds=args.epoch_ms), recovery_config=recovery)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from events.simulator import SimConfig, write_log

    with Progress("simulate", args.n, quiet=args.quiet) as progress:
        sim = SimConfig(n_users=args.users, n_items=args.items,
                        requests_per_s=args.requests_per_s)
        n = write_log(args.output, args.n, args.seed, sim, on_batch=progress.add)
    print(f"wrote {n} events to {args.output}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from flows.importers import movielens_events, obd_events, write_events

    if args.dataset == "movielens":
        events = movielens_events(args.path, with_requests=args.with_requests)
    else:
        events = obd_events(args.path)
    with Progress(f"import {args.dataset}", len(events), quiet=args.quiet) as progress:
        n = write_events(events, args.output, on_batch=progress.add)
    print(f"wrote {n} events to {args.output}")
    return 0


def _log_lines(path: str, max_bytes: int | None = None) -> Iterator[bytes | LongLine]:
    """The non-empty lines of a log (without line endings); with ``max_bytes``, longer
    lines come as ``LongLine`` and are never read into memory whole."""
    with open_log(path) as f:
        for _, line in iter_lines(f, max_bytes):
            if isinstance(line, LongLine):
                yield line
                continue
            line = line.rstrip(b"\r\n")
            if line:
                yield line


def _event_ts(line: bytes) -> int | None:
    try:
        ts = orjson.loads(line).get("ts")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return ts if isinstance(ts, int) else None


def _event_key(line: bytes) -> bytes | None:
    try:
        uid = orjson.loads(line).get("user_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return str(uid).encode() if uid is not None else None


def cmd_replay(args: argparse.Namespace) -> int:
    """Produce a log into a topic. Lines larger than ``--max-bytes`` (or than the broker
    accepts) are skipped and counted, not sent; any other failed send fails the command."""
    from kafka import KafkaProducer
    from kafka.errors import MessageSizeTooLargeError

    from flows.broker import create_topics

    check_log(args.log)
    if args.max_bytes < 1:
        raise ConfigError("replay: --max-bytes must be >= 1")
    bootstrap, kafka = _kafka(args)
    wait_for_broker(bootstrap, kafka.client_settings("consumer"), kafka.startup_timeout_s,
                    f"replay into {args.topic}")
    create_topics(bootstrap, [args.topic], args.partitions,
                  admin_config=kafka.client_settings("admin"))
    producer = KafkaProducer(**{"linger_ms": 20, "batch_size": 256 * 1024, "retries": 10,
                                "acks": "all",
                                "max_request_size": max(1_048_576, args.max_bytes + 1024),
                                **kafka.client_settings("producer"),
                                "bootstrap_servers": bootstrap})
    progress = Progress("replay", count_lines(args.log), quiet=args.quiet)
    anchor: tuple[int, float] | None = None
    too_large: list[int] = []
    failed: list[BaseException] = []

    def on_error(size: int, exc: BaseException) -> None:
        (too_large.append(size) if isinstance(exc, MessageSizeTooLargeError)
         else failed.append(exc))

    for line in _log_lines(args.log, args.max_bytes):
        if isinstance(line, LongLine):
            too_large.append(line.size)
            continue
        if args.speed > 0:
            ts = _event_ts(line)
            if ts is not None:
                if anchor is None:
                    anchor = (ts, time.monotonic())
                wait = anchor[1] + (ts - anchor[0]) / 1000 / args.speed - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
        try:
            future = producer.send(args.topic, key=_event_key(line), value=line)
        except MessageSizeTooLargeError:
            too_large.append(len(line))
            continue
        future.add_errback(on_error, len(line))  # on_error(size, exc)
        progress.add()
    producer.flush()
    producer.close()
    progress.close()
    if too_large:
        print(f"streamrec replay: skipped {len(too_large)} lines larger than the broker accepts "
              f"(--max-bytes {args.max_bytes}; largest {max(too_large)} bytes)", file=sys.stderr)
    if failed:
        print(f"streamrec replay: {len(failed)} records failed: {failed[0]!r}", file=sys.stderr)
        return 1
    return 0


def cmd_tap(args: argparse.Namespace) -> int:
    """Print a topic's records (flows/tap.py); a filter, format or position error exits 2."""
    from flows.tap import TapError, parse_from, read_file, read_kafka, resolve, tap

    config = load_config(args.config)
    try:
        start = parse_from(args.from_)
        where = resolve(args.topic, config, args.source, args.bootstrap, args.dir)
        if where.kind == "files":
            assert where.path is not None
            if args.partition:
                raise TapError("--partition applies to Kafka topics, not local output files")
            if not where.path.exists():
                raise SystemExit(f"tap: {where.path} does not exist (has the flow written "
                                 f"{args.topic!r}? output.kind = {config.output.kind!r})")
            print(f"tap: {where.path} (local output: output.kind = \"files\"; Kafka: "
                  "--bootstrap or a config with output.kind = \"kafka\")", file=sys.stderr)
            messages = read_file(where.path, start, args.follow)
        else:
            bootstrap, kafka = _kafka(args)
            wait_for_broker(bootstrap, kafka.client_settings("consumer"),
                            kafka.startup_timeout_s, f"tap {where.topic}")
            print(f"tap: Kafka topic {where.topic} on {bootstrap}", file=sys.stderr)
            messages = read_kafka(bootstrap, where.topic, start, args.follow, args.partition,
                                  kafka.client_settings("consumer"))
        with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
            tap(messages, sys.stdout, args.format, args.filter, args.limit)
    except TapError as err:
        print(f"streamrec tap: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from flows.broker import BrokerStartError, LocalBroker

    broker = LocalBroker(port=args.port)
    try:
        broker.binary()
    except BrokerStartError as err:
        print(f"streamrec broker: {err}", file=sys.stderr)
        return 1
    with broker:
        print(f"broker listening on {broker.bootstrap} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_loop(args: argparse.Namespace) -> int:
    from flows.loop import LoopSettings, run_loop

    config = load_config(args.config)
    if args.bootstrap:
        config.kafka.bootstrap = args.bootstrap
    wait_for_broker(config.kafka.bootstrap, config.kafka.client_settings("consumer"),
                    config.kafka.startup_timeout_s, f"the {config.app} loop's topics")
    settings = LoopSettings(seed=args.seed, n_users=args.users, n_items=args.items,
                            warmup_events=args.warmup, requests=args.requests, rate=args.rate,
                            step_ms=args.step_ms, window=args.window)
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(config, settings, partitions=args.partitions)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from flows.evaluate import evaluate

    check_log(args.log)  # one line, before any progress output
    with Progress("eval", count_lines(args.log), quiet=args.quiet) as progress:
        report = evaluate(args.log, args.report, config=args.config, out_dir=args.out,
                          plots=not args.no_plots, examples=args.examples,
                          progress=progress.set)
    brief = {k: v for k, v in report.items()
             if k not in ("config", "hr_curve", "hr_windows", "reliability")}
    print(orjson.dumps(brief, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    if not args.update_docs:
        print(reference_markdown(), end="")
        return 0
    for path, text in generated_docs(Path(__file__).resolve().parents[1]).items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"updated {path}")
    return 0


def _quiet(s: argparse.ArgumentParser) -> None:
    s.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar (status lines still go to the log)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamrec", description="Run, replay, evaluate and inspect the streamrec flow "
        "(README.md; every page: docs/README.md; every config key: streamrec config-reference).")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="stderr logs as text or one JSON object per line")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("run", help="run the main flow (one process of it with -i/-a)")
    s.add_argument("--config", help="TOML (or .json) config; default: the embedded demo")
    s.add_argument("-i", "--process-id", type=int, help="this process's index in the cluster")
    s.add_argument("-a", "--addresses", help='every process\'s "host:port", ";"-separated')
    s.add_argument("-w", "--workers", type=int, default=1, help="worker threads per process")
    s.add_argument("--epoch-ms", type=int, default=10_000,
                   help="Bytewax epoch (ms): at each epoch's end every stage drains before the "
                   "input reads on, so it bounds how far stages trail the input; 0 = one "
                   "micro-batch per epoch (replays through several processes, in lockstep); "
                   "with -r also the recovery snapshot interval")
    s.add_argument("-r", "--recovery-directory", type=Path,
                   help="recovery partitions (python -m bytewax.recovery DIR N)")
    s.add_argument("-b", "--backup-s", type=int, default=10,
                   help="with -r: seconds older recovery snapshots are kept")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("simulate", help="write a seeded synthetic event log")
    s.add_argument("-n", type=int, required=True, help="number of events")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--users", type=int, default=2_000)
    s.add_argument("--items", type=int, default=1_000)
    s.add_argument("--requests-per-s", type=float, default=InputConfig().requests_per_s,
                   help="requests per event-time second (the pace of event time; default: "
                   "the flow's simulator input's)")
    s.add_argument("-o", "--output", required=True, help="LOG.jsonl (or .jsonl.gz)")
    _quiet(s)
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("import", help="convert a public dataset to an event log")
    s.add_argument("dataset", choices=["movielens", "obd"])
    s.add_argument("path")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--with-requests", action="store_true",
                   help="movielens: a request before each positive (rating >= 4)")
    _quiet(s)
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("replay", help="produce a log into Kafka, paced by event time")
    s.add_argument("log")
    s.add_argument("--topic", required=True)
    s.add_argument("--speed", type=float, default=0.0, help="X times real time; 0 = as fast as possible")
    s.add_argument("--bootstrap", help=f"Kafka bootstrap (default: config, else {DEFAULT_BOOTSTRAP})")
    s.add_argument("--partitions", type=int, default=4, help="partitions if the topic is created")
    s.add_argument("--max-bytes", type=int, default=1_000_000,
                   help="skip (and count) lines longer than this many bytes, read in bounded "
                        "chunks (Kafka's default message.max.bytes is 1,048,588)")
    s.add_argument("--config")
    _quiet(s)
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser("tap", help="print a topic's records like kcat (Kafka or local JSONL)")
    s.add_argument("topic", help="an app topic (outputs: examples, recommendations, ...; inputs: "
                   "events), read as <app>.<name>, or any Kafka topic")
    s.add_argument("--follow", "-f", action="store_true", help="keep reading new records")
    s.add_argument("--from", dest="from_", default="beginning", metavar="WHERE",
                   help="beginning (default), end, -N (last N per partition) or an offset N")
    s.add_argument("--partition", "-p", type=int, action="append",
                   help="only this partition (repeatable)")
    s.add_argument("--format", help="kcat tokens (%%t %%p %%o %%k %%s %%T %%S), named "
                   "placeholders ({partition} {offset} {key} {timestamp} {value} {r[FIELD]}) or "
                   "json (an envelope per message); default: the record")
    s.add_argument("--filter", help="Python expression over the record's fields, e.g. "
                   "\"label == 1\" (r = the record; a bad expression or unknown field exits 2)")
    s.add_argument("--limit", type=int, default=0, help="stop after printing this many")
    s.add_argument("--source", choices=["auto", "kafka", "files"], default="auto",
                   help="auto: outputs from local files when output.kind = files (and no "
                   "--bootstrap), everything else from Kafka")
    s.add_argument("--bootstrap", help="read from Kafka at this bootstrap")
    s.add_argument("--dir", help="local output directory (default: config output.dir)")
    s.add_argument("--config")
    s.set_defaults(func=cmd_tap)

    s = sub.add_parser("broker", help="start the local Kafka-protocol broker (Tansu) for demos")
    s.add_argument("--port", type=int, default=9092)
    s.set_defaults(func=cmd_broker)

    s = sub.add_parser("loop", help="simulated users in a closed loop with a running flow "
                       "(requests in, recommendations -> impressions and clicks back)")
    s.add_argument("--config", help="the flow's config (app, kafka)")
    s.add_argument("--bootstrap", help="Kafka bootstrap (default: the config's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--users", type=int, default=2_000, help="simulated users")
    s.add_argument("--items", type=int, default=1_000, help="simulated items")
    s.add_argument("--warmup", type=int, default=3_000,
                   help="events of the simulator's own stream sent first (catalog, history)")
    s.add_argument("--requests", type=int, default=0, help="stop after this many; 0 = endless")
    s.add_argument("--rate", type=float, default=40.0, help="requests per wall second")
    s.add_argument("--step-ms", type=int, default=1_000, help="event time between requests (ms)")
    s.add_argument("--window", type=int, default=200, help="answered requests per CTR line")
    s.add_argument("--partitions", type=int, default=4, help="partitions of created topics")
    s.set_defaults(func=cmd_loop)

    s = sub.add_parser("eval", help="replay a log through the real flow and write a JSON report")
    s.add_argument("log")
    s.add_argument("--report", required=True)
    s.add_argument("--config")
    s.add_argument("--out", help="directory for the flow's outputs (default: beside the report)")
    _quiet(s)
    s.add_argument("--examples", action="store_true",
                   help="also write the training examples (examples.jsonl; large)")
    s.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("config-reference", help="print every config key (markdown table)")
    s.add_argument("--update-docs", action="store_true",
                   help="rewrite docs/config.md and the generated config tables of README.md "
                        "and docs/*.md instead")
    s.set_defaults(func=cmd_config_reference)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(LogConfig(format=args.log_format))
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"streamrec: config error: {err}", file=sys.stderr)
        return 2
    except LogFileError as err:
        print(f"streamrec: input error: {err}", file=sys.stderr)
        return 2
    except StreamrecError as err:
        print(f"streamrec: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
