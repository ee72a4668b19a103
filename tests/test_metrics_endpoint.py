"""The metrics endpoint on prometheus_client (issue 20 point 5): families grouped by
stage, parsed by prometheus_client's own parser; /healthz; Kafka consumer lag per
partition; bounded threads, request timeout and the loopback default. Real HTTP."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import orjson
import pytest
from bytewax.testing import run_main
from prometheus_client.parser import text_string_to_metric_families

from flows.broker import free_port
from flows.recsys import build
from operators import health
from operators.metrics import MetricsConfig
from operators.prometheus import MetricsServer


@pytest.fixture(autouse=True)
def _stop_servers():
    yield
    MetricsServer.stop_all()


def _get(port: int, path: str, accept: str | None = None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "app")))] = s.value
    return out


def test_families_grouped_by_stage_and_health(tmp_path) -> None:
    port = free_port()
    flow = build({
        "app": "stages",
        "inputs": [{"kind": "simulator", "events": 3000, "seed": 5, "n_users": 40, "n_items": 50,
                    "batch_size": 300}],
        "output": {"dir": str(tmp_path / "out")},
        "shards": {"users": 2, "items": 2},
        "metrics": {"port": port},
    })
    # the endpoint is up before the flow runs: /healthz answers while starting
    code, ctype, body = _get(port, "/healthz")
    assert code == 200 and ctype == "application/json"
    assert orjson.loads(body)["status"] in ("starting", "ok")
    run_main(flow)
    [summary] = [m for m in map(orjson.loads, (tmp_path / "out" / "metrics.jsonl").read_bytes()
                                .splitlines()) if m["kind"] == "summary"]
    code, ctype, body = _get(port, "/metrics")
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
    s = _samples(body.decode())
    join = summary["join"]
    requests = summary["events_by_type"]["request"]
    assert s[("streamrec_serving_requests_total", ())] == join["requests"] == requests
    served = {sc: s[("streamrec_serving_served_total", (("scorer", sc),))]
              for sc in ("ranker", "retrieval", "pool")}
    assert served == {"ranker": join["served_by_ranker"], "retrieval": join["served_by_retrieval"],
                      "pool": join["served_by_pool"]}
    assert s[("streamrec_duel_outcomes_total", ())] == join["duel_outcomes"]
    assert s[("streamrec_serving_category_sampled_total", ())] == join.get(
        "served_by_category_sampling", 0)
    assert s[("streamrec_serving_served_total", (("scorer", "interleaved"),))] == join[
        "served_interleaved"]
    assert s[("streamrec_duel_clicks_total", ())] == join["duel_clicks"] == sum(
        s[("streamrec_duel_click_wins_total", (("scorer", t),))] for t in ("ranker", "challenger"))
    assert s[("streamrec_serving_cpu_seconds_count", ())] == requests
    assert s[("streamrec_serving_queue_seconds_count", ())] == requests
    assert 0 < s[("streamrec_serving_cpu_seconds_sum", ())] < s[("streamrec_serving_latency_seconds_sum", ())]
    assert s[("streamrec_join_impressions_total", ())] == join["impressions"] > 0
    names = {name for name, _ in s}
    # serving and duel counters are no longer under the joiner's prefix
    assert not {n for n in names if n.startswith(("streamrec_join_requests", "streamrec_join_served",
                                                  "streamrec_join_duel"))}
    assert "process_cpu_seconds_total" in names and "process_resident_memory_bytes" in names
    # no Kafka input: no consumer lag samples
    assert not {n for n in names if n.startswith("streamrec_kafka_")}
    # OpenMetrics when the scraper asks for it
    code, ctype, body = _get(port, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and body.rstrip().endswith(b"# EOF")
    code, _, _ = _get(port, "/nope")
    assert code == 404
    code, _, body = _get(port, "/healthz")
    details = orjson.loads(body)
    assert code == 200 and details["status"] == "ok" and details["app"] == "stages"


def test_healthz_reports_a_stalled_process(monkeypatch) -> None:
    port = free_port()
    MetricsServer.serve(MetricsConfig(port=port, health_stall_s=5.0))
    health.beat()
    assert _get(port, "/healthz")[0] == 200
    # the last beat 10 s ago (no input partition asked for data, no metrics item): stalled;
    # backdated rather than slept, so a loaded machine cannot make the first answer late
    monkeypatch.setattr(health, "_last_beat", time.monotonic() - 10.0)
    code, _, body = _get(port, "/healthz")
    assert code == 503 and orjson.loads(body)["status"] == "stalled"
    health.beat()
    assert _get(port, "/healthz")[0] == 200


def test_loopback_default_bounded_threads_and_timeout() -> None:
    assert MetricsConfig().host == "127.0.0.1"
    port = free_port()
    server = MetricsServer.serve(MetricsConfig(port=port, max_threads=2, request_timeout_s=1.0))
    assert server is not None and server.address[0] == "127.0.0.1"
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # hold both slots
    try:
        time.sleep(0.2)
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _get(port, "/metrics")  # a third request is refused while both are busy
        time.sleep(1.5)  # the idle connections time out and free their threads
        assert _get(port, "/metrics")[0] == 200
    finally:
        for sock in idle:
            sock.close()
    # the same port again in this process: the running server, not a second bind
    assert MetricsServer.serve(MetricsConfig(port=port)) is server


@pytest.mark.kafka
def test_kafka_consumer_lag_per_partition(kafka_broker, kafka_topic, kafka_produce, tmp_path) -> None:
    from events.simulator import SimConfig, Simulator
    from operators.kafka_io import KafkaSource

    bootstrap = kafka_broker.bootstrap
    app = f"lag{tmp_path.name[-6:]}".replace("_", "")
    topic = f"{app}.events"
    from flows.broker import create_topics

    create_topics(bootstrap, [topic], 2)
    events = Simulator(SimConfig(n_users=20, n_items=30), seed=4).next_batch(600)
    per_part = {0: [], 1: []}
    for i, e in enumerate(events):
        per_part[i % 2].append(orjson.dumps(e))
    for part, values in per_part.items():
        kafka_produce(bootstrap, topic, values, partition=part)
    # the source's batches carry end offset - position: the lag while reading
    source = KafkaSource(bootstrap, [topic], batch_size=100, tail=False)
    part = source.build_part("s", f"{topic}#0", None)
    batch = []
    deadline = time.monotonic() + 20
    while not batch and time.monotonic() < deadline:
        batch = part.next_batch()
    part.close()
    [values] = batch
    assert values.offsets == {f"{topic}#0": (100, 300)}  # read 100 of 300: lag 200
    # through the flow: the endpoint shows position and lag of every partition
    port = free_port()
    run_main(build({
        "app": app, "kafka": {"bootstrap": bootstrap},
        "inputs": [{"kind": "kafka", "tail": False, "batch_size": 100}],
        "output": {"dir": str(tmp_path / "out")}, "shards": {"users": 2, "items": 2},
        "metrics": {"port": port},
    }))
    s = _samples(_get(port, "/metrics")[2].decode())
    for p in (0, 1):
        labels = (("partition", str(p)), ("topic", topic))
        assert s[("streamrec_kafka_consumer_offset", labels)] == 300
        assert s[("streamrec_kafka_consumer_lag", labels)] == 0
    [summary] = [m for m in map(orjson.loads, (tmp_path / "out" / "metrics.jsonl").read_bytes()
                                .splitlines()) if m["kind"] == "summary"]
    assert summary["consumer_lag"] == {f"{topic}#0": 0, f"{topic}#1": 0}
