"""Who may reach the server: loopback by default; anything wider needs a flag and a secret.

The server holds users' prompts (as KV blocks) and maps its clients' KV caches: a client it
lets in can read blocks back, or name a shared-memory segment or CUDA handle for it to copy
into or out of. So every listening address is checked at start-up: IPC endpoints and
loopback TCP addresses are local; any other address (``0.0.0.0``, a LAN address, a host
name, another transport) is refused unless ``--allow-remote`` is given together with a
shared secret that every client must present in its ``hello``.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import stat
from collections.abc import Iterable

TOKEN_ENV = "PEGAFLOW_AUTH_TOKEN"
# A secret shorter than this is refused: 16 characters of a random token are ~96 bits.
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 1024  # the protocol's bound on hello's token field
_LOCAL_TRANSPORTS = ("ipc://", "inproc://")
_LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def endpoint_host(endpoint: str) -> str | None:
    """The host of a ``tcp://HOST:PORT`` endpoint (brackets of IPv6 removed); None otherwise."""
    if not endpoint.startswith("tcp://"):
        return None
    host = endpoint[len("tcp://"):].rpartition(":")[0]
    if ";" in host:  # ZMQ's "tcp://src;dst:port" form: the address that matters is the last
        host = host.rpartition(";")[2]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_local(endpoint: str) -> bool:
    """True for IPC/inproc endpoints and TCP on a loopback address; False for anything else."""
    if endpoint.startswith(_LOCAL_TRANSPORTS):
        return True
    host = endpoint_host(endpoint)
    if host is None:  # pgm, epgm, ws, vmci, udp...: reachable beyond this host
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host or interface name (eth0, *): not provably loopback
        return False


def check_exposure(endpoints: Iterable[str], allow_remote: bool, token: str | None) -> None:
    """Refuse (ValueError saying why and what to do) to listen beyond this host unless both
    ``allow_remote`` and a token are given."""
    remote = [e for e in endpoints if not is_local(e)]
    if not remote:
        return
    missing = []
    if not allow_remote:
        missing.append("--allow-remote")
    if token is None:
        missing.append(f"a shared secret (--auth-token-file PATH or ${TOKEN_ENV})")
    if missing:
        raise ValueError(
            f"refusing to listen on {', '.join(remote)}: a non-loopback address lets other hosts read and "
            f"overwrite cached KV blocks; it needs {' and '.join(missing)} (or listen on 127.0.0.1)"
        )


def check_token(token: str, source: str) -> str:
    """A usable secret: printable, no spaces, MIN_TOKEN_CHARS..MAX_TOKEN_CHARS long."""
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
        raise ValueError(f"the auth token from {source} must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} "
                         f"characters, got {len(token)}")
    if not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"the auth token from {source} must be printable characters without spaces")
    return token


def load_token(path: str | None, env: dict[str, str] | os._Environ | None = None) -> str | None:
    """The server's secret from ``path`` (one line; must not be readable by group or others)
    or else from ``$PEGAFLOW_AUTH_TOKEN``; None if neither is set."""
    if path:
        try:
            mode = os.stat(path).st_mode
            with open(path, encoding="utf-8") as f:
                text = f.read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the auth token file: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(f"the auth token file {path} is readable by others (mode {stat.S_IMODE(mode):o}): "
                             f"chmod 600 it")
        return check_token(text, path)
    env = os.environ if env is None else env
    text = env.get(TOKEN_ENV)
    return check_token(text, f"${TOKEN_ENV}") if text else None


def token_matches(expected: bytes, given: object) -> bool:
    """Constant-time comparison (the time taken does not depend on how much matches)."""
    if isinstance(given, str):
        given = given.encode("utf-8", "surrogatepass")
    if not isinstance(given, bytes):
        given = b""
    return hmac.compare_digest(expected, given)
