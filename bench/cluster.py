"""A recloop deployment on one machine, as processes on 127.0.0.1: Redis (user state, result
cache, the event stream), N stateless `recloop serve` replicas following one registry alias,
nginx in front with deploy/nginx/recloop.conf, and the online learner.

The same topology as deploy/README.md describes for several machines, with ports instead of
hosts. Used by bench/scale_serve.py and by tests/test_cluster.py (which forks its processes
from a warm interpreter: see ``Launch``). Nothing here is a substitute for the engines: it only
starts them, with the configs a user would use, and stops them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

REPO = Path(__file__).resolve().parents[1]
NGINX_TEMPLATE = REPO / "deploy" / "nginx" / "recloop.conf"
READY_TIMEOUT = 180.0


class Process(Protocol):
    """What the cluster needs of a child process (subprocess.Popen and the tests' warm
    interpreter's processes both have it)."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


# Starts `python -m recloop.cli ARGS` with ENV, its output to LOG.
Launch = Callable[[list[str], dict[str, str], Path], Process]


def launch_subprocess(args: list[str], env: dict[str, str], log: Path) -> Process:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "recloop.cli", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(url: str, process: Process | None, timeout: float, what: str, log: Path) -> None:
    """Until GET url answers 200; fails early when the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.poll()}), see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout:.0f} s, see {log}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------- nginx


def render_nginx_config(template: str, listen: int, replica_ports: Sequence[int]) -> str:
    """deploy/nginx/recloop.conf with its `listen` port and, in every upstream block, one
    `server` line per replica (each keeping the parameters of the block's first line)."""
    if not replica_ports:
        raise ValueError("nginx needs at least one replica")
    out: list[str] = []
    in_upstream = wrote_servers = False
    server_line = re.compile(r"^(\s*)server 127\.0\.0\.1:\d+(.*)$")
    for line in template.splitlines():
        if re.match(r"^\s*upstream \w+ \{", line):
            in_upstream, wrote_servers = True, False
        elif in_upstream and line.strip() == "}":
            in_upstream = False
        match = server_line.match(line) if in_upstream else None
        if match:
            if not wrote_servers:
                indent, rest = match.groups()
                out += [f"{indent}server 127.0.0.1:{port}{rest}" for port in replica_ports]
                wrote_servers = True
            continue
        out.append(re.sub(r"listen 127\.0\.0\.1:\d+", f"listen 127.0.0.1:{listen}", line))
    return "\n".join(out) + "\n"


@dataclass
class Nginx:
    """nginx with the rendered deploy config, in the foreground (daemon off), under workdir."""

    workdir: Path
    port: int
    replica_ports: list[int]
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx is not installed: run `make system-deps`")
        for sub in ("logs", "tmp"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            render_nginx_config(NGINX_TEMPLATE.read_text(), self.port, self.replica_ports)
        )
        log = self.workdir / "logs" / "error.log"
        with open(self.workdir / "logs" / "stderr.log", "ab") as stderr:
            self.process = subprocess.Popen(
                [binary, "-p", f"{self.workdir}/", "-c", str(conf), "-g", "daemon off;"],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        wait_for(f"{self.url}/nginx-healthz", self.process, 30, "nginx", log)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish in-flight requests
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.process = None


# ---------------------------------------------------------------------------------- replicas


@dataclass
class Replica:
    name: str
    port: int
    log: Path
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    """Replicas, nginx and the learner over one registry and one Redis; ``stop`` ends all."""

    registry: Path
    redis_url: str
    workdir: Path
    api_key: str
    launch: Launch = launch_subprocess
    version: str = "latest"  # the registry alias every replica follows
    follow_seconds: float = 0.2
    serve_flags: list[str] = field(default_factory=list)  # e.g. --index milvus
    threads: int = 1
    onnx_cache: Path | None = None  # default: workdir/onnx-cache
    # A shared Milvus server (--index-uri in serve_flags): each replica its own --index-alias.
    alias_per_replica: bool = False
    ready_timeout: float = READY_TIMEOUT  # a replica's load (index builds) must end within it
    replicas: dict[str, Replica] = field(default_factory=dict)
    nginx: Nginx | None = None
    learner: Process | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = {**os.environ, "RECLOOP_API_KEY": self.api_key}
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(self.threads)
        return env

    def serve_args(self, port: int, name: str) -> list[str]:
        alias = ["--index-alias", f"replica_{name}"] if self.alias_per_replica else []
        return [
            "serve", "--registry", str(self.registry), "--version", self.version,
            "--follow", str(self.follow_seconds), "--redis-url", self.redis_url,
            "--event-log", self.redis_url, "--port", str(port),
            "--threads", str(self.threads),
            "--cache-dir", str(self.onnx_cache or self.workdir / "onnx-cache"),
            *self.serve_flags, *alias,
        ]  # fmt: skip

    def start_replica(self, name: str, port: int | None = None) -> Replica:
        """Starts (or restarts, on its old port) replica ``name`` and waits for /readyz."""
        replica = self.replicas.get(name) or Replica(
            name, port or free_port(), self.workdir / f"{name}.log"
        )
        self.replicas[name] = replica
        args = self.serve_args(replica.port, name)
        replica.process = self.launch(args, self.env(), replica.log)
        wait_for(f"{replica.url}/readyz", replica.process, self.ready_timeout, name, replica.log)
        return replica

    def kill_replica(self, name: str) -> None:
        """SIGKILL: no shutdown, in-flight requests cut off."""
        process = self.replicas[name].process
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def start_nginx(self, port: int | None = None) -> Nginx:
        ports = [replica.port for replica in self.replicas.values()]
        self.nginx = Nginx(self.workdir / "nginx", port or free_port(), ports)
        self.nginx.start()
        return self.nginx

    def start_learner(self, overrides: Sequence[str] = ()) -> Process:
        """`recloop online --follow` on the shared stream, publishing into the registry."""
        args = [
            "online", "--registry", str(self.registry), "--event-log", self.redis_url,
            "--run-dir", str(self.workdir / "online"), "--follow",
            "--threads", str(self.threads), *overrides,
        ]  # fmt: skip
        self.learner = self.launch(args, self.env(), self.workdir / "learner.log")
        return self.learner

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        processes = [r.process for r in self.replicas.values()] + [self.learner]
        for process in processes:
            if process is not None and process.poll() is None:
                process.send_signal(
                    signal.SIGTERM if process is not self.learner else signal.SIGINT
                )
        for process in processes:
            if process is None:
                continue
            try:
                process.wait(timeout=30)
            except (subprocess.TimeoutExpired, TimeoutError):
                process.kill()
                process.wait(timeout=30)


def tail(path: Path, lines: int = 40) -> str:
    """The end of a log, for failure messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(text.splitlines()[-lines:])


class Traffic:
    """Client threads sending GET recommendations (and, given ``items``, every fifth request a
    POST /v1/events) to ``url`` until the ``with`` block ends; every status is counted, a
    transport error as 0. What "no request fails while ..." is measured with."""

    def __init__(
        self,
        url: str,
        users: list[str],
        *,
        items: list[str] | None = None,
        api_key: str | None = None,
        threads: int = 1,
        params: dict[str, int] | None = None,
    ) -> None:
        self.url, self.users, self.items, self.params = url, users, items, params
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.statuses: Counter[int] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(threads)
        ]

    def run(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                user = self.users[(worker * 7 + n) % len(self.users)]
                try:
                    if self.items and n % 5 == 0:
                        event = {"user_id": user, "item_id": self.items[n % len(self.items)]}
                        body = {"events": [event]}
                        status = client.post("/v1/events", json=body, headers=self.headers)
                    else:
                        path = f"/v1/users/{user}/recommendations"
                        status = client.get(path, params=self.params)
                    code = status.status_code
                except httpx.TransportError:
                    code = 0
                with self.lock:
                    self.statuses[code] += 1

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
