"""The CUDA IPC path through a real server process (GPU mode): this test process is the worker.

It allocates a KV cache on the GPU, shares it with the server by CUDA IPC, writes blocks
behind a long GPU sleep, records an interprocess event and saves at once (the server's copy
must wait on the event, or it reads the old bytes), overwrites the cache, loads the blocks
elsewhere and compares bit for bit; blocks not loaded must be untouched.

    python -m pytest -q -m gpu tests/test_server_gpu.py
"""

from __future__ import annotations

import os

import pytest
import torch

from pegaflow.client import PegaClient, PegaServerError
from pegaflow.server import protocol as P
from pegaflow.server.spawn import ServerProcess
from test_server_support import hashes, wait_completion

pytestmark = pytest.mark.gpu

LAYERS, BLOCKS, PAGE = 4, 64, 16 << 10  # 4 layer regions of 64 blocks x 16 KiB


@pytest.fixture(scope="module")
def server():
    with ServerProcess(pool_size="256mb", device="0") as proc:
        yield proc
        assert proc.alive(), "\n".join(proc.log)


def new_gpu_cache(client: PegaClient, instance_id: str) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    client.register_instance(instance_id, model="gpu-test", kv_dtype="int8", layout="LBNHC", block_size=16,
                             page_bytes=[PAGE] * LAYERS)
    backing = torch.randint(-128, 128, (LAYERS, BLOCKS, PAGE), dtype=torch.int8, device="cuda:0")
    regions = [(layer * BLOCKS * PAGE, PAGE, PAGE) for layer in range(LAYERS)]
    assert client.register_kv_caches(instance_id, 0, backing, regions, BLOCKS, device="cuda:0") == LAYERS * PAGE
    return backing, regions


def test_cuda_ipc_save_waits_on_the_event_and_load_is_bit_exact(server):
    assert server.log and not any("CPU mode" in line for line in server.log), "\n".join(server.log)
    with PegaClient(server.ipc, timeout_s=30.0, name="gpu-worker") as client:
        assert client.hello()["cpu_mode"] is False
        backing, _ = new_gpu_cache(client, "gpu-a")
        src, dst = [1, 7, 8, 40, 63], [0, 2, 9, 41, 62]
        written = torch.randint(-128, 128, (LAYERS, len(src), PAGE), dtype=torch.int8, device="cuda:0")
        event = torch.cuda.Event(interprocess=True)
        torch.cuda._sleep(500_000_000)  # hundreds of ms of GPU time before the blocks are written
        backing[:, src] = written
        event.record()
        hs = hashes(len(src))
        client.save("gpu-a", 0, 1, src, hs, event=event)  # at once: the server's copy must wait
        done = wait_completion(client, 1, timeout_s=60)
        assert done.ok and done.num_blocks == len(src), done
        assert client.query("gpu-a", hs) == len(src)

        backing.copy_(torch.randint(-128, 128, backing.shape, dtype=torch.int8, device="cuda:0"))
        before = backing.clone()
        torch.cuda.synchronize()
        client.load("gpu-a", 0, 2, dst, hs)
        done = wait_completion(client, 2, timeout_s=60)
        assert done.ok and done.num_blocks == len(src), done
        torch.cuda.synchronize()
        for i, b in enumerate(dst):
            got, want = backing[:, b].cpu(), written[:, i].cpu()
            assert torch.equal(got, want), f"block {b}: first mismatch at {(got != want).nonzero()[0].tolist()}"
        untouched = [b for b in range(BLOCKS) if b not in dst]
        assert torch.equal(backing[:, untouched], before[:, untouched])
        client.unregister_kv_caches("gpu-a", 0)
        assert client.stats()["server"]["open_mappings"] == 0


def test_cuda_errors(server):
    with PegaClient(server.ipc, timeout_s=30.0) as client:
        backing, regions = new_gpu_cache(client, "gpu-b")
        with pytest.raises(PegaServerError) as info:  # a garbage event handle
            client.save("gpu-b", 0, 1, [0], hashes(1), event=os.urandom(64))
        assert info.value.code == P.SHARE_FAILED
        with pytest.raises(PegaServerError) as info:  # regions past the shared allocation
            client.register_kv_caches("gpu-b", 0, backing, regions, BLOCKS + 1)
        assert info.value.code == P.BAD_FIELD
        cpu = torch.zeros(LAYERS * BLOCKS * PAGE, dtype=torch.int8)  # a CPU cache on a GPU server: refused
        with pytest.raises(PegaServerError) as info:
            client.register_kv_caches("gpu-b", 0, cpu, regions, BLOCKS)
        assert info.value.code in (P.BAD_FIELD, P.SHARE_FAILED)
        assert client.health()["status"] == "ok"
