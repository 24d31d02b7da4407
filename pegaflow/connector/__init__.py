"""PegaFlow's vLLM v1 KV connector.

vLLM loads ``PegaKVConnector`` from here (``kv_connector_module_path="pegaflow.connector"``).
The class is imported on first access, so importing this package costs nothing and starts
nothing; the settings, tracker, metadata and scheduler-side modules import neither vLLM
nor torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PegaKVConnector"]


def __getattr__(name: str) -> Any:
    if name == "PegaKVConnector":
        from pegaflow.connector.connector import PegaKVConnector

        return PegaKVConnector
    raise AttributeError(f"module 'pegaflow.connector' has no attribute {name!r}")
