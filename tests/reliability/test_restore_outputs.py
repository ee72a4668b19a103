"""Safe restore of file outputs (issue 19, point 4).

A JSONL sink's recovery state is its file's length; resuming truncates the file back to
it. With the recovery directory kept but the output directory lost (or a file cut
short), that "truncation" used to extend every file with NUL bytes up to the recorded
length and the flow exited 0. Now the flow stops at start with an error naming the
file, and writes nothing; with the output directory restored it resumes normally.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from bytewax.recovery import RecoveryConfig
from bytewax.testing import run_main

from flows.evaluate import read_jsonl
from flows.recsys import build
from operators.sinks import OutputFileLost

from .flow_process import FlowProcess, init_recovery, simulated_log


def _config(tmp_path: Path) -> dict:
    return {"inputs": [{"kind": "replay", "path": str(tmp_path / "log.jsonl"), "batch_size": 200}],
            "output": {"dir": str(tmp_path / "out")},
            "snapshots": {"dir": str(tmp_path / "store")}, "serving": {"poll_ms": 0}}


def _chain(err: BaseException | None) -> list[BaseException]:
    """The exception and its causes (Bytewax wraps the sink's error)."""
    out = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _no_nul(directory: Path) -> bool:
    return all(b"\x00" not in p.read_bytes() for p in directory.glob("*.jsonl"))


@pytest.fixture()
def finished_run(tmp_path: Path) -> tuple[dict, RecoveryConfig]:
    """A run to the end of a small log with recovery, and a backup of its outputs."""
    simulated_log(tmp_path / "log.jsonl", 2_000, seed=3, requests_per_s=1.0)
    config = _config(tmp_path)
    recovery = RecoveryConfig(init_recovery(tmp_path / "recovery"))
    run_main(build(config), epoch_interval=timedelta(0), recovery_config=recovery)
    assert read_jsonl(tmp_path / "out" / "examples.jsonl")
    shutil.copytree(tmp_path / "out", tmp_path / "backup")
    return config, recovery


def test_lost_output_directory_stops_the_resume_naming_the_file(tmp_path, finished_run) -> None:
    config, recovery = finished_run
    shutil.rmtree(tmp_path / "out")
    with pytest.raises(Exception) as caught:
        run_main(build(config), epoch_interval=timedelta(0), recovery_config=recovery)
    [lost] = [e for e in _chain(caught.value) if isinstance(e, OutputFileLost)]
    assert "cannot resume: output file" in str(lost) and str(tmp_path / "out") in str(lost)
    assert not (tmp_path / "out").exists() or _no_nul(tmp_path / "out")


def test_shorter_output_file_stops_the_resume(tmp_path, finished_run) -> None:
    config, recovery = finished_run
    examples = tmp_path / "out" / "examples.jsonl"
    data = examples.read_bytes()
    examples.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as caught:
        run_main(build(config), epoch_interval=timedelta(0), recovery_config=recovery)
    [lost] = [e for e in _chain(caught.value) if isinstance(e, OutputFileLost)]
    assert f"output file {examples} has {len(data) // 2} bytes" in str(lost)
    assert _no_nul(tmp_path / "out")


def test_restored_output_directory_resumes(tmp_path, finished_run) -> None:
    config, recovery = finished_run
    shutil.rmtree(tmp_path / "out")
    shutil.copytree(tmp_path / "backup", tmp_path / "out")
    run_main(build(config), epoch_interval=timedelta(0), recovery_config=recovery)
    assert _no_nul(tmp_path / "out")
    examples = read_jsonl(tmp_path / "out" / "examples.jsonl")
    assert examples == read_jsonl(tmp_path / "backup" / "examples.jsonl")


def test_the_flow_process_exits_non_zero_with_the_file_in_its_log(tmp_path) -> None:
    """As an operator sees it: ``python -m bytewax.run ... -r DIR`` after the output
    directory was lost exits non-zero at start, its log naming the file."""
    simulated_log(tmp_path / "log.jsonl", 1_500, seed=4, requests_per_s=1.0)
    config = _config(tmp_path)
    db = init_recovery(tmp_path / "recovery")
    FlowProcess(config, tmp_path / "run1.log", recovery=db).start().wait(180)
    shutil.rmtree(tmp_path / "out")
    again = FlowProcess(config, tmp_path / "run2.log", recovery=db).start()
    assert again.proc is not None
    try:
        code = again.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        again.stop()
        raise
    log = again.tail(100_000)
    assert code != 0, log
    assert "cannot resume: output file" in log and str(tmp_path / "out") in log
    assert not (tmp_path / "out").exists() or _no_nul(tmp_path / "out")
