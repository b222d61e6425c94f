"""The one validation of the service's inputs, shared by the FastAPI routes and the fast path.

Every check here is a plain function that returns the parsed value or raises ``ValueError``
with a message that names the problem. The FastAPI routes use them as pydantic validators (so
a refusal is a 422 that names the field) and the fast path of
``GET /v1/users/{id}/recommendations`` calls the same functions, declining (handing the request
to FastAPI) on anything they refuse: the two paths cannot disagree on what is valid.
"""

from __future__ import annotations

import hmac
import re
from typing import Annotated
from urllib.parse import parse_qsl

from pydantic import AfterValidator, Field

from recloop.ids import raw_id_problem

MAX_K = 1000  # largest k a request may ask for
DEFAULT_K = 10
MAX_VERSION_REF = 32
# A version reference as the registry spells it, checked before the registry touches the
# filesystem: an id (v + 6..18 ASCII digits) or an alias.
VERSION_REF = re.compile(r"(latest|production|v[0-9]{6,18})", re.ASCII)

BOOLS = {
    **dict.fromkeys(("true", "1", "yes", "on", "t", "y"), True),
    **dict.fromkeys(("false", "0", "no", "off", "f", "n"), False),
}


def check_raw_id(value: str) -> str:
    """A raw id as it travels on the wire (see :func:`recloop.ids.raw_id_problem`)."""
    problem = raw_id_problem(value)
    if problem is not None:
        raise ValueError(f"id {problem}")
    return value


def raw_id_from_json(value: str | int) -> str:
    """Ids are strings; numbers are accepted and converted, so 42 and "42" are the same item."""
    if isinstance(value, bool):
        raise ValueError("id must be a string or an integer, not a boolean")
    return check_raw_id(str(value))


def check_version_ref(value: str) -> str:
    if not VERSION_REF.fullmatch(value):
        raise ValueError(
            f"not a version reference: expected 'latest', 'production' or an id like 'v000001' "
            f"(got {value[:40]!r}{'...' if len(value) > 40 else ''})"
        )
    return value


RawId = Annotated[str, AfterValidator(check_raw_id)]
WireId = Annotated[str | int, AfterValidator(raw_id_from_json)]
VersionRef = Annotated[
    str,
    # The pattern is for the OpenAPI document (clients, schemathesis); check_version_ref is the
    # check, with a message that says what a reference looks like.
    Field(max_length=MAX_VERSION_REF, json_schema_extra={"pattern": f"^{VERSION_REF.pattern}$"}),
    AfterValidator(check_version_ref),
]


def fast_arguments(query_string: bytes) -> tuple[int, bool] | None:
    """(k, exclude_seen) when the query string is plainly valid; None hands it to FastAPI.

    Accepts a subset of what FastAPI accepts, parsed to the same values: k as ASCII digits in
    1..MAX_K, exclude_seen as one of pydantic's boolean words, each at most once. Anything
    else (a repeated name, a non-ASCII digit, a sign, spaces) goes to FastAPI, which either
    parses it the same way or answers 422.
    """
    k, exclude = DEFAULT_K, True
    if not query_string:
        return k, exclude
    seen: set[str] = set()
    try:
        pairs = parse_qsl(query_string.decode("ascii"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None
    for name, value in pairs:
        if name in seen:
            return None
        seen.add(name)
        if name == "k":
            if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_K:
                return None
            k = int(value)
        elif name == "exclude_seen":
            parsed = BOOLS.get(value.lower()) if value.isascii() else None
            if parsed is None:
                return None
            exclude = parsed
    return k, exclude


def key_matches(given: str | None, expected: str) -> bool:
    """Whether a header carries the API key, compared in constant time. Header values arrive
    decoded as latin-1, so any byte string compares (a malformed key is just a wrong key)."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("latin-1", "replace"), expected.encode("utf-8"))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (how Prometheus sends one)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None
