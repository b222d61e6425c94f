"""Micro-batching: many concurrent requests, one batched computation off the event loop.

The batcher knows nothing of models: a request is an opaque item and the function that
computes a whole batch of such items (``run(items) -> results``, one result per item, in
order). Requests wait on the event loop in a bounded queue. One worker task takes what is
queued (up to ``max_batch``), waits ``max_wait`` seconds for more when the queue was empty
(not when a backlog built up while the last batch computed), and runs each
function once over its items in a single worker thread, off the event loop (ONNX Runtime, numpy
and faiss release the GIL, so the HTTP loop keeps accepting requests meanwhile). While one
batch computes, the next one fills up, so under load batches grow by themselves and an idle
service answers a lone request without waiting. ``max_batch=1`` turns batching off.

A batch function may do the first part of its work and return a :class:`SecondStage`: the rest
then runs on a second thread while the compute thread starts the next batch (at most one
second stage at a time). The recommender encodes on the first thread and searches on the second,
so the two halves of consecutive batches overlap on the two cores (issue 20: computed answers
rose ~8% on this machine, measured in alternation with the one-thread batcher).

A batch groups requests by their function (compared with ``==``: the same bound method of the
same object is one group), so requests that started on different model versions are never
computed together, which is what lets a hot swap happen with requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from recloop.errors import ServingError

T = TypeVar("T")
Item = TypeVar("Item")
Result = TypeVar("Result")
# Computes one result per item, in order, on the worker thread. Hashable: it keys its group.
BatchFunction = Callable[[Sequence[Any]], "Sequence[Any] | SecondStage[Any]"]


@dataclass(frozen=True)
class SecondStage(Generic[Result]):
    """What a batch function returns to have the rest of its batch (``run()``: one result per
    item) computed on the second-stage thread, while the compute thread starts the next batch.
    The recommender's encode (ONNX Runtime) and search (BLAS, torch) release the GIL, so two
    stages keep both cores busy where one thread alternated between them (issue 20)."""

    run: Callable[[], Sequence[Result]]


class Overloaded(ServingError):
    """The request queue is full: answer 503 with Retry-After instead of queueing forever."""


@dataclass
class _Pending:
    run: BatchFunction
    item: Any
    future: asyncio.Future[Any]


BatchObserver = Callable[[int, float], None]  # (batch size, seconds of compute)


class MicroBatcher:
    def __init__(
        self,
        *,
        max_batch: int = 32,
        max_wait: float = 0.0005,
        max_queue: int = 1024,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch < 1:
            raise ServingError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait < 0:
            raise ServingError(f"max_wait must be >= 0 seconds, got {max_wait}")
        if max_queue < 1:
            raise ServingError(f"max_queue must be >= 1, got {max_queue}")
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self._observer = observer
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self._finishing: asyncio.Future[None] | None = None  # the second stage in progress
        # One compute thread: the work need not be thread-safe (engines reuse their buffers).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recloop-infer")
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recloop-finish")

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._finishing is not None:  # its requests get their answers
            await asyncio.wait([self._finishing])
        if self._queue is not None:
            while not self._queue.empty():
                pending = self._queue.get_nowait()
                if not pending.future.done():
                    pending.future.set_exception(ServingError("service is shutting down"))
        self._executor.shutdown(wait=True)
        self._finisher.shutdown(wait=True)

    async def submit(
        self,
        run: Callable[[Sequence[Item]], Sequence[Result] | SecondStage[Result]],
        item: Item,
    ) -> Result:
        """``run([item, ...])[i]`` for this item, computed in a batch with the other queued
        items of the same ``run``. Overloaded when the queue is full."""
        if self._queue is None:
            raise ServingError("the batcher is not running")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(run, item, future))
        except asyncio.QueueFull:
            raise Overloaded(f"request queue is full ({self.max_queue} waiting)") from None
        result: Result = await future
        return result

    async def run_in_worker(self, function: Callable[[], T]) -> T:
        """Runs one piece of other work (similar items) on the compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            # A backlog (requests that queued while the last batch computed) goes at once:
            # waiting max_wait for more would idle the compute thread on every batch under
            # load (~0.5 ms of each ~2 ms batch on this machine). Only a batch that starts
            # from an empty queue waits for company.
            backlog = not self._queue.empty()
            batch = [await self._queue.get()]
            self._drain(batch)
            if not backlog and len(batch) < self.max_batch and self.max_wait > 0:
                await asyncio.sleep(self.max_wait)
                self._drain(batch)
            for group in _by_function(batch):
                started = loop.time()
                try:
                    results = await loop.run_in_executor(self._executor, _compute, group)
                except Exception as exc:  # report to every waiter; the batcher keeps running
                    _fail(group, exc)
                    continue
                if isinstance(results, SecondStage):
                    # At most one second stage at a time: it overlaps the next first stage.
                    if self._finishing is not None:
                        await asyncio.wait([self._finishing])
                    second = loop.run_in_executor(self._finisher, _finish, group, results)
                    self._finishing = asyncio.ensure_future(self._settle(group, second, started))
                    continue
                self._settle_now(group, results, loop.time() - started)

    async def _settle(
        self, group: list[_Pending], second: asyncio.Future[Sequence[Any]], started: float
    ) -> None:
        try:
            results = await second
        except Exception as exc:
            _fail(group, exc)
            return
        self._settle_now(group, results, asyncio.get_running_loop().time() - started)

    def _settle_now(self, group: list[_Pending], results: Sequence[Any], seconds: float) -> None:
        for pending, result in zip(group, results, strict=True):
            if not pending.future.done():  # the client may have gone away
                pending.future.set_result(result)
        if self._observer is not None:
            self._observer(len(group), seconds)

    def _drain(self, batch: list[_Pending]) -> None:
        assert self._queue is not None
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return


def _fail(group: list[_Pending], exc: Exception) -> None:
    for pending in group:
        if not pending.future.done():
            pending.future.set_exception(exc)


def _by_function(batch: list[_Pending]) -> list[list[_Pending]]:
    groups: dict[BatchFunction, list[_Pending]] = {}
    for pending in batch:
        groups.setdefault(pending.run, []).append(pending)
    return list(groups.values())


def _compute(group: list[_Pending]) -> Sequence[Any] | SecondStage[Any]:
    """Worker thread: one call of the group's function over all of its items."""
    results = group[0].run([pending.item for pending in group])
    if isinstance(results, SecondStage):
        return results
    return _checked(group, results)


def _finish(group: list[_Pending], second: SecondStage[Any]) -> Sequence[Any]:
    """Second-stage thread: the rest of a batch whose function returned a SecondStage."""
    return _checked(group, second.run())


def _checked(group: list[_Pending], results: Sequence[Any]) -> Sequence[Any]:
    if len(results) != len(group):
        raise ServingError(f"the batch function gave {len(results)} results for {len(group)} items")
    return results
