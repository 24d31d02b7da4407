"""Block tables: a transfer's ids checked and uploaded once, then launched in ranges of rows
(the engine's staged pipeline). Bit for bit against the torch reference, with guard bytes
around every buffer and the padding between rows checked untouched."""

from __future__ import annotations

import pytest
import torch

from pegaflow.kernels import reference, triton_copy
from pegaflow.kernels.triton_copy import ROW_BUFFER_ALIGN, Tuning
from test_kernels import LAYOUTS, TARGETS, assert_same_bytes, clone_kv, raw_bytes, random_bytes, some_ids, sync

SMALL_TUNING = Tuning(chunk_bytes=128, step_bytes=32, num_warps=1)


def aligned_buffer(nbytes: int, target) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Random bytes; a ROW_BUFFER_ALIGN-aligned window of ``nbytes`` with >= 256 guard bytes on
    each side: (the window, the whole, the window's start in the whole)."""
    device, kind = target
    whole = random_bytes(nbytes + 4 * ROW_BUFFER_ALIGN, "cuda" if kind == "staging" else "cpu", pinned=kind == "pinned")
    start = ROW_BUFFER_ALIGN + (-(whole.data_ptr() + ROW_BUFFER_ALIGN)) % ROW_BUFFER_ALIGN
    return whole[start : start + nbytes], whole, start


def pitch_for(block_bytes: int) -> int:
    return -(-block_bytes // 256) * 256 + 256  # padding after every row, to see it untouched


@pytest.mark.parametrize("tuning", [triton_copy.DEFAULT_TUNING, SMALL_TUNING], ids=["default", "small"])
@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC", "kv_first", "fp8_ds_mla"])
@pytest.mark.parametrize("target", TARGETS)
def test_gather_in_ranges_matches_reference(layout: str, target, tuning: Tuning) -> None:
    device = target[0]
    kv = LAYOUTS[layout](device).regions
    ids = some_ids(kv.num_blocks, 4, seed=1)
    pitch = pitch_for(kv.block_bytes)
    table = triton_copy.block_table(kv, ids, pitch, to_kv=False, tuning=tuning)
    kv_before = raw_bytes(kv.regions[0].owner).clone()
    for first, count in ((0, 3), (3, 1)):  # two chunks through the same two-row window
        gather_rows(kv, table, ids, pitch, first, count, target, rows=3)
    assert_same_bytes(raw_bytes(kv.regions[0].owner), kv_before, "KV cache after gathers")


def gather_rows(kv, table, ids, pitch, first, count, target, rows: int | None = None) -> None:
    """``launch_rows`` of ``[first, +count)`` into a fresh window of ``rows`` rows (``count`` if
    None), bit for bit against the torch reference, guards and padding included."""
    window, whole, start = aligned_buffer((rows or count) * pitch, target)
    expected_whole = whole.clone()
    expected = expected_whole[start : start + window.numel()]
    triton_copy.launch_rows(table, first, count, window)
    reference.gather_into_slots(kv, ids[first : first + count], expected, list(range(count)), pitch)
    sync(target[0])
    assert_same_bytes(whole, expected_whole, f"rows of [{first}, +{count}) with guards and padding")


@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC", "kv_first", "fp8_ds_mla"])
@pytest.mark.parametrize("target", TARGETS)
def test_scatter_in_ranges_matches_reference(layout: str, target) -> None:
    device = target[0]
    kv = LAYOUTS[layout](device).regions
    ids = some_ids(kv.num_blocks, 4, seed=2)
    pitch = pitch_for(kv.block_bytes)
    table = triton_copy.block_table(kv, ids, pitch, to_kv=True)
    expected_kv = clone_kv(kv)
    for first, count in ((1, 3), (0, 1)):
        window, whole, _ = aligned_buffer(3 * pitch, target)
        before = whole.clone()
        triton_copy.launch_rows(table, first, count, window)
        reference.scatter_from_slots(expected_kv, ids[first : first + count], window, list(range(count)), pitch)
        sync(device)
        assert_same_bytes(whole, before, "scatter source")
    # Whole storages: the four targets are right and every other block is as it was.
    assert_same_bytes(raw_bytes(kv.regions[0].owner), raw_bytes(expected_kv.regions[0].owner), "KV after scatters")


@pytest.mark.parametrize("impl", [triton_copy, reference], ids=["triton", "reference"])
@pytest.mark.parametrize("target", TARGETS)
def test_bad_tables_and_launches_rejected_before_any_copy(target, impl) -> None:
    device = target[0]
    kv = LAYOUTS["LBNHC"](device).regions
    pitch = pitch_for(kv.block_bytes)
    for ids, to_kv, match in (
        ([0, kv.num_blocks], False, "out of range"),
        ([-1], False, "negative"),
        ([1, 1], True, "duplicate"),
        ([0.5], False, "ints"),
    ):
        with pytest.raises(ValueError, match=match):
            impl.block_table(kv, ids, pitch, to_kv=to_kv)
    for bad_pitch in (kv.block_bytes - 16, kv.block_bytes + 8, True):
        with pytest.raises(ValueError, match="pitch"):
            impl.block_table(kv, [0], bad_pitch, to_kv=False)
    table = impl.block_table(kv, [0, 1], pitch, to_kv=True)
    window, whole, _ = aligned_buffer(2 * pitch, target)
    kv_before = raw_bytes(kv.regions[0].owner).clone()
    bad = [(1, 2, window, "within"), (-1, 1, window, "within"), (0, 2, window[:pitch], "holds")]
    if impl is triton_copy:  # the reference takes any alignment
        bad.append((0, 1, window[16 : 16 + pitch], "start at a multiple"))
    for first, count, buffer, match in bad:
        with pytest.raises(ValueError, match=match):
            impl.launch_rows(table, first, count, buffer)
    sync(device)
    assert_same_bytes(raw_bytes(kv.regions[0].owner), kv_before, "KV cache after refused launches")


@pytest.mark.parametrize("to_kv", [False, True], ids=["gather", "scatter"])
@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC", "kv_first", "fp8_ds_mla"])
@pytest.mark.parametrize("target", TARGETS)
def test_warm_up_copies_nothing(layout: str, target, to_kv: bool) -> None:
    """The compile-ahead launch (every page length 0 in its table) leaves the KV cache and the
    buffer as they were, bit for bit, in either direction."""
    device = target[0]
    kv = LAYOUTS[layout](device).regions
    pitch = pitch_for(kv.block_bytes)
    window, whole, _ = aligned_buffer(2 * pitch, target)
    buffer_before, kv_before = whole.clone(), raw_bytes(kv.regions[0].owner).clone()
    triton_copy.warm_up(kv, pitch, window, to_kv=to_kv, tuning=SMALL_TUNING)
    sync(device)
    assert_same_bytes(whole, buffer_before, "buffer after a warm-up")
    assert_same_bytes(raw_bytes(kv.regions[0].owner), kv_before, "KV cache after a warm-up")


@pytest.mark.parametrize("target", TARGETS)
def test_warm_up_checks_the_pitch(target) -> None:
    kv = LAYOUTS["LBNHC"](target[0]).regions
    window, _, _ = aligned_buffer(2 * pitch_for(kv.block_bytes), target)
    with pytest.raises(ValueError):
        triton_copy.warm_up(kv, kv.block_bytes - 16, window, to_kv=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("to_kv", [False, True], ids=["gather", "scatter"])
def test_warm_up_compiles_the_variant_a_table_launches(to_kv: bool) -> None:
    """After a warm-up, a real table's launch on a buffer of the same alignment compiles
    nothing more (read from Triton's per-device kernel cache; skipped where that differs)."""
    kernel = triton_copy._copy_pages_kernel
    caches = getattr(kernel, "device_caches", None)
    kv = LAYOUTS["LBNHC"]("cuda").regions
    pitch = pitch_for(kv.block_bytes) + 512  # a pitch no other test used: a fresh variant
    window, _, _ = aligned_buffer(3 * pitch, ("cuda", "staging"))

    def compiled() -> int:
        entry = caches.get(torch.cuda.current_device()) if isinstance(caches, dict) else None
        if not (isinstance(entry, tuple) and entry and isinstance(entry[0], dict)):
            pytest.skip("this Triton keeps its kernel cache elsewhere")
        return len(entry[0])

    triton_copy.warm_up(kv, pitch, window, to_kv=to_kv)
    after_warm_up = compiled()
    table = triton_copy.block_table(kv, some_ids(kv.num_blocks, 3, seed=5), pitch, to_kv=to_kv)
    triton_copy.launch_rows(table, 0, 3, window)
    torch.cuda.synchronize()
    assert compiled() == after_warm_up
