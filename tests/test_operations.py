"""Operations (issue 10): Prometheus metrics, JSON logs, config errors at start,
Kafka security pass-through, the docker compose file."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import orjson
import pytest
from bytewax.testing import run_main

from flows.broker import free_port
from flows.config import ConfigError, load_config
from flows.logs import LogConfig, setup_logging
from flows.recsys import build
from operators.prometheus import MetricsServer

ROOT = Path(__file__).resolve().parents[1]


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_prometheus_endpoint_serves_real_counters(tmp_path) -> None:
    port = free_port()
    flow = build({
        "app": "promtest",
        "inputs": [{"kind": "simulator", "events": 4000, "seed": 3, "n_users": 50, "n_items": 60,
                    "batch_size": 500}],
        "output": {"dir": str(tmp_path / "out")},
        "shards": {"users": 2, "items": 2},
        "items": {"refresh_interval_ms": 10_000},
        "metrics": {"port": port, "host": "127.0.0.1"},
    })
    try:
        run_main(flow)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
    finally:
        MetricsServer.stop_all()
    [summary] = [m for m in map(orjson.loads, (tmp_path / "out" / "metrics.jsonl").read_bytes()
                                .splitlines()) if m["kind"] == "summary"]
    s = _samples(text)
    app = 'app="promtest"'
    for etype, n in summary["events_by_type"].items():
        assert s[f'streamrec_events_in_total{{{app},type="{etype}"}}'] == n
    assert sum(summary["events_by_type"].values()) == 4000
    for label, n in summary["examples_by_label"].items():
        assert s[f'streamrec_examples_total{{{app},label="{label}"}}'] == n
    assert summary["examples_by_label"]["1"] > 0
    assert s[f"streamrec_join_windows_closed_total{{{app}}}"] == summary["join"]["windows_closed"] > 0
    assert s[f'streamrec_table_admitted_total{{{app},table="user"}}'] > 0
    assert s[f'streamrec_table_admitted_total{{{app},table="item"}}'] > 0
    assert s[f'streamrec_snapshot_version{{{app},kind="ranker"}}'] >= 1
    assert s[f'streamrec_snapshot_version{{{app},kind="index"}}'] >= 1
    assert f'streamrec_freshness_lag_seconds{{{app},kind="index"}}' in s
    requests = summary["events_by_type"]["request"]
    assert s[f'streamrec_serving_latency_seconds_count{{{app}}}'] == requests
    assert s[f'streamrec_serving_latency_seconds_bucket{{{app},le="+Inf"}}'] == requests
    assert "# TYPE streamrec_serving_latency_seconds histogram" in text
    assert summary["serving_latency_ms"]["count"] == requests
    # this process's memory: the same order as the summary's, peak >= start (the summary
    # rounds MB to 0.1, so compare within half a rounding step)
    rss = s["process_resident_memory_bytes"] / 2**20
    assert 20 < rss < 10_000 and abs(rss - summary["rss_mb"]) < 0.5 * summary["rss_mb"]
    peak_mb = s[f"streamrec_peak_resident_memory_bytes{{{app}}}"] / 2**20
    assert peak_mb >= summary["rss_start_mb"] - 0.05 and summary["rss_start_mb"] > 20


def test_metrics_endpoint_is_local_with_timeouts_and_bounded_threads() -> None:
    """Issue 19 point 6: by default the endpoint binds 127.0.0.1; a flood of idle
    connections makes at most ``max_threads`` handler threads (the rest are closed at
    once) and each idle one is dropped after ``request_timeout_s``, after which scrapes
    work."""
    import socket
    import threading
    import time

    from operators.metrics import MetricsConfig

    assert MetricsConfig().host == "127.0.0.1"
    port = free_port()
    server = MetricsServer.serve(MetricsConfig(port=port, max_threads=2, request_timeout_s=0.5))
    assert server is not None
    idle: list[socket.socket] = []
    try:
        before = threading.active_count()
        for _ in range(100):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.3)
        assert threading.active_count() - before <= 2
        time.sleep(0.7)  # past request_timeout_s: the idle connections are closed by the server
        assert threading.active_count() - before <= 0
        assert all(s.recv(1) == b"" for s in idle[:2])  # closed by the server, not by us
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200 and b"python_info" in resp.read()
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_json_logs_one_object_per_line(capsys) -> None:
    setup_logging(LogConfig(format="json", level="INFO"))
    try:
        logging.getLogger("operators.test").info("hello %s", "world", extra={"shard": "u001"})
        logging.getLogger("kafka.conn").info("library chatter stays out")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("flows.test").exception("failed")
    finally:
        setup_logging()
    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["level"], r["logger"], r["message"]) for r in lines] == [
        ("INFO", "operators.test", "hello world"), ("ERROR", "flows.test", "failed")]
    assert lines[0]["shard"] == "u001" and lines[0]["ts"].endswith("+00:00")
    assert "ValueError: boom" in lines[1]["exc"]


@pytest.mark.parametrize(
    ("toml", "message"),
    [('[join]\nallowed_lateness = 5\n', "join.allowed_lateness: unknown key"),
     ('[metrics]\nport = "9100"\n', "metrics.port: expected int, got str"),
     ('[kafka]\nsasl_mechanism = "PLAN"\n', "kafka.sasl_mechanism: expected one of"),
     ('[kafka.client]\nlinger_ms = 5\n', "kafka.client.linger_ms: not a setting of both"),
     ('[kafka.client]\nsasl_plain_password = "x"\n', "kafka.client.sasl_plain_password: set "
      "kafka.sasl_plain_password instead"),
     # issue 19 point 5: values that used to start a flow that silently misbehaves
     ('[snapshots]\nkeep = 0\n', "snapshots.keep: must be >= 1"),
     ('[index]\nM = 0\n', "index.M: must be >= 2"),
     ('[index]\nM = -3\n', "index.M: must be >= 2"),
     ('[ranker.params]\nlearning_rate = 0.1\n', "ranker.params.learning_rate: unknown parameter"),
     ('[ranker]\nkind = "fm"\n[ranker.params]\nk = 4\n', "ranker.params.k: unknown parameter"),
     ('[parse]\nmax_bytes = 0\n', "parse.max_bytes: must be >= 1"),
     ('[ranker]\nsync_interval_ms = -1\n', "ranker.sync_interval_ms: must be >= 0"),
     ('[index]\nrefresh_interval_ms = -60000\n', "index.refresh_interval_ms: must be >= 0"),
     ('[join]\ndefault_window_ms = -5\n', "join.default_window_ms: must be >= 0"),
     ('[join.window_ms]\nclick = -600000\n', "join.window_ms.click: must be >= 0"),
     ('[join]\nidle_flush_s = -1.0\n', "join.idle_flush_s: must be >= 0"),
     ('[serving]\nscorer_window = -1\n', "serving.scorer_window: must be >= 0"),
     ('[items.covis]\nwindow = -2\n', "items.covis.window: must be >= 0"),
     ('[items.covis]\nwindw = 2\n', "items.covis: "),
     ('[kafka]\nstartup_timeout_s = -1\n', "kafka.startup_timeout_s: must be >= 0"),
     ('[metrics]\nmax_threads = 0\n', "metrics.max_threads: must be >= 1")],
)
def test_bad_config_file_fails_at_start_naming_the_key(tmp_path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        build(str(path))


def test_bad_config_fails_the_flow_process_and_the_cli(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[sampler]\nnegative_rte = 0.5\n")
    run = subprocess.run([sys.executable, "-m", "bytewax.run", f"flows.recsys:build('{path}')"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 1 and "Traceback" not in run.stderr  # one line, no traceback
    assert run.stderr.startswith("streamrec: error: sampler.negative_rte: unknown key")
    cli = subprocess.run([sys.executable, "-m", "flows.cli", "tap", "examples", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert cli.returncode == 2
    assert cli.stderr.startswith("streamrec: config error: sampler.negative_rte: unknown key")
    for args in (["--config", str(path)], ["-i", "0"], ["--epoch-ms", "-1"]):
        cli = subprocess.run([sys.executable, "-m", "flows.cli", "run", *args],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert cli.returncode == 2 and cli.stderr.startswith("streamrec: config error: ")


def test_kafka_security_settings_reach_kafka_python() -> None:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    from operators.kafka_io import KafkaSource
    from operators.kafka_sink import KafkaSink

    config = load_config({"kafka": {
        "bootstrap": "k1:9093,k2:9093", "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "svc",
        "ssl_cafile": "/etc/ca.pem", "ssl_check_hostname": False,
        "client": {"request_timeout_ms": 20_000},
        "startup_timeout_s": 0}},  # built, not run: no broker to wait for
        environ={"STREAMREC__KAFKA__SASL_PLAIN_PASSWORD": "s3cret"})
    security = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_plain_username": "svc", "sasl_plain_password": "s3cret",
                "ssl_cafile": "/etc/ca.pem", "ssl_check_hostname": False}
    assert config.kafka.client_settings("consumer") == {**security, "request_timeout_ms": 20_000,
                                                         "fetch_max_wait_ms": 10}
    assert config.kafka.client_settings("admin") == {**security, "request_timeout_ms": 20_000}
    # What the flow's source and sink hand to kafka-python: every key known to the client.
    flow_config = {**config.to_dict(), "inputs": [{"kind": "kafka"}], "output": {"kind": "kafka"}}
    flow = build(flow_config)
    steps = {s.step_id: s for s in _steps(flow)}
    source = next(s.source.inner for name, s in steps.items() if name.endswith("input_0_kafka"))
    sink = next(s.sink for name, s in steps.items() if name.endswith("out_files")).sinks["examples"]
    assert isinstance(source, KafkaSource) and isinstance(sink, KafkaSink)
    consumer_kwargs = source._kafka_config()
    producer_kwargs = sink._kafka_config()
    assert consumer_kwargs.items() >= {**security, "bootstrap_servers": ["k1:9093", "k2:9093"]}.items()
    assert producer_kwargs.items() >= {**security, "bootstrap_servers": ["k1:9093", "k2:9093"]}.items()
    assert set(consumer_kwargs) <= set(KafkaConsumer.DEFAULT_CONFIG)
    assert set(producer_kwargs) <= set(KafkaProducer.DEFAULT_CONFIG)
    assert set(config.kafka.client_settings("admin")) <= set(KafkaAdminClient.DEFAULT_CONFIG)
    assert config.redacted()["kafka"]["sasl_plain_password"] == "***"
    assert config.to_dict()["kafka"]["sasl_plain_password"] == "s3cret"
    # Defaults: plaintext, nothing else.
    assert load_config({}).kafka.client_settings("producer") == {"security_protocol": "PLAINTEXT"}
    assert load_config({}).kafka.client_settings("consumer") == {"security_protocol": "PLAINTEXT",
                                                                 "fetch_max_wait_ms": 10}


def _steps(flow):  # noqa: ANN001, ANN202 - walks Bytewax's step tree
    stack = list(flow.substeps)
    while stack:
        step = stack.pop()
        yield step
        stack.extend(getattr(step, "substeps", []))


COMPOSE = ROOT / "docker" / "compose.yaml"


def test_compose_file_validates_with_docker_compose() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("needs Debian's docker-compose package (apt-get install -y docker-compose; "
                    ".ci/run installs it when it can) to validate docker/compose.yaml")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "PARTITIONS": "6"}
    as_json = subprocess.run([exe, "-f", str(COMPOSE), "config", "--format", "json"],
                             capture_output=True, text=True, timeout=120, env=env)
    if as_json.returncode == 0 and as_json.stdout.lstrip().startswith("{"):  # Compose v2
        resolved = orjson.loads(as_json.stdout)
    else:  # Debian's docker-compose 1.29 (Python): YAML only
        run = subprocess.run([exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                             timeout=120, env=env)
        assert run.returncode == 0, run.stderr
        # It ships with PyYAML: let its interpreter turn the YAML into JSON.
        python = Path(exe).read_text(errors="replace").splitlines()[0].removeprefix("#!").split()
        to_json = subprocess.run([*python, "-c", "import json, sys, yaml; "
                                  "print(json.dumps(yaml.safe_load(sys.stdin)))"],
                                 input=run.stdout, capture_output=True, text=True, timeout=60)
        assert to_json.returncode == 0, to_json.stderr
        resolved = orjson.loads(to_json.stdout)
    services = resolved["services"]
    assert {"kafka", "topics", "flow", "users"} <= set(services)
    kafka_env = services["kafka"]["environment"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    from flows.recsys import OUTPUTS

    topics = services["topics"]["environment"]
    assert topics["TOPICS"].split() == ["events", *OUTPUTS]
    assert topics["PARTITIONS"] == "6" and topics["APP"] == "demo"
    for name in ("flow", "users"):
        assert services[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        assert services[name]["environment"]["STREAMREC__KAFKA__BOOTSTRAP"] == "kafka:9092"
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
    flow = services["flow"]
    assert flow["environment"]["STREAMREC__METRICS__PORT"] == "9100"
    assert flow["environment"]["STREAMREC__METRICS__HOST"] == "0.0.0.0"  # published port
    # recovery on the volume, through the entrypoint that initialises it once
    assert flow["command"] == ["sh", "/app/docker/run-flow.sh"]
    assert flow["environment"]["RECOVERY_DIR"].startswith("/data/")
    assert any(str(v).split(":")[:2] == ["state", "/data"]
               or (isinstance(v, dict) and (v.get("source"), v.get("target")) == ("state", "/data"))
               for v in flow["volumes"]) and "state" in resolved["volumes"]
    assert flow["restart"] == "on-failure"
    check = " ".join(flow["healthcheck"]["test"])
    assert "127.0.0.1:9100/healthz" in check
    assert services["users"]["depends_on"]["flow"]["condition"] == "service_healthy"
    assert services["users"]["command"][:2] == ["streamrec", "loop"]
    # Both services read the config baked into the image; it must load.
    load_config(ROOT / "docker" / "streamrec.toml")
    # The validation is real: a mistake in the file fails it.
    broken = COMPOSE.parent / ".compose-broken-test.yaml"
    try:
        broken.write_text(COMPOSE.read_text().replace("    depends_on:\n", "    depends_onn:\n", 1))
        bad = subprocess.run([exe, "-f", str(broken), "config"], capture_output=True, text=True,
                             timeout=120, env=env)
    finally:
        broken.unlink()
    assert bad.returncode != 0 and "depends_onn" in bad.stdout + bad.stderr


def test_compose_publishes_ports_on_localhost_only() -> None:
    """Every published port binds 127.0.0.1 (Docker's default, 0.0.0.0, would open the
    broker and the metrics endpoint to the network); the flow's endpoint listens on every
    interface inside its container so that the published port reaches it."""
    lines = COMPOSE.read_text().splitlines()
    published = []
    for i, line in enumerate(lines):
        if line.strip() == "ports:":
            for entry in lines[i + 1:]:
                if not entry.strip().startswith("- "):
                    break
                published.append(entry.strip()[2:].split("#")[0].strip().strip('"'))
    assert len(published) == 2, published  # the broker's host listener, the metrics port
    assert all(p.startswith("127.0.0.1:") for p in published), published
    assert "STREAMREC__METRICS__HOST: 0.0.0.0" in COMPOSE.read_text()


def test_dockerfile_is_slim_non_root_and_pinned() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert froms and all(f.startswith("python:3.11") and "slim" in f for f in froms)
    assert "\nUSER streamrec" in text
    pins = [line for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all("==" in line for line in pins)
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {line.split("==")[0].lower() for line in pins}
    for dep in deps:
        name = dep.split(">")[0].split("<")[0].split("=")[0].strip().lower()
        assert name in pinned, f"{name} is not pinned in docker/requirements.txt"


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.kafka
def test_two_apps_share_one_kafka_and_store_without_touching_each_other(
        kafka_broker, kafka_produce, kafka_read_records, tmp_path) -> None:
    from events.simulator import SimConfig, Simulator
    from flows.broker import broker_metadata, create_topics

    bootstrap = kafka_broker.bootstrap
    store = tmp_path / "snapshots"
    apps = {f"shop{n}-{tmp_path.name[-6:]}".replace("_", "-"): seed for n, seed in ((1, 11), (2, 22))}
    runs = {}
    for app, seed in apps.items():
        events = Simulator(SimConfig(n_users=30, n_items=40), seed=seed).next_batch(1500)
        create_topics(bootstrap, [f"{app}.events"], 2)
        kafka_produce(bootstrap, f"{app}.events", [orjson.dumps(e) for e in events],
                      keys=[str(e.get("user_id", "")).encode() for e in events])
        before = {a: _tree(store / a) for a in runs}
        run_main(build({
            "app": app,
            "kafka": {"bootstrap": bootstrap},
            "inputs": [{"kind": "kafka", "topics": ["events"], "tail": False, "batch_size": 200}],
            "output": {"kind": "kafka", "dir": str(tmp_path / "out")},
            "snapshots": {"dir": str(store)},
            "shards": {"users": 2, "items": 2},
            "sampler": {"negative_rate": 1.0},
        }))
        # The other app's snapshot store is untouched by this run.
        assert {a: _tree(store / a) for a in runs} == before
        runs[app] = events
    topics = broker_metadata(bootstrap)
    from flows.recsys import OUTPUTS

    for app, seed in apps.items():
        mine = {t for t in topics if t.startswith(f"{app}.")}
        assert {f"{app}.{n}" for n in ("events", "examples", "snapshots", "metrics")} <= mine
        assert mine <= {f"{app}.{name}" for name in ("events", *OUTPUTS)}
        impressions = {e["impression_id"] for e in runs[app] if e["type"] == "impression"}
        examples = [orjson.loads(r.value) for r in kafka_read_records(bootstrap, f"{app}.examples")]
        ids = {e["example_id"] for e in examples if e["example_id"].startswith("imp:")}
        assert ids and ids <= {f"imp:{i}" for i in impressions}  # only its own events
        assert all(i.startswith(f"imp:imp{seed}-") for i in ids)
        manifests = [orjson.loads(r.value) for r in kafka_read_records(bootstrap, f"{app}.snapshots")]
        assert manifests and all((store / app / m["path"]).is_file() for m in manifests)
        [summary] = [m for m in map(orjson.loads, (r.value for r in kafka_read_records(
            bootstrap, f"{app}.metrics"))) if m["kind"] == "summary"]
        assert summary["app"] == app and summary["events_in"] == len(runs[app])
        recs = [orjson.loads(r.value) for r in kafka_read_records(bootstrap, f"{app}.recommendations")]
        requests = {e["request_id"] for e in runs[app] if e["type"] == "request"}
        assert recs and {r["request_id"] for r in recs} == requests
    assert sorted(p.name for p in store.iterdir()) == sorted(apps)


def test_config_reference_states_units_of_times() -> None:
    from flows.config import reference, reference_markdown

    rows = reference()
    for key, _type, _default, text in rows:
        name = key.rsplit(".", 1)[-1]
        if name.endswith("_ms"):
            assert "ms" in text, key
        elif name.endswith("_s") and not name.endswith("per_s"):
            assert "(s" in text or "seconds" in text, key
    markdown = reference_markdown()
    for key in ("metrics.port", "log.format", "kafka.security_protocol", "kafka.sasl_plain_password",
                "kafka.ssl_cafile", "app"):
        assert f"| `{key}` |" in markdown


def test_metrics_state_resumes_from_an_older_snapshot() -> None:
    import pickle

    from operators.metrics import MetricsState

    old = MetricsState("shop")
    old.events_by_type["click"] = 3
    state = dict(old.__dict__)
    for key in ("examples", "snapshots", "latency_ms"):  # fields an older version lacked
        del state[key]
    resumed = MetricsState.__new__(MetricsState)
    resumed.__setstate__(state)
    resumed.add("examples", {"1": (2, 2.0)})
    assert resumed.events_by_type["click"] == 3 and resumed.examples["1"] == 2
    assert pickle.loads(pickle.dumps(resumed)).record()["examples_by_label"] == {"1": 2}


def test_a_user_shard_outputs_metrics_fold_as_one_item_like_its_items_one_by_one() -> None:
    """``_shard_counts`` sends one ``("items", [...])`` per user-shard output (one item
    crossing to the metrics stage's process instead of ~6); the metrics state it leaves is
    the one its items added one by one leave."""
    from flows.recsys import METRICS_KEY, _shard_counts
    from operators.metrics import MetricsState

    out = {"examples": [{"label": 1, "weight": 1.0}, {"label": 0, "weight": 4.0}],
           "recommendations": [{"latency_ms": 3.5}, {"latency_ms": 70.0}],
           "late-labels": [{}], "serving-cost": [(0.4, 1.0), (2.5, 12.0)],
           "counters": [{"shard": "u000", "counters": {"joined": 2}, "table": {"rows": 5}}],
           "dead-letters": [{"stage": "user_shard u000"}]}
    key, (kind, items) = _shard_counts(("u000", out))
    assert key == METRICS_KEY and kind == "items" and len(items) == 6
    folded, one_by_one = MetricsState("shop"), MetricsState("shop")
    folded.add(kind, items)
    for item in items:
        one_by_one.add(*item)
    ignore = ("ts", "elapsed_s", "events_per_s", "rss_mb", "peak_rss_mb", "rss_start_mb")
    record = {k: v for k, v in folded.record().items() if k not in ignore}
    assert record == {k: v for k, v in one_by_one.record().items() if k not in ignore}
    assert record["outputs"] == {"examples": 2, "late-labels": 1, "recommendations": 2}
    assert record["examples_by_label"] == {"1": 1, "0": 1}
    assert record["serving_latency_ms"]["count"] == 2 and record["serving_cpu_ms"]["count"] == 2
    assert record["join"] == {"joined": 2} and record["processing_errors"] == {"user_shard": 1}


@pytest.mark.kafka
def test_flow_entrypoint_initialises_recovery_once_and_restarts_without_duplicates(
        kafka_broker, kafka_produce, kafka_read_records, tmp_path) -> None:
    """docker/run-flow.sh (the compose flow service): the first start creates the recovery
    directory, later starts resume from it, so restarting re-reads nothing and writes no
    output twice; events produced meanwhile are processed exactly once."""
    import os

    from events.simulator import SimConfig, Simulator
    from flows.broker import create_topics

    bootstrap = kafka_broker.bootstrap
    app = f"restart{tmp_path.name[-6:]}".replace("_", "")
    create_topics(bootstrap, [f"{app}.events"], 2)
    sim = Simulator(SimConfig(n_users=30, n_items=40), seed=8)

    def produce(n: int) -> None:
        events = sim.next_batch(n)
        kafka_produce(bootstrap, f"{app}.events", [orjson.dumps(e) for e in events],
                      keys=[str(e.get("user_id", "")).encode() for e in events])

    config = tmp_path / "flow.toml"
    config.write_text(f'app = "{app}"\n[kafka]\nbootstrap = "{bootstrap}"\n'
                      '[[inputs]]\nkind = "kafka"\ntail = false\nbatch_size = 200\n'
                      f'[output]\nkind = "kafka"\n[snapshots]\ndir = "{tmp_path / "store"}"\n'
                      '[shards]\nusers = 2\nitems = 2\n[sampler]\nnegative_rate = 1.0\n')
    recovery = tmp_path / "recovery"
    env = {**os.environ, "FLOW": f"flows.recsys:build('{config}')", "RECOVERY_DIR": str(recovery),
           "SNAPSHOT_S": "1", "BACKUP_S": "1"}

    def start() -> str:
        run = subprocess.run(["sh", str(ROOT / "docker" / "run-flow.sh")], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return run.stderr

    def ids(topic: str, key: str) -> list[str]:
        return [orjson.loads(r.value)[key] for r in kafka_read_records(bootstrap, f"{app}.{topic}")]

    produce(1500)
    assert "initialising recovery" in start()
    db = recovery / "part-0.sqlite3"
    inode = db.stat().st_ino
    examples, recs = ids("examples", "example_id"), ids("recommendations", "request_id")
    assert examples and recs and len(set(examples)) == len(examples)
    # a restart with nothing new: resumes, re-reads nothing, writes nothing again
    assert "resuming" in start()
    assert db.stat().st_ino == inode
    assert ids("examples", "example_id") == examples
    assert ids("recommendations", "request_id") == recs
    # events produced while it was down are processed once
    produce(800)
    start()
    after = ids("examples", "example_id")
    assert len(after) > len(examples) and len(set(after)) == len(after)
    assert set(after) >= set(examples)
    recs_after = ids("recommendations", "request_id")
    assert len(set(recs_after)) == len(recs_after) > len(recs)
