"""The engine: a pinned memory pool, its slot allocator, a content-hash block index with LRU
eviction, and the save/load transfers between vLLM's KV caches and the pool."""

from pegaflow.engine.config import EngineConfig, InstanceSpec
from pegaflow.engine.engine import Engine
from pegaflow.engine.handle import TransferHandle, TransferResult
from pegaflow.engine.size import parse_size

__all__ = ["Engine", "EngineConfig", "InstanceSpec", "TransferHandle", "TransferResult", "parse_size"]
