"""Sharing a KV cache's backing storage with the server: once per registration, by handle.

A worker shares the ONE storage behind its KV cache (vLLM 0.33: one int8 buffer for all
layers) and then sends only block ids; the server copies through its own mapping.

* GPU: ``storage._share_cuda_()`` gives a CUDA IPC handle (what ``torch.multiprocessing``
  sends); the server opens it with ``UntypedStorage._new_shared_cuda`` and checks, with the
  driver, that the claimed range lies inside the real allocation. The mapping is closed when
  the server drops the storage (unregister or client death).
* CPU (no GPU: CI, laptops): the storage is moved into POSIX shared memory and shared by its
  name (``_share_filename_cpu_``; tensors and views over it keep working, it is moved in
  place). This works whatever ``torch.multiprocessing``'s sharing strategy is: the default
  ``file_descriptor`` strategy's segments are unlinked and cannot be named, so the storage
  is moved straight to a named one (``share_memory_()`` first would only copy it twice).
  The server opens it with ``UntypedStorage._new_shared_filename_cpu`` after checking that
  the segment exists and is as large as claimed (a mapping past its end would be SIGBUS).

Interprocess CUDA events travel as their 64-byte ``ipc_handle()``: :func:`share_event` and
:func:`open_event`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

_SHM_NAME = re.compile(rb"^/torch_\d+_\d+_\d+$")  # the names torch's libshm gives segments
_SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class CpuShare:
    """A CPU storage in named POSIX shared memory (torch's file_system handle)."""

    manager: bytes  # torch_shm_manager socket that tracks the segment
    name: bytes
    size: int

    def __post_init__(self) -> None:
        if type(self.manager) is not bytes or not 0 < len(self.manager) <= 4096:
            raise ValueError(f"manager must be a socket path as bytes, got {self.manager!r}")
        if type(self.name) is not bytes or not _SHM_NAME.match(self.name):
            raise ValueError(f"name must be a torch shared-memory name like /torch_1_2_3, got {self.name!r}")
        if type(self.size) is not int or self.size <= 0:
            raise ValueError(f"size must be a positive int, got {self.size!r}")


@dataclass(frozen=True)
class CudaShare:
    """A CUDA storage by IPC handle: the fields of ``UntypedStorage._share_cuda_()``."""

    device: int
    handle: bytes
    size: int
    offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool
    device_uuid: str = ""

    def __post_init__(self) -> None:
        for name in ("device", "size", "offset", "ref_counter_offset"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.size == 0:
            raise ValueError("size must be > 0")
        for name in ("handle", "ref_counter_handle"):
            value = getattr(self, name)
            if type(value) is not bytes or not 0 < len(value) <= 1024:
                raise ValueError(f"{name} must be bytes, got {value!r}")
        if self.event_handle is not None and (type(self.event_handle) is not bytes or len(self.event_handle) > 1024):
            raise ValueError(f"event_handle must be bytes or None, got {self.event_handle!r}")
        if type(self.event_sync_required) is not bool:
            raise ValueError(f"event_sync_required must be a bool, got {self.event_sync_required!r}")
        if type(self.device_uuid) is not str or len(self.device_uuid) > 256:
            raise ValueError(f"device_uuid must be a string, got {self.device_uuid!r}")


ShareHandle = CpuShare | CudaShare


def backing_storage(obj: torch.Tensor | torch.UntypedStorage) -> torch.UntypedStorage:
    """The untyped storage behind a tensor (or the storage itself)."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage()
    if isinstance(obj, torch.UntypedStorage):
        return obj
    raise ValueError(f"expected a tensor or an UntypedStorage, got {type(obj).__name__}")


def share_storage(obj: torch.Tensor | torch.UntypedStorage) -> ShareHandle:
    """A handle another process on this host can open; CPU storage is moved to shared memory."""
    storage = backing_storage(obj)
    if storage.device.type == "cuda":
        device, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = storage._share_cuda_()
        return CudaShare(
            device=int(device), handle=bytes(handle), size=int(size), offset=int(offset),
            ref_counter_handle=bytes(rc_handle), ref_counter_offset=int(rc_offset),
            event_handle=None if ev_handle is None else bytes(ev_handle), event_sync_required=bool(ev_sync),
            device_uuid=device_uuid(int(device)),
        )
    if storage.device.type == "cpu":
        if storage.nbytes() == 0:
            raise ValueError("cannot share an empty storage")
        manager, name, size = storage._share_filename_cpu_()
        return CpuShare(manager=bytes(manager), name=bytes(name), size=int(size))
    raise ValueError(f"cannot share a storage on {storage.device}")


def handle_to_wire(handle: ShareHandle) -> dict[str, Any]:
    fields = asdict(handle)
    fields["kind"] = "cuda" if isinstance(handle, CudaShare) else "cpu"
    return fields


def handle_from_wire(fields: dict[str, Any]) -> ShareHandle:
    """The handle a client sent; ``ValueError`` naming the bad field."""
    if type(fields) is not dict:
        raise ValueError(f"storage must be a map, got {type(fields).__name__}")
    kind = fields.get("kind")
    cls = {"cpu": CpuShare, "cuda": CudaShare}.get(kind) if type(kind) is str else None
    if cls is None:
        raise ValueError(f"storage.kind must be 'cpu' or 'cuda', got {kind!r}")
    rest = {k: v for k, v in fields.items() if k != "kind"}
    try:
        return cls(**rest)
    except TypeError as exc:  # missing or unknown fields
        raise ValueError(f"storage ({kind}): {exc}") from None


def open_storage(handle: ShareHandle, device: int | None = None) -> torch.UntypedStorage:
    """Open a shared storage in this process; ``device`` (CUDA) is this process's index of its GPU.

    ``ValueError`` (or RuntimeError from torch) when it cannot be opened or is smaller than claimed.
    """
    if isinstance(handle, CpuShare):
        return _open_cpu(handle)
    return _open_cuda(handle, handle.device if device is None else device)


def _open_cpu(handle: CpuShare) -> torch.UntypedStorage:
    path = _SHM_DIR + handle.name.decode()
    try:
        actual = os.stat(path).st_size
    except OSError as exc:
        raise ValueError(f"shared memory {handle.name!r} cannot be opened: {exc.strerror}") from None
    if actual < handle.size:
        raise ValueError(f"shared memory {handle.name!r} holds {actual} bytes, fewer than the claimed {handle.size}")
    return torch.UntypedStorage._new_shared_filename_cpu(handle.manager, handle.name, handle.size)


def _open_cuda(handle: CudaShare, device: int) -> torch.UntypedStorage:
    from torch.multiprocessing.reductions import shared_cache, storage_from_cache, StorageWeakRef

    key = (handle.handle, handle.offset)
    storage = storage_from_cache(torch.UntypedStorage, key)
    if storage is not None:
        # Already open here: the producer still expects this reference to be released.
        torch.UntypedStorage._release_ipc_counter(handle.ref_counter_handle, handle.ref_counter_offset, device=device)
    else:
        torch.cuda._lazy_init()
        storage = torch.UntypedStorage._new_shared_cuda(
            device, handle.handle, handle.size, handle.offset, handle.ref_counter_handle,
            handle.ref_counter_offset, handle.event_handle, handle.event_sync_required,
        )
        shared_cache[key] = StorageWeakRef(storage)
    _check_cuda_range(storage, handle)
    return storage


def _check_cuda_range(storage: torch.UntypedStorage, handle: CudaShare) -> None:
    """The claimed [ptr, ptr + size) must lie inside the driver's allocation: else a copy faults."""
    with torch.cuda.device(storage.device):
        base, size = _allocation_range(storage.data_ptr())
    if base is None:
        return  # the driver could not say: keep the registration (the regions are still checked)
    if storage.data_ptr() + handle.size > base + size:
        raise ValueError(
            f"shared CUDA storage claims {handle.size} bytes at offset {handle.offset}, "
            f"past its allocation of {size} bytes"
        )


_libcuda: Any = None


def _allocation_range(ptr: int) -> tuple[int | None, int]:
    """(base, size) of the allocation holding ``ptr``, or (None, 0) if the driver cannot say."""
    global _libcuda
    if _libcuda is None:
        try:
            _libcuda = ctypes.CDLL("libcuda.so.1")
        except OSError:
            _libcuda = False
    if not _libcuda:
        logger.warning("libcuda not found: the size of a shared CUDA storage is not checked")
        return None, 0
    base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    rc = _libcuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if rc != 0:
        logger.warning("cuMemGetAddressRange returned %d: the size of a shared CUDA storage is not checked", rc)
        return None, 0
    return base.value, size.value


def unlink_cpu(handle: CpuShare) -> None:
    """Remove a dead client's segment name (its memory goes once every mapping is closed).

    Only for a client known dead: a live one would fail to unlink it itself when it frees it.
    """
    try:
        os.unlink(_SHM_DIR + handle.name.decode())
    except FileNotFoundError:
        pass


def storage_bytes_tensor(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over the whole storage: the owner of the server's regions."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


def device_uuid(index: int) -> str:
    """The GPU's UUID: it names the same card in processes that number GPUs differently."""
    try:
        return str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # an old torch without .uuid, or no such device
        return ""


def local_device(handle: CudaShare, served: tuple[int, ...]) -> int:
    """This process's index of the GPU a handle came from, among the ``served`` ones."""
    if handle.device_uuid:
        for index in served:
            if device_uuid(index) == handle.device_uuid:
                return index
        raise ValueError(f"GPU {handle.device_uuid} is not one this server serves ({served})")
    if handle.device not in served:
        raise ValueError(f"GPU {handle.device} is not one this server serves ({served})")
    return handle.device


def share_event(event: torch.cuda.Event) -> bytes:
    """The IPC handle of an event created with ``interprocess=True`` (and recorded)."""
    return bytes(event.ipc_handle())


def open_event(device: int, handle: bytes) -> torch.cuda.Event:
    """The producer's event in this process: a stream here can wait on it."""
    return torch.cuda.Event.from_ipc_handle(device, handle)
