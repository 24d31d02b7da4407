"""The end-to-end harness on a GPU, small: the real server in GPU mode, spawned workers with
vLLM-shaped caches over CUDA IPC, saves behind interprocess events recorded after a long GPU
kernel, every load checked bit for bit. No timing assertions.

    python3 -m pytest -q -m gpu tests/test_e2e_gpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

pytestmark = pytest.mark.gpu

SMALL = ["--cache-gib", "1", "--pool-size", "3gb", "--job-blocks", "64", "--rounds", "1",
         "--interference-rounds", "2", "--overhead-n", "5"]


def _check(result, phases: bool) -> None:
    replay = result["results"]["replay"]
    stats = replay["stats"]
    assert stats["mismatches"] == 0, replay["mismatches"]
    assert stats["drained"] and stats["saves_failed"] == 0
    assert stats["loads_ok"] > 0 and stats["blocks_checked"] > 0 and stats["blocks_rechecked"] > 0
    if phases:
        assert result["summary"][1] == "PASS figure phases: every load bit-exact", result["summary"][1]


def test_e2e_gpu_llama_lbnhc_replay_and_figures(tmp_path):
    import e2e

    result = e2e.main(SMALL + ["--steps", "80", "--ttft-tokens", "1024", "--json", str(tmp_path / "e2e.json")])
    _check(result, phases=True)
    methods = {(r.direction, r.method) for r in result["rows"]}
    assert ("ttft", "speedup-1024tok") in methods and ("both", "pegaflow-e2e") in methods


@pytest.mark.parametrize("layout", ["BLHNC", "MLA"])
def test_e2e_gpu_other_layouts_replay(layout):
    import e2e

    result = e2e.main(SMALL + ["--layout", layout, "--steps", "60", "--skip", "bulk,overhead,interference,ttft"])
    _check(result, phases=False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_e2e_gpu_tp2_replay_and_bulk():
    import e2e

    result = e2e.main(SMALL + ["--tp", "2", "--steps", "60", "--skip", "interference,ttft"])
    _check(result, phases=True)
