"""The micro-batcher: batches form under load, results go to the right request, bundles are
never mixed in one batch, and a full queue refuses work instead of growing latency.

The batcher runs opaque work; here the work is ModelBundle.top_items on fake engines and
indexes, as the recommender submits it."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Sequence
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest

from recloop.errors import ServingError
from recloop.serve.batcher import MicroBatcher, Overloaded, SecondStage
from recloop.serve.bundle import ModelBundle, TopK


class FakeEngine:
    """Query vector = [last item, bundle tag]: lets a test see which bundle computed what."""

    def __init__(self, tag: float, gate: threading.Event | None = None) -> None:
        self.tag = tag
        self.gate = gate
        self.batches: list[int] = []

    def encode(self, sequences: list[npt.NDArray[np.int64]]) -> npt.NDArray[np.float32]:
        if self.gate is not None:
            self.gate.wait(timeout=10)
        self.batches.append(len(sequences))
        return np.array([[float(s[-1]), self.tag] for s in sequences], dtype=np.float32)


class FakeIndex:
    """Top-k = the query's first component repeated k times, scores = the tag."""

    def search(
        self, queries: npt.NDArray[np.float32], k: int, exclude: Any
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        ids = np.repeat(queries[:, :1].astype(np.int64), k, axis=1)
        scores = np.repeat(queries[:, 1:2], k, axis=1)
        return ids, scores


def bundle(engine: FakeEngine) -> ModelBundle:
    members = {
        "engine": engine,
        "index": FakeIndex(),
        "incremental": None,  # users encoded by the engine, as without --incremental-encoding
        "top_items": ModelBundle.top_items,
        "encode_batch": ModelBundle.encode_batch,
        "search_batch": ModelBundle.search_batch,
    }
    fake: Any = type("FakeBundle", (), members)()
    return cast(ModelBundle, fake)


def ask(
    batcher: MicroBatcher, target: ModelBundle, sequence: np.ndarray, k: int
) -> Awaitable[tuple[np.ndarray, np.ndarray]]:
    """One request as the recommender submits it: no exclusions."""
    return batcher.submit(target.top_items, TopK(sequence, k, None))


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_concurrent_requests_share_batches_and_get_their_own_results() -> None:
    async def scenario() -> tuple[list[Any], list[int]]:
        gate = threading.Event()
        engine = FakeEngine(tag=1.0, gate=gate)
        target = bundle(engine)
        batcher = MicroBatcher(max_batch=8, max_wait=0.0)
        batcher.start()
        calls = [
            ask(batcher, target, np.array([5, item], dtype=np.int64), 3) for item in range(1, 21)
        ]
        tasks = [asyncio.ensure_future(call) for call in calls]
        await asyncio.sleep(0.05)  # all 20 are queued while the first batch waits on the gate
        gate.set()
        results = await asyncio.gather(*tasks)
        await batcher.stop()
        return results, engine.batches

    results, batches = run(scenario())
    for item, (ids, scores) in enumerate(results, start=1):
        assert ids.tolist() == [item] * 3 and scores.tolist() == [1.0] * 3
    assert sum(batches) == 20 and max(batches) == 8 and len(batches) <= 4


def test_a_batch_never_mixes_bundles() -> None:
    async def scenario() -> list[Any]:
        gate = threading.Event()
        old, new = FakeEngine(tag=1.0, gate=gate), FakeEngine(tag=2.0)
        batcher = MicroBatcher(max_batch=16, max_wait=0.0)
        batcher.start()
        first = asyncio.ensure_future(ask(batcher, bundle(old), np.array([1]), 1))
        await asyncio.sleep(0.02)  # the worker holds `first`; the rest queue together
        rest = [
            asyncio.ensure_future(ask(batcher, bundle(old if i % 2 else new), np.array([i]), 1))
            for i in range(2, 8)
        ]
        gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.stop()
        return results

    results = run(scenario())
    tags = [float(scores[0]) for _, scores in results]
    assert tags == [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0]  # each answered by its own bundle


def test_max_wait_gathers_company_for_a_lone_request_but_never_delays_a_backlog() -> None:
    async def scenario() -> tuple[list[int], float]:
        gate = threading.Event()
        engine = FakeEngine(tag=1.0, gate=gate)
        target = bundle(engine)
        batcher = MicroBatcher(max_batch=8, max_wait=0.3)
        batcher.start()
        loop = asyncio.get_running_loop()
        # From an empty queue: the first request waits max_wait, so the second one joins it.
        pair = [asyncio.ensure_future(ask(batcher, target, np.array([i]), 1)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*pair)
        # A backlog: 3 requests queue while one batch computes; they go as soon as it ends.
        gate.clear()
        busy = asyncio.ensure_future(ask(batcher, target, np.array([3]), 1))
        await asyncio.sleep(0.35)  # past max_wait: the worker now computes `busy` on the gate
        backlog = [asyncio.ensure_future(ask(batcher, target, np.array([i]), 1)) for i in (4, 5, 6)]
        await asyncio.sleep(0)
        released = loop.time()
        gate.set()
        await asyncio.gather(busy, *backlog)
        waited = loop.time() - released
        await batcher.stop()
        return engine.batches, waited

    batches, waited = run(scenario())
    assert batches == [2, 1, 3]
    assert waited < 0.2, f"the backlog waited {waited:.3f} s (max_wait is 0.3 s)"


def test_a_full_queue_refuses_with_overloaded() -> None:
    async def scenario() -> tuple[int, int]:
        gate = threading.Event()
        target = bundle(FakeEngine(tag=1.0, gate=gate))
        batcher = MicroBatcher(max_batch=1, max_wait=0.0, max_queue=3)
        batcher.start()
        busy = asyncio.ensure_future(ask(batcher, target, np.array([1]), 1))
        await asyncio.sleep(0.02)  # the worker is now blocked on the gate with `busy`
        waiting = [asyncio.ensure_future(ask(batcher, target, np.array([2]), 1)) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="queue is full"):
            await ask(batcher, target, np.array([3]), 1)
        gate.set()
        done = await asyncio.gather(busy, *waiting)
        await batcher.stop()
        return len(done), batcher.depth

    answered, depth = run(scenario())
    assert answered == 4 and depth == 0  # the queued ones were all answered afterwards


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_batch": 0}, "max_batch must be >= 1"),
        ({"max_wait": -1.0}, "max_wait must be >= 0"),
        ({"max_queue": 0}, "max_queue must be >= 1"),
    ],
)
def test_bad_batcher_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ServingError, match=message):
        MicroBatcher(**options)


def test_batch_items_json_equals_items_json_per_request() -> None:
    """The compute thread's one-lookup JSON for a batch is, request by request, what
    items_json gives (padding id 0 dropped, scores rounded alike, per-request k kept)."""
    from recloop.serve.recommender import batch_items_json, items_json

    class Catalog:
        def to_raw(self, ids: npt.NDArray[np.int64]) -> list[str]:
            return [f'item"{int(i)}' for i in ids]  # a quote: the text must be escaped

    target = cast(ModelBundle, Catalog())
    results = [
        (np.array([3, 1, 2], dtype=np.int64), np.array([0.5, 0.25, 1 / 3], dtype=np.float32)),
        (np.array([7, 0, 0], dtype=np.int64), np.array([2.0, -np.inf, -np.inf], np.float32)),
        (np.array([9], dtype=np.int64), np.array([-1.125], dtype=np.float32)),
        (np.array([0], dtype=np.int64), np.array([-np.inf], dtype=np.float32)),
    ]
    bodies = batch_items_json(target, results)
    assert bodies == [items_json(target, ids, scores) for ids, scores in results]
    assert json.loads(bodies[1]) == [{"item_id": 'item"7', "score": 2.0}]
    assert bodies[3] == "[]"


def test_a_second_stage_overlaps_the_next_batch_and_reports_its_errors() -> None:
    """A batch function that returns a SecondStage: its rest runs on the second-stage thread
    while the compute thread already runs the next batch's first stage, each request gets its
    own result, and an error in the rest reaches that batch's requests only."""
    next_first_ran = threading.Event()
    firsts: list[list[int]] = []

    def two_stages(items: Sequence[int]) -> SecondStage[int]:
        firsts.append(list(items))
        if len(firsts) == 2:
            next_first_ran.set()

        def rest() -> list[int]:
            # Batch 1 finishes only once batch 2's first stage ran: the stages overlap.
            if items[0] == 1 and not next_first_ran.wait(timeout=5):
                raise ServingError("the second stage did not overlap the next batch")
            if items[0] == 3:
                raise ServingError("second stage failed")
            return [item * 10 for item in items]

        return SecondStage(rest)

    async def scenario() -> list[Any]:
        batcher = MicroBatcher(max_batch=1, max_wait=0.0)
        batcher.start()
        calls = [batcher.submit(two_stages, item) for item in (1, 2, 3, 4)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await batcher.stop()
        return results

    first, second, failed, fourth = run(scenario())
    assert (first, second, fourth) == (10, 20, 40)
    assert isinstance(failed, ServingError) and "second stage failed" in str(failed)
