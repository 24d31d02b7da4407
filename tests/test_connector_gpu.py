"""The connector's worker side on a GPU with a real server (CUDA IPC, interprocess events).

No vLLM here (the GPU host has none): the KV cache is built as vLLM 0.33 builds it, and the
worker is driven with the metadata the scheduler side would send. Run on a GPU host with
``python -m pytest -q -m gpu tests/test_connector_gpu.py``.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from pegaflow.connector.config import ConnectorSettings
from pegaflow.connector.link import EngineLink
from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, SaveJob
from pegaflow.connector.worker_side import ConnectorWorker, InstanceGeometry
from pegaflow.kernels.layouts import allocate_attention_kv_cache

pytestmark = pytest.mark.gpu

NUM_LAYERS, NUM_BLOCKS, HEADS, HEAD, BLOCK = 4, 64, 8, 128, 16


def kv_cache_config_for(built, names):
    """The parts of vLLM's KVCacheConfig the worker side reads."""
    placement = SimpleNamespace(
        layers=list(names), offset=0, layer_stride=built.layer_stride, block_stride=built.block_stride, size=0
    )
    spec = SimpleNamespace(page_size_bytes=built.page_bytes)
    group = SimpleNamespace(layer_names=list(names), kv_cache_spec=spec)
    return SimpleNamespace(
        kv_cache_tensors=[placement], kv_cache_groups=[group], num_blocks_of=lambda t: NUM_BLOCKS
    )


def wait_until(cond, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
    raise AssertionError("timed out")


@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC"])
def test_save_waits_for_the_forward_then_load_is_bit_identical(layout):
    from pegaflow.server.spawn import ServerProcess

    with ServerProcess(pool_size="512mb", device="0") as srv:
        built = allocate_attention_kv_cache(
            layout, num_layers=NUM_LAYERS, num_blocks=NUM_BLOCKS, num_kv_heads=HEADS, head_size=HEAD,
            block_size=BLOCK, dtype=torch.bfloat16, device="cuda",
        )
        names = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]
        settings = ConnectorSettings(endpoint=srv.ipc, instance_id=f"gpu-{layout}", transfer_timeout_s=30.0)
        geometry = InstanceGeometry(f"gpu-{layout}", "gpu-test-model", "auto:bfloat16", layout, BLOCK, 1, False)
        worker = ConnectorWorker(settings, EngineLink(settings, "gpu test"), geometry, rank=0)
        worker.register_kv_caches(dict(zip(names, built.views)), kv_cache_config_for(built, names))
        assert worker._registered

        def pages(ids):
            return [torch.cat([r.pages(NUM_BLOCKS)[b] for r in worker._regions.regions]).cpu() for b in ids]

        src, dst = list(range(1, 9)), list(range(40, 48))
        hashes = [bytes([layout == "LBNHC", i]) * 16 for i in range(len(src))]
        # The "forward": a long kernel, then the writes, all on the compute stream. The save
        # is submitted at once; only its event keeps the server from reading early.
        torch.cuda._sleep(200_000_000)
        for b in src:
            for view in built.views:
                view[b].copy_(torch.randn_like(view[b], dtype=torch.float32).to(view.dtype))
        worker.bind(PegaConnectorMetadata(save=SaveJob(1, tuple(src), tuple(hashes))))
        worker.wait_for_save()
        worker.clear()
        torch.cuda.synchronize()
        expected = pages(src)
        metas = []

        def saved():
            worker.collect(wait_s=0.2)
            metas.append(worker.take_worker_meta())
            return metas[-1] is not None

        wait_until(saved)
        meta = metas[-1]
        assert meta.saves_done == {1: 1} and meta.blocks_saved == len(src) and meta.saves_failed == 0

        before = pages(range(NUM_BLOCKS))
        worker.bind(PegaConnectorMetadata(loads=[LoadJob(2, "req", tuple(dst), tuple(hashes))]))
        worker.start_load_kv()
        worker.clear()
        done: set[str] = set()
        failed: set[str] = set()

        def finished():
            worker.collect(wait_s=0.2)
            f, x = worker.take_transfer_results()
            done.update(f)
            failed.update(x)
            return "req" in done

        wait_until(finished)
        assert not failed
        torch.cuda.synchronize()
        after = pages(range(NUM_BLOCKS))
        for i, b in enumerate(dst):
            assert torch.equal(after[b], expected[i]), f"block {b} differs from saved block {src[i]}"
        for b in range(NUM_BLOCKS):
            if b not in dst:
                assert torch.equal(after[b], before[b]), f"block {b} was written by the load"
        worker.shutdown()
