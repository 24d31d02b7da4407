"""The connector's settings: ``kv_connector_extra_config`` plus environment overrides.

Every field is validated on construction; an unknown key or a bad value is a ValueError that
names it, raised when vLLM builds the connector (a typo must not silently disable a cache).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

ENV_ENDPOINT = "PEGAFLOW_ENGINE_ENDPOINT"
ENV_INSTANCE_ID = "PEGAFLOW_INSTANCE_ID"
ENV_AUTH_TOKEN = "PEGAFLOW_AUTH_TOKEN"
# The server's default control endpoint (python -m pegaflow.server without --endpoint).
DEFAULT_ENDPOINT = "ipc:///tmp/pega_engine.sock"
SAVE_SCOPES = ("prompt", "all")


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"PegaKVConnector setting {name} must be a number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ConnectorSettings:
    """What the connector needs to reach the server and decide what to move.

    * ``endpoint``: the server's control endpoint (``ipc://...`` or ``tcp://host:port``).
    * ``instance_id``: the name this vLLM instance registers under; every rank and the
      scheduler must use the same one (the default derives it from vLLM's ``engine_id``).
    * ``namespace``: overrides the model name in the block namespace (two deployments of the
      same weights under different paths can then share blocks).
    * ``rpc_timeout_s``: deadline of one request to the server (query, save, load submit).
    * ``transfer_timeout_s``: how long a submitted save or load may stay without a completion
      before the connector gives it up (a load then fails, a save is dropped).
    * ``retry_initial_s`` / ``retry_max_s``: back-off after the server was unreachable; in
      between, every lookup is a miss and nothing is sent.
    * ``save_scope``: ``"all"`` saves prompt and decode blocks, ``"prompt"`` prompt blocks only.
    * ``auth_token``: the shared secret of a server started with one (``$PEGAFLOW_AUTH_TOKEN``
      overrides it; the client reads that variable itself when this is unset).
    * ``wait_for_acceptance``: a save or load call returns once the server has accepted it
      (True) or once it is sent (False, the default: the server then answers with the
      completion alone and a refusal arrives as a failed completion; one message and one
      wait less per transfer, and with the fast lane the server starts the copy without
      sending a reply first. On two H100 hosts, four same-call rounds, it lowered the
      overhead and raised the TTFT figures in most: bench/NOTES.md, session 16).
    * ``completion_board``: the server also marks each transfer that copied every block on a
      shared-memory page the worker reads (``pegaflow.board``), so a completion is seen
      without the server's loop and two ZMQ I/O threads waking first (True, the default).
    * ``fast_lane``: through an ipc:// endpoint, saves and loads go to the server as Unix
      datagrams, which wake its loop without ZMQ's I/O threads (True, the default).
    """

    endpoint: str = DEFAULT_ENDPOINT
    instance_id: str = "pegaflow"
    namespace: str | None = None
    rpc_timeout_s: float = 2.0
    transfer_timeout_s: float = 60.0
    retry_initial_s: float = 1.0
    retry_max_s: float = 30.0
    save_scope: str = "all"
    auth_token: str | None = field(default=None, repr=False)
    wait_for_acceptance: bool = False
    completion_board: bool = True
    fast_lane: bool = True

    def __post_init__(self) -> None:
        for name in ("endpoint", "instance_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"PegaKVConnector setting {name} must be a non-empty string, got {value!r}")
        if not (self.endpoint.startswith("ipc://") or self.endpoint.startswith("tcp://")):
            raise ValueError(f"PegaKVConnector setting endpoint must start with ipc:// or tcp://, got {self.endpoint!r}")
        if self.namespace is not None and (not isinstance(self.namespace, str) or not self.namespace):
            raise ValueError(f"PegaKVConnector setting namespace must be a non-empty string, got {self.namespace!r}")
        for name in ("rpc_timeout_s", "transfer_timeout_s", "retry_initial_s", "retry_max_s"):
            object.__setattr__(self, name, _positive_float(name, getattr(self, name)))
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError(
                f"PegaKVConnector setting retry_max_s ({self.retry_max_s}) must be >= "
                f"retry_initial_s ({self.retry_initial_s})"
            )
        if self.auth_token is not None and (not isinstance(self.auth_token, str) or not self.auth_token):
            raise ValueError("PegaKVConnector setting auth_token must be a non-empty string")
        for name in ("wait_for_acceptance", "completion_board", "fast_lane"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PegaKVConnector setting {name} must be true or false, got {getattr(self, name)!r}")
        if self.save_scope not in SAVE_SCOPES:
            raise ValueError(f"PegaKVConnector setting save_scope must be one of {SAVE_SCOPES}, got {self.save_scope!r}")

    @property
    def save_decode_blocks(self) -> bool:
        return self.save_scope == "all"

    @classmethod
    def from_extra_config(
        cls,
        extra: Mapping[str, Any] | None,
        *,
        engine_id: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ConnectorSettings:
        """Settings from ``kv_connector_extra_config``; the environment overrides endpoint and
        instance id (so one config file serves several instances on a host)."""
        env = os.environ if env is None else env
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(
                f"PegaKVConnector: unknown kv_connector_extra_config key(s) {unknown}; valid keys: {sorted(known)}"
            )
        if env.get(ENV_ENDPOINT):
            extra["endpoint"] = env[ENV_ENDPOINT]
        if env.get(ENV_INSTANCE_ID):
            extra["instance_id"] = env[ENV_INSTANCE_ID]
        if env.get(ENV_AUTH_TOKEN):
            extra["auth_token"] = env[ENV_AUTH_TOKEN]
        if "instance_id" not in extra and engine_id:
            extra["instance_id"] = f"vllm-{engine_id}"
        return cls(**extra)
