"""bench/request_timeline.py on the CPU: the server's stamps are patched in by method name, so
a rename in the server, engine or lane must show up here, not as an empty column on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_STEPS = ("call -> server has the message", "message -> engine call", "completion -> push sends",
                "push sends -> client has it", "total")


@pytest.mark.parametrize("wait", [True, False], ids=["wait-for-acceptance", "no-wait"])
def test_timeline_stamps_every_server_step(tmp_path, wait):
    out = tmp_path / "timeline.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "request_timeline.py"), "--cpu", "--n", "2",
                          "--sizes", "1,2", "--gap-ms", "0", "--json", str(out), *(["--wait"] if wait else [])],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    steps = json.loads(out.read_text())["steps_us"]
    assert set(steps) == {"save 1", "save 2", "load 1", "load 2"}
    for name, row in steps.items():
        missing = [s for s in SERVER_STEPS if row[s] is None]
        assert not missing, f"{name}: no stamps for {missing}"
        assert (row["message -> reply sends"] is not None) == wait  # no acceptance reply without waiting
        assert row["total"] >= row["call -> server has the message"] > 0
