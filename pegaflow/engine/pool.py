"""The pool: one anonymous mmap, first-touched by parallel threads, then pinned with
``cudaHostRegister`` (GPU mode) and exposed as a uint8 CPU tensor.

Not torch's pinned allocator: it rounds up to a power of two and pinned 32 GiB in 18.9 s on
the H200 (``shared/reference/field-notes.md``). Faulting the pages in from many threads and
registering them once is what the Rust original does; bench/pool.py measures the two.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

logger = logging.getLogger(__name__)

# cudaHostRegisterPortable | cudaHostRegisterMapped: pinned for every device's context and
# mapped, so the Triton kernels may read and write it directly (zero-copy saves and loads).
_REGISTER_FLAGS = 0x01 | 0x02
# Bytes one touch task covers: large enough that task overhead vanishes, small enough that
# 16 threads stay balanced on an 8 GiB pool.
_TOUCH_TASK_BYTES = 256 << 20
# Transparent huge pages, where the kernel offers them: 512x fewer faults to take and to pin.
_HUGE_PAGE = 2 << 20


class PoolError(RuntimeError):
    """The pool could not be allocated or pinned."""


class PinnedPool:
    """``nbytes`` of host memory, pinned for CUDA when ``pin`` is true; ``tensor`` views all of it."""

    def __init__(self, nbytes: int, *, pin: bool, threads: int = 1) -> None:
        if not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"pool size must be a positive int, got {nbytes!r}")
        self.nbytes = nbytes
        self.pinned = False
        self.timings: dict[str, float] = {}
        start = time.perf_counter()
        mapped = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
        try:
            self._mmap = mmap.mmap(-1, mapped, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as exc:
            raise PoolError(f"mmap of {nbytes} bytes failed: {exc}") from exc
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                logger.debug("MADV_HUGEPAGE refused; touching 4 KiB pages")
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8, count=nbytes)
        self.timings["mmap_s"] = time.perf_counter() - start
        _touch(self._address, mapped, threads)
        self.timings["touch_s"] = time.perf_counter() - start - self.timings["mmap_s"]
        if pin:
            self._register(mapped)
            self.timings["register_s"] = time.perf_counter() - start - self.timings["mmap_s"] - self.timings["touch_s"]
        self._mapped = mapped
        logger.info("pool of %d bytes ready (%s)", nbytes, ", ".join(f"{k}={v:.3f}" for k, v in self.timings.items()))

    @property
    def address(self) -> int:
        return self._address

    def _register(self, mapped: int) -> None:
        cudart = _cudart()
        err = cudart.cudaHostRegister(ctypes.c_void_p(self._address), ctypes.c_size_t(mapped), _REGISTER_FLAGS)
        if err != 0:
            message = _error_string(cudart, err)
            cudart.cudaGetLastError()  # clear it: torch would report it at its next CUDA check
            self.close()
            raise PoolError(
                f"cudaHostRegister of {mapped} bytes failed: error {err} ({message}); "
                "is the memlock limit (ulimit -l) or the host's free memory too small?"
            )
        self.pinned = True

    def close(self) -> None:
        """Unregister and unmap; the tensor must not be used afterwards."""
        if self.pinned:
            cudart = _cudart()
            err = cudart.cudaHostUnregister(ctypes.c_void_p(self._address))
            if err != 0:
                cudart.cudaGetLastError()
                logger.warning("cudaHostUnregister failed: error %d (%s)", err, _error_string(cudart, err))
            self.pinned = False
        if self._mmap is None:
            return
        self.tensor = torch.empty(0, dtype=torch.uint8)
        try:
            self._mmap.close()
        except BufferError:
            # Someone still holds a view of the pool: the mapping goes when they let go.
            logger.debug("pool views still alive; unmapping deferred to garbage collection")
        self._mmap = None


def _touch(address: int, nbytes: int, threads: int) -> None:
    """Fault every page in, one task per ``_TOUCH_TASK_BYTES``, ``threads`` at a time.

    ctypes calls drop the GIL, so the memsets run truly in parallel; the kernel zero-fills
    each page on its first write, so the pool is also deterministic (all zeros).
    """
    ranges = [(off, min(_TOUCH_TASK_BYTES, nbytes - off)) for off in range(0, nbytes, _TOUCH_TASK_BYTES)]
    if threads <= 1 or len(ranges) == 1:
        for off, size in ranges:
            ctypes.memset(address + off, 0, size)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pegaflow-touch") as pool:
        list(pool.map(lambda r: ctypes.memset(address + r[0], 0, r[1]), ranges))


_CUDART: ctypes.CDLL | None = None
_CUDART_LOCK = threading.Lock()


def _cudart() -> ctypes.CDLL:
    """The CUDA runtime torch itself uses (same error state), through ctypes."""
    global _CUDART
    with _CUDART_LOCK:
        if _CUDART is not None:
            return _CUDART
        torch.cuda.init()
        lib = None
        for path in _loaded_libraries("libcudart"):
            lib = ctypes.CDLL(path)
            break
        if lib is None:
            for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
                try:
                    lib = ctypes.CDLL(name)
                    break
                except OSError:
                    continue
        if lib is None:
            raise PoolError("cannot find the CUDA runtime library (libcudart) torch loaded")
        lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        _CUDART = lib
        return lib


def _loaded_libraries(stem: str) -> list[str]:
    try:
        with open(f"/proc/{os.getpid()}/maps") as maps:
            paths = {line.split()[-1] for line in maps if stem in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def _error_string(cudart: ctypes.CDLL, err: int) -> str:
    text = cudart.cudaGetErrorString(err)
    return text.decode() if text else "unknown"
