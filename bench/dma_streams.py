"""Scattered block copies by the copy engines: one stream against several (diagnostic).

A lone load of a layer-first Llama-3-8B prompt (LBNHC: 32 layers, 64 KiB pages, 2 MiB a
block) goes as one 2D copy per block (32 rows, the layer stride apart). Its GPU span runs
past one contiguous copy of the same bytes (bench/NOTES.md, session 12: ~330 us for 64
blocks). This measures, in one process and without the engine, whether spreading the copies
over several streams (so several copy engines overlap each copy's start) closes that gap, and
what a batched copy call (``cuMemcpyBatchAsync``) does. Each variant runs after a 2 ms idle gap
(as a request finds the GPU) and back to back; GPU span by events, medians; every variant's
result is checked bit for bit once.

    python bench/dma_streams.py --json bench/results/dma_streams-h100.json
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "bench")]

from common import Row, arg_parser, print_table, write_json  # noqa: E402

from pegaflow.engine import dma  # noqa: E402

LAYERS, PAGE = 32, 64 << 10
SLOT = LAYERS * PAGE


class _Loc(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Attrs(ctypes.Structure):
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", _Loc), ("dstLocHint", _Loc),
                ("flags", ctypes.c_uint)]


def _batch_call() -> tuple[Callable | None, str]:
    """cuMemcpyBatchAsync as this driver exports it (CUDA 13: no failIdx), or None."""
    lib = ctypes.CDLL("libcuda.so.1")
    ver = ctypes.c_int()
    lib.cuDriverGetVersion(ctypes.byref(ver))
    p = ctypes.POINTER
    if ver.value >= 13000 and hasattr(lib, "cuMemcpyBatchAsync_v2"):
        fn = lib.cuMemcpyBatchAsync_v2
        fn.argtypes = [p(ctypes.c_uint64), p(ctypes.c_uint64), p(ctypes.c_size_t), ctypes.c_size_t,
                       p(_Attrs), p(ctypes.c_size_t), ctypes.c_size_t, ctypes.c_void_p]
        return (lambda d, s, n, c, a, i, na, st: fn(d, s, n, c, a, i, na, st)), f"v2 driver {ver.value}"
    if ver.value >= 12080 and hasattr(lib, "cuMemcpyBatchAsync"):
        fn = lib.cuMemcpyBatchAsync
        fn.argtypes = [p(ctypes.c_uint64), p(ctypes.c_uint64), p(ctypes.c_size_t), ctypes.c_size_t,
                       p(_Attrs), p(ctypes.c_size_t), ctypes.c_size_t, p(ctypes.c_size_t), ctypes.c_void_p]
        fail = ctypes.c_size_t()
        return (lambda d, s, n, c, a, i, na, st: fn(d, s, n, c, a, i, na, ctypes.byref(fail), st)), f"v1 driver {ver.value}"
    return None, f"driver {ver.value}: no cuMemcpyBatchAsync"


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--blocks", type=int, default=2048, help="KV cache blocks per layer")
    p.add_argument("--slots", type=int, default=1024, help="pinned pool slots (2 MiB each)")
    p.add_argument("--sizes", default="1,8,64,256,640")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--gap-ms", type=float, default=2.0)
    args = p.parse_args()
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    nb = args.blocks
    kv = torch.empty(LAYERS * nb * PAGE, dtype=torch.uint8, device=dev)
    kv.view(torch.int64).random_()
    pool = torch.empty(args.slots * SLOT, dtype=torch.uint8, pin_memory=True)
    pool.view(torch.int64).random_()
    flat = torch.empty(max(int(s) for s in args.sizes.split(",")) * SLOT, dtype=torch.uint8, device=dev)
    kv3 = kv.view(LAYERS, nb, PAGE)
    pool3 = pool.view(args.slots, LAYERS, PAGE)
    streams = [torch.cuda.Stream(dev) for _ in range(4)]
    main_s = streams[0]
    copiers = [dma.Copier2D() for _ in streams]
    batch, batch_info = _batch_call()
    print("batch copy:", batch_info, flush=True)
    kvp, poolp, flatp = kv.data_ptr(), pool.data_ptr(), flat.data_ptr()
    pitch = nb * PAGE

    def enqueue_2d(load: bool, ids: list[int], slots: list[int], nstreams: int, split: bool) -> None:
        if nstreams > 1:
            start = torch.cuda.Event()
            start.record(main_s)
            for s in streams[1:nstreams]:
                s.wait_event(start)
        pieces = []
        for j, (b, s) in enumerate(zip(ids, slots)):
            if split:
                rows = LAYERS // nstreams
                pieces += [(b, s, r * rows, rows, r) for r in range(nstreams)]
            else:
                pieces.append((b, s, 0, LAYERS, j % nstreams))
        for b, s, first, rows, k in pieces:
            kv_a, slot_a = kvp + first * pitch + b * PAGE, poolp + s * SLOT + first * PAGE
            st = streams[k].cuda_stream
            if load:
                copiers[k].copy(kv_a, pitch, slot_a, PAGE, PAGE, rows, st)
            else:
                copiers[k].copy(slot_a, PAGE, kv_a, pitch, PAGE, rows, st)
        if nstreams > 1:
            for s in streams[1:nstreams]:
                e = torch.cuda.Event()
                e.record(s)
                main_s.wait_event(e)

    def enqueue_batch(load: bool, ids: list[int], slots: list[int]) -> None:
        n = len(ids) * LAYERS
        d, s = (ctypes.c_uint64 * n)(), (ctypes.c_uint64 * n)()
        sizes = (ctypes.c_size_t * n)(*([PAGE] * n))
        i = 0
        for b, sl in zip(ids, slots):
            for layer in range(LAYERS):
                kv_a, slot_a = kvp + layer * pitch + b * PAGE, poolp + sl * SLOT + layer * PAGE
                d[i], s[i] = (kv_a, slot_a) if load else (slot_a, kv_a)
                i += 1
        attrs = _Attrs()
        attrs.srcAccessOrder = 1  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        idx = (ctypes.c_size_t * 1)(0)
        rc = batch(d, s, sizes, n, ctypes.byref(attrs), idx, 1, main_s.cuda_stream)
        if rc != 0:
            raise RuntimeError(f"cuMemcpyBatchAsync: CUDA driver error {rc}")

    def enqueue_contig(load: bool, k: int) -> None:
        if load:
            dma.copy_async(flatp, poolp, k * SLOT, main_s.cuda_stream)
        else:
            dma.copy_async(poolp, flatp, k * SLOT, main_s.cuda_stream)

    variants: dict[str, Callable] = {
        "contiguous": lambda load, ids, sl: enqueue_contig(load, len(ids)),
        "2d x1": lambda load, ids, sl: enqueue_2d(load, ids, sl, 1, False),
        "2d x2": lambda load, ids, sl: enqueue_2d(load, ids, sl, 2, False),
        "2d x4": lambda load, ids, sl: enqueue_2d(load, ids, sl, 4, False),
        "2d split x2": lambda load, ids, sl: enqueue_2d(load, ids, sl, 2, True),
        "2d split x4": lambda load, ids, sl: enqueue_2d(load, ids, sl, 4, True),
    }
    if batch is not None:
        variants["batch 1d"] = enqueue_batch

    def span_us(fn: Callable[[], None], gap_s: float) -> tuple[float, float]:
        spans, walls = [], []
        for _ in range(args.repeat + 2):
            if gap_s:
                time.sleep(gap_s)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            e0.record(main_s)
            fn()
            e1.record(main_s)
            e1.synchronize()
            walls.append((time.perf_counter() - t0) * 1e6)
            spans.append(e0.elapsed_time(e1) * 1e3)
        return statistics.median(spans[2:]), statistics.median(walls[2:])

    gen = torch.Generator().manual_seed(11)
    rows, extra = [], {"batch": batch_info, "results": []}
    for k in (int(s) for s in args.sizes.split(",")):
        ids = torch.randperm(nb, generator=gen)[:k].tolist()
        slots = torch.randperm(args.slots, generator=gen)[:k].tolist()
        for load in (True, False):
            direction = "load" if load else "save"
            base = {}
            for name, fn in variants.items():
                try:
                    if name != "contiguous":  # bit-exact once: the target poisoned first
                        if load:
                            kv3[:, ids] = 0x5A
                        else:
                            pool3[slots] = 0xA5
                        torch.cuda.synchronize()
                        fn(load, ids, slots)
                        torch.cuda.synchronize()
                        ok = (torch.equal(kv3[:, ids].cpu(), pool3[slots].transpose(0, 1)) if load
                              else torch.equal(pool3[slots].transpose(0, 1), kv3[:, ids].cpu()))
                        if not ok:
                            raise RuntimeError("copy mismatch")
                    gap = span_us(lambda: fn(load, ids, slots), args.gap_ms / 1e3)
                    hot = span_us(lambda: fn(load, ids, slots), 0.0)
                except Exception as exc:
                    print(f"{direction} {k} {name}: {exc}", flush=True)
                    extra["results"].append({"dir": direction, "blocks": k, "variant": name, "error": str(exc)})
                    continue
                if name == "contiguous":
                    base = {"gap": gap[0], "hot": hot[0]}
                res = {"dir": direction, "blocks": k, "variant": name, "gap_span_us": gap[0], "gap_wall_us": gap[1],
                       "hot_span_us": hot[0], "hot_wall_us": hot[1],
                       "gap_vs_contig": base["gap"] / gap[0], "hot_vs_contig": base["hot"] / hot[0]}
                extra["results"].append(res)
                rows.append(Row(f"8b-lbnhc x{k}", f"{direction} gap", name, name != "contiguous",
                                round(k * SLOT / gap[0] / 1e3, 2), "GB/s", round(k * SLOT / base["gap"] / 1e3, 2)))
                print(f"{direction:4} {k:4} {name:12} gap span {gap[0]:8.1f} wall {gap[1]:8.1f} | hot span "
                      f"{hot[0]:8.1f} wall {hot[1]:8.1f} | vs contig gap {base['gap'] / gap[0]:.3f} "
                      f"hot {base['hot'] / hot[0]:.3f}", flush=True)
    print_table(rows)
    write_json(args.json, "dma_streams", rows, extra)


if __name__ == "__main__":
    main()
