"""The hottest request's own path, and the readiness gate a load balancer asks for.

:class:`FastPath` wraps the FastAPI app: GET /v1/users/{id}/recommendations with valid
arguments is answered here, without FastAPI's routing and dependency machinery; everything else
goes to the app. Requests that carry ``X-Recloop-Require-Ready`` (nginx, deploy/nginx) are
refused with 503 at once while the replica is not ready.
"""

from __future__ import annotations

import logging
import re
import time

from fastapi import FastAPI

from recloop.errors import IndexUnavailable
from recloop.ids import raw_id_problem
from recloop.serve.batcher import Overloaded
from recloop.serve.middleware import Receive, Scope, Send, send_json
from recloop.serve.service import Service, Unavailable, dumps
from recloop.serve.validation import fast_arguments

log = logging.getLogger("recloop.serve")


# The pattern Starlette compiles for the route (a :path parameter, greedy, and the same `$`),
# less the empty id, which the route refuses.
_USER_RECS = re.compile(r"^/v1/users/(.+)/recommendations$")
_USER_RECS_ROUTE = "/v1/users/{user_id}/recommendations"
HEALTHY = b'{"status":"ok"}'


# Sent by a load balancer (deploy/nginx/recloop.conf): "answer only if /readyz would say ready,
# else 503 at once", so the balancer moves the request to a ready replica and marks this one
# failed for a while. Open-source nginx has no active health checks; this is how readiness
# reaches it. Clients that come direct get what the replica has (last known state).
REQUIRE_READY_HEADER = b"x-recloop-require-ready"


def _wants_ready(scope: Scope) -> bool:
    return any(name == REQUIRE_READY_HEADER for name, _ in scope["headers"])


def _announces_body(scope: Scope) -> bool:
    """A GET with a body (which no client of this route sends) goes to FastAPI, so that the
    body size limit refuses it there as it would any other request."""
    return any(
        name == b"transfer-encoding" or (name == b"content-length" and value != b"0")
        for name, value in scope["headers"]
    )


class FastPath:
    """The hottest request, GET /v1/users/{id}/recommendations with valid arguments (and no
    body), answered without FastAPI's routing and dependency machinery (about half of the
    per-request CPU on this machine). It validates with the FastAPI route's own functions and
    hands anything they refuse (and anything else) to the FastAPI app, which then answers the
    422 (or the 413): both paths accept and refuse the same inputs
    (``tests/test_api_schema.py`` feeds them both).
    """

    def __init__(self, app: FastAPI, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and _wants_ready(scope):
            reason = self.service.not_ready()
            if reason is not None:  # the balancer retries another replica (deploy/nginx)
                await send_json(send, 503, dumps({"detail": f"replica not ready: {reason}"}))
                self.service.metrics.observe_request("not-ready", 503, 0.0)
                return
        if scope["type"] == "http" and scope["method"] == "GET":
            if scope["path"] == "/healthz":  # liveness: the HTTP stack's own ceiling
                await send_json(send, 200, HEALTHY)
                self.service.metrics.observe_request("/healthz", 200, 0.0)
                return
            match = _USER_RECS.match(scope["path"])
            arguments = fast_arguments(scope["query_string"]) if match else None
            if (
                match
                and arguments is not None
                and raw_id_problem(match.group(1)) is None
                and self.service.holder.current is not None
                and not _announces_body(scope)
            ):
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
            status, body = 503, dumps({"detail": str(exc)})
        except Unavailable as exc:
            status, body = 503, dumps({"detail": exc.detail})
        except IndexUnavailable as exc:  # another replica (nginx retries) or a later try
            status, body = 503, dumps({"detail": str(exc)})
        except Exception:  # logged, answered 500; the process keeps serving
            log.exception("GET %s failed", _USER_RECS_ROUTE)
            status, body = 500, b'{"detail":"internal error"}'
        await send_json(send, status, body)
        self.service.metrics.observe_request(
            _USER_RECS_ROUTE, status, time.perf_counter() - started
        )
