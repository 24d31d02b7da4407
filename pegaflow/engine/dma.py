"""Copy-engine copies by raw address on a given stream, through the CUDA driver API.

The staged pipeline issues a few DMA calls per chunk; through ``Tensor.copy_`` each costs
~9 us of dispatch plus a current-stream switch (~30 us on the H200's host). Here a call is
one ctypes call on the stream's handle: both sides must be device memory or pinned (or
registered) host memory, which unified addressing lets the driver tell apart.

``strided_plan`` describes one block of a layer-first KV cache as a few 2D copies (one row
per layer, the rows ``pitch`` apart), so that a save can run on the copy engines alone: no
SM work in the server, which otherwise takes the GPU away from the model's process in time
slices (see ``EngineConfig.save_mode``).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

_lock = threading.Lock()
_driver: ctypes.CDLL | None = None
_UNIFIED = 4  # CU_MEMORYTYPE_UNIFIED: the driver tells device from (registered) host addresses
# CU_DEVICE_ATTRIBUTE_MAX_PITCH is 2^31 - 1 on Hopper; a layer stride past it (a KV cache of
# over ~2 GiB per layer) is not expressible as one 2D copy.
MAX_PITCH = (1 << 31) - 1


class _Copy2D(ctypes.Structure):
    """CUDA_MEMCPY2D."""

    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
        ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
        ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t), ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t),
    ]


def _lib() -> ctypes.CDLL:
    global _driver
    with _lock:
        if _driver is None:
            lib = ctypes.CDLL("libcuda.so.1")
            lib.cuMemcpyAsync.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
            lib.cuMemcpyAsync.restype = ctypes.c_int
            lib.cuMemcpy2DAsync_v2.argtypes = [ctypes.POINTER(_Copy2D), ctypes.c_void_p]
            lib.cuMemcpy2DAsync_v2.restype = ctypes.c_int
            _driver = lib
        return _driver


def copy_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Enqueue ``nbytes`` from address ``src`` to ``dst`` on the CUDA stream handle ``stream``."""
    if nbytes <= 0:
        return
    rc = _lib().cuMemcpyAsync(dst, src, nbytes, stream)
    if rc != 0:
        raise RuntimeError(f"cuMemcpyAsync of {nbytes} bytes failed: CUDA driver error {rc}")


@dataclass(frozen=True)
class Rows:
    """``height`` rows of ``width`` bytes: in the KV cache at ``src + b * block_stride + i *
    src_pitch`` for block ``b``, in a slot at ``dst + i * dst_pitch`` (bytes into the slot)."""

    src: int
    src_pitch: int
    dst: int
    dst_pitch: int
    width: int
    height: int

    @property
    def contiguous(self) -> bool:
        """The rows touch on both sides: one run of ``width * height`` bytes."""
        return self.src_pitch == self.width == self.dst_pitch

    @property
    def run_bytes(self) -> int:
        """The longest piece the copy engine moves in one go."""
        return self.width * self.height if self.contiguous else self.width


def strided_plan(geometry: tuple[tuple[int, ...], ...]) -> tuple[Rows, ...] | None:
    """One block's pages as at most two strided row sets, or None if the regions do not line up.

    ``geometry`` is ``KVRegions.geometry`` (bases, block strides, page bytes, page offsets in
    the slot). Layer-first layouts give one set (every layer's page, ``layer_stride`` apart);
    K and V in separate regions per layer give two (the K pages and the V pages); block-first
    layouts give one set of rows that touch, i.e. one contiguous run.
    """
    bases, strides, pages, offsets = geometry
    n = len(bases)
    if len(set(strides)) != 1:
        return None
    for step in (1, 2):
        if n % step:
            continue
        plan = []
        for first in range(step):
            idx = list(range(first, n, step))
            rows = _rows(idx, bases, pages, offsets)
            if rows is None:
                break
            plan.append(rows)
        else:
            return tuple(plan)
    return None


def _rows(idx: list[int], bases, pages, offsets) -> Rows | None:
    width = pages[idx[0]]
    if any(pages[i] != width for i in idx):
        return None
    if len(idx) == 1:
        return Rows(bases[idx[0]], width, offsets[idx[0]], width, width, 1)
    src_pitch = bases[idx[1]] - bases[idx[0]]
    dst_pitch = offsets[idx[1]] - offsets[idx[0]]
    if any(bases[b] - bases[a] != src_pitch or offsets[b] - offsets[a] != dst_pitch for a, b in zip(idx, idx[1:])):
        return None
    if not (width <= src_pitch <= MAX_PITCH and width <= dst_pitch <= MAX_PITCH):
        return None  # rows that overlap, run backwards, or sit too far apart for one 2D copy
    return Rows(bases[idx[0]], src_pitch, offsets[idx[0]], dst_pitch, width, len(idx))


class Copier2D:
    """Enqueues 2D copies; reuses one descriptor (one instance per thread, or under a lock)."""

    def __init__(self) -> None:
        self._d = _Copy2D()
        self._d.srcMemoryType = _UNIFIED
        self._d.dstMemoryType = _UNIFIED
        self._call = _lib().cuMemcpy2DAsync_v2
        self._ref = ctypes.byref(self._d)

    def copy(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
             stream: int) -> None:
        d = self._d
        d.srcDevice, d.srcPitch, d.dstDevice, d.dstPitch, d.WidthInBytes, d.Height = (
            src, src_pitch, dst, dst_pitch, width, height)
        rc = self._call(self._ref, stream)
        if rc != 0:
            raise RuntimeError(f"cuMemcpy2DAsync of {height} rows of {width} bytes failed: CUDA driver error {rc}")
