"""The end-to-end harness on the CPU: the real server in CPU mode, spawned worker processes
driving the connector's worker side over shared memory, every load checked bit for bit.

``bench/e2e.py --smoke`` is the whole flow at toy sizes; the unit tests below make sure its
checks can fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from e2e_shapes import LAYOUTS, SMOKE, Contents, build_rank_cache  # noqa: E402
from pegaflow.kernels.layouts import allocate_attention_kv_cache  # noqa: E402


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cache_regions_follow_the_vllm_placement(layout):
    """The regions the connector derives from the kv_cache_config stand-in cover exactly the
    bytes of each block's layers: writing one block changes that block's pages only."""
    cache = build_rank_cache(SMOKE, layout, 8, 1, "cpu")
    before = cache.buffer.clone()
    contents = Contents(cache.regions, rank=0, replicated=layout == "MLA")
    contents.write([3], [12345])
    changed = (cache.buffer != before).nonzero().flatten()
    assert len(changed) > 0.9 * cache.regions.block_bytes  # random bytes: a few may coincide
    for region in cache.regions.regions:
        start = region.offset + 3 * region.block_stride
        inside = (changed >= start) & (changed < start + region.page_bytes)
        assert inside.any(), f"region at {region.offset} not written"
    spans = [(r.offset + 3 * r.block_stride, r.offset + 3 * r.block_stride + r.page_bytes) for r in cache.regions.regions]
    assert all(any(a <= int(i) < b for a, b in spans) for i in changed), "a byte outside block 3 changed"
    if layout != "MLA":
        built = allocate_attention_kv_cache(layout, num_layers=SMOKE.num_layers, num_blocks=8,
                                            num_kv_heads=SMOKE.num_kv_heads, head_size=SMOKE.head_size,
                                            block_size=SMOKE.block_size, dtype=torch.bfloat16)
        assert [(r.offset, r.block_stride, r.page_bytes) for r in cache.regions.regions] == \
            [(r.offset, r.block_stride, r.page_bytes) for r in built.regions.regions]


def test_contents_check_catches_a_flipped_byte_and_a_wrong_block():
    cache = build_rank_cache(SMOKE, "LBNHC", 8, 1, "cpu")
    contents = Contents(cache.regions, rank=0, replicated=False)
    keys = [contents.key_of(bytes([i]) * 32) for i in range(8)]
    contents.write(list(range(8)), keys)
    assert contents.mismatches(list(range(8)), keys) == []
    assert contents.mismatches([2], [keys[3]]), "block 2 passed as block 3's content"
    region = cache.regions.regions[-1]
    raw = cache.buffer.view(torch.uint8)
    raw[region.offset + 5 * region.block_stride + 7] ^= 1
    bad = contents.mismatches(list(range(8)), keys)
    assert len(bad) == 1 and bad[0].startswith("block 5: 1 bytes differ")


def test_ranks_write_different_bytes_unless_replicated():
    cache = build_rank_cache(SMOKE, "LBNHC", 4, 2, "cpu")
    r0, r1 = Contents(cache.regions, 0, False), Contents(cache.regions, 1, False)
    assert not torch.equal(r0.expected([r0.key_of(b"h" * 32)]), r1.expected([r1.key_of(b"h" * 32)]))
    m0, m1 = Contents(cache.regions, 0, True), Contents(cache.regions, 1, True)
    assert torch.equal(m0.expected([m0.key_of(b"h" * 32)]), m1.expected([m1.key_of(b"h" * 32)]))


def test_smoke_run_tp2_every_load_bit_exact(tmp_path):
    """The whole harness, two ranks, CPU mode: replay and every figure phase."""
    import e2e

    out = tmp_path / "e2e.json"
    result = e2e.main(["--smoke", "--tp", "2", "--steps", "40", "--rounds", "2", "--json", str(out)])
    stats = result["results"]["replay"]["stats"]
    assert stats["mismatches"] == 0, result["results"]["replay"]["mismatches"]
    assert stats["drained"] and stats["saves_failed"] == 0
    assert stats["loads_ok"] > 0 and stats["blocks_checked"] > 0 and stats["blocks_rechecked"] > 0
    assert result["summary"][0].startswith("PASS replay")
    assert result["summary"][1] == "PASS figure phases: every load bit-exact", result["summary"][1]
    kinds = {(r.direction, r.method) for r in result["rows"]}
    for want in [("save", "pegaflow-e2e"), ("load", "pegaflow-e2e"), ("both", "pegaflow-e2e"),
                 ("interference", "matmul-rate-with-saves"), ("interference", "matmul-rate-with-loads"),
                 ("overhead", "save-1blk-p50"), ("ttft", "speedup-16tok"), ("correctness", "loads-checked-bit-exact")]:
        assert want in kinds, want
    assert out.exists() and '"bench": "e2e"' in out.read_text()


def test_smoke_replay_mla_replicated():
    """MLA pages are stored once (rank 0) and loaded by every rank."""
    import e2e

    result = e2e.main(["--smoke", "--tp", "2", "--layout", "MLA", "--steps", "30",
                       "--skip", "bulk,overhead,interference,ttft"])
    stats = result["results"]["replay"]["stats"]
    assert stats["mismatches"] == 0, result["results"]["replay"]["mismatches"]
    assert stats["loads_ok"] > 0 and stats["drained"]


def test_an_overhead_phase_larger_than_the_pool_is_refused_before_anything_starts():
    """Its saves would evict each other before their loads, which would then fail."""
    import e2e

    with pytest.raises(SystemExit, match="--overhead-n 200: the overhead phase saves 200 jobs of 4 blocks"):
        e2e.main(["--smoke", "--overhead-n", "200"])
