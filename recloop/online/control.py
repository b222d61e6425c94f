"""How the learner's loop is controlled from outside: fault injection for the crash-safety
tests, SIGINT/SIGTERM as a clean stop, and the progress bar of a catch-up run."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

# Fault injection for the crash-safety tests: "<point>:<n>" kills this process with SIGKILL
# the n-th time it reaches <point> (batch, state-saved, published, committed).
CRASH_ENV = "RECLOOP_ONLINE_CRASH_AT"
# Under torchrun: only the process of this rank crashes (unset: every process).
CRASH_RANK_ENV = "RECLOOP_ONLINE_CRASH_RANK"
_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    rank = os.environ.get(CRASH_RANK_ENV)
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def stop_on_signals(stop: threading.Event, *, enabled: bool) -> Iterator[None]:
    """SIGINT/SIGTERM set `stop`, so the loop publishes its pending work and returns."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def progress(total: int | None, enabled: bool) -> Any:
    if not enabled or total is None:
        return nullcontext(lambda n: None)
    from recloop.progress import progress_bar

    return progress_bar("online learning", total, unit="events")
