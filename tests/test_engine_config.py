"""Size parsing, the engine's configuration and the instance namespace."""

from __future__ import annotations

import dataclasses

import pytest

from pegaflow.engine import EngineConfig, InstanceSpec, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("30gb", 30 << 30),
        ("512MB", 512 << 20),
        ("1.5tb", 3 << 39),
        ("64kb", 64 << 10),
        ("1234", 1234),
        (1234, 1234),
        (" 2 GiB ", 2 << 30),
        ("8g", 8 << 30),
        ("0.5kb", 512),
        ("10b", 10),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1.5.3gb", "-3gb", "12 bytes", "1xb", "gb", "0.5b", "1.5", None, True, -1])
def test_parse_size_rejects_and_names_the_text(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)
    if isinstance(text, str) and text:
        with pytest.raises(ValueError, match=repr(text).replace(".", r"\.")):
            parse_size(text)


def test_engine_config_validation():
    assert EngineConfig(pool_bytes=1 << 20).devices == ()
    for kwargs, name in [
        ({"pool_bytes": 0}, "pool_bytes"),
        ({"pool_bytes": 1, "devices": [0]}, "devices"),
        ({"pool_bytes": 1, "devices": (0, 0)}, "duplicate"),
        ({"pool_bytes": 1, "staging_bytes": 0}, "staging_bytes"),
        ({"pool_bytes": 1, "write_timeout_s": 0}, "write_timeout_s"),
        ({"pool_bytes": 1, "save_mode": "fast"}, "save_mode"),
        ({"pool_bytes": 1, "pin_threads": 0}, "pin_threads"),
    ]:
        with pytest.raises(ValueError, match=name):
            EngineConfig(**kwargs)


SPEC = InstanceSpec("i0", "llama", "bf16", "LBNHC", 16, (65536,) * 32)


def test_block_bytes_and_namespace():
    assert SPEC.block_bytes == 32 * 65536
    assert dataclasses.replace(SPEC, instance_id="i1").namespace == SPEC.namespace
    changes = [
        {"model": "qwen"}, {"kv_dtype": "fp8"}, {"layout": "BLNHC"}, {"block_size": 32},
        {"page_bytes": (65536,) * 31 + (32768,)}, {"tp_size": 2}, {"replicated": True}, {"hash_bytes": 16},
    ]  # fmt: skip
    namespaces = {dataclasses.replace(SPEC, **c).namespace for c in changes}
    assert len(namespaces) == len(changes) and SPEC.namespace not in namespaces


def test_instance_spec_validation():
    for change, name in [
        ({"instance_id": ""}, "instance_id"),
        ({"model": 3}, "model"),
        ({"block_size": 0}, "block_size"),
        ({"page_bytes": ()}, "page_bytes"),
        ({"page_bytes": [1, 2]}, "page_bytes"),
        ({"page_bytes": (1, 0)}, "page_bytes"),
        ({"tp_size": 0}, "tp_size"),
        ({"replicated": 1}, "replicated"),
    ]:
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(SPEC, **change)
    assert dataclasses.replace(SPEC, tp_size=4, replicated=True).stored_ranks == 1
    assert dataclasses.replace(SPEC, tp_size=4).stored_ranks == 4


def test_save_modes_choose_when_saves_go_by_dma_alone():
    from pegaflow.engine.config import DMA_MIN_ROW_BYTES

    assert EngineConfig(pool_bytes=1, save_mode="dma").dma_min_row == 0
    assert EngineConfig(pool_bytes=1, save_mode="auto").dma_min_row == DMA_MIN_ROW_BYTES
    assert EngineConfig(pool_bytes=1, save_mode="staged").dma_min_row is None
    assert EngineConfig(pool_bytes=1, save_mode="zero_copy").dma_min_row is None
    with pytest.raises(ValueError, match="save_mode"):
        EngineConfig(pool_bytes=1, save_mode="fast")
