"""In-process user state kept as a fold of the durable event log, so it survives a crash.

With the memory state store and an event log, the state is by construction the result of
applying the log's events in offset order up to an offset (``MemoryStateStore.log_offset``):

* at start it is **rebuilt**: the snapshot (which records the offset it covers) is loaded, then
  the log's tail after that offset is replayed; ``/readyz`` answers 503 until that is done and
  shows the progress, and the log shows it with rate and ETA;
* after every ``POST /v1/events`` the events are applied right after their append, in log
  order: when the batch directly follows the applied offset (the SQLite log's offsets are
  dense) it is applied as it is, otherwise the gap is read back from the log first (events
  that another writer, ``recloop ingest`` or another replica, appended in between);
* a tail task applies what other writers append, every ``tail_seconds``;
* the store writes its snapshot periodically and at shutdown (see ``every`` and
  ``MemoryStateStore.snapshot``), atomically, from a consistent copy of the state and the
  offset it covers.

So a replica killed at any moment restarts with every event it acknowledged: each was in the
log before its answer, and the log is replayed from the snapshot's offset. Events acknowledged
while the rebuild runs are appended to the log and picked up by the rebuild itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from recloop.errors import ServingError
from recloop.serve.state.base import gc_paused
from recloop.serve.state.memory import MemoryStateStore

if TYPE_CHECKING:
    from recloop.events import EventLog

log = logging.getLogger("recloop.serve.state")

T = TypeVar("T")
PAGE = 20_000  # events per read of the log
PROGRESS_EVERY = 2.0  # seconds between progress lines of a rebuild


@dataclass
class RebuildProgress:
    """How far the start-up replay of the event log has come."""

    start_offset: int
    target_offset: int
    applied_offset: int
    events: int = 0
    started: float = 0.0
    finished: float | None = None

    @property
    def done(self) -> bool:
        return self.finished is not None

    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def rate(self) -> float | None:
        seconds = self.seconds()
        return self.events / seconds if seconds > 0 and self.events else None

    def as_dict(self) -> dict[str, Any]:
        rate = self.rate()
        return {
            "done": self.done,
            "applied_offset": self.applied_offset,
            "target_offset": self.target_offset,
            "events": self.events,
            "seconds": round(self.seconds(), 3),
            "events_per_second": round(rate, 1) if rate is not None else None,
        }

    def line(self) -> str:
        """'rebuilding user state: 3,000,000 / 10,000,000 events (812,000/s, ETA 8.6 s)'."""
        total = max(self.target_offset - self.start_offset, self.events)
        rate = self.rate()
        eta = f", ETA {(total - self.events) / rate:.1f} s" if rate else ""
        speed = f"{rate:,.0f}/s" if rate else "starting"
        return f"rebuilding user state: {self.events:,} / {total:,} events ({speed}{eta})"


class LoggedState:
    """Keeps a :class:`MemoryStateStore` equal to the event log's fold (see the module doc).

    All log calls run on ``executor``, the service's single log thread, so reads are ordered
    with appends; all state changes run on the event loop, under one lock.
    """

    def __init__(
        self,
        store: MemoryStateStore,
        event_log: EventLog,
        executor: ThreadPoolExecutor,
        *,
        tail_seconds: float | None = 1.0,
    ) -> None:
        self.store = store
        self.event_log = event_log
        self.executor = executor
        self.tail_seconds = tail_seconds
        self.progress: RebuildProgress | None = None
        self._lock = asyncio.Lock()
        self._pending = 0  # highest offset acknowledged while the rebuild runs
        self._draining = False  # the rebuild reached the log's end: appends apply themselves
        self._tasks: list[asyncio.Task[None]] = []

    # ---------------------------------------------------------------- checks before binding

    def check_snapshot(self) -> None:
        """Refuses a snapshot that does not belong to this log (synchronous, before the port
        is bound): one without an offset while it holds users, or one ahead of the log."""
        store = self.store
        last = self.event_log.last_offset()
        if store.log_offset is None:
            if store.status()["users"]:
                raise ServingError(
                    f"{store.snapshot_path}: the state snapshot records no event log offset "
                    f"(written without --event-log, or by an older recloop), so it cannot be "
                    f"combined with {self.event_log!r}; remove it: the log rebuilds the state"
                )
            store.log_offset = 0
        elif store.log_offset > last:
            raise ServingError(
                f"{store.snapshot_path}: the state snapshot covers event log offset "
                f"{store.log_offset}, but {self.event_log!r} ends at offset {last}: it is not "
                f"this log's snapshot (remove it to rebuild the state from the log)"
            )
        store.log_name = repr(self.event_log)

    # ---------------------------------------------------------------- lifecycle

    @property
    def ready(self) -> bool:
        return self.progress is not None and self.progress.done

    def start(self) -> None:
        """Starts the rebuild, then the tail and snapshot tasks, in the background."""
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._run(), name="recloop-state-rebuild"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        await self.rebuild()
        if self.tail_seconds:
            self._tasks.append(asyncio.ensure_future(every(self.tail_seconds, self.tail)))

    # ---------------------------------------------------------------- rebuild

    async def rebuild(self) -> RebuildProgress:
        """Replays the log after the snapshot's offset into the state, page by page (each page
        read on the log thread while the event loop keeps answering)."""
        offset = self._offset()
        target = await self._call(self.event_log.last_offset)
        progress = RebuildProgress(offset, target, offset, started=time.monotonic())
        self.progress = progress
        reported = progress.started
        with gc_paused():
            await self._replay(progress, reported)
        # The rebuilt state lives as long as the process: out of the collector's sight, so
        # full collections stop walking it (as the service does with a loaded model).
        gc.freeze()
        log.info(
            "user state rebuilt: %d events after offset %d in %.2f s; %d users",
            progress.events,
            progress.start_offset,
            progress.seconds(),
            self.store.status()["users"],
        )
        return progress

    async def _replay(self, progress: RebuildProgress, reported: float) -> None:
        while True:
            async with self._lock:
                page = await self._call(self.event_log.read_pairs, self._offset(), PAGE)
                progress.events += self._apply(page)
                if len(page) < PAGE:
                    # The end of the log. From now on each append applies itself (after this
                    # lock); the events acknowledged during the rebuild that this read missed
                    # are read now, so that none is missing once the state says it is ready.
                    self._draining = True
                    if self._pending > self._offset():
                        progress.events += await self._catch_up(self._pending)
                    progress.applied_offset = self._offset()
                    progress.finished = time.monotonic()
                    break
                progress.applied_offset = self._offset()
            if time.monotonic() - reported >= PROGRESS_EVERY:
                reported = time.monotonic()
                log.info("%s", progress.line())

    # ---------------------------------------------------------------- while serving

    async def appended(self, offsets: Sequence[int], pairs: Sequence[tuple[str, str]]) -> None:
        """Applies a batch the service just appended (``offsets`` in log order) after
        whatever precedes it in the log. During the rebuild it is left to the rebuild."""
        if not offsets:
            return
        if not self.ready and not self._draining:
            self._pending = max(self._pending, offsets[-1])
            return
        async with self._lock:
            applied = self._offset()
            if applied >= offsets[-1]:
                return  # a read for a later batch brought it in already
            dense = offsets[-1] - offsets[0] == len(offsets) - 1
            if dense and applied == offsets[0] - 1:
                self.store.apply_logged(pairs, offsets[-1])
                return
            await self._catch_up(offsets[-1])

    async def tail(self) -> None:
        """Applies what other writers appended to the log since the last read."""
        async with self._lock:
            await self._catch_up(None)

    async def _catch_up(self, through: int | None) -> int:
        """Reads and applies the log after the applied offset: through ``through``, or to its
        end (None); returns the number of events applied."""
        applied = 0
        while True:
            page = await self._call(self.event_log.read_pairs, self._offset(), PAGE)
            applied += self._apply(page)
            if len(page) < PAGE or (through is not None and self._offset() >= through):
                return applied

    def status(self) -> dict[str, Any] | None:
        return self.progress.as_dict() if self.progress is not None else None

    # ---------------------------------------------------------------- helpers

    def _offset(self) -> int:
        return self.store.log_offset or 0

    def _apply(self, page: list[tuple[int, str, str]]) -> int:
        """Applies the (offset, user, item) rows of ``page`` past the applied offset (a page
        may overlap what a concurrent append applied already); returns how many."""
        applied = self._offset()
        if page and page[0][0] <= applied:
            page = [row for row in page if row[0] > applied]
        if page:
            self.store.apply_logged([(user, item) for _, user, item in page], page[-1][0])
        return len(page)

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)


async def every(seconds: float, action: Callable[[], Any]) -> None:
    """Runs ``action`` every ``seconds`` until cancelled; a failure is logged, not fatal."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await action()
        except Exception:  # a background task: keep serving, say why
            log.exception("background task %s failed", getattr(action, "__name__", action))
