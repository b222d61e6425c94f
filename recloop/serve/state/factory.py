"""open_state_store: the state store for a URL, its options checked."""

from __future__ import annotations

from typing import Any

from recloop.errors import ServingError
from recloop.serve.state.base import StateStore
from recloop.serve.state.memory import MemoryStateStore

_MEMORY_OPTIONS = frozenset({"max_length", "cache_ttl", "cache_max_entries", "snapshot_path"})
_REDIS_OPTIONS = frozenset(
    {
        "max_length",
        "cache_ttl",
        "prefix",
        "pool_size",
        "socket_timeout",
        "connect_timeout",
        "mirror_max_users",
        "max_pending",
        "backoff_initial",
        "backoff_max",
    }
)
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_state_store(url: str | None, **options: Any) -> StateStore:
    """A store for ``url``: None or "memory" -> in-process; "redis://..." -> Redis.

    ``options`` are the backend's constructor keywords. ``snapshot_path`` only applies to the
    memory backend; None is accepted (and ignored) for Redis so callers can pass it always.
    """
    if url is None or url == "memory":
        _check_options("memory", options, _MEMORY_OPTIONS)
        return MemoryStateStore(**options)
    if not isinstance(url, str) or not url.startswith(_REDIS_SCHEMES):
        raise ServingError(
            f"state store url {url!r}: expected 'memory' or a redis://, rediss:// or unix:// URL"
        )
    if options.pop("snapshot_path", None) is not None:
        raise ServingError(
            "state store: snapshot_path only applies to the memory backend (Redis persists itself)"
        )
    _check_options("redis", options, _REDIS_OPTIONS)
    # Imported here: the memory backend should not need the Redis client at all.
    from recloop.serve.state.redis import RedisStateStore

    return RedisStateStore(url, **options)


def _check_options(backend: str, options: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ServingError(
            f"state store ({backend}): unknown option(s) {', '.join(unknown)}; "
            f"expected some of {', '.join(sorted(allowed))}"
        )
