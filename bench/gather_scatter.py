"""Gather/scatter of scattered KV blocks between a vLLM-shaped GPU cache and host memory.

For each model config: a KV cache of at least 4 GiB allocated as vLLM 0.33 allocates it, and
transfers of 512 random distinct blocks (rotating over several id sets so L2 flatters
nothing). In the same run, on the same card:

* ceilings: one contiguous pinned copy of the same bytes each way; a device copy (read +
  written bytes);
* baselines: a per-block ``copy_`` loop (one per block per region, what vLLM's old
  ``swap_blocks`` did), and ``index_select`` per region + one DMA (``index_copy_`` for loads);
* ours: staged (gather into GPU staging + one DMA; DMA + scatter for loads), pipelined (the
  same in chunks, gather of chunk k+1 overlapping the DMA of chunk k on a second stream, as
  the engine does), zero-copy (the kernel reads/writes pinned host memory), into/from slots
  of a pinned pool at random slot ids, and the device-to-device gather/scatter;
* launch-shape variants (``--tunings``) of the kernel, to pick ``DEFAULT_TUNING``.

Every one of our methods is checked bit for bit once against the reference. Without a GPU it
runs a tiny smoke version under Triton's interpreter and measures nothing.

    python3 bench/gather_scatter.py --json bench/results/gather_scatter-h100.json
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "bench")]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from common import Row, arg_parser, gbps, print_table, write_json  # noqa: E402

from pegaflow.kernels import KVRegions, reference, triton_copy  # noqa: E402
from pegaflow.kernels.layouts import (  # noqa: E402
    BuiltKVCache,
    allocate_attention_kv_cache,
    allocate_kv_first_cache,
    allocate_mla_kv_cache,
)
from pegaflow.kernels.triton_copy import DEFAULT_TUNING, Tuning  # noqa: E402

GIB = 1 << 30
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DEFAULT_TUNINGS = "16384:4096:4,16384:2048:8,16384:4096:16,16384:4096:8:s"


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # "attention" (layout given), "kv_first", "mla", "fp8_ds_mla"
    layout: str
    num_layers: int
    num_kv_heads: int = 1
    head_size: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16

    def build(self, num_blocks: int, device: str, *, scale: bool = False) -> BuiltKVCache:
        """The cache; ``scale`` shrinks it to a toy for the interpreter smoke run."""
        layers = 2 if scale else self.num_layers
        heads, head, block = (1, 8, 2) if scale else (self.num_kv_heads, self.head_size, self.block_size)
        if self.kind == "attention":
            return allocate_attention_kv_cache(
                self.layout, num_layers=layers, num_blocks=num_blocks, num_kv_heads=heads, head_size=head,
                block_size=block, dtype=self.dtype, device=device,
            )
        if self.kind == "kv_first":
            return allocate_kv_first_cache(
                num_layers=layers, num_blocks=num_blocks, block_size=block, num_kv_heads=heads, head_size=head,
                dtype=self.dtype, device=device,
            )
        return allocate_mla_kv_cache(
            num_layers=layers, num_blocks=num_blocks, block_size=block, fp8_ds_mla=self.kind == "fp8_ds_mla",
            layout=self.layout, device=device,
        )

    @property
    def page_bytes(self) -> int:
        """vLLM's page: one layer's block (K or V alone in the kv_first layout)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        if self.kind == "mla":
            return self.block_size * 576 * item
        if self.kind == "fp8_ds_mla":
            return self.block_size * 656
        per_kv = self.num_kv_heads * self.block_size * self.head_size * item
        return per_kv if self.kind == "kv_first" else 2 * per_kv

    @property
    def block_bytes(self) -> int:
        return self.num_layers * self.page_bytes * (2 if self.kind == "kv_first" else 1)


CONFIGS = {
    c.name: c
    for c in [
        Config("llama3-8b", "attention", "LBNHC", 32, num_kv_heads=8),
        Config("llama3-70b-tp8", "attention", "LBNHC", 80, num_kv_heads=1),
        Config("qwen2.5-7b", "attention", "LBNHC", 28, num_kv_heads=4),
        Config("deepseek-v3-mla", "mla", "LBNHC", 61, block_size=64),
        Config("deepseek-v3-fp8ds", "fp8_ds_mla", "LBNHC", 61, block_size=64, dtype=torch.uint8),
        Config("llama3-8b-blnhc", "attention", "BLNHC", 32, num_kv_heads=8),
        Config("llama3-8b-kvfirst", "kv_first", "LBNHC", 32, num_kv_heads=8),
    ]
}


def log(message: str) -> None:
    print(message, flush=True)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


# ---------------------------------------------------------------- timing


def gpu_ms(fn: Callable[[], None], *, warmup: int, repeat: int, target_ms: float = 4.0) -> float:
    """Median GPU milliseconds of one ``fn`` call, from CUDA events.

    A GPU sleep is queued before the start event so that the host's enqueue time of the first
    call is not counted; calls short on the GPU run ``inner`` times between the events (back to
    back, as the engine queues them), so any host time beyond the GPU time still shows.
    Without a GPU (smoke run) it returns wall time of one call, which means nothing.
    """
    if not CUDA:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    inner = max(1, min(20, math.ceil(target_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(repeat):
        torch.cuda._sleep(2_000_000)  # ~1 ms: covers the host's first enqueue
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


# ---------------------------------------------------------------- pinned memory


class PinnedArena:
    """One page-locked host allocation for every config: mmap-backed memory touched first and
    registered with CUDA (torch's pinned allocator rounds sizes up to a power of two)."""

    def __init__(self, nbytes: int) -> None:
        t0 = time.perf_counter()
        self.registered = False
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self.tensor.zero_()  # first touch, in parallel
        if not CUDA:
            return
        cudart = torch.cuda.cudart()
        try:
            err = cudart.cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
        except (AttributeError, RuntimeError) as exc:  # a torch without the binding
            err = exc
        if not isinstance(err, Exception) and int(err) == 0 and self.tensor.is_pinned():
            self.registered = True
        else:
            if not isinstance(err, Exception) and int(err) == 0:
                cudart.cudaHostUnregister(self.tensor.data_ptr())
            log(f"cudaHostRegister gave {err}; using torch's pinned allocator")
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        log(f"pinned {nbytes / GIB:.2f} GiB in {time.perf_counter() - t0:.1f} s")

    def take(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset : offset + nbytes]

    def close(self) -> None:
        if CUDA and self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.registered = False


def _round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


# ---------------------------------------------------------------- one config


@dataclass
class Method:
    direction: str  # save, load, d2d
    name: str
    ours: bool
    run: Callable[[], None]
    nbytes: int  # bytes counted for the rate
    check: Callable[[], bool] | None = None
    note: str | None = None


class Bench:
    """The buffers and methods of one config on the GPU."""

    def __init__(self, config: Config, args, arena: PinnedArena) -> None:
        self.config, self.args = config, args
        n = args.blocks
        t0 = time.perf_counter()
        if CUDA:
            self.num_blocks = max(2 * n, math.ceil(args.cache_gib * GIB / config.block_bytes))
            self.built = config.build(self.num_blocks, DEVICE)
            assert self.built.regions.block_bytes == config.block_bytes
        else:
            self.num_blocks = 2 * n
            self.built = config.build(self.num_blocks, DEVICE, scale=True)
        self.kv: KVRegions = self.built.regions
        self.block_bytes = self.kv.block_bytes
        self.nbytes = n * self.block_bytes
        self.staging = torch.empty(self.nbytes, dtype=torch.uint8, device=DEVICE)
        self.scratch = torch.empty(self.nbytes, dtype=torch.uint8, device=DEVICE)  # d2d ceiling, checks
        host_bytes = _round_up(self.nbytes, 4096)
        self.host = arena.take(0, self.nbytes)
        self.slot_bytes = _round_up(self.block_bytes, 256)
        self.num_slots = args.pool_slots_per_block * n
        self.pool = arena.take(host_bytes, self.num_slots * self.slot_bytes)
        generator = torch.Generator().manual_seed(0)
        self.id_sets = [torch.randperm(self.num_blocks, generator=generator)[:n] for _ in range(args.id_sets)]
        self.slot_sets = [torch.randperm(self.num_slots, generator=generator)[:n] for _ in range(args.id_sets)]
        self.id_sets_gpu = [ids.to(DEVICE) for ids in self.id_sets]
        self._next = itertools.cycle(range(args.id_sets))
        self.copy_stream = torch.cuda.Stream() if CUDA else None
        sync()
        log(
            f"[{config.name}] cache {self.num_blocks} blocks x {self.block_bytes / 1024:.0f} KiB = "
            f"{self.num_blocks * self.block_bytes / GIB:.2f} GiB, {len(self.kv.regions)} region(s), "
            f"transfer {n} blocks = {self.nbytes / 2**20:.0f} MiB (built in {time.perf_counter() - t0:.1f} s)"
        )

    def pick(self) -> int:
        return next(self._next)

    # -- checks: one run of a method on id set 0, compared with the reference

    def _reference_blocks(self, k: int = 0) -> torch.Tensor:
        reference.gather(self.kv, self.id_sets[k], self.scratch)
        return self.scratch

    def _check_save(self, run: Callable[[int], None], read: Callable[[], torch.Tensor]) -> Callable[[], bool]:
        def check() -> bool:
            run(0)
            sync()
            return torch.equal(read().to(DEVICE), self._reference_blocks())

        return check

    def _check_load(self, fill: Callable[[torch.Tensor], None], run: Callable[[int], None]) -> Callable[[], bool]:
        def check() -> bool:
            data = torch.randint(0, 256, (self.nbytes,), dtype=torch.uint8, device=DEVICE)
            fill(data)
            sync()
            run(0)
            sync()
            return torch.equal(self._reference_blocks(), data)

        return check

    def _pool_rows(self, k: int) -> torch.Tensor:
        rows = self.pool.view(self.num_slots, self.slot_bytes)[self.slot_sets[k], : self.block_bytes]
        return rows.reshape(-1)

    def _fill_pool(self, data: torch.Tensor, k: int = 0) -> None:
        self.host.copy_(data)  # to host memory through the pinned buffer (fast), then into the slots
        rows = self.pool.view(self.num_slots, self.slot_bytes)
        rows[self.slot_sets[k], : self.block_bytes] = self.host.view(-1, self.block_bytes)

    # -- the methods

    def ceilings(self) -> list[Method]:
        return [
            Method("save", "ceiling-contiguous-copy", False, lambda: self.host.copy_(self.staging, non_blocking=True), self.nbytes),
            Method("load", "ceiling-contiguous-copy", False, lambda: self.staging.copy_(self.host, non_blocking=True), self.nbytes),
            Method("d2d", "ceiling-device-copy", False, lambda: self.scratch.copy_(self.staging), 2 * self.nbytes),
        ]

    def baselines(self) -> list[Method]:
        n_loop = min(self.args.blocks, max(8, self.args.loop_copies // len(self.kv.regions)))
        pages = [r.pages(self.num_blocks) for r in self.kv.regions]
        offsets = self.kv.page_offsets()
        host_rows = self.host[: n_loop * self.block_bytes].view(n_loop, self.block_bytes)
        # (GPU page, host slice) pairs built beforehand: the timed loop is only the copy_ calls.
        loop_pairs = [
            [
                (page[block], host_rows[i, offset : offset + page.shape[1]])
                for i, block in enumerate(ids[:n_loop].tolist())
                for page, offset in zip(pages, offsets)
            ]
            for ids in self.id_sets
        ]

        def loop(save: bool) -> None:
            for gpu_page, host_page in loop_pairs[self.pick()]:
                if save:
                    host_page.copy_(gpu_page, non_blocking=True)
                else:
                    gpu_page.copy_(host_page, non_blocking=True)

        n = self.args.blocks
        layer_major = [self.staging[n * o : n * (o + p.shape[1])].view(n, p.shape[1]) for p, o in zip(pages, offsets)]

        def index_save() -> None:
            ids = self.id_sets_gpu[self.pick()]
            for page, out in zip(pages, layer_major):
                torch.index_select(page, 0, ids, out=out)
            self.host.copy_(self.staging, non_blocking=True)

        def index_load() -> None:
            ids = self.id_sets_gpu[self.pick()]
            self.staging.copy_(self.host, non_blocking=True)
            for page, src in zip(pages, layer_major):
                page.index_copy_(0, ids, src)

        note = f"timed on {n_loop} of the {n} blocks ({n_loop * len(pages)} copy_ calls)"
        return [
            Method("save", "per-block-copy", False, lambda: loop(True), n_loop * self.block_bytes, note=note),
            Method("load", "per-block-copy", False, lambda: loop(False), n_loop * self.block_bytes, note=note),
            Method("save", "index-select+copy", False, index_save, self.nbytes),
            Method("load", "index-copy+copy", False, index_load, self.nbytes),
        ]

    def ours(self, tuning: Tuning) -> list[Method]:
        kv, tc = self.kv, triton_copy
        n, chunk = self.args.blocks, self.args.pipeline_blocks

        def staged_save(k: int) -> None:
            tc.gather(kv, self.id_sets[k], self.staging, tuning=tuning)
            self.host.copy_(self.staging, non_blocking=True)

        def staged_load(k: int) -> None:
            self.staging.copy_(self.host, non_blocking=True)
            tc.scatter(kv, self.id_sets[k], self.staging, tuning=tuning)

        def pipelined(k: int, save: bool) -> None:
            # Chunk k's DMA runs on the side stream while the main stream gathers chunk k+1.
            main, side = (torch.cuda.current_stream(), self.copy_stream) if CUDA else (None, None)
            on_side = (lambda: torch.cuda.stream(side)) if CUDA else contextlib.nullcontext
            wait = (lambda waiter, waited: waiter.wait_stream(waited)) if CUDA else (lambda waiter, waited: None)
            wait(side, main)
            ids = self.id_sets[k]
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                part = slice(start * self.block_bytes, stop * self.block_bytes)
                if save:
                    tc.gather(kv, ids[start:stop], self.staging[part], tuning=tuning)
                    wait(side, main)
                    with on_side():
                        self.host[part].copy_(self.staging[part], non_blocking=True)
                else:
                    with on_side():
                        self.staging[part].copy_(self.host[part], non_blocking=True)
                    wait(main, side)
                    tc.scatter(kv, ids[start:stop], self.staging[part], tuning=tuning)
            wait(main, side)

        def zero_save(k: int) -> None:
            tc.gather(kv, self.id_sets[k], self.host, tuning=tuning)

        def zero_load(k: int) -> None:
            tc.scatter(kv, self.id_sets[k], self.host, tuning=tuning)

        def slots_save(k: int) -> None:
            tc.gather_into_slots(kv, self.id_sets[k], self.pool, self.slot_sets[k], self.slot_bytes, tuning=tuning)

        def slots_load(k: int) -> None:
            tc.scatter_from_slots(kv, self.id_sets[k], self.pool, self.slot_sets[k], self.slot_bytes, tuning=tuning)

        def d2d_gather(k: int) -> None:
            tc.gather(kv, self.id_sets[k], self.staging, tuning=tuning)

        def d2d_scatter(k: int) -> None:
            tc.scatter(kv, self.id_sets[k], self.staging, tuning=tuning)

        host, staging = (lambda: self.host), (lambda: self.staging)
        fill_host = lambda data: self.host.copy_(data)  # noqa: E731
        fill_staging = lambda data: self.staging.copy_(data)  # noqa: E731
        save_p, load_p = (lambda k: pipelined(k, True)), (lambda k: pipelined(k, False))
        specs = [
            ("save", "pegaflow-staged", staged_save, self._check_save(staged_save, host)),
            ("save", "pegaflow-pipelined", save_p, self._check_save(save_p, host)),
            ("save", "pegaflow-zero-copy", zero_save, self._check_save(zero_save, host)),
            ("save", "pegaflow-into-slots", slots_save, self._check_save(slots_save, lambda: self._pool_rows(0))),
            ("load", "pegaflow-staged", staged_load, self._check_load(fill_host, staged_load)),
            ("load", "pegaflow-pipelined", load_p, self._check_load(fill_host, load_p)),
            ("load", "pegaflow-zero-copy", zero_load, self._check_load(fill_host, zero_load)),
            ("load", "pegaflow-from-slots", slots_load, self._check_load(self._fill_pool, slots_load)),
            ("d2d", "pegaflow-gather", d2d_gather, self._check_save(d2d_gather, staging)),
            ("d2d", "pegaflow-scatter", d2d_scatter, self._check_load(fill_staging, d2d_scatter)),
        ]
        methods = []
        for direction, name, run, check in specs:
            nbytes = 2 * self.nbytes if direction == "d2d" else self.nbytes
            methods.append(Method(direction, name, True, lambda run=run: run(self.pick()), nbytes, check))
        return methods

    def close(self) -> None:
        sync()
        del self.built, self.kv, self.staging, self.scratch, self.id_sets_gpu
        if CUDA:
            torch.cuda.empty_cache()


def measure(bench: Bench, method: Method, ceiling: float | None, args) -> tuple[Row, bool | None]:
    exact = None
    if method.check is not None:
        exact = method.check()
    repeat = args.loop_repeat if method.name == "per-block-copy" else args.repeat
    ms = gpu_ms(method.run, warmup=2 if method.name == "per-block-copy" else args.warmup, repeat=repeat)
    value = gbps(method.nbytes, ms)
    note = method.note
    if exact is False:
        note = "NOT BIT-EXACT" + (f"; {note}" if note else "")
    row = Row(bench.config.name, method.direction, method.name, method.ours, round(value, 2), "GB/s",
              round(ceiling, 2) if ceiling else None, note=note)
    flag = "" if exact is None else (" exact" if exact else " NOT BIT-EXACT")
    ratio = f" ratio {row.ratio:.3f}" if row.ratio is not None else ""
    if CUDA:
        log(f"[{bench.config.name}] {method.direction:<4} {method.name:<26} {value:9.2f} GB/s ({ms:.3f} ms){ratio}{flag}")
    else:
        log(f"[{bench.config.name}] {method.direction:<4} {method.name:<26} ran{flag} (not measured)")
    return row, exact


def run_config(config: Config, args, arena: PinnedArena, tunings: list[Tuning]) -> tuple[list[Row], list[str]]:
    bench = Bench(config, args, arena)
    rows: list[Row] = []
    failures: list[str] = []
    ceilings: dict[str, float] = {}
    for method in bench.ceilings():
        row, _ = measure(bench, method, None, args)
        ceilings[method.direction] = row.value
        rows.append(Row(row.config, row.direction, row.method, False, row.value, row.unit, row.value))
    for method in bench.baselines() + bench.ours(DEFAULT_TUNING):
        row, exact = measure(bench, method, ceilings[method.direction], args)
        rows.append(row)
        if exact is False:
            failures.append(f"{config.name} {method.direction} {method.name}")
    # Speed-up of our best save/load over the per-block loop.
    for direction in ("save", "load"):
        loop = next(r for r in rows if r.direction == direction and r.method == "per-block-copy")
        best = max((r for r in rows if r.direction == direction and r.ours), key=lambda r: r.value)
        speedup = best.value / loop.value if loop.value > 0 else float("inf")
        rows.append(Row(config.name, direction, "best/per-block-copy", True, round(speedup, 1), "x",
                        note=f"best = {best.method} ({best.ratio} of the ceiling); page {config.page_bytes} B"))
    # Launch-shape variants: the kernel-bound paths (d2d) and the zero-copy ones. The d2d
    # checks cover each variant's kernels (zero-copy runs the same ones on another buffer).
    for tuning in tunings:
        for method in bench.ours(tuning):
            if method.name in ("pegaflow-gather", "pegaflow-scatter", "pegaflow-zero-copy"):
                what = method.name.removeprefix("pegaflow-")
                if tuning == DEFAULT_TUNING or what == "zero-copy":
                    method.check = None
                method.name = tuning_label(tuning, what)
                row, exact = measure(bench, method, ceilings[method.direction], args)
                rows.append(row)
                if exact is False:
                    failures.append(f"{config.name} {method.name}")
    bench.close()
    return rows, failures


def summarize(rows: list[Row], configs: list[Config], tunings: list[Tuning]) -> list[str]:
    """The targets of the issue, and the tuning that does best across configs."""
    lines = []
    pages = {c.name: c.page_bytes for c in configs}
    for c in configs:
        for direction in ("save", "load"):
            best = max((r for r in rows if r.config == c.name and r.direction == direction and r.ours
                        and r.unit == "GB/s" and not r.method.startswith("tune ")), key=lambda r: r.value)
            ok = "ok  " if (best.ratio or 0) >= 0.95 else "MISS"
            lines.append(f"{ok} {c.name:<18} {direction} best {best.method:<22} {best.ratio} of ceiling (>= 0.95)")
        gather = next(r for r in rows if r.config == c.name and r.method == "pegaflow-gather")
        ok = "ok  " if (gather.ratio or 0) >= 0.90 else "MISS"
        lines.append(f"{ok} {c.name:<18} d2d gather {gather.ratio} of the device copy (>= 0.90)")
        if pages[c.name] <= 32 * 1024:
            for r in rows:
                if r.config == c.name and r.method == "best/per-block-copy":
                    ok = "ok  " if r.value >= 10 else "MISS"
                    lines.append(f"{ok} {c.name:<18} {r.direction} {r.value:.1f}x the per-block loop (>= 10x)")
    lines.append("launch shapes (CHUNK:STEP:WARPS), geometric mean over configs of the ratio to the ceiling:")
    for tuning in tunings:
        parts = []
        for what in ("gather", "scatter", "zero-copy"):
            label = tuning_label(tuning, what)
            for direction in ("d2d", "save", "load"):
                sel = [r.ratio for r in rows if r.method == label and r.direction == direction and r.ratio]
                if sel:
                    parts.append(f"{what}/{direction} {math.exp(statistics.fmean(math.log(x) for x in sel)):.3f}")
        lines.append(f"  {str(tuning):<16} " + "  ".join(parts))
    return lines


def tuning_label(tuning: Tuning, what: str) -> str:
    def size(n: int) -> str:
        return f"{n // 1024}k" if n % 1024 == 0 else str(n)

    hints = ":s" if tuning.streaming else ""
    return f"tune {size(tuning.chunk_bytes)}:{size(tuning.step_bytes)}:{tuning.num_warps}w{hints} {what}"


def main() -> None:
    parser = arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--blocks", type=int, default=512, help="blocks per transfer")
    parser.add_argument("--cache-gib", type=float, default=4.0, help="least KV cache size per config")
    parser.add_argument("--tunings", default=DEFAULT_TUNINGS, help="CHUNK:STEP:WARPS,... ('' for none)")
    parser.add_argument("--pipeline-blocks", type=int, default=64, help="blocks per chunk of the pipelined method")
    parser.add_argument("--pool-slots-per-block", type=int, default=2, help="pool slots per transferred block")
    parser.add_argument("--id-sets", type=int, default=4, help="block id sets rotated over")
    parser.add_argument("--loop-copies", type=int, default=4096, help="copy_ calls per per-block loop run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--loop-repeat", type=int, default=3)
    args = parser.parse_args()
    configs = [CONFIGS[name] for name in args.configs.split(",") if name]
    tunings = [Tuning.parse(t) for t in args.tunings.split(",") if t]

    t0 = time.perf_counter()
    if CUDA:
        log(f"{torch.cuda.get_device_name()}: configs {', '.join(c.name for c in configs)}; "
            f"default tuning {DEFAULT_TUNING}")
        largest = max(c.block_bytes for c in configs)
    else:
        log("NO GPU: smoke run of every method on toy caches under Triton's interpreter, "
            "checked against the reference. NOTHING IS MEASURED.")
        args.blocks, args.id_sets, args.warmup, args.repeat, args.loop_repeat = 3, 2, 0, 1, 1
        args.pipeline_blocks = 2
        tunings = [DEFAULT_TUNING, Tuning(256, 64, 1)]
        largest = max(c.build(1, "cpu", scale=True).regions.block_bytes for c in configs)
    slot = _round_up(largest, 256)
    arena = PinnedArena(_round_up(largest * args.blocks, 4096) + args.pool_slots_per_block * args.blocks * slot)
    rows: list[Row] = []
    failures: list[str] = []
    try:
        for config in configs:
            config_rows, config_failures = run_config(config, args, arena, tunings)
            rows += config_rows
            failures += config_failures
            log(f"[{config.name}] done at {time.perf_counter() - t0:.0f} s")
    finally:
        arena.close()
    if not CUDA:
        if failures:
            raise SystemExit("NOT BIT-EXACT under the interpreter: " + "; ".join(failures))
        log(f"smoke run passed: every method bit-exact on toy caches. No GPU: nothing was measured, "
            f"no numbers are reported ({time.perf_counter() - t0:.0f} s).")
        write_json(args.json, "gather_scatter", [], {"note": "no GPU: smoke run only, nothing measured"})
        return
    print_table(rows)
    lines = summarize(rows, configs, tunings)
    for line in lines:
        log(line)
    if failures:
        log("NOT BIT-EXACT: " + "; ".join(failures))
    write_json(
        args.json,
        "gather_scatter",
        rows,
        {"default_tuning": str(DEFAULT_TUNING), "summary": lines, "not_bit_exact": failures,
         "seconds": round(time.perf_counter() - t0, 1)},
    )
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
