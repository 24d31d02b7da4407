"""The connector's line to the PegaFlow server: one client, a deadline on every call, and a
back-off gate so that a dead or wedged server costs one warning and then nothing.

While the gate is closed no request is sent: lookups are misses, loads fail at once (vLLM
recomputes), saves are dropped. The gate reopens after a back-off that doubles up to
``retry_max_s``; the first call that succeeds logs the recovery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pegaflow.connector.config import ConnectorSettings

logger = logging.getLogger(__name__)


class LinkUnavailable(Exception):
    """The server could not be reached (now or recently): treat the call as not made."""


class LinkRejected(Exception):
    """The server answered, but refused the request; ``code`` is the server's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


# Codes by which the server says our KV cache registration is gone (it restarted, or expired
# our session): the worker registers again before its next transfer.
REGISTRATION_LOST = frozenset({"no_session", "not_registered", "unknown_instance"})
# The code of a request the client refused to send (its arguments failed its checks).
INVALID_REQUEST = "invalid_request"


@dataclass(frozen=True)
class Completion:
    """A finished save or load, as the worker side uses it."""

    job_id: int
    ok: bool
    skipped: int = 0  # save: blocks not copied (already held, or no room: a full pool)
    missing: tuple[int, ...] = ()  # load: indices of hashes the pool did not hold
    error: str | None = None
    code: str | None = None  # the server refused the transfer: its error code


def to_completion(raw: Any) -> Completion:
    """Normalise the client's completion record (``pegaflow.client.Completion`` or alike)."""
    skipped = getattr(raw, "skipped", ()) or ()
    return Completion(
        job_id=int(raw.job_id),
        ok=bool(raw.ok),
        skipped=skipped if isinstance(skipped, int) else len(skipped),
        missing=tuple(int(i) for i in (getattr(raw, "missing", ()) or ())),
        error=getattr(raw, "error", None),
        code=getattr(raw, "code", None),
    )


class BackoffGate:
    """Closed for a growing while after each failure; logs one warning per outage."""

    def __init__(self, what: str, initial_s: float, max_s: float, clock: Callable[[], float] = time.monotonic):
        self._what = what
        self._initial_s = initial_s
        self._max_s = max_s
        self._clock = clock
        self._delay_s = 0.0
        self._retry_at = 0.0
        self.failures = 0

    @property
    def down(self) -> bool:
        return self._delay_s > 0

    def allows(self) -> bool:
        return self._clock() >= self._retry_at

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if not self.down:
            logger.warning(
                "PegaFlow server unreachable from the %s (%s: %s): cache misses until it answers, retrying with back-off",
                self._what,
                type(exc).__name__,
                exc,
            )
            self._delay_s = self._initial_s
        else:
            logger.debug("PegaFlow server still unreachable from the %s: %s", self._what, exc)
            self._delay_s = min(self._delay_s * 2, self._max_s)
        self._retry_at = self._clock() + self._delay_s

    def succeeded(self) -> None:
        if self.down:
            logger.info("PegaFlow server reachable again from the %s", self._what)
        self._delay_s = 0.0
        self._retry_at = 0.0


def default_client_factory(settings: ConnectorSettings) -> Any:
    """The real client (imported here, on first use: importing the connector starts nothing)."""
    from pegaflow.client import PegaClient

    return PegaClient(endpoint=settings.endpoint, timeout_s=settings.rpc_timeout_s, auth_token=settings.auth_token,
                      board=settings.completion_board, fast=settings.fast_lane)


def _rejection_types() -> tuple[type[BaseException], ...]:
    """Errors by which a live server refuses a request (as opposed to not answering)."""
    try:
        from pegaflow.client import PegaServerError
    except ImportError:  # the client is optional for the connector's own unit tests
        return ()
    return (PegaServerError,)


class EngineLink:
    """Calls the client behind a :class:`BackoffGate`; never raises anything but the two
    exceptions above, whatever the client does."""

    def __init__(
        self,
        settings: ConnectorSettings,
        what: str,
        client_factory: Callable[[ConnectorSettings], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.gate = BackoffGate(what, settings.retry_initial_s, settings.retry_max_s, clock)
        self._factory = client_factory or default_client_factory
        self._client: Any = None
        self._rejections = _rejection_types()

    def available(self) -> bool:
        return self.gate.allows()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if not self.gate.allows():
            raise LinkUnavailable("server marked unreachable; waiting for the back-off")
        try:
            if self._client is None:
                self._client = self._factory(self.settings)
            result = getattr(self._client, method)(*args, **kwargs)
        except self._rejections as exc:
            # A live server said no: not an outage, but the caller must not count it a success.
            self.gate.succeeded()
            raise LinkRejected(str(getattr(exc, "code", "error")), str(getattr(exc, "message", exc))) from exc
        except (ValueError, TypeError) as exc:
            # The client refused our arguments before sending anything (hashes of mixed
            # lengths, say): the server is not down, so the gate stays as it is.
            raise LinkRejected(INVALID_REQUEST, f"{method}: {exc}") from exc
        except Exception as exc:  # any failure of a best-effort cache is a miss, never a crash
            # The client keeps its session and replaces its socket by itself: keep it (closing
            # it would end the session, and with it the server's hold on our registration).
            self.gate.failed(exc)
            raise LinkUnavailable(f"{method}: {type(exc).__name__}: {exc}") from exc
        self.gate.succeeded()
        return result

    def close(self) -> None:
        """End the session (the server releases this client's registrations)."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.close()
        except Exception:  # closing a broken client may fail too; it is gone either way
            logger.debug("closing the PegaFlow client failed", exc_info=True)
