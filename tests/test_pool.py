"""The pool: plain memory on the CPU, pinned with cudaHostRegister on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from pegaflow.engine.pool import PinnedPool


def test_cpu_pool_is_zeroed_writable_and_exact_size():
    pool = PinnedPool(3 * (1 << 20) + 5, pin=False, threads=2)
    try:
        t = pool.tensor
        assert t.dtype == torch.uint8 and t.numel() == 3 * (1 << 20) + 5 and t.device.type == "cpu"
        assert int(t.count_nonzero()) == 0
        data = torch.randint(0, 256, (4096,), dtype=torch.uint8)
        t[-4096:] = data
        assert torch.equal(t[-4096:], data) and not pool.pinned
        assert set(pool.timings) == {"mmap_s", "touch_s"}
    finally:
        pool.close()
    pool.close()  # idempotent


@pytest.mark.parametrize("size", [0, -1, 1.5])
def test_bad_sizes(size):
    with pytest.raises(ValueError, match="pool size"):
        PinnedPool(size, pin=False)


@pytest.mark.gpu
def test_gpu_pool_is_pinned_and_copies_asynchronously():
    pool = PinnedPool(64 << 20, pin=True, threads=4)
    try:
        assert pool.pinned and pool.tensor.is_pinned()
        src = torch.randint(0, 256, (8 << 20,), dtype=torch.uint8, device="cuda")
        pool.tensor[1 << 20 : 9 << 20].copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(pool.tensor[1 << 20 : 9 << 20].cuda(), src)
    finally:
        pool.close()
    assert not pool.pinned
    torch.cuda.synchronize()  # no CUDA error left behind


@pytest.mark.gpu
def test_a_failed_register_raises_clearly_and_leaves_no_cuda_error():
    from pegaflow.engine.pool import PoolError

    pool = PinnedPool(4 << 20, pin=True, threads=1)
    with pytest.raises(PoolError, match="cudaHostRegister"):
        pool._register(pool._mapped)  # the same range twice: "already registered"
    # torch checks cudaGetLastError after launches: a stale error would surface here.
    x = torch.ones(1024, device="cuda") * 2
    torch.cuda.synchronize()
    assert float(x.sum()) == 2048
    pool.close()
