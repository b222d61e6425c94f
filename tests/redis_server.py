"""A real, throwaway ``redis-server`` for tests: free 127.0.0.1 port, no persistence.

Use it through a fixture, e.g.::

    @pytest.fixture
    def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
        with running_redis(tmp_path / "redis") as server:
            yield server

A missing ``redis-server`` FAILS the test (``make system-deps`` installs it; ``make test`` runs
that first): a skip would silently drop the coverage of the Redis backend.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["RedisServer", "free_port", "running_redis"]

STARTUP_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed (needed by the Redis state-store tests): "
            "run `make system-deps`",
            pytrace=False,
        )
    return binary


class RedisServer:
    """One ``redis-server`` process on a fixed port; stop() and start() again to simulate an
    outage (it comes back empty: no RDB, no AOF)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and return once it answers PING."""
        if self.process is not None:
            raise RuntimeError("redis-server is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.workdir),
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=log)
        self._wait_ready()

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL if it lingers) and reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                self.process = None
                pytest.fail(f"redis-server exited at startup: {self._log_tail()}", pytrace=False)
            if _answers_ping(self.port):
                return
            time.sleep(0.02)
        self.stop()
        pytest.fail(
            f"redis-server did not answer PING on port {self.port} within {STARTUP_TIMEOUT} s: "
            f"{self._log_tail()}",
            pytrace=False,
        )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


def _answers_ping(port: int) -> bool:
    """True when a RESP PING on 127.0.0.1:port gets +PONG (a raw socket: no client to close)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def running_redis(workdir: Path, port: int | None = None) -> Iterator[RedisServer]:
    """A started RedisServer, stopped on exit whatever happened."""
    server = RedisServer(workdir, port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
