"""Start a service as a subprocess of this one (``python run.py service=...``) and wait until it answers.

Used where one process needs a real server beside it: tests, benchmarks, and served-vs-embedded
comparisons. The server binds to 127.0.0.1 on a free port and is stopped with SIGTERM (graceful).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``python run.py <overrides> server.port=<free>`` in a subprocess, logging to ``log_dir``.

    ``command(port)`` replaces that with any other server answering ``GET /health`` (a peer
    server in a benchmark, say); ``port`` a given port (a server restarted where its clients
    expect it). Use as a context manager, or call ``start()`` / ``stop()``.
    """

    def __init__(
        self,
        log_dir: str | Path,
        *overrides: str,
        env: dict | None = None,
        command: Callable[[int], list[str]] | None = None,
        port: int | None = None,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log_dir) / f"server-{self.port}.log"
        self.args = (
            command(self.port)
            if command
            else [
                sys.executable,
                str(ROOT / "run.py"),
                *overrides,
                f"server.port={self.port}",
                f"hydra.run.dir={Path(log_dir) / f'run-{self.port}'}",
            ]
        )
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> LocalServer:
        """Launch and wait for ``GET /health`` to answer 200; raise with the log tail if it does not.
        A server already running is left as it is (``with LocalServer(...).start(timeout=...)``)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def metric(self, name: str, headers: dict | None = None) -> float:
        """One sample of ``/metrics`` by its full name (labels included), 0.0 when absent."""
        for line in httpx.get(f"{self.url}/metrics", headers=headers, timeout=5).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def stop(self) -> None:
        """SIGTERM (in-flight requests finish), then kill after 20 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
