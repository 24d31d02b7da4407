"""The Triton block copies against the torch reference, bit for bit.

On a machine without CUDA the kernel runs under Triton's interpreter (conftest.py) with the
KV cache and buffers in host memory; the tests marked ``gpu`` run the same checks on CUDA with
a pinned host buffer and a GPU staging buffer as destinations. Every check compares whole
storages (KV backing buffer, destination with guard bytes), so a stray write anywhere fails.
"""

from __future__ import annotations

import os

import pytest
import torch

from pegaflow.kernels import KVRegions, Region, reference, triton_copy
from pegaflow.kernels.layouts import (
    BuiltKVCache,
    allocate_attention_kv_cache,
    allocate_kv_cache,
    allocate_kv_first_cache,
    allocate_mla_kv_cache,
    regions_from_kv_cache_tensor,
)
from pegaflow.kernels.triton_copy import DEFAULT_TUNING, Tuning

GUARD = 64  # random bytes before and after every destination
# A launch shape small enough that test pages span several chunks and chunks several steps.
SMALL_TUNING = Tuning(chunk_bytes=128, step_bytes=32, num_warps=1)

# On a CUDA machine Triton compiles for the GPU and cannot run host-memory caches.
interpreter_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="host-memory KV caches run only under Triton's interpreter"
)

# (KV device, buffer kind): host memory under the interpreter; pinned host or GPU staging on CUDA.
TARGETS = [
    pytest.param(("cpu", "host"), id="cpu", marks=interpreter_only),
    pytest.param(("cuda", "pinned"), id="cuda-pinned", marks=pytest.mark.gpu),
    pytest.param(("cuda", "staging"), id="cuda-staging", marks=pytest.mark.gpu),
]

LAYOUTS = {
    **{
        name: (
            lambda device, name=name: allocate_attention_kv_cache(
                name, num_layers=2, num_blocks=6, num_kv_heads=2, head_size=8, block_size=4,
                dtype=torch.bfloat16, device=device,
            )
        )
        for name in ("LBNHC", "LBHNC", "BLNHC", "BLHNC")
    },
    "kv_first": lambda device: allocate_kv_first_cache(
        num_layers=2, num_blocks=6, block_size=4, num_kv_heads=2, head_size=8, dtype=torch.bfloat16, device=device
    ),
    "mla": lambda device: allocate_mla_kv_cache(num_layers=2, num_blocks=5, block_size=2, device=device),
    "fp8_ds_mla": lambda device: allocate_mla_kv_cache(
        num_layers=2, num_blocks=5, block_size=3, fp8_ds_mla=True, device=device
    ),
}

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8]


# ---------------------------------------------------------------- helpers


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A uint8 view of the tensor's whole storage."""
    storage = tensor.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage, 0, (storage.nbytes(),), (1,))


def random_bytes(nbytes: int, device: str, *, pinned: bool = False) -> torch.Tensor:
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    if pinned:
        return data.pin_memory()
    return data.to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    a = actual.reshape(-1).view(torch.uint8).cpu()
    e = expected.reshape(-1).view(torch.uint8).cpu()
    assert a.numel() == e.numel(), f"{what}: {a.numel()} bytes vs {e.numel()}"
    if not torch.equal(a, e):
        diff = (a != e).nonzero().flatten()
        first = int(diff[0])
        raise AssertionError(
            f"{what}: {diff.numel()} bytes differ, first at byte {first}: {int(a[first])} != {int(e[first])}"
        )


def guarded_buffer(nbytes: int, target: tuple[str, str], guard: int = GUARD) -> tuple[torch.Tensor, torch.Tensor]:
    """A random destination of ``nbytes`` inside random guard bytes: (the buffer, the whole)."""
    device, kind = target
    whole = random_bytes(nbytes + 2 * guard, "cuda" if kind == "staging" else "cpu", pinned=kind == "pinned")
    return whole[guard : guard + nbytes], whole


def clone_kv(kv: KVRegions) -> KVRegions:
    """The same regions over a byte-for-byte copy of the storage (all regions share one)."""
    owner = kv.regions[0].owner
    assert all(r.owner.untyped_storage().data_ptr() == owner.untyped_storage().data_ptr() for r in kv.regions)
    copy = raw_bytes(owner).clone()
    return KVRegions(tuple(Region(copy, r.offset, r.block_stride, r.page_bytes) for r in kv.regions), kv.num_blocks)


def check_gather(kv: KVRegions, block_ids, target, tuning: Tuning = DEFAULT_TUNING) -> None:
    device = target[0]
    count = len(block_ids)
    dst, whole = guarded_buffer(count * kv.block_bytes, target)
    expected_whole = whole.clone()
    expected = expected_whole[GUARD : GUARD + dst.numel()]
    kv_before = raw_bytes(kv.regions[0].owner).clone()
    triton_copy.gather(kv, block_ids, dst, tuning=tuning)
    reference.gather(kv, block_ids, expected)
    sync(device)
    assert_same_bytes(whole, expected_whole, "gather destination (with guards)")
    assert_same_bytes(raw_bytes(kv.regions[0].owner), kv_before, "KV cache after gather")


def check_gather_into_slots(kv: KVRegions, block_ids, slot_ids, target, tuning: Tuning = DEFAULT_TUNING, pad: int = 16) -> None:
    device = target[0]
    slot_bytes = kv.block_bytes + pad
    num_slots = int(max(slot_ids)) + 2 if len(slot_ids) else 3
    pool, whole = guarded_buffer(num_slots * slot_bytes, target)
    expected_whole = whole.clone()
    expected = expected_whole[GUARD : GUARD + pool.numel()]
    triton_copy.gather_into_slots(kv, block_ids, pool, slot_ids, slot_bytes, tuning=tuning)
    reference.gather_into_slots(kv, block_ids, expected, slot_ids, slot_bytes)
    sync(device)
    assert_same_bytes(whole, expected_whole, "slot pool after gather_into_slots (with guards)")


def check_scatter(kv: KVRegions, block_ids, target, tuning: Tuning = DEFAULT_TUNING) -> None:
    device = target[0]
    src, whole = guarded_buffer(len(block_ids) * kv.block_bytes, target)
    src_before = whole.clone()
    expected_kv = clone_kv(kv)
    triton_copy.scatter(kv, block_ids, src, tuning=tuning)
    reference.scatter(expected_kv, block_ids, src)
    sync(device)
    assert_same_bytes(raw_bytes(kv.regions[0].owner), raw_bytes(expected_kv.regions[0].owner), "KV cache after scatter")
    assert_same_bytes(whole, src_before, "scatter source")


def check_scatter_from_slots(kv: KVRegions, block_ids, slot_ids, target, tuning: Tuning = DEFAULT_TUNING, pad: int = 16) -> None:
    device = target[0]
    slot_bytes = kv.block_bytes + pad
    num_slots = int(max(slot_ids)) + 2 if len(slot_ids) else 3
    pool, whole = guarded_buffer(num_slots * slot_bytes, target)
    expected_kv = clone_kv(kv)
    triton_copy.scatter_from_slots(kv, block_ids, pool, slot_ids, slot_bytes, tuning=tuning)
    reference.scatter_from_slots(expected_kv, block_ids, pool, slot_ids, slot_bytes)
    sync(device)
    assert_same_bytes(
        raw_bytes(kv.regions[0].owner), raw_bytes(expected_kv.regions[0].owner), "KV cache after scatter_from_slots"
    )


def check_all_ops(kv: KVRegions, block_ids, slot_ids, target, tuning: Tuning = DEFAULT_TUNING, pad: int = 16) -> None:
    check_gather(kv, block_ids, target, tuning)
    check_gather_into_slots(kv, block_ids, slot_ids, target, tuning, pad)
    check_scatter(kv, block_ids, target, tuning)
    check_scatter_from_slots(kv, block_ids, slot_ids, target, tuning, pad)


def some_ids(num_blocks: int, count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_blocks, generator=generator)[:count].tolist()


# ---------------------------------------------------------------- every layout, dtype, id type


@pytest.mark.parametrize("tuning", [DEFAULT_TUNING, SMALL_TUNING], ids=["default-tuning", "small-tuning"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("target", TARGETS)
def test_every_layout_all_ops(layout: str, target, tuning: Tuning) -> None:
    built = LAYOUTS[layout](target[0])
    ids = some_ids(built.regions.num_blocks, 3, seed=1)
    slots = [4, 0, 2]
    check_all_ops(built.regions, ids, slots, target, tuning)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", TARGETS)
def test_every_dtype_all_ops(dtype: torch.dtype, target) -> None:
    # Pages of 36 elements: 36, 72 or 144 bytes, none a power of two.
    built = allocate_kv_cache(
        "LBNHC", num_layers=2, num_blocks=5, num_heads=3, block_size=2, content=6, dtype=dtype, device=target[0]
    )
    ids = [3, 0, 4]
    check_all_ops(built.regions, ids, [1, 3, 0], target)
    # The views really hold this dtype, and the page of a block is what the view says.
    assert built.views[0].dtype == dtype
    dst = torch.empty(built.regions.block_bytes, dtype=torch.uint8, device=target[0])
    reference.gather(built.regions, [2], dst)
    layer1 = built.views[1][2].permute(1, 0, 2).contiguous().view(torch.uint8).flatten()  # NHC memory order
    assert_same_bytes(dst[built.page_bytes :], layer1, "layer 1 page of block 2")


def _id_forms(device: str):
    forms = [
        ("list", lambda ids: list(ids)),
        ("int64", lambda ids: torch.tensor(ids, dtype=torch.int64)),
        ("int32", lambda ids: torch.tensor(ids, dtype=torch.int32)),
    ]
    if device == "cuda":
        forms.append(("int32-cuda", lambda ids: torch.tensor(ids, dtype=torch.int32, device="cuda")))
    return forms


@pytest.mark.parametrize("target", TARGETS)
def test_id_types(target) -> None:
    built = LAYOUTS["LBNHC"](target[0])
    for name, form in _id_forms(target[0]):
        ids, slots = form([5, 2, 0]), form([0, 3, 1])
        check_all_ops(built.regions, ids, slots, target)


@pytest.mark.parametrize("target", TARGETS)
def test_empty_ids_touch_nothing(target) -> None:
    built = LAYOUTS["BLNHC"](target[0])
    empty = torch.empty(0, dtype=torch.int64)
    check_all_ops(built.regions, [], [], target)
    check_all_ops(built.regions, empty, empty, target)


@pytest.mark.parametrize("target", TARGETS)
def test_one_block(target) -> None:
    for layout in ("LBHNC", "kv_first", "fp8_ds_mla"):
        built = LAYOUTS[layout](target[0])
        check_all_ops(built.regions, [built.regions.num_blocks - 1], [0], target)


@pytest.mark.parametrize("target", TARGETS)
def test_gather_repeated_blocks_and_scatter_from_repeated_slots(target) -> None:
    # Reading one block (or slot) twice is fine; only destinations must be distinct.
    built = LAYOUTS["LBNHC"](target[0])
    check_gather(built.regions, [1, 1, 4], target)
    check_gather_into_slots(built.regions, [3, 3], [0, 2], target)
    check_scatter_from_slots(built.regions, [0, 5], [1, 1], target)


@pytest.mark.parametrize("target", TARGETS)
def test_odd_pages_offsets_and_slots(target) -> None:
    """Pages, buffer offsets and slot sizes that allow only 4-, 2- or 1-byte words."""
    device = target[0]
    cases = [
        (torch.float32, 3, 0),  # page 3*2*3*4 = 72 bytes: 8-byte words
        (torch.float16, 3, 0),  # 36 bytes: 4-byte words
        (torch.int8, 3, 0),  # 18 bytes: 2-byte words
        (torch.uint8, 5, 0),  # 30 bytes, 2-byte words
        (torch.uint8, 3, 1),  # odd slot padding: 1-byte words
    ]
    for dtype, content, pad in cases:
        built = allocate_kv_cache(
            "LBNHC", num_layers=2, num_blocks=4, num_heads=2, block_size=3, content=content, dtype=dtype, device=device
        )
        check_all_ops(built.regions, [2, 0, 3], [1, 0, 3], target, pad=pad)
        check_all_ops(built.regions, [2, 0, 3], [1, 0, 3], target, SMALL_TUNING, pad=pad + 2)
    # A destination that starts at an odd address.
    built = LAYOUTS["LBNHC"](device)
    dst, whole = guarded_buffer(2 * built.regions.block_bytes + 1, target, guard=GUARD + 2)
    dst = dst[1:]  # starts at byte GUARD + 3 of the allocation
    expected_whole = whole.clone()
    triton_copy.gather(built.regions, [4, 1], dst)
    reference.gather(built.regions, [4, 1], expected_whole[GUARD + 3 : GUARD + 3 + dst.numel()])
    sync(device)
    assert_same_bytes(whole, expected_whole, "gather into an odd address")


@pytest.mark.parametrize("target", TARGETS)
def test_padding_between_pages_untouched(target) -> None:
    """Regions with gaps (offset, padded strides): bytes between pages never change."""
    device = target[0]
    backing = random_bytes(4096, device)
    kv = regions_from_kv_cache_tensor(
        backing, offset=40, layer_stride=1000, block_stride=232, page_bytes=200, num_layers=3, num_blocks=4
    )
    assert len(kv.regions) == 3
    check_all_ops(kv, [3, 1, 0, 2], [0, 1, 2, 3], target)
    check_all_ops(kv, [2, 1], [5, 0], target, SMALL_TUNING)


@interpreter_only
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_block_bytes_are_the_views_pages(layout: str) -> None:
    """Independent of the reference: a gathered block is each layer's page, in memory order."""
    built: BuiltKVCache = LAYOUTS[layout]("cpu")
    dst = torch.empty(2 * built.regions.block_bytes, dtype=torch.uint8)
    triton_copy.gather(built.regions, [3, 1], dst)
    pages = []
    for view in built.views:
        if layout == "kv_first":  # [2, B, N, H, D]: K page then V page
            pages += [view[0][1], view[1][1]]
        elif layout in ("LBNHC", "BLNHC"):  # [B, H, N, C] stored as N, H, C
            pages.append(view[1].permute(1, 0, 2))
        else:
            pages.append(view[1])
    expected = torch.cat([p.contiguous().view(torch.uint8).flatten() for p in pages])
    assert_same_bytes(dst[built.regions.block_bytes :], expected, f"{layout} block 1")


# ---------------------------------------------------------------- regions


def test_block_first_layers_merge_into_one_region() -> None:
    built = LAYOUTS["BLHNC"]("cpu")
    (region,) = built.regions.regions
    assert region.page_bytes == 2 * built.page_bytes
    assert region.block_stride == built.block_stride == region.page_bytes
    assert len(LAYOUTS["LBHNC"]("cpu").regions.regions) == 2
    # One block: a layer-first layer stride equals the page, yet the layers stay apart.
    one = allocate_attention_kv_cache(
        "LBNHC", num_layers=3, num_blocks=1, num_kv_heads=1, head_size=4, block_size=2, dtype=torch.float16
    )
    assert len(one.regions.regions) == 3
    assert len(LAYOUTS["kv_first"]("cpu").regions.regions) == 4


def test_overlapping_regions_rejected() -> None:
    backing = torch.zeros(4096, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"regions\[0\] and regions\[1\]"):
        KVRegions((Region(backing, 0, 256, 128), Region(backing, 100, 256, 128)), 4)
    with pytest.raises(ValueError, match=r"regions\[0\] and regions\[1\]"):
        KVRegions((Region(backing, 0, 256, 128), Region(backing, 200, 256, 128)), 4)  # wraps into the next block
    # Interleaved without sharing a byte: fine.
    KVRegions((Region(backing, 0, 256, 128), Region(backing, 128, 256, 128)), 4)
    with pytest.raises(ValueError, match="layer_stride"):
        regions_from_kv_cache_tensor(
            backing, offset=0, layer_stride=64, block_stride=512, page_bytes=128, num_layers=2, num_blocks=2
        )


# ---------------------------------------------------------------- validation


def _ops(kv: KVRegions, buffer: torch.Tensor, slot_bytes: int):
    """Each operation as a callable of (block_ids, slot_ids) on a given implementation."""
    return {
        "gather": lambda impl, b, s: impl.gather(kv, b, buffer),
        "gather_into_slots": lambda impl, b, s: impl.gather_into_slots(kv, b, buffer, s, slot_bytes),
        "scatter": lambda impl, b, s: impl.scatter(kv, b, buffer),
        "scatter_from_slots": lambda impl, b, s: impl.scatter_from_slots(kv, b, buffer, s, slot_bytes),
    }


BAD_IDS = [
    # (operations it applies to, block_ids, slot_ids, message)
    ("all", [0, 6], [0, 1], "block_ids holds id 6"),
    ("all", [0, -1], [0, 1], "block_ids holds a negative id"),
    ("all", [0, 1.0], [0, 1], "block_ids must hold ints"),
    ("all", torch.tensor([0.0, 1.0]), [0, 1], "block_ids must hold integers"),
    ("all", torch.tensor([[0, 1]]), [0, 1], "block_ids must be 1-D"),
    ("slots", [0, 1], [0, 4], "slot_ids holds id 4"),
    ("slots", [0, 1], [-3, 1], "slot_ids holds a negative id"),
    ("slots", [0, 1, 2], [0, 1], "slot_ids has 2 ids, block_ids 3"),
    ("gather_into_slots", [0, 1], [2, 2], "slot_ids holds duplicate ids"),
    ("scatter", [3, 3], None, "block_ids holds duplicate ids"),
    ("scatter_from_slots", [3, 3], [0, 1], "block_ids holds duplicate ids"),
    ("contiguous", [0, 1, 2, 3, 4], None, "holds .* bytes, 5 blocks need"),
]


@pytest.mark.parametrize("impl", [triton_copy, reference], ids=["triton", "reference"])
@pytest.mark.parametrize("case", BAD_IDS, ids=[c[3] for c in BAD_IDS])
def test_bad_ids_rejected_before_any_copy(impl, case) -> None:
    applies, block_ids, slot_ids, message = case
    built = LAYOUTS["LBNHC"]("cpu")
    kv = built.regions
    slot_bytes = kv.block_bytes
    buffer = random_bytes(4 * slot_bytes, "cpu")  # 4 slots, or 4 contiguous blocks
    kv_before, buffer_before = raw_bytes(built.buffer).clone(), buffer.clone()
    selected = {
        "all": ["gather", "gather_into_slots", "scatter", "scatter_from_slots"],
        "slots": ["gather_into_slots", "scatter_from_slots"],
        "contiguous": ["gather", "scatter"],
    }.get(applies, [applies])
    for name in selected:
        op = _ops(kv, buffer, slot_bytes)[name]
        with pytest.raises(ValueError, match=message):
            op(impl, block_ids, slot_ids if slot_ids is not None else [0, 1])
        assert_same_bytes(raw_bytes(built.buffer), kv_before, f"KV cache after a rejected {name}")
        assert_same_bytes(buffer, buffer_before, f"buffer after a rejected {name}")


@pytest.mark.parametrize("impl", [triton_copy, reference], ids=["triton", "reference"])
def test_bad_buffers_rejected(impl) -> None:
    kv = LAYOUTS["LBNHC"]("cpu").regions
    block = kv.block_bytes
    with pytest.raises(ValueError, match="dst must be contiguous"):
        impl.gather(kv, [0], torch.zeros(2 * block, dtype=torch.uint8)[::2])
    with pytest.raises(ValueError, match="dst must be a torch.Tensor"):
        impl.gather(kv, [0], bytearray(block))
    with pytest.raises(ValueError, match="slot_bytes .* smaller than one block"):
        impl.gather_into_slots(kv, [0], torch.zeros(4 * block, dtype=torch.uint8), [0], block - 8)
    with pytest.raises(ValueError, match="slot_bytes must be a positive int"):
        impl.scatter_from_slots(kv, [0], torch.zeros(4 * block, dtype=torch.uint8), [0], 0)
    with pytest.raises(ValueError, match="kv must be KVRegions"):
        impl.scatter([kv], [0], torch.zeros(block, dtype=torch.uint8))


@pytest.mark.gpu
def test_unpinned_host_buffer_rejected_on_cuda() -> None:
    kv = LAYOUTS["LBNHC"]("cuda").regions
    with pytest.raises(ValueError, match="not pinned"):
        triton_copy.gather(kv, [0], torch.zeros(kv.block_bytes, dtype=torch.uint8))


# ---------------------------------------------------------------- 64-bit offsets


@pytest.mark.parametrize("target", TARGETS)
def test_offsets_beyond_2_gib(target) -> None:
    """Byte (and, with 1-byte words, word) offsets past 2**31 must not wrap."""
    device = target[0]
    gib = 1 << 30
    backing = torch.empty(5 * gib // 2 + 64, dtype=torch.uint8, device=device)  # never touched but here
    stride = 6 * gib // 5 + 1  # odd: 1-byte words, block 2 starts past 2**31
    kv = KVRegions((Region(backing, 1, stride, 3), Region(backing, 5, stride, 7)), 3)
    for region in kv.regions:
        region.pages(3)[2] = random_bytes(region.page_bytes, device)
    expected = torch.cat([r.pages(3)[2] for r in kv.regions]).cpu()
    dst, _ = guarded_buffer(kv.block_bytes, target)
    triton_copy.gather(kv, [2], dst)
    sync(device)
    assert_same_bytes(dst, expected, "block 2 gathered from past 2 GiB")
    src = random_bytes(kv.block_bytes, "cpu")
    triton_copy.scatter(kv, [2], src.pin_memory() if device == "cuda" else src)
    sync(device)
    assert_same_bytes(torch.cat([r.pages(3)[2] for r in kv.regions]), src, "block 2 scattered past 2 GiB")


# ---------------------------------------------------------------- GPU: realistic sizes


@pytest.mark.gpu
@pytest.mark.parametrize("target", [("cuda", "pinned"), ("cuda", "staging")], ids=["pinned", "staging"])
@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC", "kv_first"])
def test_llama_sized_pages_on_gpu(layout: str, target) -> None:
    """64 KiB pages: the unmasked, vectorised path with the default tuning."""
    if layout == "kv_first":
        built = allocate_kv_first_cache(
            num_layers=4, num_blocks=64, block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16, device="cuda"
        )
    else:
        built = allocate_attention_kv_cache(
            layout, num_layers=4, num_blocks=64, num_kv_heads=8, head_size=128, block_size=16,
            dtype=torch.bfloat16, device="cuda",
        )
    ids = some_ids(64, 40, seed=3)
    check_all_ops(built.regions, ids, some_ids(50, 40, seed=4), target)
    check_all_ops(built.regions, ids, some_ids(50, 40, seed=4), target, Tuning(32 * 1024, 8 * 1024, 8))


@pytest.mark.parametrize("layout", ["LBNHC", "fp8_ds_mla"])  # an even and a masked page
@pytest.mark.parametrize("target", TARGETS)
def test_streaming_cache_hints_copy_the_same_bytes(layout: str, target) -> None:
    kv = LAYOUTS[layout](target[0]).regions
    check_all_ops(kv, some_ids(kv.num_blocks, 3, seed=9), [4, 0, 2], target,
                  Tuning(chunk_bytes=128, step_bytes=32, num_warps=1, streaming=True))


def test_tuning_parse_and_its_errors() -> None:
    assert Tuning.parse("16384:4096:4") == Tuning(16384, 4096, 4)
    assert Tuning.parse("16384:4096:8:s") == Tuning(16384, 4096, 8, streaming=True)
    assert str(Tuning.parse("8192:2048:4:s")) == "8192:2048:4:s"
    for bad in ("16384:4096", "16384:4096:4:x", "a:b:c", "16384:3000:4", "4096:8192:4"):
        with pytest.raises(ValueError):
            Tuning.parse(bad)
