"""Test helpers for the state store: run a scenario against a started store, look at what is
really in Redis, and pick the store's own log records."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from recloop.serve.state.base import LOGGER_NAME, StateStore

__all__ = ["Scenario", "redis_call", "run", "state_records"]

Scenario = Callable[[StateStore], Awaitable[None]]


def run(store: StateStore, scenario: Scenario) -> None:
    """Start the store, run the scenario, close the store (even on failure)."""

    async def main() -> None:
        await store.start()
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(main())


async def redis_call(url: str, command: str, *args: Any) -> Any:
    """One command through a separate client: what is really in Redis."""
    client = Redis.from_url(url)
    try:
        # execute_command is untyped in redis-py; the typed commands do not take a name.
        return await client.execute_command(command, *args)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


def state_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER_NAME and r.levelno == level]
