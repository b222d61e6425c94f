"""The HTTP API against its own OpenAPI document, and the fast path against FastAPI's route.

Three kinds of test, all on a real tiny model:

- schemathesis generates requests for every operation of ``/openapi.json`` (valid and invalid
  ones, with and without the API key) against a real uvicorn server, and checks that no answer
  is a 5xx and that every answer is documented: status code, media type and body schema;
- the fast path of ``GET /v1/users/{id}/recommendations`` and the FastAPI app behind it are fed
  the same generated paths and query strings (odd digits, percent-encoded bytes, repeats, signs)
  and must answer alike, status and body;
- one regression test per reported case, each naming the exact status and the message.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_from_bytes, unquote

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from recloop.ids import raw_id_problem
from recloop.serve.app import FastPath, ServiceConfig, create_app
from recloop.serve.bundle import LoadOptions
from recloop.serve.validation import fast_arguments
from tests.serving import make_dataset, running_service, train_version

API_KEY = "schema-key"
MAX_BODY = 16 * 1024
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = 25  # per operation, generation mode and key: the whole run stays well under a minute
# A user and an item the model knows (schemathesis' own ids are all unknown).
KNOWN_IDS = {"user_id": "5", "item_id": "1"}
# Operations that need the API key whatever the service's configuration.
KEYED_ALWAYS = {"POST /v1/events", "POST /v1/admin/reload", "GET /v1/users/{user_id}/events"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry of its own with one version: POST /v1/admin/reload can only reload it."""
    root = tmp_path_factory.mktemp("api-schema")
    data = make_dataset(root / "data")
    train_version(data, root / "registry", root / "run", seed=1, steps=10)
    return root / "registry"


def config_for(registry: Path, **overrides: Any) -> ServiceConfig:
    values: dict[str, Any] = {
        "registry": registry,
        "load": LoadOptions(engine="torch"),
        "api_key": API_KEY,
        "max_body_bytes": MAX_BODY,
    }
    values.update(overrides)
    return ServiceConfig(**values)


@pytest.fixture(scope="module")
def service(registry: Path) -> Iterator[str]:
    with running_service(config_for(registry)) as url:
        yield url


# ---------------------------------------------------------------------------- schemathesis


def test_every_operation_answers_as_its_openapi_document_says(service: str) -> None:
    schema = schemathesis.openapi.from_url(f"{service}/openapi.json", config=schemathesis.Config())
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document itself is valid OpenAPI
        operations.append(result.ok())
    assert {
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /v1/users/{user_id}/recommendations",
        "POST /v1/recommendations",
        "GET /v1/items/{item_id}/similar",
        "GET /v1/model",
        "POST /v1/events",
        "POST /v1/admin/reload",
    } <= {operation.label for operation in operations}
    statuses: dict[tuple[str, bool], Counter[int]] = {}
    with requests.Session() as session:
        for operation in operations:
            keyed = any(parameter.name.lower() == "x-api-key" for parameter in operation.headers)
            for mode in schemathesis.GenerationMode:
                # Invalid requests only where the document constrains something a client can
                # get wrong: a query or a body (path ids and headers are any string).
                if mode.is_negative and not (operation.query or operation.body):
                    continue
                for with_key in (True, False) if keyed else (False,):
                    seen = statuses.setdefault((operation.label, with_key), Counter())
                    seen.update(_exercise(operation, mode, service, session, with_key))
                    names = {parameter.name for parameter in operation.path_parameters}
                    known = {name: KNOWN_IDS[name] for name in names & set(KNOWN_IDS)}
                    if known and mode.is_positive:  # and ids the model knows: real answers
                        seen.update(_exercise(operation, mode, service, session, with_key, known))
    total = sum(sum(seen.values()) for seen in statuses.values())
    print(f"schemathesis: {total} cases over {len(operations)} operations")
    for (label, with_key), seen in sorted(statuses.items()):
        print(f"  {label}{' (with the key)' if with_key else ''}: {dict(sorted(seen.items()))}")
    for (label, with_key), seen in statuses.items():
        assert seen, label  # (GET /healthz has one case only: hypothesis stops there)
        if with_key:  # the right key was sent: some requests were served
            assert any(200 <= status < 300 for status in seen), (label, seen)
        elif label in KEYED_ALWAYS:  # without it, nothing but a refusal
            assert 401 in seen and set(seen) <= {401, 413, 422}, (label, seen)


def _exercise(
    operation: Any,
    mode: schemathesis.GenerationMode,
    base_url: str,
    session: requests.Session,
    with_key: bool,
    path_parameters: dict[str, str] | None = None,
) -> Counter[int]:
    """Runs EXAMPLES generated cases of one operation; returns the statuses they got."""
    statuses: Counter[int] = Counter()
    # Headers given at the call replace the generated ones of the same name.
    headers = {"X-API-Key": API_KEY} if with_key else None

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(
            base_url=base_url, session=session, headers=headers, checks=CHECKS, timeout=30
        )
        statuses[response.status_code] += 1

    run()
    return statuses


# ---------------------------------------------------------------------------- fast path vs FastAPI


class _Lifespan:
    """Runs an ASGI app's lifespan protocol, start and stop, as a server does."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def start(self) -> None:
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outgoing: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.ensure_future(self.app(scope, self.incoming.get, self.outgoing.put))
        await self._step("lifespan.startup")

    async def stop(self) -> None:
        await self._step("lifespan.shutdown")
        await self.task

    async def _step(self, kind: str) -> None:
        await self.incoming.put({"type": kind})
        answer = await self.outgoing.get()
        assert answer["type"] == f"{kind}.complete", answer


@pytest.fixture(scope="module")
def in_process(registry: Path) -> Iterator[tuple[asyncio.AbstractEventLoop, FastPath]]:
    """The app with its service started, in this process, on a loop of its own. No result
    cache: the two paths must compute every answer, so that their bodies can be compared."""
    app = create_app(config_for(registry, cache=False))
    loop = asyncio.new_event_loop()
    lifespan = _Lifespan(app)
    loop.run_until_complete(lifespan.start())
    try:
        yield loop, app
    finally:
        loop.run_until_complete(lifespan.stop())
        loop.close()


async def _get(
    app: Any, raw_path: bytes, query: bytes = b"", body: bytes | None = None
) -> tuple[int, str, Any]:
    """GET raw_path?query straight through ASGI, with the scope uvicorn builds for that request
    target (and a body, sent chunked, if given); returns (status, content type, JSON body)."""
    headers = [(b"host", b"127.0.0.1:8000")]
    if body is not None:
        headers.append((b"transfer-encoding", b"chunked"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "root_path": "",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": query,
        "headers": headers,
        "state": {},
    }
    requests_left = [{"type": "http.request", "body": body or b"", "more_body": False}]
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return requests_left.pop() if requests_left else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    start = next(message for message in messages if message["type"] == "http.response.start")
    content = b"".join(message.get("body", b"") for message in messages[1:])
    content_type = dict(start["headers"]).get(b"content-type", b"").decode()
    return start["status"], content_type, json.loads(content)


# The inputs each path must judge alike: ASCII digits and other digits, signs, spaces, huge and
# empty numbers, booleans in odd spellings, percent-encoded bytes (valid UTF-8 or not).
ODD_VALUES = [
    *("10", "1", "1000", "0", "1001", "0010", "007", "1_0", "1e3", "0x10", "10.0", "10.5"),
    *("²", "٣", "١٠", "１０", "%C2%B2", "%D9%A3", "%31%30", "+5", "%2B5", "-3", "-0", " 5", "5 "),
    *("%205", "5%20", "+", "", str(10**30), str(-(10**30)), "9" * 400, "%FF", "%ED%A0%80"),
    *("true", "TRUE", "tRuE", "false", "FaLsE", "yes", "No", "oN", "OFF", "t", "F", "y", "N"),
    *("2", "-1", "maybe", "%74rue", "tru%65", " true", "true ", "ｔｒｕｅ", "on%00", "%00"),
]
ODD_NAMES = ["k", "exclude_seen", "K", "Exclude_Seen", "%6B", "exclude%5Fseen", "k ", "other", ""]
ODD_IDS = [
    *("", "0", "5", "17", "299", "nobody", "%ED%A0%80", "%ED%B0%80x", "%F0%9F%98%80"),
    *("%FF", "%C3%28", "%C0%AF", "%E2%80%8B", "%EF%BF%BD", "%0A", "a%0A"),
    *("%20", "%20%20", "%09", "+", "%2B", "%00", "a%2Fb", "%2F", "%C2%B2", "%D9%A3", ".", ".."),
    *("x" * 512, "x" * 513, "%C3%A9" * 256, "%C3%A9" * 257, "%F0%9F%98%80" * 129),
]


# Any character, lone surrogates included (they arrive percent-encoded: %ED%A0%80).
ALPHABET = st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))


@st.composite
def query_strings(draw: st.DrawFn) -> bytes:
    pairs = draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(ODD_NAMES), st.text(ALPHABET, max_size=3)),
                st.one_of(
                    st.sampled_from(ODD_VALUES),
                    st.integers(-(10**40), 10**40).map(str),
                    st.text(ALPHABET, max_size=6),
                ),
                st.sampled_from(["raw", "quoted", "bare"]),
            ),
            max_size=4,
        )
    )
    parts = []
    for name, value, form in pairs:
        if form == "bare":  # a name without "=": blank
            parts.append(name.encode("utf-8", "surrogatepass"))
        elif form == "quoted":
            quoted = (quote(text, errors="surrogatepass") for text in (name, value))
            parts.append("=".join(quoted).encode())
        else:  # as typed, non-ASCII as UTF-8 (ASGI allows any bytes in query_string)
            parts.append(f"{name}={value}".encode("utf-8", "surrogatepass"))
    separator = draw(st.sampled_from([b"&", b"&&", b";"]))
    return separator.join(parts)


user_segments = st.one_of(
    st.sampled_from(ODD_IDS),
    st.integers(0, 400).map(str),  # users 0..299 are known to the model
    st.text(ALPHABET, min_size=1, max_size=20).map(
        lambda text: quote(text, safe="", errors="surrogatepass")
    ),
    st.binary(min_size=1, max_size=12).map(lambda data: quote_from_bytes(data, safe="")),
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    user=user_segments,
    query=query_strings(),
    body=st.one_of(st.none(), st.sampled_from([b"", b"{}", b"x" * (MAX_BODY + 1)])),
)
def test_the_fast_path_and_fastapi_answer_every_request_alike(
    in_process: tuple[asyncio.AbstractEventLoop, FastPath],
    user: str,
    query: bytes,
    body: bytes | None,
) -> None:
    loop, app = in_process
    raw_path = f"/v1/users/{user}/recommendations".encode("ascii")
    fast = loop.run_until_complete(_get(app, raw_path, query, body))
    slow = loop.run_until_complete(_get(app.app, raw_path, query, body))
    assert fast == slow
    status, content_type, answer = fast
    assert content_type == "application/json"
    event(f"status {status}")
    user_id = unquote(user)  # what the server hands the app (invalid UTF-8 becomes U+FFFD)
    if body is not None and len(body) > MAX_BODY:  # refused before routing, on both paths
        assert status == 413, answer
    elif "\n" in user_id:  # {user_id:path} matches no line break: no route, on both paths
        assert status == 404, answer
    elif raw_id_problem(user_id) is not None:
        assert status == 422 and "path.user_id: Value error, id " in answer["detail"], answer
    elif fast_arguments(query) is not None and body is None:  # the fast path answered it
        event("answered by the fast path")
        assert status == 200, answer
    else:
        assert status in (200, 422), answer


# ---------------------------------------------------------------------------- reported cases


@pytest.mark.parametrize("query", ["k=²".encode(), b"k=%C2%B2", "k=٣".encode(), b"k=%D9%A3"])
def test_k_made_of_a_non_ascii_digit_is_a_422_on_both_paths(
    in_process: tuple[asyncio.AbstractEventLoop, FastPath], query: bytes
) -> None:
    loop, app = in_process
    for asgi in (app, app.app):
        status, _, body = loop.run_until_complete(_get(asgi, b"/v1/users/5/recommendations", query))
        assert status == 422, body
        assert body["detail"].startswith("query.k: Input should be a valid integer"), body


def test_k_made_of_a_non_ascii_digit_is_a_422_over_http(service: str) -> None:
    response = httpx.get(f"{service}/v1/users/5/recommendations", params={"k": "²"})
    assert response.status_code == 422 and "query.k" in response.json()["detail"]


def test_an_id_with_a_lone_surrogate_is_a_422_and_nothing_is_stored(service: str) -> None:
    headers = {"X-API-Key": API_KEY, "content-type": "application/json"}
    with httpx.Client(base_url=service, headers=headers, timeout=30) as client:
        reported = rb'{"events":[{"user_id":"\ud800","item_id":"1"}]}'
        alone = client.post("/v1/events", content=reported)
        assert alone.status_code == 422, alone.text
        assert alone.json()["detail"] == (
            "body.events.0.user_id: Value error, id is not valid UTF-8 (it holds a lone surrogate)"
        )
        # With a valid event before it: the batch is refused whole, the valid event too.
        mixed = (
            rb'{"events":[{"user_id":"surrogate-neighbour","item_id":"1"},'
            rb'{"user_id":"surrogate-neighbour","item_id":"\udc00"}]}'
        )
        refused = client.post("/v1/events", content=mixed)
        assert refused.status_code == 422, refused.text
        assert "body.events.1.item_id" in refused.json()["detail"]
        assert "lone surrogate" in refused.json()["detail"]
        neighbour = client.get("/v1/users/surrogate-neighbour/recommendations")
        assert neighbour.status_code == 200 and neighbour.json()["fallback"] == "popularity"
        known = client.get("/v1/users/5/recommendations")
        assert known.status_code == 200 and known.json()["fallback"] is None
        long = client.post("/v1/events", json={"events": [{"user_id": "é" * 257, "item_id": 1}]})
        assert long.status_code == 422 and long.json()["detail"] == (
            "body.events.0.user_id: Value error, id is 514 bytes long, the limit is 512 bytes "
            "of UTF-8"
        )


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"\xc3(", "body: not valid JSON: 'utf-8' codec can't decode byte 0xc3 in position 0"),
        (b"\xff\xfe+\xffP", "body: not valid JSON: 'utf-16-le' codec can't decode byte 0x50"),
        (b"{not json", "body: not valid JSON at character 1: Expecting property name"),
        (b'{"items": [1', "body: not valid JSON at character 12: Expecting ',' delimiter"),
    ],
)
def test_a_body_that_is_not_json_is_a_422_naming_the_problem(
    service: str, body: bytes, detail: str
) -> None:
    # Found by schemathesis: a body that is not UTF-8 was FastAPI's bare 400.
    headers = {"content-type": "application/json", "X-API-Key": API_KEY}
    for path in ("/v1/recommendations", "/v1/events", "/v1/admin/reload"):
        response = httpx.post(f"{service}{path}", content=body, headers=headers)
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith(detail), response.text


@pytest.mark.parametrize(
    ("version", "needle"),
    [
        ("v" + "0" * 40, "body.version: String should have at most 32 characters"),
        ("", "body.version: Value error, not a version reference"),
        ("../../etc", "body.version: Value error, not a version reference"),
        ("v1", "body.version: Value error, not a version reference"),
        ("v٠٠٠٠٠١", "body.version: Value error, not a version reference"),  # Arabic-Indic digits
    ],
)
def test_a_malformed_version_is_a_422_before_the_registry_is_asked(
    service: str, version: str, needle: str
) -> None:
    before = httpx.get(f"{service}/v1/model").json()["version"]
    response = httpx.post(
        f"{service}/v1/admin/reload", json={"version": version}, headers={"X-API-Key": API_KEY}
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(needle), response.text
    assert httpx.get(f"{service}/v1/model").json()["version"] == before


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": b"\xff\xfe"},
        {"X-API-Key": API_KEY.encode() + b"\xff"},
        {"X-API-Key": "schema-kéy".encode()},
        {"X-API-Key": b""},
        {"Authorization": b"Bearer \xff\xfe"},
        {"Authorization": b"Bearer"},
        {"Authorization": b"\xff"},
    ],
)
def test_any_malformed_key_is_a_401(service: str, headers: dict[str, bytes]) -> None:
    for method, path, body in [
        ("POST", "/v1/events", {"events": [{"user_id": "malformed-key", "item_id": "1"}]}),
        ("POST", "/v1/admin/reload", {}),
    ]:
        response = httpx.request(method, f"{service}{path}", json=body, headers=headers)
        assert response.status_code == 401, response.text
        assert "API key" in response.json()["detail"]


def test_an_oversized_chunked_body_is_a_413(service: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"items": ['
        for _ in range(2 * MAX_BODY // 4096):
            yield b'"1",' * 1024
        yield b'"1"]}'

    for path in ("/v1/recommendations", "/v1/events", "/v1/admin/reload"):
        response = httpx.post(
            f"{service}{path}",
            content=chunks(),
            headers={"content-type": "application/json", "X-API-Key": API_KEY},
        )
        assert response.request.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in response.request.headers
        assert response.status_code == 413, response.text
        assert response.json()["detail"] == f"request body over {MAX_BODY} bytes"


def test_a_get_with_an_oversized_body_is_a_413_on_both_paths(
    in_process: tuple[asyncio.AbstractEventLoop, FastPath], service: str
) -> None:
    # Found by the differential test: the fast path answered it 200, without reading the body.
    loop, app = in_process
    oversized = b"x" * (MAX_BODY + 1)
    for asgi in (app, app.app):
        status, _, body = loop.run_until_complete(
            _get(asgi, b"/v1/users/5/recommendations", b"k=3", oversized)
        )
        assert (status, body) == (413, {"detail": f"request body over {MAX_BODY} bytes"})
    response = httpx.request("GET", f"{service}/v1/users/5/recommendations", content=oversized)
    assert response.status_code == 413, response.text


# The statuses each operation can answer, besides 200.
DOCUMENTED = {
    ("get", "/healthz"): set(),
    ("get", "/readyz"): {"503"},
    ("get", "/metrics"): {"401", "403"},
    ("get", "/v1/model"): {"401", "403", "503"},
    ("get", "/v1/users/{user_id}/recommendations"): {"422", "503"},
    ("post", "/v1/recommendations"): {"413", "422", "503"},
    ("get", "/v1/items/{item_id}/similar"): {"404", "422", "503"},
    ("post", "/v1/events"): {"401", "403", "413", "422", "503"},
    ("post", "/v1/admin/reload"): {"401", "403", "404", "409", "413", "422", "503"},
}


def test_the_openapi_document_lists_every_status_and_media_type(service: str) -> None:
    document = httpx.get(f"{service}/openapi.json").json()
    for (method, path), expected in DOCUMENTED.items():
        responses = document["paths"][path][method]["responses"]
        assert {"200", *expected} <= set(responses), (method, path, sorted(responses))
    problem = {"$ref": "#/components/schemas/Problem"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                assert len(response["content"]) == 1, (method, path, status)
                ((media_type, content),) = response["content"].items()
                if path == "/metrics" and status == "200":
                    assert media_type == "text/plain; version=0.0.4; charset=utf-8"
                elif path == "/readyz":
                    assert media_type == "application/json"
                    assert content["schema"] == {"$ref": "#/components/schemas/Readiness"}
                elif status != "200":  # every refusal is {"detail": "..."}
                    assert (media_type, content["schema"]) == ("application/json", problem)
    # FastAPI's own 422 shape is never sent, so it is not in the document either.
    assert "HTTPValidationError" not in document["components"]["schemas"]
    # Version references are documented with the registry's pattern (so generated ones are real).
    version = document["components"]["schemas"]["ReloadRequest"]["properties"]["version"]
    assert version["anyOf"][0]["pattern"] == "^(latest|production|v[0-9]{6,18})$"
    metrics = httpx.get(f"{service}/metrics")
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


def test_the_docs_load_nothing_from_outside_the_app(service: str) -> None:
    for page in ("/docs", "/redoc"):
        response = httpx.get(f"{service}{page}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        html = response.text
        assert "http://" not in html and "https://" not in html and "//cdn" not in html
        assets = re.findall(r"""(?:src|href|spec-url)="([^"]+)"|url: '([^']+)'""", html)
        urls = {first or second for first, second in assets}
        assert "/openapi.json" in urls and len(urls) >= 3, urls
        for url in urls:
            assert url.startswith("/"), url
            asset = httpx.get(f"{service}{url}")
            assert asset.status_code == 200 and asset.content, url
    assert '"validatorUrl": null' in httpx.get(f"{service}/docs").text


READ_ONLY = ["/docs", "/redoc", "/openapi.json", "/metrics", "/v1/model"]


def test_protected_read_endpoints_need_the_key(registry: Path, service: str) -> None:
    for path in READ_ONLY:  # not protected (the default): open to anyone
        assert httpx.get(f"{service}{path}").status_code == 200, path
    protected = frozenset({"docs", "metrics", "model"})
    with running_service(config_for(registry, protected=protected)) as url:
        for path in READ_ONLY:
            refused = httpx.get(f"{url}{path}")
            assert refused.status_code == 401, (path, refused.text)
            assert "API key" in refused.json()["detail"]
            wrong = httpx.get(f"{url}{path}", headers={"X-API-Key": "wrong"})
            assert wrong.status_code == 401, path
            by_header = httpx.get(f"{url}{path}", headers={"X-API-Key": API_KEY})
            assert by_header.status_code == 200, (path, by_header.text)
            by_bearer = httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {API_KEY}"})
            assert by_bearer.status_code == 200, (path, by_bearer.text)
        # Liveness, readiness and recommendations stay open.
        for path in ("/healthz", "/readyz", "/v1/users/5/recommendations"):
            assert httpx.get(f"{url}{path}").status_code == 200, path
