"""Running the service: in the foreground (`recloop serve`) or in a thread (demo, tests)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn

from recloop.errors import ServingError
from recloop.serve.app import ServiceConfig, create_app

# The GIL switch interval of a `recloop serve` process (CPython's default: 5 ms). The compute
# thread gives the GIL up in every ONNX Runtime run, GEMM and top-k and then needs it back
# while the event loop is busy in Python; at 5 ms it waited up to that long each time (a batch
# computes in ~2 ms). At 0.5 ms computed answers rose ~15% under wrk (issue 20, measured in
# alternation with 5 ms on this 2-core machine).
GIL_SWITCH_INTERVAL = 0.0005


def run_server(
    config: ServiceConfig,
    *,
    host: str,
    port: int,
    log_level: str = "warning",
    on_loaded: Callable[[str], None] | None = None,
) -> None:
    """Loads the version (a RecloopError before any port is bound), then blocks serving until
    SIGINT/SIGTERM; in-flight requests get a graceful shutdown."""
    app = create_app(config)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)  # this process only serves from here on
    if on_loaded is not None:
        current = app.service.holder.current
        on_loaded(current.version if current is not None else "?")
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        loop="uvloop",  # the fastest event loop and HTTP parser on this machine
        http="httptools",
        ws="none",
        timeout_graceful_shutdown=10,
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serve_in_thread(
    config: ServiceConfig, *, host: str = "127.0.0.1", port: int | None = None, timeout: float = 300
) -> Iterator[str]:
    """Runs the real app under uvicorn in a background thread; yields its base URL."""
    port = port or free_port(host)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            loop="asyncio",
            http="h11",
            ws="none",
            lifespan="on",
        )
    )
    thread = threading.Thread(target=server.run, name="recloop-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise ServingError("the service failed to start (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise ServingError(f"the service did not start within {timeout:.0f} s")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
