"""``streamrec tap`` like kcat (issue 20 point 3): app topics (inputs included) on the real
Tansu broker, positions, partitions, formats, follow, filter errors (exit 2), and local
output files when the config writes files."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from flows.cli import main
from flows.config import load_config
from flows.tap import resolve

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, app: str, output: str = "files") -> str:
    path = tmp_path / f"{app}.toml"
    path.write_text(f'app = "{app}"\n[output]\nkind = "{output}"\ndir = "{tmp_path / "out"}"\n')
    return str(path)


def _tap(capsys, *args: str) -> tuple[int, list[str], str]:
    code = main(["tap", *args])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_resolve_decides_between_kafka_and_local_files(tmp_path) -> None:
    files = load_config({"app": "shop", "output": {"dir": str(tmp_path)}})
    kafka = load_config({"app": "shop", "output": {"kind": "kafka"},
                         "inputs": [{"kind": "kafka", "topics": ["events", "clicks"]}]})
    assert resolve("examples", files).kind == "files"
    assert resolve("examples", files).path == tmp_path / "examples.jsonl"
    assert (resolve("examples", kafka).kind, resolve("examples", kafka).topic) == ("kafka", "shop.examples")
    assert (resolve("events", files).kind, resolve("events", files).topic) == ("kafka", "shop.events")
    assert resolve("clicks", kafka).topic == "shop.clicks"
    assert resolve("other.topic", files).topic == "other.topic"
    assert resolve("examples", files, bootstrap="h:1").kind == "kafka"
    assert resolve("examples", files, source="kafka").kind == "kafka"
    assert resolve("examples", kafka, source="files").kind == "files"


@pytest.mark.kafka
def test_replay_then_tap_events_shows_what_replay_produced(kafka_broker, tmp_path, capsys) -> None:
    """The README sequence: `streamrec replay LOG --topic <app>.events`, then `streamrec
    tap events` (an input topic) prints exactly the replayed records."""
    from events.simulator import write_log

    app = f"tap{tmp_path.name[-8:]}".replace("_", "")
    log = tmp_path / "log.jsonl"
    write_log(str(log), 300, 5)
    config = _config(tmp_path, app)
    bootstrap = kafka_broker.bootstrap
    assert main(["replay", str(log), "--topic", f"{app}.events", "--bootstrap", bootstrap,
                 "--partitions", "3"]) == 0
    capsys.readouterr()
    code, lines, err = _tap(capsys, "events", "--config", config, "--bootstrap", bootstrap)
    assert code == 0 and f"Kafka topic {app}.events" in err
    replayed = [line for line in log.read_text().splitlines() if line]
    assert sorted(lines) == sorted(replayed)
    # Key, partition, offset and timestamp in a kcat format; the key is the user id.
    code, lines, _ = _tap(capsys, "events", "--config", config, "--bootstrap", bootstrap,
                          "--format", "%p|%o|%k|%T|%s")
    rows = [line.split("|", 4) for line in lines]
    assert {int(r[0]) for r in rows} == {0, 1, 2}
    for part in (0, 1, 2):
        offsets = [int(r[1]) for r in rows if int(r[0]) == part]
        assert offsets == list(range(len(offsets)))
    for _p, _o, key, ts, value in rows:
        event = orjson.loads(value)
        assert key == str(event.get("user_id", "")) and int(ts) > 1e12


@pytest.mark.kafka
def test_positions_partitions_and_formats(kafka_broker, kafka_topic, kafka_produce, capsys) -> None:
    bootstrap = kafka_broker.bootstrap
    topic = kafka_topic(partitions=2)
    kafka_produce(bootstrap, topic, [orjson.dumps({"n": i, "label": i % 2}) for i in range(10)],
                  keys=[f"u{i}".encode() for i in range(10)], partition=0)
    kafka_produce(bootstrap, topic, [orjson.dumps({"n": 100 + i, "label": 1}) for i in range(5)],
                  keys=[b"v"] * 5, partition=1)
    base = [topic, "--bootstrap", bootstrap]
    # -N: the last N of every partition (exact end offsets on Tansu too).
    code, lines, _ = _tap(capsys, *base, "--from", "-3", "--format", "{partition}:{offset}:{key}:{r[n]}")
    assert code == 0
    assert sorted(lines) == sorted(["0:7:u7:7", "0:8:u8:8", "0:9:u9:9",
                                    "1:2:v:102", "1:3:v:103", "1:4:v:104"])
    code, lines, _ = _tap(capsys, *base, "--partition", "1", "--from", "2", "--format", "%o %k %s")
    assert lines == ['2 v {"n":102,"label":1}', '3 v {"n":103,"label":1}', '4 v {"n":104,"label":1}']
    code, lines, _ = _tap(capsys, *base, "--from", "end")
    assert code == 0 and lines == []
    code, lines, _ = _tap(capsys, *base, "--partition", "0", "--format", "json", "--limit", "1")
    [env] = map(orjson.loads, lines)
    assert env["partition"] == 0 and env["offset"] == 0 and env["key"] == "u0"
    assert env["value"] == {"n": 0, "label": 0} and env["ts"] > 1e12
    code, lines, _ = _tap(capsys, *base, "--filter", "label == 1 and n < 100")
    assert sorted(orjson.loads(x)["n"] for x in lines) == [1, 3, 5, 7, 9]
    code, lines, err = _tap(capsys, *base, "--partition", "7")
    assert code == 2 and "not [7]" in err


@pytest.mark.kafka
def test_follow_prints_records_produced_after_the_start(kafka_broker, kafka_topic, kafka_produce) -> None:
    bootstrap = kafka_broker.bootstrap
    topic = kafka_topic(partitions=1)
    kafka_produce(bootstrap, topic, [b'{"n": 0}', b'{"n": 1}'])
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "tap", topic, "--bootstrap", bootstrap, "--follow",
         "--limit", "4", "--format", "%o %s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        first = [proc.stdout.readline().strip() for _ in range(2)]
        assert first == ['0 {"n": 0}', '1 {"n": 1}']
        time.sleep(0.5)
        assert proc.poll() is None  # still following
        kafka_produce(bootstrap, topic, [b'{"n": 2}', b'{"n": 3}'])
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines() == ['2 {"n": 2}', '3 {"n": 3}']


@pytest.mark.kafka
def test_filter_errors_exit_2_on_kafka(kafka_broker, kafka_topic, kafka_produce, capsys) -> None:
    bootstrap = kafka_broker.bootstrap
    topic = kafka_topic(partitions=1)
    kafka_produce(bootstrap, topic, [b'{"label": 1}', b'{"label": 0}'])
    base = [topic, "--bootstrap", bootstrap]
    code, lines, err = _tap(capsys, *base, "--filter", "lable == 1")
    assert code == 2 and "unknown field(s) lable" in err
    code, lines, err = _tap(capsys, *base, "--filter", "label ==")
    assert code == 2 and "--filter 'label =='" in err and lines == []
    code, lines, err = _tap(capsys, *base, "--filter", "label.upper() == 'X'")
    assert code == 2 and "failed on every record" in err
    code, lines, _ = _tap(capsys, *base, "--filter", "label == 1")
    assert code == 0 and lines == ['{"label": 1}']


def test_local_files_positions_follow_and_filter(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    records = [{"user_id": f"u{i}", "ts": 1_700_000_000_000 + i, "label": i % 2} for i in range(6)]
    (out / "examples.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    config = _config(tmp_path, "files")
    code, lines, err = _tap(capsys, "examples", "--config", config, "--from", "-2",
                            "--format", "%p %o %k %T")
    assert code == 0 and lines == ["0 4 u4 1700000000004", "0 5 u5 1700000000005"]
    assert "examples.jsonl (local output" in err
    code, lines, _ = _tap(capsys, "examples", "--config", config, "--filter", "label == 1 and ts > 1700000000001")
    assert [orjson.loads(x)["user_id"] for x in lines] == ["u3", "u5"]
    code, _, err = _tap(capsys, "examples", "--config", config, "--filter", "lable == 1")
    assert code == 2 and "unknown field(s) lable" in err
    code, _, err = _tap(capsys, "examples", "--config", config, "--partition", "0")
    assert code == 2 and "Kafka topics" in err
    # --follow sees lines appended by the writer, a half-written line only once complete.
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "tap", "examples", "--config", config, "--from", "end",
         "--follow", "--limit", "2", "--format", "%o %k"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert "examples.jsonl" in proc.stderr.readline()  # started (imports take seconds)
        time.sleep(1.0)
        with (out / "examples.jsonl").open("ab") as f:
            f.write(b'{"user_id": "u6", "ts": 1')
            f.flush()
            time.sleep(0.5)
            f.write(b'}\n{"user_id": "u7", "ts": 2}\n')
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert stdout.splitlines() == ["6 u6", "7 u7"]
