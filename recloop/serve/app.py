"""The HTTP side of the recommendation service: FastAPI routes, errors, docs (the fast path of
the hottest request and the readiness gate wrap it: :mod:`recloop.serve.fastpath`).

Everything here is HTTP and JSON; the work is :class:`recloop.serve.service.Service`'s. Every
input is checked by :mod:`recloop.serve.validation`, the same functions on the FastAPI routes
and on the fast path, so both accept and refuse exactly the same requests. Bad input is a 4xx
with a message; every status a route can answer is in the OpenAPI document (``/openapi.json``),
which ``tests/test_api_schema.py`` checks with schemathesis. ``/docs`` is served from the
installed ``fastapi-offline`` assets, so it works on a machine without internet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from starlette.exceptions import HTTPException as StarletteHTTPException

from recloop.errors import (
    EngineParityError,
    IndexUnavailable,
    RecloopError,
    RegistryError,
    ServingError,
)
from recloop.serve.batcher import Overloaded
from recloop.serve.fastpath import HEALTHY, FastPath
from recloop.serve.middleware import BodySizeLimit, RequestMetrics
from recloop.serve.recommender import UnknownItem
from recloop.serve.schemas import (
    EventBatch,
    EventsAccepted,
    ExperimentInfo,
    Health,
    ModelInfo,
    Problem,
    Readiness,
    Recommendations,
    ReloadRequest,
    ReloadResult,
    SequenceRequest,
    SimilarItems,
    UserEvents,
)
from recloop.serve.service import BadEvents, Service, ServiceConfig, Unavailable, dumps
from recloop.serve.validation import (
    DEFAULT_K,
    MAX_K,
    RawId,
    bearer_token,
    key_matches,
)

if TYPE_CHECKING:
    from recloop.events import Event

__all__ = ["FastPath", "ServiceConfig", "create_app"]

log = logging.getLogger("recloop.serve")

JSON = "application/json"
# The text format generate_latest writes, as Prometheus scrapers expect it (prometheus_client's
# CONTENT_TYPE_LATEST names its 1.0.0 variant since 0.22).
PROMETHEUS_TEXT = CONTENT_TYPE_PLAIN_0_0_4
DOCS_ASSETS = "/docs-assets"


def _problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


# The statuses every route may answer, and the ones that only some do (OpenAPI `responses`).
Responses = dict[int | str, dict[str, Any]]
COMMON: Responses = {
    422: _problem("invalid parameter or body"),
    503: _problem("not ready or overloaded"),
}
BODY: Responses = {413: _problem("request body over the size limit")}
KEYED: Responses = {
    401: _problem("missing or wrong API key (X-API-Key or Authorization: Bearer)"),
    403: _problem("write and admin endpoints are disabled: no API key is configured"),
}
NOT_FOUND: Responses = {404: _problem("unknown item or version")}
# A path id the route cannot hold (a line break, which `{id:path}` does not match): no route.
NO_ROUTE: Responses = {404: _problem("no such route (the id cannot be part of a URL path)")}
CONFLICT: Responses = {409: _problem("the version cannot be loaded or fails the parity check")}


def _offline_assets() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def create_app(config: ServiceConfig) -> FastPath:
    """The ASGI app. Loads the served version now (a broken one raises RecloopError here,
    before any server binds a port); resources live for the app's lifespan."""
    service = Service(config)
    service.preload()

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
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind the API key when "docs" is protected
    )
    app.state.service = service
    _error_handlers(app, service)
    _ops_routes(app, service)
    _recommendation_routes(app, service)
    _model_routes(app, service)
    _event_routes(app, service)
    _admin_routes(app, service)
    _docs_routes(app, service)
    # Outermost first: metrics see every request, including the ones the size limit refuses.
    app.add_middleware(BodySizeLimit, limit=config.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    return FastPath(app, service)


# ------------------------------------------------------------------------------ API keys


def key_checker(service: Service, *, group: str | None) -> Callable[..., None]:
    """A dependency that demands the API key: always for writes (``group`` None), and for a
    read-only group ("docs", "metrics", "model") only when the service protects it."""
    config = service.config

    def check(
        x_api_key: Annotated[str | None, Header()] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> None:
        if group is not None and group not in config.protected:
            return
        if config.api_key is None:
            raise HTTPException(403, "write and admin endpoints are disabled: start with --api-key")
        given = x_api_key if x_api_key is not None else bearer_token(authorization)
        if not key_matches(given, config.api_key):
            raise HTTPException(401, "missing or wrong API key (X-API-Key header)")

    return check


# ------------------------------------------------------------------------------ routes


def _error_handlers(app: FastAPI, service: Service) -> None:
    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        service.metrics.rejected.inc()
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse({"detail": exc.detail}, status_code=503, headers=headers)

    @app.exception_handler(IndexUnavailable)
    async def index_unavailable(request: Request, exc: IndexUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(BadEvents)
    async def bad_events(request: Request, exc: BadEvents) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers a body that json.loads cannot decode (not UTF-8) with a bare 400
        # "error parsing the body"; it is invalid JSON like any other (RFC 8259), so a 422.
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            detail = f"body: not valid JSON: {exc.__cause__}"
            return JSONResponse({"detail": detail}, status_code=422)
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # One readable line per problem: "query.k: Input should be greater than or equal to 1".
        problems = [_problem_line(error) for error in exc.errors()]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)


def _problem_line(error: dict[str, Any]) -> str:
    loc = error.get("loc", ())
    if error.get("type") == "json_invalid":  # loc is ("body", character offset)
        why = error.get("ctx", {}).get("error", "")
        return f"body: not valid JSON at character {loc[-1] if loc else 0}: {why}"
    return f"{'.'.join(str(part) for part in loc)}: {error.get('msg')}"


def _ops_routes(app: FastAPI, service: Service) -> None:
    @app.get("/healthz", tags=["ops"], response_model=Health)
    async def healthz() -> Response:
        return Response(HEALTHY, media_type=JSON)

    @app.get(
        "/readyz",
        tags=["ops"],
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "not ready (loading, rebuilding)"}},
    )
    async def readyz() -> Response:
        ready, body = service.readiness()
        return Response(dumps(body), status_code=200 if ready else 503, media_type=JSON)

    @app.get(
        "/metrics",
        tags=["ops"],
        dependencies=[Depends(key_checker(service, group="metrics"))],
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}},
            },
            **KEYED,
            422: COMMON[422],
        },
    )
    async def metrics() -> Response:
        return Response(service.render_metrics(), media_type=PROMETHEUS_TEXT)


def _recommendation_routes(app: FastAPI, service: Service) -> None:
    @app.get(
        "/v1/users/{user_id:path}/recommendations",  # :path: ids may hold "/" (URLs)
        response_model=Recommendations,
        tags=["recommendations"],
        responses={**COMMON, **NO_ROUTE},
    )
    async def user_recommendations(
        user_id: Annotated[RawId, PathParam()],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = DEFAULT_K,
        exclude_seen: bool = True,
    ) -> Response:
        body = await service.user_recommendations(user_id, k, exclude_seen)
        return Response(body, media_type=JSON)

    @app.post(
        "/v1/recommendations",
        response_model=Recommendations,
        tags=["recommendations"],
        responses={**COMMON, **BODY},
    )
    async def sequence_recommendations(request: SequenceRequest) -> Response:
        items = [str(item) for item in request.items]
        recommender = service.recommender
        body = await recommender.for_items(service.bundle, items, request.k, request.exclude_seen)
        return Response(body, media_type=JSON)

    @app.get(
        "/v1/items/{item_id:path}/similar",
        response_model=SimilarItems,
        tags=["recommendations"],
        responses={**COMMON, **NOT_FOUND},
    )
    async def similar_items(
        item_id: Annotated[RawId, PathParam()],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = DEFAULT_K,
    ) -> Response:
        try:
            body = await service.recommender.similar(service.bundle, item_id, k)
        except UnknownItem as exc:
            raise HTTPException(404, str(exc)) from None
        return Response(body, media_type=JSON)


def _model_routes(app: FastAPI, service: Service) -> None:
    @app.get(
        "/v1/model",
        response_model=ModelInfo,
        tags=["model"],
        dependencies=[Depends(key_checker(service, group="model"))],
        responses={**KEYED, **COMMON},
    )
    async def model_info() -> ModelInfo:
        described = service.bundle.describe()
        core = {name: described.pop(name) for name in ModelInfo.model_fields if name in described}
        arms = service.arms
        experiment = ExperimentInfo.model_validate(arms.describe()) if arms else None
        return ModelInfo(**core, details=described, experiment=experiment)


def _event_routes(app: FastAPI, service: Service) -> None:
    require_key = Depends(key_checker(service, group=None))

    @app.get(
        "/v1/users/{user_id:path}/events",
        response_model=UserEvents,
        tags=["events"],
        dependencies=[require_key],
        responses={**COMMON, **KEYED, **NO_ROUTE},
    )
    async def user_events(user_id: Annotated[RawId, PathParam()]) -> UserEvents:
        """The user's recent events as the service holds them (oldest first): what its next
        recommendations are computed from, besides the training history. Needs the API key
        (it is user data)."""
        return UserEvents(user_id=user_id, items=await service.recent_events(user_id))

    @app.post(
        "/v1/events",
        response_model=EventsAccepted,
        tags=["events"],
        dependencies=[require_key],
        responses={**COMMON, **BODY, **KEYED},
    )
    async def post_events(batch: EventBatch) -> EventsAccepted:
        events = _events(batch)
        ingested = await service.ingest(events)
        return EventsAccepted(
            accepted=len(events),
            users=len({event.user_id for event in events}),
            durable=ingested.durable,
            event_ids=ingested.event_ids,
            unknown_items=ingested.unknown_items,
        )


def _events(batch: EventBatch) -> list[Event]:
    """The body's events as the event log takes them (no timestamp: now)."""
    from recloop.events import Event

    now = time.time()
    return [
        Event(
            user_id=str(e.user_id),
            item_id=str(e.item_id),
            timestamp=e.timestamp if e.timestamp is not None else now,
            event_type=e.event_type,
            value=e.value,
        )
        for e in batch.events
    ]


def _admin_routes(app: FastAPI, service: Service) -> None:
    require_key = Depends(key_checker(service, group=None))

    @app.post(
        "/v1/admin/reload",
        response_model=ReloadResult,
        tags=["admin"],
        dependencies=[require_key],
        responses={**COMMON, **BODY, **KEYED, **NOT_FOUND, **CONFLICT},
    )
    async def admin_reload(request: ReloadRequest | None = None) -> ReloadResult:
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


def _docs_routes(app: FastAPI, service: Service) -> None:
    """/openapi.json, /docs (Swagger UI) and /redoc from installed assets, no CDN."""
    protect = [Depends(key_checker(service, group="docs"))]
    app.mount(DOCS_ASSETS, StaticFiles(directory=_offline_assets()), name="docs-assets")

    @app.get("/openapi.json", include_in_schema=False, dependencies=protect)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=protect)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="recloop API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            # No badge from validator.swagger.io: the page loads nothing from outside the app.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False, dependencies=protect)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="recloop API",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
