"""Raw user and item ids as every layer accepts them (HTTP, event files, the event log)."""

from __future__ import annotations

MAX_ID_BYTES = 512  # a raw user or item id, UTF-8 encoded (UUIDs, SKUs, URLs fit)


def raw_id_problem(value: str) -> str | None:
    """What is wrong with a raw id, or None: it must be non-blank, free of control characters
    (a line break in an id is a bug upstream, and no URL path can carry it), valid UTF-8 (no
    lone surrogates, which JSON can carry but no store can write) and at most MAX_ID_BYTES
    bytes."""
    if not value.strip():
        return "is empty"
    if not value.isprintable() and any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "holds a control character"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8 (it holds a lone surrogate)"
    if size > MAX_ID_BYTES:
        return f"is {size} bytes long, the limit is {MAX_ID_BYTES} bytes of UTF-8"
    return None
