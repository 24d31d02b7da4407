"""CPU memory sharing (pegaflow.sharing): moved in place, opened by another process, under
either torch sharing strategy; bad handles refused before anything is mapped."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as tmp

from pegaflow import sharing

OPENER = textwrap.dedent("""
    import sys, torch
    from pegaflow import sharing
    handle = sharing.handle_from_wire({"kind": "cpu", "manager": sys.argv[1].encode(), "name": sys.argv[2].encode(),
                                       "size": int(sys.argv[3])})
    raw = sharing.storage_bytes_tensor(sharing.open_storage(handle))
    print(int(raw.to(torch.int64).sum()), flush=True)
    raw[:16] = 7  # the other process must see this
""")


def open_elsewhere(handle: sharing.CpuShare) -> int:
    out = subprocess.run([sys.executable, "-c", OPENER, handle.manager.decode(), handle.name.decode(), str(handle.size)],
                         capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip())


def test_default_strategy_moves_in_place_and_another_process_sees_the_same_bytes():
    assert tmp.get_sharing_strategy() == "file_descriptor"  # torch's default on Linux
    kv = torch.randint(-128, 128, (4, 64, 32), dtype=torch.int8)
    original = kv.clone()
    view = kv[2, 5:9]  # a view made before the move keeps working after it
    handle = sharing.share_storage(view)
    assert isinstance(handle, sharing.CpuShare) and handle.size == kv.numel()
    assert torch.equal(kv, original) and view.data_ptr() == kv[2, 5].data_ptr()
    assert sharing.share_storage(kv) == handle  # once shared, the same handle
    assert open_elsewhere(handle) == int(original.view(torch.uint8).to(torch.int64).sum())  # it sums bytes
    assert torch.equal(kv.flatten()[:16], torch.full((16,), 7, dtype=torch.int8))
    assert torch.equal(kv.flatten()[16:], original.flatten()[16:])


def test_file_system_strategy_too():
    code = textwrap.dedent("""
        import torch, torch.multiprocessing as tmp
        from pegaflow import sharing
        tmp.set_sharing_strategy("file_system")
        kv = torch.arange(1000, dtype=torch.int16)
        kv.untyped_storage().share_memory_()
        h = sharing.share_storage(kv)
        raw = sharing.storage_bytes_tensor(sharing.open_storage(h))
        raw[:2] = 0
        assert kv[0] == 0 and torch.equal(kv[1:], torch.arange(1, 1000, dtype=torch.int16))
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_wire_round_trip_and_bad_handles():
    kept = torch.zeros(256, dtype=torch.uint8)  # its segment lives as long as it does
    handle = sharing.share_storage(kept)
    assert sharing.handle_from_wire(sharing.handle_to_wire(handle)) == handle
    bad = [
        {"kind": "cpu", "manager": b"/m", "name": b"/../etc/passwd", "size": 1},
        {"kind": "cpu", "manager": b"/m", "name": b"/torch_1_2_3", "size": 0},
        {"kind": "cpu", "manager": "str", "name": b"/torch_1_2_3", "size": 1},
        {"kind": "cpu", "manager": b"/m", "name": b"/torch_1_2_3"},
        {"kind": "gpu"},
        [],
    ]
    for fields in bad:
        with pytest.raises(ValueError):
            sharing.handle_from_wire(fields)
    with pytest.raises(ValueError, match="cannot be opened"):
        sharing.open_storage(sharing.CpuShare(handle.manager, b"/torch_1_1_999999", 16))
    with pytest.raises(ValueError, match="fewer than the claimed"):
        sharing.open_storage(sharing.CpuShare(handle.manager, handle.name, 1 << 20))
    with pytest.raises(ValueError):
        sharing.share_storage(torch.zeros(0))
