"""The engine: a pinned pool, a block index, and save/load transfers between them and vLLM's
KV caches. A plain in-process API, thread-safe; the server wraps it.

Every call validates its input completely (raising ``ValueError`` naming the bad argument)
before it changes the index or launches a copy.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pegaflow.engine.config import EngineConfig, InstanceSpec
from pegaflow.engine.handle import TransferHandle, TransferResult, combine, missing_error
from pegaflow.engine.index import BlockIndex, LoadPlan
from pegaflow.engine.pool import PinnedPool
from pegaflow.engine.transfer import LOAD, SAVE, CopyJob, CpuLane, GpuLane
from pegaflow.kernels import KVRegions

logger = logging.getLogger(__name__)

# Slots start on 256-byte boundaries whatever the mix of instances' block sizes, so the
# kernels always copy in their widest words and DMAs stay aligned.
SLOT_ALIGN = 256


def _slot_bytes(block_bytes: int) -> int:
    return -(-block_bytes // SLOT_ALIGN) * SLOT_ALIGN


@dataclass(eq=False)
class _PinnedLoad:
    """A load's pins, released exactly once (at completion, or earlier by unregister)."""

    plan: LoadPlan
    released: bool = False


@dataclass(eq=False)
class _Instance:
    spec: InstanceSpec
    namespace: str
    slot_bytes: int
    kv: dict[int, tuple[KVRegions, Any]] = field(default_factory=dict)  # rank -> (regions, lane)
    loads: set[_PinnedLoad] = field(default_factory=set)


class Engine:
    """Owns the pool and the index; moves blocks with the copy kernels."""

    def __init__(self, config: EngineConfig) -> None:
        """Allocate (and in GPU mode pin) the pool; start the transfer threads."""
        if not isinstance(config, EngineConfig):
            raise ValueError(f"config must be an EngineConfig, got {type(config).__name__}")
        if config.devices and not torch.cuda.is_available():
            raise ValueError(f"devices={config.devices} given but CUDA is not available (use devices=() for CPU mode)")
        for d in config.devices:
            if d >= torch.cuda.device_count():
                raise ValueError(f"device {d} does not exist ({torch.cuda.device_count()} CUDA devices)")
        self.config = config
        self._lock = threading.Lock()
        self._closed = False
        self._instances: dict[str, _Instance] = {}
        self._counters = {
            "saves": 0, "loads": 0, "bytes_saved": 0, "bytes_loaded": 0, "blocks_saved": 0,
            "blocks_loaded": 0, "skipped_saves": 0, "failed_saves": 0, "failed_loads": 0, "load_missing": 0,
        }  # fmt: skip
        self.pool = PinnedPool(config.pool_bytes, pin=bool(config.devices), threads=config.pin_threads)
        self.index = BlockIndex(config.pool_bytes, config.write_timeout_s, compiled=config.compiled_index)
        self._lanes: dict[int | None, Any] = {}
        try:
            if config.devices:
                zero_copy = config.save_mode == "zero_copy"
                for d in config.devices:
                    self._lanes[d] = GpuLane(d, self.pool.tensor, config.staging_bytes, zero_copy,
                                             dma_min_row=config.dma_min_row)
            else:
                self._lanes[None] = CpuLane(self.pool.tensor)
        except BaseException:
            for lane in self._lanes.values():
                lane.close()
            self.pool.close()
            raise
        logger.info("engine ready: pool %d bytes, devices %s, save mode %s, queries %s", config.pool_bytes,
                    config.devices or "cpu", config.save_mode,
                    "compiled (numba)" if self.index.compiled else "through dicts")

    # -- registration -------------------------------------------------------------------

    def register_instance(self, spec: InstanceSpec) -> str:
        """Record an instance's geometry; returns its namespace.

        Registering the same spec again is fine; the same id with another spec is a ValueError.
        """
        if not isinstance(spec, InstanceSpec):
            raise ValueError(f"spec must be an InstanceSpec, got {type(spec).__name__}")
        with self._lock:
            self._check_open()
            known = self._instances.get(spec.instance_id)
            if known is not None:
                if known.spec != spec:
                    raise ValueError(f"instance {spec.instance_id!r} is registered with another spec: {known.spec}")
                return known.namespace
            self._instances[spec.instance_id] = _Instance(spec, spec.namespace, _slot_bytes(spec.block_bytes))
            logger.info("instance %s registered (namespace %s)", spec.instance_id, spec.namespace)
            return spec.namespace

    def register_kv(self, instance_id: str, rank: int, kv: KVRegions, device: int | None = None) -> None:
        """Register rank ``rank``'s KV cache regions (``kv.block_bytes`` must equal the spec's)."""
        with self._lock:
            self._check_open()
            inst = self._instance(instance_id)
            self._check_rank(inst, rank)
            if not isinstance(kv, KVRegions):
                raise ValueError(f"kv must be KVRegions, got {type(kv).__name__}")
            if kv.block_bytes != inst.spec.block_bytes:
                raise ValueError(
                    f"kv.block_bytes ({kv.block_bytes}) differs from instance {instance_id!r}'s "
                    f"block_bytes ({inst.spec.block_bytes})"
                )
            lane = self._lane_for(kv, device)
            inst.kv[rank] = (kv, lane)
        if isinstance(lane, GpuLane):
            lane.warm_up(kv, inst.slot_bytes, f"instance {instance_id} rank {rank}")

    def unregister_kv(self, instance_id: str, rank: int) -> None:
        """Forget one rank's KV cache; copies already in flight keep its memory alive and finish."""
        with self._lock:
            inst = self._instance(instance_id)
            self._check_rank(inst, rank)
            inst.kv.pop(rank, None)

    def unregister(self, instance_id: str) -> None:
        """Forget an instance and release every pin it holds; its stored blocks stay (they
        belong to the namespace). Its copies in flight still finish; a load whose pins were
        released may then read slots that a later save reuses, which only the departed
        instance would see."""
        with self._lock:
            inst = self._instance(instance_id)
            del self._instances[instance_id]
            loads, inst.loads = list(inst.loads), set()
        for pinned in loads:
            self._release(pinned)
        logger.info("instance %s unregistered (%d pinned loads released)", instance_id, len(loads))

    def reset(self, instance_id: str) -> int:
        """Drop every stored block of the instance's namespace; returns how many.

        For vLLM's ``reset_prefix_cache`` (new weights make old KV wrong). Every instance that
        shares the namespace loses those blocks too: instances whose weights differ must not
        share a namespace.
        """
        with self._lock:
            namespace = self._instance(instance_id).namespace
        dropped = self.index.drop_namespace(namespace)
        logger.info("instance %s reset: %d blocks of %s dropped", instance_id, dropped, namespace)
        return dropped

    # -- queries and transfers ----------------------------------------------------------

    def query(self, instance_id: str, hashes: Sequence[bytes]) -> int:
        """Length of the longest prefix of ``hashes`` ready on every rank (rank 0 if replicated)."""
        with self._lock:
            inst = self._instance(instance_id)
        self._check_hashes(inst, hashes)
        return self.index.query(inst.namespace, hashes)

    def save(
        self,
        instance_id: str,
        rank: int,
        block_ids: Sequence[int],
        hashes: Sequence[bytes],
        after_event: Any = None,
    ) -> TransferHandle:
        """Copy blocks ``block_ids`` of the rank's KV cache into the pool under ``hashes``.

        The copy starts after ``after_event`` (a CUDA event recorded after the forward that
        wrote the blocks). Held blocks and blocks without room are skipped (``result.skipped``);
        the entries become READY once every rank's copy has completed.
        """
        inst, kv, lane, ids = self._check_transfer(instance_id, rank, block_ids, hashes)
        with self._lock:
            self._counters["saves"] += 1
        head = lane.head_blocks(SAVE, inst.slot_bytes)
        parts = _pieces(len(ids), head, lane.tail_blocks(SAVE, inst.slot_bytes))
        return combine([(i, self._save_piece(inst, kv, lane, rank, ids[i : i + n], hashes[i : i + n], after_event,
                                             lone=head is not None))
                        for i, n in parts], len(ids))

    def load(self, instance_id: str, rank: int, block_ids: Sequence[int], hashes: Sequence[bytes]) -> TransferHandle:
        """Copy the pool's blocks ``hashes`` into blocks ``block_ids`` of the rank's KV cache.

        A hash not held and ready makes the result ``ok=False`` with its index in ``missing``;
        the others are still loaded. Entries stay pinned (never evicted) for the copy's duration.
        """
        inst, kv, lane, ids = self._check_transfer(instance_id, rank, block_ids, hashes)
        if len(set(ids)) != len(ids):
            raise ValueError("block_ids holds duplicates: two loads would write the same block")
        with self._lock:
            self._counters["loads"] += 1
        head = lane.head_blocks(LOAD, inst.slot_bytes)
        parts = _pieces(len(ids), head, lane.tail_blocks(LOAD, inst.slot_bytes))
        return combine([(i, self._load_piece(inst, kv, lane, rank, ids[i : i + n], hashes[i : i + n],
                                             lone=head is not None))
                        for i, n in parts], len(ids))

    # A transfer that finds its path idle is booked and launched in growing pieces with its
    # last piece apart (see _pieces): copies start after one head's bookkeeping, and the last
    # completion waits on one piece's (on the H200, 512-block saves lost 0.04-0.14 of the
    # ceiling to filling and draining the pipeline while their steady state ran at 1.00; a
    # 10K-token load reached 0.92 of the TTFT bound split, 0.84-0.86 whole). A busy path splits
    # off its tail only: one piece per chunk there cost more in bookkeeping and uploads than it
    # saved (saves and loads at once fell from 0.84-0.92 to 0.66-0.91 of the ceiling).

    def _save_piece(self, inst: _Instance, kv: KVRegions, lane: Any, rank: int, ids: list[int],
                    hashes: Sequence[bytes], after_event: Any, lone: bool = False) -> TransferHandle:
        spec = inst.spec
        plan = self.index.prepare_save(
            inst.namespace, hashes, 0 if spec.replicated else rank, spec.stored_ranks, inst.slot_bytes
        )
        with self._lock:
            self._counters["skipped_saves"] += len(plan.skipped)
        if not plan.writes:
            return TransferHandle.completed(TransferResult(True, 0, 0, skipped=plan.skipped))
        count = len(plan.writes)
        nbytes = count * kv.block_bytes
        handle = TransferHandle(lane.new_event(nbytes) if isinstance(lane, GpuLane) else None)

        def finish(ok: bool, error: str | None) -> None:
            self.index.complete_save(plan, ok)
            with self._lock:
                if ok:
                    self._counters["bytes_saved"] += nbytes
                    self._counters["blocks_saved"] += count
                else:
                    self._counters["failed_saves"] += 1
            handle._complete(TransferResult(ok, count if ok else 0, nbytes if ok else 0, plan.skipped, error=error))

        job = CopyJob(SAVE, kv, [ids[i] for i, _ in plan.writes], plan.offsets(), inst.slot_bytes, handle,
                      finish, after_event, lone)  # fmt: skip
        lane.submit(job)
        return handle

    def _load_piece(self, inst: _Instance, kv: KVRegions, lane: Any, rank: int, ids: list[int],
                    hashes: Sequence[bytes], lone: bool = False) -> TransferHandle:
        spec = inst.spec
        plan = self.index.prepare_load(inst.namespace, hashes, 0 if spec.replicated else rank)
        missing = missing_error(len(plan.missing), len(ids))
        with self._lock:
            self._counters["load_missing"] += len(plan.missing)
            if not plan.reads:
                return TransferHandle.completed(
                    TransferResult(not plan.missing, 0, 0, missing=plan.missing, error=missing)
                )
            pinned = _PinnedLoad(plan)
            inst.loads.add(pinned)
        count = len(plan.reads)
        nbytes = count * kv.block_bytes
        handle = TransferHandle(lane.new_event(nbytes) if isinstance(lane, GpuLane) else None)

        def finish(ok: bool, error: str | None) -> None:
            with self._lock:
                inst.loads.discard(pinned)
                if ok:
                    self._counters["bytes_loaded"] += nbytes
                    self._counters["blocks_loaded"] += count
                else:
                    self._counters["failed_loads"] += 1
            if not ok:
                self.index.forget(plan)  # stop advertising what could not be loaded
            self._release(pinned)
            handle._complete(TransferResult(ok and not plan.missing, count if ok else 0, nbytes if ok else 0,
                                            missing=plan.missing, error=error or missing))

        job = CopyJob(LOAD, kv, [ids[i] for i, _ in plan.reads], plan.offsets(), inst.slot_bytes, handle, finish,
                      lone=lone)
        lane.submit(job)
        return handle

    def stats(self) -> dict[str, int | float]:
        """Counters: hits, misses, bytes_saved, bytes_loaded, evictions, skipped_saves, pool_used, pool_free, ..."""
        out: dict[str, int | float] = dict(self.index.stats())
        with self._lock:
            out.update(self._counters)
            out["instances"] = len(self._instances)
            out["loads_pinned"] = sum(len(i.loads) for i in self._instances.values())
        out["pool_bytes"] = self.config.pool_bytes
        return out

    def close(self) -> None:
        """Finish the transfers in flight, stop the threads, unpin and free the pool."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for lane in self._lanes.values():
            lane.close()
        self.pool.close()
        logger.info("engine closed")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _release(self, pinned: _PinnedLoad) -> None:
        with self._lock:
            if pinned.released:
                return
            pinned.released = True
        self.index.unpin(pinned.plan)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed")

    def _instance(self, instance_id: str) -> _Instance:
        inst = self._instances.get(instance_id) if isinstance(instance_id, str) else None
        if inst is None:
            raise ValueError(f"unknown instance {instance_id!r}")
        return inst

    @staticmethod
    def _check_rank(inst: _Instance, rank: int) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < inst.spec.tp_size:
            raise ValueError(f"rank {rank!r} out of range [0, {inst.spec.tp_size}) for instance {inst.spec.instance_id!r}")

    def _lane_for(self, kv: KVRegions, device: int | None) -> Any:
        if not self.config.devices:
            if kv.device.type != "cpu":
                raise ValueError(f"the engine runs in CPU mode; kv is on {kv.device}")
            if device is not None:
                raise ValueError(f"device={device} given, but the engine runs in CPU mode")
            return self._lanes[None]
        if kv.device.type != "cuda":
            raise ValueError(f"kv is on {kv.device}; the engine serves CUDA devices {self.config.devices}")
        index = kv.device.index
        if device is not None and device != index:
            raise ValueError(f"device={device} but kv is on cuda:{index}")
        if index not in self._lanes:
            raise ValueError(f"kv is on cuda:{index}, not one of the engine's devices {self.config.devices}")
        return self._lanes[index]

    @staticmethod
    def _check_hashes(inst: _Instance, hashes: Sequence[bytes]) -> None:
        if isinstance(hashes, (str, bytes)) or not isinstance(hashes, Sequence):
            raise ValueError(f"hashes must be a sequence of bytes, got {type(hashes).__name__}")
        size = inst.spec.hash_bytes
        # The fast path runs in C (map of builtins); the loop below only names the culprit.
        if not hashes or (set(map(type, hashes)) == {bytes} and set(map(len, hashes)) == {size}):
            return
        for i, h in enumerate(hashes):
            if type(h) is not bytes or len(h) != size:
                raise ValueError(
                    f"hashes[{i}] must be {size} bytes (instance {inst.spec.instance_id!r}), got {h!r:.60}"
                )

    def _check_transfer(
        self, instance_id: str, rank: int, block_ids: Sequence[int], hashes: Sequence[bytes]
    ) -> tuple[_Instance, KVRegions, Any, list[int]]:
        with self._lock:
            self._check_open()
            inst = self._instance(instance_id)
            self._check_rank(inst, rank)
            registered = inst.kv.get(rank)
        if registered is None:
            raise ValueError(f"rank {rank} of instance {instance_id!r} has no registered KV cache")
        kv, lane = registered
        self._check_hashes(inst, hashes)
        ids = _check_block_ids(block_ids, kv.num_blocks)
        if len(ids) != len(hashes):
            raise ValueError(f"block_ids has {len(ids)} ids, hashes {len(hashes)}: lengths differ")
        return inst, kv, lane, ids


def _pieces(count: int, head: int | None, tail: int | None) -> list[tuple[int, int]]:
    """``(first, size)`` of a transfer's pieces.

    On an idle path (``head`` given) the pieces grow from ``head`` blocks, doubling, and the
    last ``tail`` blocks go apart: each piece's bookkeeping (~6-10 us a block on the H200's
    host, against ~38 us of copy for a 2 MiB block) hides behind the copies of the one before.
    On a busy path (``tail`` alone) only the last ``tail`` blocks go apart, so the body's
    completion bookkeeping runs during the tail's copy instead of after the last byte.
    A middle piece shorter than the tail is not split off.
    """
    if head is None:
        if tail is None or count < 2 * tail:
            return [(0, count)]
        return [(0, count - tail), (count - tail, tail)]
    tail = head if tail is None else tail
    if count <= 2 * head:
        return [(0, count)]
    out: list[tuple[int, int]] = []
    first, size = 0, head
    while count - first - tail > size:
        out.append((first, size))
        first += size
        size *= 2
    rest = count - first
    if rest - tail < tail:
        return out + [(first, rest)]
    return out + [(first, rest - tail), (count - tail, tail)]


def _check_block_ids(block_ids: Sequence[int], num_blocks: int) -> list[int]:
    if isinstance(block_ids, torch.Tensor):
        block_ids = block_ids.tolist()
    if isinstance(block_ids, (str, bytes)) or not isinstance(block_ids, Sequence):
        raise ValueError(f"block_ids must be a sequence of ints, got {type(block_ids).__name__}")
    if block_ids and set(map(type, block_ids)) == {int}:
        # The common case, checked in C: min and max of plain ints (512 ids: ~15 us, not ~150).
        if 0 <= min(block_ids) and max(block_ids) < num_blocks:
            return list(block_ids)
    ids = []
    for b in block_ids:
        if isinstance(b, bool):
            raise ValueError(f"block_ids holds {b!r}, not an int")
        try:
            b = operator.index(b)
        except TypeError:
            raise ValueError(f"block_ids holds {b!r}, not an int") from None
        if not 0 <= b < num_blocks:
            raise ValueError(f"block_ids holds {b}, out of range [0, {num_blocks})")
        ids.append(b)
    return ids
