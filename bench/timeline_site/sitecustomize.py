"""Stamps in the server process for bench/request_timeline.py (imported at start-up through
PYTHONPATH; does nothing unless PEGA_TIMELINE names a file). Each stamp is (tag, CLOCK_MONOTONIC
ns), the same clock as the client's ``time.monotonic_ns``; the file is written at exit."""

import atexit
import json
import os
import time

_PATH = os.environ.get("PEGA_TIMELINE")


def _install(stamps: list) -> None:
    from pegaflow.engine import engine, transfer
    from pegaflow.server import loop, service

    clock = time.monotonic_ns

    def wrap(cls, name: str, tag: str) -> None:
        fn = getattr(cls, name)

        def stamped(*args, **kwargs):
            stamps.append((tag + "0", clock()))
            try:
                return fn(*args, **kwargs)
            finally:
                stamps.append((tag + "1", clock()))

        setattr(cls, name, stamped)

    send = loop.ServerLoop._send

    def stamped_send(self, identity, frame, keep):
        # Before the send: the other process may receive the message before this thread runs again.
        stamps.append(("push" if keep else "reply", clock()))
        send(self, identity, frame, keep)

    loop.ServerLoop._send = stamped_send
    wrap(loop.ServerLoop, "_serve", "serve")
    wrap(service.Service, "_start", "start")
    wrap(service.Service, "_on_done", "done")
    wrap(engine.Engine, "save", "engine")
    wrap(engine.Engine, "load", "engine")
    wrap(transfer.GpuLane, "_launch_locked", "launch")
    wrap(transfer.GpuLane, "_complete", "complete")


if _PATH:
    _STAMPS: list = []
    _install(_STAMPS)
    atexit.register(lambda: json.dump(_STAMPS, open(_PATH, "w")))
