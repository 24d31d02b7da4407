"""A reused interprocess event (its IPC handle exported once, cached by the worker) still
orders each save after its own forward. Run on a GPU host with
``python -m pytest -q -m gpu tests/test_connector_events_gpu.py``.
"""

from __future__ import annotations

import time

import pytest
import torch

from pegaflow.connector.config import ConnectorSettings
from pegaflow.connector.link import EngineLink
from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, SaveJob
from pegaflow.connector.worker_side import ConnectorWorker, InstanceGeometry
from pegaflow.kernels.layouts import allocate_attention_kv_cache
from test_connector_gpu import BLOCK, HEAD, HEADS, NUM_BLOCKS, NUM_LAYERS, kv_cache_config_for

pytestmark = pytest.mark.gpu


def collect_until(worker, cond, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        worker.collect(wait_s=0.2)
        if cond():
            return
    raise AssertionError("timed out")


def test_saves_behind_one_reused_event_each_wait_for_their_own_forward():
    from pegaflow.server.spawn import ServerProcess

    with ServerProcess(pool_size="512mb", device="0") as srv:
        built = allocate_attention_kv_cache(
            "LBNHC", num_layers=NUM_LAYERS, num_blocks=NUM_BLOCKS, num_kv_heads=HEADS, head_size=HEAD,
            block_size=BLOCK, dtype=torch.bfloat16, device="cuda",
        )
        names = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]
        settings = ConnectorSettings(endpoint=srv.ipc, instance_id="events", transfer_timeout_s=30.0)
        geometry = InstanceGeometry("events", "gpu-test-model", "auto:bfloat16", "LBNHC", BLOCK, 1, False)
        worker = ConnectorWorker(settings, EngineLink(settings, "gpu test"), geometry, rank=0)
        worker.register_kv_caches(dict(zip(names, built.views)), kv_cache_config_for(built, names))
        assert worker._registered

        def pages(ids):
            return [torch.cat([r.pages(NUM_BLOCKS)[b] for r in worker._regions.regions]).cpu() for b in ids]

        expected, all_hashes = [], []
        for step in range(3):
            src = [1 + step, 10 + step]
            hashes = [bytes([step, i]) * 16 for i in range(len(src))]
            # The forward: a long kernel, then the writes; the save is submitted at once and
            # only the (reused) event keeps the server from reading the old bytes.
            torch.cuda._sleep(200_000_000)
            for b in src:
                for view in built.views:
                    view[b].copy_(torch.randn_like(view[b], dtype=torch.float32).to(view.dtype))
            worker.bind(PegaConnectorMetadata(save=SaveJob(100 + step, tuple(src), tuple(hashes))))
            worker.wait_for_save()
            worker.clear()
            torch.cuda.synchronize()
            expected += pages(src)
            all_hashes += hashes
            metas = []
            collect_until(worker, lambda: metas.append(worker.take_worker_meta()) or metas[-1] is not None)
            assert metas[-1].saves_done == {100 + step: 1} and metas[-1].saves_failed == 0
        assert worker._events._made == 1  # one event served all three saves

        dst = list(range(40, 40 + len(all_hashes)))
        worker.bind(PegaConnectorMetadata(loads=[LoadJob(7, "req", tuple(dst), tuple(all_hashes))]))
        worker.start_load_kv()
        worker.clear()
        done: set[str] = set()
        failed: set[str] = set()

        def finished():
            f, x = worker.take_transfer_results()
            done.update(f)
            failed.update(x)
            return "req" in done

        collect_until(worker, finished)
        assert not failed
        torch.cuda.synchronize()
        for got, want in zip(pages(dst), expected):
            assert torch.equal(got, want)
        worker.shutdown()
