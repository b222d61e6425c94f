"""Recommendations and similar items: what a model version answers, as JSON bodies.

The request path below the HTTP app and above the model: a user's sequence is assembled from
the training history and the events the state store holds since (raw ids translated to the
version's dense ids, unknown ones reported), a user with no known items gets the popular items
(the ``popularity`` fallback), everything else goes through the micro-batcher as one
:class:`~recloop.serve.bundle.TopK` of a batched encode + search on the bundle the request
started on. The engine windows the sequence to the model's ``max_length`` (once); the index
excludes the whole sequence when ``exclude_seen``. Bodies are built as strings: json.dumps of
a list of dicts was a tenth of the per-request CPU. The items array of each answer is built on
the compute thread, for the whole batch at once (:class:`TopItemsJson`): one id-to-text lookup
per batch instead of one per request, and less Python on the event loop, which is the busier
of the two threads under load.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring

import numpy as np

from recloop.errors import ServingError
from recloop.serve.batcher import MicroBatcher, SecondStage
from recloop.serve.bundle import FloatArray, IdArray, ModelBundle, TopK
from recloop.serve.metrics import ServiceMetrics

FALLBACK_POPULAR = "popularity"
# Every body starts with "cached":false, so a cache hit is the stored body with this swapped.
_CACHED_PREFIX = b'{"cached":false,'
_HIT_PREFIX = b'{"cached":true,'


class UnknownItem(ServingError):
    """An item id the served version does not know (404)."""


class Recommender:
    """Answers recommendations and similar items on the bundle a request started on."""

    def __init__(self, batcher: MicroBatcher, metrics: ServiceMetrics) -> None:
        self.batcher = batcher
        self.metrics = metrics

    async def for_user(
        self, bundle: ModelBundle, user_id: str, recent: list[str], k: int, exclude_seen: bool
    ) -> bytes:
        """The body of GET /v1/users/{user_id}/recommendations: the training history and
        ``recent`` (the user's events since, raw ids, oldest first)."""
        history = bundle.user_history(user_id)
        if recent:
            dense, unknown = bundle.to_dense(recent)
            sequence = np.concatenate([history, dense])
        else:
            sequence, unknown = history, []
        items, fallback = await self._recommend(bundle, sequence, k, exclude_seen, user_id)
        return recommendations_body(bundle, user_id, items, fallback, unknown)

    async def for_items(
        self, bundle: ModelBundle, items: list[str], k: int, exclude_seen: bool
    ) -> bytes:
        """The body of POST /v1/recommendations: the given raw item ids, oldest first."""
        sequence, unknown = bundle.to_dense(items)
        found, fallback = await self._recommend(bundle, sequence, k, exclude_seen)
        return recommendations_body(bundle, None, found, fallback, unknown)

    async def similar(self, bundle: ModelBundle, item_id: str, k: int) -> bytes:
        """The body of GET /v1/items/{item_id}/similar; UnknownItem for an unknown id."""
        dense, unknown = bundle.to_dense([item_id])
        if unknown:
            raise UnknownItem(f"unknown item {item_id!r} (not in model {bundle.version})")
        item = int(dense[0])
        ids, scores = await self.batcher.run_in_worker(lambda: bundle.similar_items(item, k))
        return (
            f'{{"model_version":{encode_basestring(bundle.version)},'
            f'"item_id":{encode_basestring(item_id)},"items":{items_json(bundle, ids, scores)}}}'
        ).encode()

    async def _recommend(
        self,
        bundle: ModelBundle,
        sequence: IdArray,
        k: int,
        exclude_seen: bool,
        user_id: str | None = None,
    ) -> tuple[str, str | None]:
        """(JSON array of the top-k items, fallback used or None)."""
        if len(sequence) == 0:
            self.metrics.fallbacks.inc()
            ids = bundle.popular_items(k)
            scores = np.zeros(len(ids), dtype=np.float32)
            return items_json(bundle, ids, scores), FALLBACK_POPULAR
        # The index de-duplicates the exclusions (on the worker thread).
        request = TopK(sequence, k, sequence if exclude_seen else None, user_id)
        found: str = await self.batcher.submit(TopItemsJson(bundle), request)
        return found, None


@dataclass(frozen=True)
class TopItemsJson:
    """The batch function the recommender submits: ``bundle.top_items`` and then each
    request's JSON items array, on the compute thread. Equal for the same bundle (its identity),
    so requests on one bundle batch together and never with another bundle's."""

    bundle: ModelBundle

    def __call__(self, requests: Sequence[TopK]) -> SecondStage[str]:
        """Encodes on the compute thread; search and JSON follow on the second-stage thread,
        overlapping the next batch's encode."""
        bundle, queries = self.bundle, self.bundle.encode_batch(requests)
        return SecondStage(lambda: batch_items_json(bundle, bundle.search_batch(requests, queries)))


def batch_items_json(
    bundle: ModelBundle, results: Sequence[tuple[IdArray, FloatArray]]
) -> list[str]:
    """items_json of every (ids, scores) in ``results``, with one id lookup for them all."""
    ids = np.concatenate([found for found, _ in results])
    scores = np.concatenate([values for _, values in results])
    keep = ids > 0  # padding: fewer eligible items than k
    parts = _item_parts(bundle, ids[keep], scores[keep])
    starts = np.cumsum([0] + [len(found) for found, _ in results[:-1]])
    counts = np.add.reduceat(keep.astype(np.int64), starts)  # kept items per request
    bodies: list[str] = []
    start = 0
    for count in counts.tolist():
        bodies.append("[" + ",".join(parts[start : start + count]) + "]")
        start += count
    return bodies


def items_json(bundle: ModelBundle, ids: IdArray, scores: FloatArray) -> str:
    """'[{"item_id":..,"score":..},..]' built directly. Padding (id 0: fewer eligible items
    than k) is dropped."""
    keep = ids > 0
    return "[" + ",".join(_item_parts(bundle, ids[keep], scores[keep])) + "]"


def _item_parts(bundle: ModelBundle, ids: IdArray, scores: FloatArray) -> list[str]:
    """'{"item_id":..,"score":..}' of each (dense id, score), the ids translated in one lookup."""
    return [
        f'{{"item_id":{encode_basestring(raw)},"score":{round(score, 6)!r}}}'
        for raw, score in zip(bundle.to_raw(ids), scores.tolist(), strict=True)
    ]


def recommendations_body(
    bundle: ModelBundle,
    user_id: str | None,
    items_json: str,
    fallback: str | None,
    unknown: list[str],
) -> bytes:
    """The Recommendations schema as JSON bytes, with "cached":false first (see as_cache_hit)."""
    user = "null" if user_id is None else encode_basestring(user_id)
    return (
        f'{{"cached":false,"model_version":{encode_basestring(bundle.version)},'
        f'"user_id":{user},"items":{items_json},'
        f'"fallback":{"null" if fallback is None else encode_basestring(fallback)},'
        f'"unknown_items":{json.dumps(unknown)}}}'
    ).encode()


def as_cache_hit(body: bytes) -> bytes:
    """A stored recommendations body as served from the cache: "cached":true."""
    return _HIT_PREFIX + body[len(_CACHED_PREFIX) :]
