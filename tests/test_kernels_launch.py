"""Direct launches of a kept CompiledKernel (triton_copy.FAST_LAUNCH): taken after a
variant's first launch, bit-exact, and keyed on everything Triton specializes on. The GPU
tests run with PEGAFLOW_VERIFY_LAUNCH=1 (conftest), so every direct launch also asks Triton
which variant it would pick and raises on a mismatch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from pegaflow.kernels import reference, triton_copy
from test_kernels import LAYOUTS, assert_same_bytes, clone_kv, interpreter_only, raw_bytes, some_ids
from test_kernels_block_table import aligned_buffer, gather_rows, pitch_for

STAGING = ("cuda", "staging")
# Triton releases outside triton_copy's checked range never launch directly.
needs_direct_launches = pytest.mark.skipif(triton_copy._knobs is None,
                                           reason=f"Triton {triton.__version__} takes no direct launches")


@pytest.fixture
def fresh_variants(monkeypatch):
    """An empty variant cache, verification on, and a count of the direct launches."""
    monkeypatch.setattr(triton_copy, "_compiled", {})
    monkeypatch.setattr(triton_copy, "FAST_LAUNCH", True)
    monkeypatch.setattr(triton_copy, "VERIFY_LAUNCH", True)
    direct = []
    verify = triton_copy._verify_variant

    def counting(*args, **kwargs):
        direct.append(args[1])  # the grid
        verify(*args, **kwargs)

    monkeypatch.setattr(triton_copy, "_verify_variant", counting)
    return direct


@needs_direct_launches
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["LBNHC", "fp8_ds_mla"])
def test_later_chunks_launch_directly_and_copy_bit_exact(layout: str, fresh_variants) -> None:
    kv = LAYOUTS[layout]("cuda").regions
    ids = some_ids(kv.num_blocks, 5, seed=3)  # fp8_ds_mla's cache holds 5 blocks
    pitch = pitch_for(kv.block_bytes)
    table = triton_copy.block_table(kv, ids, pitch, to_kv=False)
    for first, count in ((0, 1), (1, 3), (4, 1)):
        gather_rows(kv, table, ids, pitch, first, count, STAGING)
    assert len(triton_copy._compiled) == 1
    assert [grid[2] for grid in fresh_variants] == [3, 1]  # the first launch compiled or found the variant


@needs_direct_launches
@pytest.mark.gpu
def test_scatter_launches_directly_and_leaves_other_blocks(fresh_variants) -> None:
    kv = LAYOUTS["LBNHC"]("cuda").regions
    ids = some_ids(kv.num_blocks, 4, seed=4)
    pitch = pitch_for(kv.block_bytes)
    table = triton_copy.block_table(kv, ids, pitch, to_kv=True)
    expected_kv = clone_kv(kv)
    for first, count in ((0, 2), (2, 2)):
        window, _, _ = aligned_buffer(count * pitch, STAGING)
        triton_copy.launch_rows(table, first, count, window)
        reference.scatter_from_slots(expected_kv, ids[first : first + count], window, list(range(count)), pitch)
    torch.cuda.synchronize()
    assert_same_bytes(raw_bytes(kv.regions[0].owner), raw_bytes(expected_kv.regions[0].owner), "KV after scatters")
    assert len(fresh_variants) == 1


@needs_direct_launches
@pytest.mark.gpu
def test_table_alignment_is_part_of_the_key(fresh_variants) -> None:
    """A table 8 bytes past a 16-byte boundary is another variant for Triton: it must not
    reuse the aligned table's kernel (verification raises if it does)."""
    kv = LAYOUTS["LBNHC"]("cuda").regions
    ids = some_ids(kv.num_blocks, 4, seed=5)
    pitch = pitch_for(kv.block_bytes)

    def at_offset(words: int):
        def upload(host):
            backing = torch.empty(host.size + 4, dtype=torch.int64, device="cuda")
            view = backing[words : words + host.size]
            view.copy_(torch.from_numpy(host))
            return view
        return upload

    aligned = triton_copy.block_table(kv, ids, pitch, to_kv=False, upload=at_offset(0))
    shifted = triton_copy.block_table(kv, ids, pitch, to_kv=False, upload=at_offset(1))
    assert aligned.table.data_ptr() % 16 == 0 and shifted.table.data_ptr() % 16 == 8
    for table in (aligned, shifted, aligned, shifted):
        gather_rows(kv, table, ids, pitch, 0, 4, STAGING)
    assert len(triton_copy._compiled) == 2
    assert len(fresh_variants) == 2


@pytest.mark.gpu
def test_fast_launch_off_goes_through_triton(monkeypatch, fresh_variants) -> None:
    monkeypatch.setattr(triton_copy, "FAST_LAUNCH", False)
    kv = LAYOUTS["LBNHC"]("cuda").regions
    ids = some_ids(kv.num_blocks, 4, seed=6)
    pitch = pitch_for(kv.block_bytes)
    table = triton_copy.block_table(kv, ids, pitch, to_kv=False)
    for first, count in ((0, 2), (2, 2)):
        gather_rows(kv, table, ids, pitch, first, count, STAGING)
    assert not triton_copy._compiled and not fresh_variants


@interpreter_only
def test_interpreter_never_keeps_variants(monkeypatch) -> None:
    """On the CPU (Triton's interpreter) every launch goes through the interpreter."""
    monkeypatch.setattr(triton_copy, "_compiled", {})
    kv = LAYOUTS["LBNHC"]("cpu").regions
    ids = some_ids(kv.num_blocks, 3, seed=7)
    pitch = pitch_for(kv.block_bytes)
    table = triton_copy.block_table(kv, ids, pitch, to_kv=False)
    for first, count in ((0, 2), (2, 1)):
        gather_rows(kv, table, ids, pitch, first, count, ("cpu", "host"))
    assert not triton_copy._compiled


class FakeCompiled:
    """A CompiledKernel's launch interface, recording each direct launch."""

    function = "function"
    packed_metadata = "packed"

    def __init__(self) -> None:
        self.launches: list[tuple] = []

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid)

    @property
    def run(self):
        return lambda *call: self.launches.append(call)


class FakeJit:
    """Stands in for the JIT kernel on the CPU: one FakeCompiled per variant, keyed as Triton
    specializes (pointer alignment, constexprs); records each launch's bound arguments."""

    def __init__(self, arg_names: list[str]) -> None:
        self.arg_names = arg_names
        self.variants: dict[tuple, FakeCompiled] = {}
        self.bound: list[dict] = []

    def _variant(self, args, kwargs) -> FakeCompiled:
        bound = dict(zip(self.arg_names, args)) | {k: v for k, v in kwargs.items() if k != "num_warps"}
        key = tuple((name, v.data_ptr() % 16 == 0) if isinstance(v, torch.Tensor) else (name, v)
                    for name, v in bound.items() if name not in ("count", "first", "row_shift"))
        return bound, self.variants.setdefault(key, FakeCompiled())

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound, kernel = self._variant(args, kwargs)
            self.bound.append(bound)
            return kernel
        return launch

    def warmup(self, *args, grid, **kwargs):
        return self._variant(args, kwargs)[1]


@needs_direct_launches
def test_direct_launch_passes_what_triton_binds(monkeypatch) -> None:
    """The logic of the direct path on the CPU, against a fake JIT kernel: the second launch of
    a variant goes direct with the same arguments, in the kernel's parameter order (pointers
    as addresses), on the current stream; another table alignment is another variant."""
    fake = FakeJit(list(triton_copy._copy_pages_kernel.arg_names))
    monkeypatch.setattr(triton_copy, "_copy_pages_kernel", fake)
    monkeypatch.setattr(triton_copy, "_interpreting", lambda: False)
    monkeypatch.setattr(triton_copy, "_compiled", {})
    monkeypatch.setattr(triton_copy, "FAST_LAUNCH", True)
    monkeypatch.setattr(triton_copy, "VERIFY_LAUNCH", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    kv = LAYOUTS["LBNHC"]("cpu").regions
    pitch = pitch_for(kv.block_bytes)
    shape = triton_copy._shape(kv, 256, triton_copy.DEFAULT_TUNING)
    backing = torch.zeros(32, dtype=torch.int64)
    aligned = backing[(-backing.data_ptr() // 8) % 2 :][:16]
    shifted = backing[(-backing.data_ptr() // 8) % 2 + 1 :][:16]
    buffer = torch.zeros(4 * pitch, dtype=torch.uint8)

    def run(table, first, count):
        triton_copy._run_kernel(kv, shape, table, 6, first, count, first, buffer, pitch, False, False)

    run(aligned, 0, 2)
    run(aligned, 2, 3)
    assert len(fake.bound) == 1, "the second launch of a variant went through the JIT"
    (kernel,) = fake.variants.values()
    ((grid_0, grid_1, grid_2, stream, function, packed, metadata, enter, exit_, *args),) = kernel.launches
    assert (grid_0, grid_1, grid_2) == (shape.chunks_per_page, len(kv.regions), 3)
    assert (stream, function, packed) == (1234, "function", "packed")
    assert metadata == ("metadata", (grid_0, grid_1, grid_2))
    assert enter is triton_copy._knobs.runtime.launch_enter_hook
    expected = dict(fake.bound[0], first=2, row_shift=2)
    expected["kv_ptr"] = expected["kv_ptr"].data_ptr()
    expected["table_ptr"] = expected["table_ptr"].data_ptr()
    assert expected["buf_ptr"].data_ptr() == buffer.data_ptr()
    assert args[1] is buffer  # a host buffer goes as a tensor; the rest in parameter order:
    assert dict(zip(fake.arg_names, args)) == dict(expected, buf_ptr=buffer)
    run(shifted, 0, 2)
    assert len(fake.bound) == 2 and len(triton_copy._compiled) == 2, "an 8-byte-aligned table reused a variant"


@pytest.mark.parametrize("version, supported", [
    ("3.4.0", True), ("3.6.0", True), ("3.8.0+git5c9e54f", True), ("3.3.1", False), ("3.9.0", False),
    ("3.10.0", False), ("4.0.0", False), ("2.3.1", False),
])
def test_direct_launches_only_on_checked_triton_releases(version: str, supported: bool) -> None:
    assert triton_copy.direct_launch_supported(version) is supported


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_the_launch_bench_imports_and_says_it_needs_a_gpu() -> None:
    bench = Path(__file__).resolve().parents[1] / "bench" / "launch_cost.py"
    run = subprocess.run([sys.executable, str(bench)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "needs a CUDA device" in run.stderr
