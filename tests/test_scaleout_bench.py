"""bench/scaleout.py: a tiny run through 1 and 2 real processes prints every figure, and
its cross-process output check fails on lost, extra or duplicated outputs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("scaleout", ROOT / "bench" / "scaleout.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaleout"] = module
    spec.loader.exec_module(module)
    return module


def _run(ids: list[str], recs: int, events_in: int = 100) -> dict[str, Any]:
    return {"summary": {"events_in": events_in}, "example_ids": ids,
            "recommendations": recs, "rec_ids": {f"r{i}" for i in range(recs)}}


def test_output_check_catches_lost_duplicated_and_different_outputs() -> None:
    check = _bench().check_same
    one = _run(["a", "b", "c"], 5)
    check(one, _run(["c", "a", "b"], 5), lines=100, requests=5)  # same outputs: passes
    for bad, why in ((_run(["a", "b", "c", "c"], 5), "written twice"),
                     (_run(["a", "b"], 5), "other examples"),
                     (_run(["a", "b", "c"], 4), "recommendations"),
                     (_run(["a", "b", "c"], 5, events_in=200), "events_in")):
        with pytest.raises(SystemExit, match=why):
            check(one, bad, lines=100, requests=5)


@pytest.mark.slow
def test_tiny_scaleout_run_prints_every_figure(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scaleout.py"), "-n", "3000"],
                          cwd=ROOT, capture_output=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    figures = orjson.loads(proc.stdout.splitlines()[-1])
    for key in ("events_per_s_1proc", "events_per_s_2proc", "ratio", "events_per_cpu_s_1proc",
                "events_per_cpu_s_2proc", "busy_share_ranker_2proc", "busy_share_index_2proc",
                "busy_share_metrics_2proc", "ceiling_events_per_s_ranker", "load_1min_start"):
        assert key in figures
    assert figures["events"] == 3000
    # both processes worked: the shards are placed round robin (operators/placement.py;
    # Bytewax's hash of the plain names gave 3 + 5 user and 0 + 4 item shards)
    assert figures["user_keys_per_process_2proc"] == [4, 4]
    assert figures["item_keys_per_process_2proc"] == [2, 2]
