"""The recommendation service: FastAPI on uvicorn, one process, any number of replicas.

Request path for ``GET /v1/users/{id}/recommendations``: result cache (per user, keyed by model
version, k and exclude_seen) -> the user's sequence (training history from the dataset + events
since, from the state store) -> micro-batcher (one encode + one top-k for many requests) ->
JSON. Every handler answers bad input with a 4xx and a message; unexpected failures are logged
and answered 500 without taking the process down.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import numpy as np
import numpy.typing as npt
from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from recloop.errors import EngineParityError, RecloopError, RegistryError, ServingError
from recloop.registry import Registry
from recloop.serve.batcher import MicroBatcher, Overloaded
from recloop.serve.metrics import ServiceMetrics
from recloop.serve.middleware import (
    BodySizeLimit,
    Receive,
    RequestMetrics,
    Scope,
    Send,
    send_json,
)
from recloop.serve.runtime import LoadOptions, ModelBundle, ModelHolder
from recloop.serve.schemas import (
    MAX_K,
    EventBatch,
    EventsAccepted,
    ModelInfo,
    Problem,
    Recommendations,
    ReloadRequest,
    ReloadResult,
    SequenceRequest,
    SimilarItems,
)
from recloop.serve.state import StateStore, open_state_store

if TYPE_CHECKING:
    from recloop.online.events import EventLog

log = logging.getLogger("recloop.serve")


@dataclass
class ServiceConfig:
    registry: Path
    ref: str = "auto"  # "auto": production if promoted, else latest
    load: LoadOptions = field(default_factory=LoadOptions)
    state_url: str | None = None  # None: in-process; "redis://..." for Redis
    state_snapshot: Path | None = None
    state_max_length: int = 200  # recent events kept per user (models read their last L)
    event_log: str | None = None  # durable log of POST /v1/events: a path, sqlite:// or redis://
    cache: bool = True
    cache_ttl: float = 60.0
    max_batch: int = 32
    max_wait_us: int = 500
    max_queue: int = 1024
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    follow_seconds: float | None = None  # poll the registry ref and hot-swap when it moves
    swap_grace_seconds: float = 30.0  # old bundles are closed after this (in-flight requests)

    def batching(self) -> tuple[int, float]:
        return self.max_batch, self.max_wait_us / 1e6


def default_ref(registry: Registry) -> str:
    return "production" if registry.production() is not None else "latest"


class Service:
    """State shared by the handlers: model holder, batcher, state store, metrics."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.registry = Registry(config.registry, create=False)
        ref = default_ref(self.registry) if config.ref == "auto" else config.ref
        self.registry.resolve(ref)  # fail before binding a port: no such version, no versions
        self.holder = ModelHolder(self.registry, config.load, ref)
        self.metrics = ServiceMetrics()
        max_batch, max_wait = config.batching()
        self.batcher = MicroBatcher(
            max_batch=max_batch,
            max_wait=max_wait,
            max_queue=config.max_queue,
            observer=self.metrics.observe_batch,
        )
        self.state: StateStore = open_state_store(
            config.state_url,
            max_length=config.state_max_length,
            cache_ttl=config.cache_ttl,
            snapshot_path=config.state_snapshot,
        )
        self.event_log: EventLog | None = None
        if config.event_log is not None:
            from recloop.online.events import open_event_log

            self.event_log = open_event_log(config.event_log)
        self._log_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recloop-log")
        self._background: set[asyncio.Task[Any]] = set()
        self._follow_task: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.state.start()
        self.batcher.start()
        await self.reload(None)
        if self.config.follow_seconds:
            self._follow_task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow_task
        for task in list(self._background):
            task.cancel()
        await self.batcher.stop()
        await self.state.close()
        self._log_executor.shutdown(wait=True)
        if self.event_log is not None:
            self.event_log.close()
        if self.holder.current is not None:
            self.holder.current.close()

    @property
    def bundle(self) -> ModelBundle:
        bundle = self.holder.current
        if bundle is None:
            raise HTTPException(503, "no model loaded yet", headers={"Retry-After": "1"})
        return bundle

    async def reload(self, ref: str | None) -> tuple[ModelBundle, str | None]:
        """Loads off the event loop, then swaps: a delta of the served version is applied to it
        (milliseconds to a second), anything else loaded in full (export, index build, parity
        check: seconds). See ModelHolder.load."""
        async with self._reload_lock:
            old = self.holder.current
            loop = asyncio.get_running_loop()
            bundle, previous = await loop.run_in_executor(None, self.holder.load, ref)
            if old is not None and bundle is not old:
                self.metrics.model_swaps.inc()
                # Results cached under the old version are simply never asked for again (the
                # version is in the cache field, and every delta is a new version). An old
                # bundle with shard processes is closed once in-flight requests have had time
                # to finish on it; any other is freed when the last of them drops it, rather
                # than kept, with its copy of the item table, for the grace period (deltas
                # come every few seconds).
                if old.needs_close:
                    loop.call_later(self.config.swap_grace_seconds, old.close)
            self.metrics.set_model(bundle.version)
            # A loaded bundle is millions of long-lived objects (vocabulary dicts, graphs); a
            # full garbage collection that walks them stalls every request for tens of ms.
            # Freezing moves what exists now out of the collector's view (the p99 killer).
            gc.collect()
            gc.freeze()
            return bundle, previous

    async def _follow(self) -> None:
        assert self.config.follow_seconds is not None
        while True:
            await asyncio.sleep(self.config.follow_seconds)
            target = self.holder.follow_target()
            current = self.holder.current
            if target is None or (current is not None and current.version == target):
                continue
            try:
                await self.reload(target)
            except RecloopError as exc:  # keep serving the old version; say why once per try
                log.error("follow: not swapping to %s: %s", target, exc)
            except Exception:  # a bug must not end following for the life of the process
                log.exception("follow: unexpected error loading %s; still serving the old", target)

    async def log_events(self, batch: EventBatch) -> list[str]:
        """Validates the batch (422) and appends it to the durable event log, if the service
        has one (503 when the log fails: nothing stored); returns the event ids."""
        from recloop.online.events import Event, EventLogError, validate_events

        now = time.time()
        events = [
            Event(
                user_id=str(e.user_id),
                item_id=str(e.item_id),
                timestamp=e.timestamp if e.timestamp is not None else now,
                event_type=e.event_type,
                value=e.value,
            )
            for e in batch.events
        ]
        try:
            validate_events(events)  # the client's problem (empty id, non-finite value): 422
        except EventLogError as exc:
            raise HTTPException(422, str(exc)) from None
        event_log = self.event_log
        if event_log is None:
            return []
        try:
            # SQLite fsyncs on commit: off the event loop, on one writer thread.
            return await asyncio.get_running_loop().run_in_executor(
                self._log_executor, event_log.append, events
            )
        except EventLogError as exc:
            log.error("event log append failed: %s", exc)
            detail = f"event log unavailable, nothing was stored: {exc}"
            raise HTTPException(503, detail, {"Retry-After": "1"}) from None

    def spawn(self, coroutine: Awaitable[Any]) -> None:
        """Fire-and-forget work (cache writes) that must not delay the response."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ recommendations

    async def user_recommendations(self, user_id: str, k: int, exclude_seen: bool) -> bytes:
        """The JSON body of GET /v1/users/{user_id}/recommendations (validated arguments)."""
        bundle = self.bundle
        (recent,) = await self.state.get_sequences([user_id])
        # The cache field names what the answer was computed from: model version, arguments and
        # a digest of the user's recent events. A result computed just before an event arrived
        # and written just after it is stored under the old digest and never served (the event
        # also deletes the user's cached entries); replicas agree because the digest is stable.
        field_name = f"{bundle.version}:{k}:{int(exclude_seen)}:{_digest(recent)}"
        if self.config.cache:
            hit = await self.state.get_cached(user_id, field_name)
            if hit is not None:
                self.metrics.cache_hits.inc()
                return _HIT_PREFIX + hit[len(_CACHED_PREFIX) :]
            self.metrics.cache_misses.inc()
        sequence, unknown = self.user_sequence(bundle, user_id, recent)
        items, fallback = await self.recommend(bundle, sequence, k, exclude_seen)
        body = _recommendations_body(bundle, user_id, items, fallback, unknown)
        if self.config.cache:
            self.spawn(self.state.set_cached(user_id, field_name, body))
        return body

    @staticmethod
    def user_sequence(
        bundle: ModelBundle, user_id: str, recent: list[str]
    ) -> tuple[npt.NDArray[np.int64], list[str]]:
        """Training history + events since, in model ids (unknown items reported)."""
        history = bundle.history.items(user_id) if bundle.history is not None else _NO_ITEMS
        if not recent:
            return history, []
        dense, unknown = bundle.catalog.to_dense(recent)
        return np.concatenate([history, dense]), unknown

    async def recommend(
        self,
        bundle: ModelBundle,
        sequence: npt.NDArray[np.int64],
        k: int,
        exclude_seen: bool,
    ) -> tuple[str, str | None]:
        """(JSON array of the top-k items, fallback used or None)."""
        if len(sequence) == 0:
            self.metrics.fallbacks.inc()
            ids = bundle.popular[:k]
            return _items_json(bundle, ids, np.zeros(len(ids), dtype=np.float32)), "popularity"
        exclude = sequence if exclude_seen else None  # the index de-duplicates (worker thread)
        window = sequence[-bundle.max_length :]
        ids, scores = await self.batcher.submit(bundle, window, k, exclude)
        return _items_json(bundle, ids, scores), None


_NO_ITEMS = np.zeros(0, dtype=np.int64)


def _items_json(
    bundle: ModelBundle, ids: npt.NDArray[np.int64], scores: npt.NDArray[np.float32]
) -> str:
    """'[{"item_id":..,"score":..},..]' built directly: json.dumps of a list of dicts was a
    tenth of the per-request CPU. Padding (id 0: fewer eligible items than k) is dropped."""
    keep = ids > 0
    raws = bundle.catalog.to_raw(ids[keep])
    parts = [
        f'{{"item_id":{encode_basestring(raw)},"score":{round(score, 6)!r}}}'
        for raw, score in zip(raws, scores[keep].tolist(), strict=True)
    ]
    return "[" + ",".join(parts) + "]"


def _recommendations_body(
    bundle: ModelBundle,
    user_id: str | None,
    items_json: str,
    fallback: str | None,
    unknown: list[str],
) -> bytes:
    """The Recommendations schema as JSON bytes, with "cached":false first (see _HIT_PREFIX)."""
    user = "null" if user_id is None else encode_basestring(user_id)
    return (
        f'{{"cached":false,"model_version":{encode_basestring(bundle.version)},'
        f'"user_id":{user},"items":{items_json},'
        f'"fallback":{"null" if fallback is None else encode_basestring(fallback)},'
        f'"unknown_items":{json.dumps(unknown)}}}'
    ).encode()


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(_dumps(payload), status_code=status, media_type="application/json")


def _digest(recent: list[str]) -> str:
    """A short stable digest of a user's recent events ("0" when there are none)."""
    if not recent:
        return "0"
    return f"{len(recent)}-{zlib.crc32(chr(31).join(recent).encode()):08x}"


_CACHED_PREFIX = b'{"cached":false,'
_HIT_PREFIX = b'{"cached":true,'


def create_app(config: ServiceConfig) -> FastPath:
    service = Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="recloop",
        summary="Real-time sequential recommendations",
        version="1",
        lifespan=lifespan,
        responses={
            400: {"model": Problem},
            413: {"model": Problem},
            422: {"description": "invalid parameter or body"},
            503: {"model": Problem},
        },
    )
    app.state.service = service

    # -------------------------------------------------------------- error handling

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        service.metrics.rejected.inc()
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # One readable line per problem: "query.k: Input should be greater than or equal to 1".
        problems = [
            f"{'.'.join(str(p) for p in error.get('loc', ()))}: {error.get('msg')}"
            for error in exc.errors()
        ]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    # -------------------------------------------------------------- probes and metrics

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> Response:
        bundle = service.holder.current
        body = {
            "ready": bundle is not None,
            "model_version": bundle.version if bundle else None,
            "state": service.state.status(),
            "queue": service.batcher.depth,
        }
        return _json(body, 200 if bundle is not None else 503)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        service.metrics.queue_depth.set(service.batcher.depth)
        service.metrics.state_connected.set(1 if service.state.status().get("connected") else 0)
        data, content_type = service.metrics.render()
        return Response(data, media_type=content_type)

    # -------------------------------------------------------------- recommendations

    @app.get(
        "/v1/users/{user_id}/recommendations",
        response_model=Recommendations,
        tags=["recommendations"],
    )
    async def user_recommendations(
        user_id: str,
        k: int = Query(10, ge=1, le=MAX_K),
        exclude_seen: bool = True,
    ) -> Response:
        body = await service.user_recommendations(user_id, k, exclude_seen)
        return Response(body, media_type="application/json")

    @app.post("/v1/recommendations", response_model=Recommendations, tags=["recommendations"])
    async def sequence_recommendations(request: SequenceRequest) -> Response:
        bundle = service.bundle
        sequence, unknown = bundle.catalog.to_dense([str(item) for item in request.items])
        items, fallback = await service.recommend(bundle, sequence, request.k, request.exclude_seen)
        body = _recommendations_body(bundle, None, items, fallback, unknown)
        return Response(body, media_type="application/json")

    @app.get("/v1/items/{item_id}/similar", response_model=SimilarItems, tags=["recommendations"])
    async def similar_items(item_id: str, k: int = Query(10, ge=1, le=MAX_K)) -> Response:
        bundle = service.bundle
        dense, unknown = bundle.catalog.to_dense([item_id])
        if unknown:
            raise HTTPException(404, f"unknown item {item_id!r} (not in model {bundle.version})")

        def search() -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
            vectors = bundle.index.vectors(dense)
            ids, scores = bundle.index.search(vectors, k, [dense])
            return ids[0], scores[0]

        ids, scores = await service.batcher.run_in_worker(search)
        body = (
            f'{{"model_version":{encode_basestring(bundle.version)},'
            f'"item_id":{encode_basestring(item_id)},"items":{_items_json(bundle, ids, scores)}}}'
        )
        return Response(body.encode(), media_type="application/json")

    # -------------------------------------------------------------- writes (API key)

    def require_key(api_key: str | None) -> None:
        if config.api_key is None:
            raise HTTPException(403, "write and admin endpoints are disabled: start with --api-key")
        if api_key is None or not hmac.compare_digest(api_key, config.api_key):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    @app.post("/v1/events", response_model=EventsAccepted, tags=["events"])
    async def post_events(
        batch: EventBatch, x_api_key: str | None = Header(None)
    ) -> EventsAccepted:
        require_key(x_api_key)
        bundle = service.bundle
        pairs = [(str(event.user_id), str(event.item_id)) for event in batch.events]
        # Durable first (the online learner reads the log), then the user state: an
        # acknowledged event is never lost, and a failed append changes nothing.
        event_ids = await service.log_events(batch)
        await service.state.append_events(pairs)
        service.metrics.events.inc(len(pairs))
        _, unknown = bundle.catalog.to_dense([item for _, item in pairs])
        return EventsAccepted(
            accepted=len(pairs),
            users=len({user for user, _ in pairs}),
            event_ids=event_ids,
            unknown_items=sorted(set(unknown)),
        )

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"])
    async def model_info() -> ModelInfo:
        described = service.bundle.describe()
        core = {name: described.pop(name) for name in ModelInfo.model_fields if name in described}
        return ModelInfo(**core, details=described)

    @app.post("/v1/admin/reload", response_model=ReloadResult, tags=["admin"])
    async def admin_reload(
        request: ReloadRequest | None = None, x_api_key: str | None = Header(None)
    ) -> ReloadResult:
        require_key(x_api_key)
        ref = request.version if request is not None else None
        old = service.holder.current
        try:
            bundle, previous = await service.reload(ref)
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from None
        except EngineParityError as exc:
            raise HTTPException(409, f"refused: {exc}") from None
        except (ServingError, RecloopError) as exc:
            raise HTTPException(409, f"cannot load: {exc}") from None
        return ReloadResult(
            version=bundle.version,
            previous=previous,
            swapped=bundle is not old,
            loaded_in_seconds=round(bundle.load_seconds, 3),
        )

    # Outermost first: metrics see every request, including the ones the size limit refuses.
    app.add_middleware(BodySizeLimit, limit=config.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    return FastPath(app, service)


_USER_RECS = re.compile(r"^/v1/users/([^/]+)/recommendations$")
_USER_RECS_ROUTE = "/v1/users/{user_id}/recommendations"
_BOOLS = {
    **dict.fromkeys(("true", "1", "yes", "on", "t", "y"), True),
    **dict.fromkeys(("false", "0", "no", "off", "f", "n"), False),
}


class FastPath:
    """The hottest request, GET /v1/users/{id}/recommendations with valid arguments, answered
    without FastAPI's routing and dependency machinery (about half of the per-request CPU on
    this machine). Anything else, including every invalid variant of that request, goes to
    the FastAPI app, which stays the one place that validates and documents the API: the fast
    path only accepts what FastAPI would accept and answers it with the same handler code.
    """

    def __init__(self, app: FastAPI, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            if scope["path"] == "/healthz":  # liveness: the HTTP stack's own ceiling
                await send_json(send, 200, _HEALTHY)
                self.service.metrics.observe_request("/healthz", 200, 0.0)
                return
            match = _USER_RECS.match(scope["path"])
            arguments = _fast_arguments(scope["query_string"]) if match else None
            if match and arguments is not None and self.service.holder.current is not None:
                await self._user_recommendations(match.group(1), *arguments, send)
                return
        await self.app(scope, receive, send)

    async def _user_recommendations(self, user_id: str, k: int, exclude: bool, send: Send) -> None:
        started = time.perf_counter()
        status = 200
        try:
            body = await self.service.user_recommendations(user_id, k, exclude)
        except Overloaded as exc:
            self.service.metrics.rejected.inc()
            status, body = 503, _dumps({"detail": str(exc)})
        except Exception:  # logged, answered 500; the process keeps serving
            log.exception("GET %s failed", _USER_RECS_ROUTE)
            status, body = 500, b'{"detail":"internal error"}'
        await send_json(send, status, body)
        self.service.metrics.observe_request(
            _USER_RECS_ROUTE, status, time.perf_counter() - started
        )


_HEALTHY = b'{"status":"ok"}'


def _fast_arguments(query_string: bytes) -> tuple[int, bool] | None:
    """(k, exclude_seen) when the query is plainly valid; None sends it to FastAPI."""
    k, exclude = 10, True
    if not query_string:
        return k, exclude
    seen: set[str] = set()
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name in seen:
            return None
        seen.add(name)
        if name == "k":
            if not value.isdigit() or not 1 <= int(value) <= MAX_K:
                return None
            k = int(value)
        elif name == "exclude_seen":
            parsed = _BOOLS.get(value.lower())
            if parsed is None:
                return None
            exclude = parsed
    return k, exclude
