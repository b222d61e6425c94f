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
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from recloop.errors import EngineParityError, RecloopError, RegistryError, ServingError
from recloop.registry import Registry
from recloop.serve.batcher import MicroBatcher, Overloaded
from recloop.serve.metrics import ServiceMetrics
from recloop.serve.runtime import LoadOptions, ModelBundle, ModelHolder
from recloop.serve.schemas import (
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

log = logging.getLogger("recloop.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class ServiceConfig:
    registry: Path
    ref: str = "auto"  # "auto": production if promoted, else latest
    load: LoadOptions = field(default_factory=LoadOptions)
    state_url: str | None = None  # None: in-process; "redis://..." for Redis
    state_snapshot: Path | None = None
    state_max_length: int = 200  # recent events kept per user (models read their last L)
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
        if self.holder.current is not None:
            self.holder.current.close()

    @property
    def bundle(self) -> ModelBundle:
        bundle = self.holder.current
        if bundle is None:
            raise HTTPException(503, "no model loaded yet", headers={"Retry-After": "1"})
        return bundle

    async def reload(self, ref: str | None) -> tuple[ModelBundle, str | None]:
        """Loads off the event loop (export, index build, parity check), then swaps."""
        async with self._reload_lock:
            old = self.holder.current
            loop = asyncio.get_running_loop()
            bundle, previous = await loop.run_in_executor(None, self.holder.load, ref)
            if old is not None and bundle is not old:
                self.metrics.model_swaps.inc()
                # Results cached under the old version are simply never asked for again (the
                # version is in the cache field); the old bundle is closed once in-flight
                # requests have had time to finish on it.
                loop.call_later(self.config.swap_grace_seconds, old.close)
            self.metrics.set_model(bundle.version)
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

    def spawn(self, coroutine: Awaitable[Any]) -> None:
        """Fire-and-forget work (cache writes) that must not delay the response."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ recommendations

    async def user_sequence(
        self, bundle: ModelBundle, user_id: str
    ) -> tuple[npt.NDArray[np.int64], list[str]]:
        """Training history + events since, in model ids (unknown items reported)."""
        history = (
            bundle.history.items(user_id)
            if bundle.history is not None
            else np.zeros(0, dtype=np.int64)
        )
        (recent,) = await self.state.get_sequences([user_id])
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
    ) -> tuple[list[dict[str, Any]], str | None]:
        if len(sequence) == 0:
            self.metrics.fallbacks.inc()
            ids = bundle.popular[:k]
            return [{"item_id": raw, "score": 0.0} for raw in bundle.catalog.to_raw(ids)], (
                "popularity"
            )
        exclude = np.unique(sequence) if exclude_seen else None
        window = sequence[-bundle.max_length :]
        ids, scores = await self.batcher.submit(bundle, window, k, exclude)
        keep = ids > 0  # fewer eligible items than k: the tail is padding
        ids, scores = ids[keep], scores[keep]
        raws = bundle.catalog.to_raw(ids)
        return [
            {"item_id": raw, "score": round(score, 6)}
            for raw, score in zip(raws, scores.tolist(), strict=True)
        ], None


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(
        json.dumps(payload, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/json",
    )


_CACHED_PREFIX = b'{"cached":false,'
_HIT_PREFIX = b'{"cached":true,'


def create_app(config: ServiceConfig) -> FastAPI:
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
        k: int = Query(10, ge=1, le=1000),
        exclude_seen: bool = True,
    ) -> Response:
        bundle = service.bundle
        field_name = f"{bundle.version}:{k}:{int(exclude_seen)}"
        if config.cache:
            hit = await service.state.get_cached(user_id, field_name)
            if hit is not None:
                service.metrics.cache_hits.inc()
                return Response(
                    _HIT_PREFIX + hit[len(_CACHED_PREFIX) :], media_type="application/json"
                )
            service.metrics.cache_misses.inc()
        sequence, unknown = await service.user_sequence(bundle, user_id)
        items, fallback = await service.recommend(bundle, sequence, k, exclude_seen)
        body = (
            _CACHED_PREFIX
            + json.dumps(
                {
                    "model_version": bundle.version,
                    "user_id": user_id,
                    "items": items,
                    "fallback": fallback,
                    "unknown_items": unknown,
                },
                separators=(",", ":"),
            ).encode()[1:]
        )
        if config.cache:
            service.spawn(service.state.set_cached(user_id, field_name, body))
        return Response(body, media_type="application/json")

    @app.post("/v1/recommendations", response_model=Recommendations, tags=["recommendations"])
    async def sequence_recommendations(request: SequenceRequest) -> Response:
        bundle = service.bundle
        sequence, unknown = bundle.catalog.to_dense([str(item) for item in request.items])
        items, fallback = await service.recommend(bundle, sequence, request.k, request.exclude_seen)
        return _json(
            {
                "cached": False,
                "model_version": bundle.version,
                "user_id": None,
                "items": items,
                "fallback": fallback,
                "unknown_items": unknown,
            }
        )

    @app.get("/v1/items/{item_id}/similar", response_model=SimilarItems, tags=["recommendations"])
    async def similar_items(item_id: str, k: int = Query(10, ge=1, le=1000)) -> Response:
        bundle = service.bundle
        dense, unknown = bundle.catalog.to_dense([item_id])
        if unknown:
            raise HTTPException(404, f"unknown item {item_id!r} (not in model {bundle.version})")

        def search() -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
            vectors = bundle.index.vectors(dense)
            ids, scores = bundle.index.search(vectors, k, [dense])
            return ids[0], scores[0]

        ids, scores = await service.batcher.run_in_worker(search)
        keep = ids > 0
        raws = bundle.catalog.to_raw(ids[keep])
        items = [
            {"item_id": raw, "score": round(score, 6)}
            for raw, score in zip(raws, scores[keep].tolist(), strict=True)
        ]
        return _json({"model_version": bundle.version, "item_id": item_id, "items": items})

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
        await service.state.append_events(pairs)
        service.metrics.events.inc(len(pairs))
        _, unknown = bundle.catalog.to_dense([item for _, item in pairs])
        return EventsAccepted(
            accepted=len(pairs),
            users=len({user for user, _ in pairs}),
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
    return app


class BodySizeLimit:
    """413 for bodies over the limit, by Content-Length or while streaming (chunked)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    await _plain(send, 400, "bad Content-Length header")
                    return
                if too_big:
                    await _plain(send, 413, f"request body over {self.limit} bytes")
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _plain(send, 413, f"request body over {self.limit} bytes")


class _TooLarge(Exception):
    pass


async def _plain(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Latency histogram per route template and status (pure ASGI: cheap per request)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            # The router stores the matched route in the (shared) scope: label by its template
            # so /v1/users/{user_id}/... is one series, not one per user.
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(path, status, time.perf_counter() - started)
