"""Start a real server process and wait for its ready line: for tests and benchmarks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque

_READY = re.compile(r"pegaflow server ready: listening on (\S+)(?: and (\S+))?;")


class ServerProcess:
    """``python -m pegaflow.server`` on a fresh IPC path and a free TCP port.

    ``ipc`` and ``tcp`` are the endpoints it bound; ``log`` keeps its last log lines.
    """

    def __init__(self, *args: str, pool_size: str = "64mb", client_timeout: float = 10.0,
                 device: str = "cpu", ready_timeout_s: float = 60.0) -> None:
        self.dir = tempfile.mkdtemp(prefix="pf-")  # short: an IPC path must fit in 107 bytes
        self.ipc = f"ipc://{self.dir}/engine.sock"
        self.socket_path = f"{self.dir}/engine.sock"
        command = [sys.executable, "-m", "pegaflow.server", "--endpoint", self.ipc, "--addr", "127.0.0.1:0",
                   "--device", device, "--pool-size", pool_size, "--client-timeout", str(client_timeout), *args]
        self.log: deque[str] = deque(maxlen=2000)
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.tcp = self._wait_ready(ready_timeout_s)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout_s: float) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line.rstrip())
            match = _READY.search(line)
            if match:
                return match.group(2) or ""
        self.proc.kill()
        raise RuntimeError("server did not start:\n" + "\n".join(self.log))

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Signal it and wait; returns its exit code (killed if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        try:
            os.rmdir(self.dir)
        except OSError:
            pass
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def kill_quietly(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
