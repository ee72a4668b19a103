"""Config loading: defaults, TOML, env overrides, and clear errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import (
    ConfigError,
    config_table,
    generated_docs,
    load_config,
    reference,
    reference_markdown,
    render_doc_tables,
)
from state.item_index import IndexConfig


def test_defaults_and_topic_namespacing() -> None:
    cfg = load_config({}, environ={})
    assert cfg.inputs[0].kind == "simulator" and cfg.output.dir == "streamrec-out"
    assert load_config({"app": "shop"}, environ={}).topic("examples") == "shop.examples"


def test_toml_file_and_env_overrides(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('app = "feed"\n[join]\nallowed_lateness_ms = 5000\n[[inputs]]\nkind = "replay"\n'
                    'path = "x.jsonl"\n')
    env = {"STREAMREC__JOIN__ALLOWED_LATENESS_MS": "7000", "STREAMREC__SAMPLER__NEGATIVE_RATE": "0.5",
           "STREAMREC__OUTPUT__DIR": "elsewhere", "OTHER": "1"}
    cfg = load_config(path, environ=env)
    assert cfg.app == "feed" and cfg.join.allowed_lateness_ms == 7000
    assert cfg.sampler.negative_rate == 0.5 and cfg.output.dir == "elsewhere"
    assert cfg.inputs[0].path == "x.jsonl"


def test_json_config_file_and_its_errors(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"app": "feed", "join": {"allowed_lateness_ms": 5000}}')
    cfg = load_config(path, environ={})
    assert cfg.app == "feed" and cfg.join.allowed_lateness_ms == 5000
    path.write_text('{"app": "feed",')
    with pytest.raises(ConfigError, match="c.json: invalid JSON"):
        load_config(path, environ={})
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a table / JSON object"):
        load_config(path, environ={})
    path.write_text('{"jion": {}}')
    with pytest.raises(ConfigError, match="jion: unknown key"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"jion": {}}, "jion: unknown key"),
        ({"join": {"allowed_lateness": 1}}, "join.allowed_lateness: unknown key"),
        ({"join": {"allowed_lateness_ms": "1s"}}, "join.allowed_lateness_ms: expected int, got str"),
        ({"join": {"window_ms": {"click": "x"}}}, "join.window_ms.click: expected int"),
        ({"inputs": [{"kind": "nope"}]}, "inputs[0].kind: expected one of"),
        ({"inputs": [{"kind": "replay"}]}, "inputs[0].path: required"),
        ({"sampler": {"negative_rate": 0}}, "sampler.negative_rate"),
        ({"output": {"kind": "files", "dir": 3}}, "output.dir: expected str, got int"),
        ({"kafka": {"client": []}}, "kafka.client: expected dict, got list"),
        ({"serving": {"pool": {"features": ["blend", "nope"]}}},
         "serving.pool.features: unknown ['nope']"),
        ({"serving": {"pool": {"features": ["pop"]}}}, "serving.pool.features: 'blend' is required"),
        ({"serving": {"pool": {"pool_size": 1}}}, "serving.pool.pool_size: must be >= 2"),
        ({"serving": {"pool": {"learning_rate": 0.0}}}, "serving.pool.learning_rate: must be > 0"),
    ],
)
def test_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(data, environ={})


def test_reference_lists_every_key_with_doc() -> None:
    rows = {key: (kind, default, text) for key, kind, default, text in reference()}
    assert "join.allowed_lateness_ms" in rows and "inputs[].path" in rows
    assert all(text for text in (r[2] for r in rows.values()))


def test_docs_config_md_is_the_generated_reference() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert docs.read_text() == reference_markdown(), "regenerate: streamrec config-reference > docs/config.md"


def test_config_tables_in_docs_are_generated_from_the_code() -> None:
    root = Path(__file__).resolve().parents[1]
    docs = generated_docs(root)
    assert sum(text.count("<!-- config-table:") for text in docs.values()) >= 2
    stale = [str(path.relative_to(root)) for path, text in docs.items() if path.read_text() != text]
    assert not stale, f"regenerate: streamrec config-reference --update-docs ({stale})"


def test_config_table_renders_the_code_defaults() -> None:
    block = "<!-- config-table: join.wait_ms_override sampler.negative_rate -->\nold\n<!-- /config-table -->"
    text = render_doc_tables(f"intro\n{block}\nrest")
    assert "| `join.wait_ms_override` | 600000 (10 min) |" in text
    assert "| `sampler.negative_rate` | 0.1 |" in text and "old" not in text
    assert text.startswith("intro\n<!-- config-table:") and text.endswith("<!-- /config-table -->\nrest")
    assert render_doc_tables(text) == text
    with pytest.raises(ConfigError, match="join.nope: not a config key"):
        config_table(["join.nope"])


def test_index_table_keys_and_the_code_set_dim() -> None:
    config = load_config({"index": {"threads": 1, "ef": 50, "rebuild_fraction": 0.4}}, environ={})
    assert (config.index.threads, config.index.ef, config.index.rebuild_fraction) == (1, 50, 0.4)
    assert (load_config(None, environ={}).index.ef, IndexConfig().rebuild_fraction) == (200, 0.3)
    with pytest.raises(ConfigError, match="index.dim: unknown key"):
        load_config({"index": {"dim": 8}}, environ={})
    assert "dim" not in config.to_dict()["index"]
    assert load_config(config, environ={}) == config
    assert "index.dim" not in {row[0] for row in reference()}


def test_consumer_and_producer_only_kafka_settings() -> None:
    """kafka.consumer / kafka.producer take settings only one client knows (fetch waits,
    linger); the flow's consumers wait at most 10 ms per empty fetch unless told."""
    config = load_config({"kafka": {"consumer": {"fetch_min_bytes": 1024},
                                    "producer": {"linger_ms": 0}}})
    consumer = config.kafka.client_settings("consumer")
    assert consumer["fetch_min_bytes"] == 1024 and consumer["fetch_max_wait_ms"] == 10
    assert config.kafka.client_settings("producer")["linger_ms"] == 0
    assert "linger_ms" not in consumer and "fetch_min_bytes" not in config.kafka.client_settings(
        "producer")
    waits = load_config({"kafka": {"consumer": {"fetch_max_wait_ms": 200}}})
    assert waits.kafka.client_settings("consumer")["fetch_max_wait_ms"] == 200
    for bad, message in (
        ({"consumer": {"linger_ms": 5}}, "kafka.consumer.linger_ms: not a setting of kafka-python's KafkaConsumer"),
        ({"producer": {"fetch_max_wait_ms": 5}}, "kafka.producer.fetch_max_wait_ms: not a setting"),
        ({"consumer": {"ssl_cafile": "x"}}, "kafka.consumer.ssl_cafile: set kafka.ssl_cafile instead"),
        ({"client": {"fetch_max_wait_ms": 5}}, "kafka.consumer or kafka.producer"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config({"kafka": bad})
