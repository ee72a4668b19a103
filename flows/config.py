"""The flow's configuration: typed dataclasses, TOML loading, env overrides, validation.

One source of truth: every key, its type, default, unit and meaning live here, in
the dataclass fields' metadata; ``streamrec config-reference`` renders them.
A config with an unknown key or a value of the wrong type fails at load time with a
message naming the key (e.g. ``join.allowed_lateness_ms: expected int, got str``).

Environment overrides: ``STREAMREC__SECTION__KEY=value`` (double underscores between
levels, case-insensitive), the value read as a TOML literal when it parses as one
(``1000``, ``true``, ``"x"``, ``[1, 2]``) and as a plain string otherwise. Example:
``STREAMREC__JOIN__ALLOWED_LATENESS_MS=5000``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from flows.logs import LogConfig, StreamrecError
from flows.runtime import RuntimeConfig
from models.category_bandit import check_category_config
from models.pool_ranker import check_pool_config
from models.rankers import ranker_param_names
from operators.item_shard import ItemsConfig
from operators.metrics import MetricsConfig
from operators.serving import ServingConfig
from operators.trainer import RankerConfig
from state.feature_spec import DEFAULT_FEATURES, FeatureSpecError, parse_features
from state.item_index import IndexConfig
from state.join_state import JoinConfig
from state.settings import doc
from state.snapshot_store import SnapshotStore

ENV_PREFIX = "STREAMREC__"


class ConfigError(StreamrecError, ValueError):
    """A configuration that cannot be used; the message names the offending key."""


@dataclass
class InputConfig:
    """One input; several inputs run in order (e.g. a replay log, then Kafka)."""

    kind: Literal["simulator", "replay", "kafka"] = doc("Source kind.", "simulator")
    events: int = doc("simulator: number of events to generate; 0 = endless.", 200_000)
    seed: int = doc("simulator: random seed.", 0)
    n_users: int = doc("simulator: number of users.", 2_000)
    n_items: int = doc("simulator: number of items.", 1_000)
    requests_per_s: float = doc("simulator: requests per event-time second (sets the event-time "
                                "pace: ~12 events per request).", 2.0)
    path: str = doc("replay: JSONL log path (plain or .gz).", "")
    speed: float = doc("replay: pace by event time at this many times real time; 0 = as fast as possible.", 0.0)
    topics: list[str] = doc("kafka: input topics (the app name prefixes them).", factory=lambda: ["events"])
    start: Literal["earliest", "latest"] = doc("kafka: where to start without a snapshot.", "earliest")
    tail: bool = doc("kafka: keep consuming forever (false: stop once drained).", True)
    batch_size: int = doc("Events per micro-batch.", 1_000)
    offset_out_of_range: Literal["earliest", "latest", "stop"] = doc(
        "kafka: what to do when a saved offset is not on the broker (the topic was deleted "
        "and recreated, the broker lost its data, or retention deleted it): earliest = read "
        "from the first offset still there, latest = skip to the end, stop = fail the flow. "
        "Logged as an error in every case.", "earliest")


SECURITY_KEYS = (
    "security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
    "sasl_kerberos_service_name", "sasl_kerberos_domain_name", "ssl_cafile", "ssl_certfile",
    "ssl_keyfile", "ssl_password", "ssl_crlfile", "ssl_check_hostname",
)
"""KafkaConfig fields that are kafka-python security settings of the same name."""

CONSUMER_DEFAULTS: dict[str, Any] = {"fetch_max_wait_ms": 10}
"""Consumer settings of the flow and the CLI unless ``kafka.consumer`` sets them: a fetch
with no data waits at most 10 ms at the broker (kafka-python's 500 ms default put half a
second into every request's round trip on brokers that hold a fetch for its whole wait;
docs/architecture.md, batches and latency)."""

SECRET_KEYS = ("sasl_plain_password", "ssl_password")
"""KafkaConfig fields never written into reports (``Config.redacted``)."""


@dataclass
class KafkaConfig:
    """Kafka connection shared by Kafka inputs, outputs and the CLI (security included)."""

    bootstrap: str = doc("Bootstrap servers, host:port[,host:port].", "127.0.0.1:9092")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = doc(
        "Protocol to talk to brokers.", "PLAINTEXT")
    sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"] = doc(
        "SASL mechanism (SASL_* protocols); empty = none.", "")
    sasl_plain_username: str = doc("SASL PLAIN/SCRAM user name.", "")
    sasl_plain_password: str = doc("SASL PLAIN/SCRAM password (set it from the environment: "
                                   "STREAMREC__KAFKA__SASL_PLAIN_PASSWORD).", "")
    sasl_kerberos_service_name: str = doc("GSSAPI: Kerberos service name.", "kafka")
    sasl_kerberos_domain_name: str = doc("GSSAPI: Kerberos domain; empty = the broker host.", "")
    ssl_cafile: str = doc("SSL: CA bundle (PEM path) to verify brokers; empty = system CAs.", "")
    ssl_certfile: str = doc("SSL: client certificate (PEM path) for mutual TLS.", "")
    ssl_keyfile: str = doc("SSL: client private key (PEM path).", "")
    ssl_password: str = doc("SSL: password of the client key.", "")
    ssl_crlfile: str = doc("SSL: certificate revocation list (PEM path).", "")
    ssl_check_hostname: bool = doc("SSL: verify that the broker certificate matches its host name.",
                                   True)
    startup_timeout_s: float = doc(
        "How long the flow and the CLI wait for a broker to answer at start (s), with one "
        "summary line per retry interval, before failing with one error; Kafka inputs also "
        "keep retrying partition discovery this long. 0 = no check at start (inputs then "
        "fail at their first failed discovery).", 60.0)
    client: dict[str, Any] = doc(
        "Extra kafka-python settings passed through to consumers and producers (e.g. "
        "request_timeout_ms); each must be a setting both KafkaConsumer and KafkaProducer know.",
        factory=dict,
    )
    consumer: dict[str, Any] = doc(
        "Extra kafka-python KafkaConsumer settings (e.g. fetch_max_wait_ms, fetch_min_bytes, "
        "max_partition_fetch_bytes), over CONSUMER_DEFAULTS and client; keys not given keep "
        "the defaults shown.", factory=lambda: dict(CONSUMER_DEFAULTS))
    producer: dict[str, Any] = doc(
        "Extra kafka-python KafkaProducer settings (e.g. linger_ms, batch_size, "
        "compression_type), over client.", factory=dict)

    def client_settings(self, role: Literal["consumer", "producer", "admin"] = "consumer") -> dict[str, Any]:
        """kafka-python keyword arguments (without bootstrap_servers) for a client of ``role``:
        the security settings that differ from kafka-python's defaults, then ``client``
        extras (for ``admin``, only the extras an admin client accepts)."""
        from kafka.admin import KafkaAdminClient

        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        for key in SECURITY_KEYS[1:]:
            value = getattr(self, key)
            if value != KafkaAdminClient.DEFAULT_CONFIG.get(key) and value != "":
                out[key] = value
        extras = self.client
        if role == "admin":
            extras = {k: v for k, v in extras.items() if k in KafkaAdminClient.DEFAULT_CONFIG}
        elif role == "consumer":
            extras = {**extras, **CONSUMER_DEFAULTS, **self.consumer}
        else:
            extras = {**extras, **self.producer}
        return {**out, **extras}


def _check_kafka_client(kafka: KafkaConfig) -> None:
    """Fail at load time on ``kafka.client`` settings kafka-python would reject later."""
    from kafka import KafkaConsumer, KafkaProducer

    known = set(KafkaConsumer.DEFAULT_CONFIG) & set(KafkaProducer.DEFAULT_CONFIG)
    for key in kafka.client:
        if key in SECURITY_KEYS:
            raise ConfigError(f"kafka.client.{key}: set kafka.{key} instead")
        if key not in known or key == "bootstrap_servers":
            raise ConfigError(f"kafka.client.{key}: not a setting of both kafka-python's "
                              "KafkaConsumer and KafkaProducer (role-specific settings go "
                              "in kafka.consumer or kafka.producer)")
    for role, cls in (("consumer", KafkaConsumer), ("producer", KafkaProducer)):
        for key in getattr(kafka, role):
            if key in SECURITY_KEYS:
                raise ConfigError(f"kafka.{role}.{key}: set kafka.{key} instead")
            if key not in cls.DEFAULT_CONFIG or key == "bootstrap_servers":
                raise ConfigError(f"kafka.{role}.{key}: not a setting of kafka-python's "
                                  f"{cls.__name__}")


OUTPUTS = ("examples", "late-labels", "recommendations", "snapshots", "dead-letters", "metrics")
"""Every output topic (Kafka topics are prefixed with the app name)."""


@dataclass
class OutputConfig:
    """Where the output topics go."""

    kind: Literal["files", "kafka"] = doc("files: one JSONL file per topic under dir; kafka: topics.", "files")
    dir: str = doc("files: output directory.", "streamrec-out")
    skip: list[str] = doc("Outputs not written at all (their counts still reach the metrics), "
                          "e.g. [\"examples\"] when nothing consumes them; streamrec eval skips "
                          "examples unless --examples.", factory=list)


@dataclass
class ParseConfig:
    """Input validation limits."""

    max_bytes: int = doc("Largest accepted raw event, in bytes.", 65_536)
    max_future_skew_ms: int = doc("Reject events further ahead of the stream watermark than this (ms).", 86_400_000)
    min_ts_ms: int = doc("Dead-letter events whose ts is below this (reason ts_seconds): epoch "
                         "seconds sent as ms (default 1e11 ms = 1973-03-03; MovieLens' 1997 "
                         "logs pass). 0 accepts every ts from 1970.", 100_000_000_000)


@dataclass
class SamplerConfig:
    """Negative downsampling."""

    negative_rate: float = doc("Keep this fraction r of negatives (0 < r <= 1); kept ones get "
                               "weight 1/r, and served scores are corrected for r.", 0.1)
    seed: int = doc("Salt of the deterministic per-impression keep decision.", 0)


@dataclass
class SnapshotConfig:
    """The snapshot store (serving models, indexes)."""

    dir: str = doc("Store directory; empty = <output.dir>/snapshots. Files go under <dir>/<app>/.", "")
    keep: int = doc("Versions kept per snapshot kind (older ones are deleted).", 5)
    hmac_key: str = doc("Secret that signs every manifest (HMAC-SHA256); when set, readers "
                        "refuse unsigned or mis-signed versions, so only holders of the key can "
                        "publish. Give it with STREAMREC__SNAPSHOTS__HMAC_KEY, not in a file. "
                        "Empty = unsigned.", "")
    fsync: bool = doc("Make each version durable (fsync its file, manifest and directory) "
                      "before it counts as written. false only where nothing resumes from the "
                      "store (streamrec eval sets it: ~10 ms of I/O wait saved per version).",
                      True)


@dataclass
class ShardConfig:
    """How many keys the large tables are sharded under."""

    users: int = doc("User shards (join, profiles, user vectors, serving).", 8)
    max_users: int = doc("Users remembered per user shard (history, attributes, and the "
                         "entities of each user-side profile kind: user, user_x_<attr>); "
                         "least recently active forgotten first.", 50_000)
    max_items: int = doc("Items whose attributes each user shard remembers (its copy of the "
                         "catalog, from broadcast item events); least recently updated or "
                         "interacted with forgotten first.", 100_000)
    items: int = doc("Item shards (item factors, co-visitation, item profiles).", 4)
    hot_profiles: int = doc("Profiles kept decoded per profile store (user and user_x_<attr> in "
                            "each user shard, item in each item shard; ~5 KB each); the others "
                            "stay compressed until used.", 2_000)
    routing_cache: int = doc("IDs whose shard is memoised, per ID kind (users, items; each "
                             "entry ~150 B); the memo is cleared when full.", 1 << 18)


@dataclass
class Config:
    """The whole flow configuration."""

    app: str = doc("Application name: namespaces topics, snapshot store and metrics.", "streamrec")
    inputs: list[InputConfig] = doc("Inputs, consumed in order.", factory=lambda: [InputConfig()])
    kafka: KafkaConfig = doc("Kafka connection.", factory=KafkaConfig)
    output: OutputConfig = doc("Outputs.", factory=OutputConfig)
    parse: ParseConfig = doc("Validation.", factory=ParseConfig)
    shards: ShardConfig = doc("Sharding.", factory=ShardConfig)
    join: JoinConfig = doc("Joiner.", factory=JoinConfig)
    sampler: SamplerConfig = doc("Negative downsampling.", factory=SamplerConfig)
    ranker: RankerConfig = doc("Online ranker (training copy -> serving copy).", factory=RankerConfig)
    features: list[dict[str, Any]] = doc(
        "Profile feature specs (IPS), see docs/profiles.md; default: the shipped set for "
        "simulator and MovieLens logs.", factory=lambda: [dict(f) for f in DEFAULT_FEATURES])
    items: ItemsConfig = doc("Item-side state and item tables.", factory=ItemsConfig)
    index: IndexConfig = doc("ANN index of item vectors.", factory=IndexConfig)
    serving: ServingConfig = doc("Serving on the user shard.", factory=ServingConfig)
    snapshots: SnapshotConfig = doc("Snapshot store.", factory=SnapshotConfig)
    metrics: MetricsConfig = doc("Metrics records and the Prometheus endpoint.", factory=MetricsConfig)
    log: LogConfig = doc("Logs (stderr).", factory=LogConfig)
    runtime: RuntimeConfig = doc("The flow process's interpreter: garbage collection, GIL "
                                 "switch interval.", factory=RuntimeConfig)

    def topic(self, name: str) -> str:
        """The Kafka topic of an output or input name, namespaced by the app."""
        return f"{self.app}.{name}"

    def snapshot_root(self) -> Path:
        """The snapshot store directory of this app."""
        return Path(self.snapshots.dir or Path(self.output.dir) / "snapshots") / self.app

    def to_dict(self) -> dict[str, Any]:
        """The full effective config as plain data (its keys only: ``load_config`` reads it)."""
        return _plain(self)

    def redacted(self) -> dict[str, Any]:
        """``to_dict()`` with secrets (passwords) replaced by ``"***"`` when set: for
        reports and logs."""
        data = self.to_dict()
        for key in SECRET_KEYS:
            if data["kafka"][key]:
                data["kafka"][key] = "***"
        if data["snapshots"]["hmac_key"]:
            data["snapshots"]["hmac_key"] = "***"
        return data

    def snapshot_store(self) -> SnapshotStore:
        """The snapshot store of this config (root, versions kept, signing key)."""
        return SnapshotStore(self.snapshot_root(), keep=self.snapshots.keep,
                             hmac_key=self.snapshots.hmac_key or None,
                             durable=self.snapshots.fsync)


def _check(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return _from_dict(hint, value, key)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise ConfigError(f"{key}: expected {origin.__name__}, got {type(value).__name__}")
        args = typing.get_args(hint)
        if origin is list:
            return [_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return {str(k): _check(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _check(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {hint}, got {type(value).__name__}")
    if hint is Any:
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected bool, got {type(value).__name__}")
    if hint is not bool and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {hint.__name__}, got bool")
    if not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def _keys(cls: type) -> list[dataclasses.Field[Any]]:
    """The config keys of a dataclass: its fields, except those marked ``config: False``
    (set by the code, e.g. ``index.dim``)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("config", True)]


def _plain(value: Any) -> Any:
    """``dataclasses.asdict`` restricted to config keys."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in _keys(type(value))}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


LEAST: dict[str, int] = {
    "parse.max_bytes": 1, "snapshots.keep": 1, "index.M": 2, "index.ef_construction": 1,
    "index.ef": 1, "index.threads": 1, "metrics.max_threads": 1,
}
"""Smallest accepted value of keys whose smaller values would start a flow that
misbehaves silently (``snapshots.keep = 0`` deleted every snapshot)."""


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in _keys(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"{full}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = _check(value, hints[key], full)
        least = LEAST.get(full)
        if least is not None and kwargs[key] < least:
            raise ConfigError(f"{full}: must be >= {least}, got {kwargs[key]}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # the table's own checks (__post_init__)
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def env_overrides(environ: typing.Mapping[str, str] | None = None) -> dict[str, Any]:
    """Nested overrides from ``STREAMREC__A__B=value`` environment variables."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(text)
    return out


def load_config(
    source: str | Path | dict[str, Any] | Config | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> Config:
    """Build a validated Config from a TOML path (or a ``.json`` one), a dict, or defaults,
    plus env overrides."""
    if isinstance(source, Config):
        data = source.to_dict()
    elif source is None:
        data = {}
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            data = orjson.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from None
        except orjson.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a table / JSON object")
    data = _merge(data, env_overrides(environ))
    config = _from_dict(Config, data)
    _validate(config)
    return config


def _durations(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(key, value) of every duration or window in a config tree: the fields (and dict
    entries) whose name ends in ``_ms`` or ``_s`` or contains ``window``."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        is_duration = f.name.endswith(("_ms", "_s")) or "window" in f.name
        if dataclasses.is_dataclass(value):
            yield from _durations(value, f"{key}.")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v):
                    yield from _durations(v, f"{key}[{i}].")
        elif isinstance(value, dict):
            for k, v in value.items():
                if is_duration or str(k).endswith(("_ms", "_s")) or "window" in str(k):
                    yield f"{key}.{k}", v
        elif is_duration:
            yield key, value


def _validate(config: Config) -> None:
    for key, value in _durations(config):
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{key}: must be >= 0 (a duration or window), got {value}")
    if config.metrics.request_timeout_s <= 0:
        raise ConfigError(f"metrics.request_timeout_s: must be > 0, got {config.metrics.request_timeout_s}")
    known = ranker_param_names(config.ranker.kind)
    for key in config.ranker.params:
        if key not in known:
            raise ConfigError(f"ranker.params.{key}: unknown parameter of the "
                              f"{config.ranker.kind} ranker (known: {', '.join(sorted(known))})")
    for name, make in (("items.covis", config.items.covis_config),
                       ("items.mf", config.items.mf_config)):
        try:
            make()
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{name}: {err}") from None
    try:
        check_pool_config(config.serving.pool)
    except ValueError as err:
        raise ConfigError(f"serving.pool.{err}") from None
    try:
        check_category_config(config.serving.category_explore)
    except ValueError as err:
        raise ConfigError(f"serving.category_explore.{err}") from None
    if not 0.0 < config.sampler.negative_rate <= 1.0:
        raise ConfigError("sampler.negative_rate: must be in (0, 1]")
    if config.shards.users < 1 or config.shards.items < 1:
        raise ConfigError("shards: users and items must be >= 1")
    if not config.inputs:
        raise ConfigError("inputs: at least one input is required")
    for name in config.output.skip:
        if name not in OUTPUTS:
            raise ConfigError(f"output.skip: {name!r} is not an output (one of {', '.join(OUTPUTS)})")
    for i, inp in enumerate(config.inputs):
        if inp.kind == "replay" and not inp.path:
            raise ConfigError(f"inputs[{i}].path: required for a replay input")
        if inp.batch_size < 1:
            raise ConfigError(f"inputs[{i}].batch_size: must be >= 1")
    try:
        parse_features(config.features)
    except FeatureSpecError as err:
        raise ConfigError(f"features: {err}") from None
    _check_kafka_client(config.kafka)
    if not 0 <= config.metrics.port <= 65535:
        raise ConfigError("metrics.port: must be in 0..65535")
    if config.kafka.startup_timeout_s < 0:
        raise ConfigError("kafka.startup_timeout_s: must be >= 0")
    if config.log.status_interval_s < 0:
        raise ConfigError("log.status_interval_s: must be >= 0")
    if config.metrics.interval_s <= 0:
        raise ConfigError("metrics.interval_s: must be > 0")
    if not config.app or not config.app.replace("-", "").replace("_", "").isalnum():
        raise ConfigError("app: must be a non-empty name of letters, digits, '-' and '_'")


def reference(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows (key, type, default, doc) of every config key, generated from the dataclasses."""
    return [(key, kind, "" if value is _TABLE else repr(value), text)
            for key, kind, value, text in _reference(cls, prefix)]


_TABLE = object()


def _reference(cls: type, prefix: str) -> list[tuple[str, str, Any, str]]:
    """``reference`` rows with the default as a value (``_TABLE`` for a table)."""
    rows: list[tuple[str, str, Any, str]] = []
    hints = typing.get_type_hints(cls)
    for f in _keys(cls):
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
        if dataclasses.is_dataclass(inner):
            rows.append((key, "table" if inner is hint else "array of tables", _TABLE,
                         f.metadata.get("doc", "")))
            rows.extend(_reference(inner, f"{key}{'[]' if inner is not hint else ''}."))
            continue
        if typing.get_origin(hint) is Literal:
            type_name = " \\| ".join(repr(a) for a in typing.get_args(hint))
        elif typing.get_origin(hint) is not None:
            type_name = str(hint).replace("typing.", "")
        else:
            type_name = hint.__name__
        rows.append((key, type_name, default, f.metadata.get("doc", "")))
    return rows


def reference_markdown() -> str:
    """The configuration reference as a markdown document (docs/config.md is this output)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the code by `streamrec config-reference`; do not edit by hand.",
        "Every key can be set in the TOML file or overridden as `STREAMREC__SECTION__KEY=value`.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, type_name, default, text in reference():
        lines.append(f"| `{key}` | {type_name} | `{default}` | {text} |")
    return "\n".join(lines) + "\n"


DOC_TABLE = re.compile(r"(<!-- config-table: (?P<keys>[^>]*?) -->\n)(?P<body>.*?)(<!-- /config-table -->)",
                       re.S)
"""A generated table of chosen keys inside a hand-written doc (README.md, docs/*.md)."""
_UNITS = ((86_400_000, "d"), (3_600_000, "h"), (60_000, "min"), (1_000, "s"))


def _ms_text(ms: int) -> str:
    """``600000`` -> ``10 min`` (the largest unit that divides it; ms otherwise)."""
    for size, unit in _UNITS:
        if ms and ms % size == 0:
            return f"{ms // size:,} {unit}"
    return f"{ms:,} ms"


def config_table(keys: typing.Sequence[str]) -> str:
    """Markdown rows (key, default, meaning) of ``keys``; durations in ms also in words.

    >>> config_table(["join.wait_ms_override"]).splitlines()[-1].split(" | ")[:2]
    ['| `join.wait_ms_override`', '600000 (10 min)']
    """
    rows = {key: (value, text) for key, _, value, text in _reference(Config, "")}
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key in keys:
        if key not in rows or rows[key][0] is _TABLE:
            raise ConfigError(f"{key}: not a config key")
        value, text = rows[key]
        in_ms = "_ms" in key.rsplit(".", 1)[-1]
        if in_ms and isinstance(value, int):
            default = f"{value} ({_ms_text(value)})"
        elif isinstance(value, dict):
            default = ", ".join(
                f"{k} {_ms_text(v) if (in_ms or str(k).endswith('_ms')) and isinstance(v, int) else v}"
                for k, v in value.items())
        else:
            default = str(value)
        lines.append(f"| `{key}` | {default} | {text} |")
    return "\n".join(lines) + "\n"


def render_doc_tables(text: str) -> str:
    """``text`` with every ``<!-- config-table: k1 k2 -->`` block regenerated from the code."""
    return DOC_TABLE.sub(lambda m: m[1] + config_table(m["keys"].split()) + m[4], text)


def generated_docs(root: Path) -> dict[Path, str]:
    """What the docs under the project ``root`` must read: docs/config.md, and README.md and
    docs/*.md with their config tables regenerated (``streamrec config-reference
    --update-docs`` writes them)."""
    out = {root / "docs" / "config.md": reference_markdown()}
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        if path not in out:
            out[path] = render_doc_tables(path.read_text())
    return out
