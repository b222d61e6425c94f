"""The service behind the HTTP app: model holder, batcher, user state, event log, metrics.

Request path for ``GET /v1/users/{id}/recommendations``: result cache (per user, keyed by model
version, k and exclude_seen) -> the user's events since training, from the state store ->
:class:`recloop.serve.recommender.Recommender` (sequence, fallback, micro-batched encode +
top-k, JSON). ``recloop.serve.app`` maps it to HTTP; nothing here knows about routes.

Durability: with an event log, ``POST /v1/events`` is acknowledged only after the append is
durable, and in-process user state is a fold of that log (:mod:`recloop.serve.state.sync`),
rebuilt at start from the last snapshot and the log's tail, so a replica killed at any moment
restarts with every event it acknowledged. Without an event log, events change the in-process
state only (the answer says ``durable: false``) and a crash loses those since the last snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import zlib
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recloop.errors import ConfigError, RecloopError
from recloop.registry import Registry
from recloop.serve.batcher import MicroBatcher
from recloop.serve.bundle import LoadOptions, ModelBundle
from recloop.serve.experiment import open_arms, service_holder, with_arm
from recloop.serve.metrics import ServiceMetrics
from recloop.serve.recommender import Recommender, as_cache_hit
from recloop.serve.state.base import StateStore
from recloop.serve.state.factory import open_state_store
from recloop.serve.state.memory import MemoryStateStore
from recloop.serve.state.redis import RedisStateStore
from recloop.serve.state.sync import LoggedState, every

if TYPE_CHECKING:
    from recloop.events import Event, EventLog
    from recloop.experiments import Experiment
    from recloop.serve.experiment import ExperimentArms

log = logging.getLogger("recloop.serve")

INDEX_PROBE_SECONDS = 1.0  # how often an unavailable item index is asked again

# Endpoints that answer without the API key unless the service is told otherwise.
PROTECTABLE = frozenset({"docs", "metrics", "model"})


class Unavailable(Exception):
    """The service cannot answer this request now (503 with Retry-After): no model loaded yet,
    user state still being rebuilt, or the event log down."""

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class BadEvents(Exception):
    """A batch of events the event log refuses (422): nothing was stored."""


@dataclass(frozen=True)
class Ingested:
    """What POST /v1/events took: the log's event ids (none without a log), whether they are
    durable, and the item ids the served version does not know (sorted, unique)."""

    event_ids: list[str]
    durable: bool
    unknown_items: list[str]


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
    snapshot_seconds: float = 30.0  # memory state: write the snapshot this often (if changed)
    tail_seconds: float = 1.0  # memory state + event log: apply other writers' events this often
    # Read-only endpoints that need the API key too (a subset of PROTECTABLE).
    protected: frozenset[str] = frozenset()
    # Users split between arms (recloop.serve.experiment); ref is then the control arm's.
    experiment: Experiment | None = None

    def __post_init__(self) -> None:
        def number(value: object) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)

        unknown = sorted(set(self.protected) - PROTECTABLE)
        if unknown:
            raise ConfigError(
                f"protected: unknown endpoint group(s) {', '.join(unknown)}; "
                f"expected some of {', '.join(sorted(PROTECTABLE))}"
            )
        if self.protected and self.api_key is None:
            raise ConfigError(
                f"protected: {', '.join(sorted(self.protected))} need an API key, but none is "
                f"set (RECLOOP_API_KEY)"
            )
        if not isinstance(self.load, LoadOptions):
            raise ConfigError(f"load must be LoadOptions, got {type(self.load).__name__}")
        if not isinstance(self.ref, str) or not self.ref:
            raise ConfigError(f"ref (--version) must be a version reference, got {self.ref!r}")
        for name in ("state_url", "event_log", "api_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name} must be a non-empty string or unset, got {value!r}")
        if not isinstance(self.cache, bool):
            raise ConfigError(f"cache must be true or false, got {self.cache!r}")
        # --follow keeps the message `recloop serve` always gave.
        if self.follow_seconds is not None and not (
            number(self.follow_seconds) and self.follow_seconds > 0
        ):
            raise ConfigError(f"--follow must be > 0 seconds, got {self.follow_seconds}")
        for name in ("snapshot_seconds", "tail_seconds", "cache_ttl"):
            value = getattr(self, name)
            if not (number(value) and value > 0):
                raise ConfigError(f"{name} must be > 0 seconds, got {value!r}")
        if not (number(self.swap_grace_seconds) and self.swap_grace_seconds >= 0):
            raise ConfigError(f"swap_grace_seconds must be >= 0, got {self.swap_grace_seconds!r}")
        for name in ("max_batch", "max_queue", "max_body_bytes", "state_max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        wait = self.max_wait_us
        if isinstance(wait, bool) or not isinstance(wait, int) or wait < 0:
            raise ConfigError(f"max_wait_us must be an integer >= 0, got {wait!r}")
        if self.experiment is not None and self.event_log is None:
            raise ConfigError(
                "experiment: --experiment needs --event-log (served lists are logged beside it, "
                "where outcomes are measured)"
            )

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
        # Under an experiment, the control arm's holder (recloop.serve.experiment).
        self.holder = service_holder(config.experiment, self.registry, config.load, ref)
        self.metrics = ServiceMetrics()
        max_batch, max_wait = config.batching()
        self.batcher = MicroBatcher(
            max_batch=max_batch,
            max_wait=max_wait,
            max_queue=config.max_queue,
            observer=self.metrics.observe_batch,
        )
        self.recommender = Recommender(self.batcher, self.metrics)
        self.state: StateStore = open_state_store(
            config.state_url,
            max_length=config.state_max_length,
            cache_ttl=config.cache_ttl,
            snapshot_path=config.state_snapshot,
        )
        if isinstance(self.state, RedisStateStore):
            self.state.check_reachable()  # before the port is bound: exit 2 naming Redis
        self.event_log: EventLog | None = None
        self.logged_state: LoggedState | None = None
        self.arms: ExperimentArms | None = None
        self._log_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recloop-log")
        self._background: set[asyncio.Task[Any]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()
        try:
            self._open_state()
            self.arms = open_arms(config.experiment, self.holder, self.event_log, self.metrics)
        except BaseException:
            self._log_executor.shutdown(wait=False)
            if self.event_log is not None:
                self.event_log.close()
            raise

    def _open_state(self) -> None:
        """Opens the event log and loads the state snapshot, checking that they belong
        together: all before the port is bound, so a bad file is one error line at start."""
        config = self.config
        if config.event_log is not None:
            from recloop.events import open_event_log

            self.event_log = open_event_log(config.event_log)
        if not isinstance(self.state, MemoryStateStore):
            return  # Redis keeps the state itself, shared by every replica
        self.state.load_snapshot()
        if self.event_log is not None:
            self.logged_state = LoggedState(
                self.state, self.event_log, self._log_executor, tail_seconds=config.tail_seconds
            )
            self.logged_state.check_snapshot()

    def preload(self) -> ModelBundle:
        """Loads the served version (every arm's, under an experiment) now (blocking), so that
        a broken version is an error before the server binds its port rather than after it."""
        bundle, _ = self.holder.load(None)
        if self.arms is not None:
            self.arms.preload()
        return bundle

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.state.start()
        self.batcher.start()
        await self.reload(None)
        loop = asyncio.get_running_loop()
        if self.logged_state is not None:
            self.logged_state.start()
        elif self.event_log is None and isinstance(self.state, MemoryStateStore):
            log.warning(
                "no --event-log: POST /v1/events changes the in-process user state only "
                "(acknowledged with durable=false; a crash loses events since the last snapshot)"
            )
        if isinstance(self.state, MemoryStateStore) and self.state.snapshot_path is not None:
            snapshot = self.state.snapshot
            self._tasks.append(loop.create_task(every(self.config.snapshot_seconds, snapshot)))
        if self.config.follow_seconds:
            self._tasks.append(loop.create_task(self._follow()))
        self._tasks.append(loop.create_task(every(INDEX_PROBE_SECONDS, self._probe_index)))
        if self.arms is not None:
            grace = self.config.swap_grace_seconds
            self._tasks += self.arms.start(
                self.config.tail_seconds, self.config.follow_seconds, grace
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.logged_state is not None:
            await self.logged_state.close()
        for task in list(self._background):
            task.cancel()
        if self.arms is not None:
            await self.arms.stop()
        await self.batcher.stop()
        await self.state.close()  # the memory store writes its final snapshot here
        self._log_executor.shutdown(wait=True)
        if self.event_log is not None:
            self.event_log.close()
        if self.holder.current is not None:
            self.holder.current.close()

    @property
    def state_ready(self) -> bool:
        return self.logged_state is None or self.logged_state.ready

    @property
    def bundle(self) -> ModelBundle:
        bundle = self.holder.current
        if bundle is None:
            raise Unavailable("no model loaded yet")
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
        seconds = self.config.follow_seconds or 1.0
        while True:
            await asyncio.sleep(seconds)
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

    async def _probe_index(self) -> None:
        """Asks an index that failed (a Milvus server away) again, off the event loop, so that
        readiness comes back without a request having to fail first."""
        bundle = self.holder.current
        if bundle is not None and bundle.index.unavailable() is not None:
            await asyncio.get_running_loop().run_in_executor(None, bundle.index.probe)

    async def ingest(self, events: list[Event]) -> Ingested:
        """POST /v1/events: :meth:`accept_events`, counted, with the items the served version
        does not know. Unavailable (before anything is stored) while no model is loaded."""
        bundle = self.bundle
        event_ids, durable = await self.accept_events(events)
        self.metrics.events.inc(len(events))
        _, unknown = bundle.to_dense([event.item_id for event in events])
        return Ingested(event_ids, durable, sorted(set(unknown)))

    def not_ready(self) -> str | None:
        """Why this replica should get no traffic now, or None when it is ready: no model
        loaded, user state still rebuilt from the log, the shared state store (Redis) or the
        item index (a Milvus server) unreachable. A replica that is not ready still answers
        what it can (last known state); readiness tells a balancer to send users elsewhere."""
        bundle = self.holder.current
        if bundle is None:
            return "no model loaded yet"
        if not self.state_ready:
            return "user state is being rebuilt from the event log"
        if isinstance(self.state, RedisStateStore) and not self.state.connected:
            return "the state store (Redis) is unreachable"
        index_problem = bundle.index.unavailable()
        if index_problem is not None:
            return f"the item index is unavailable: {index_problem}"
        return None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the /readyz body): see :meth:`not_ready`."""
        bundle = self.holder.current
        rebuild = self.logged_state.status() if self.logged_state is not None else None
        reason = self.not_ready()
        return reason is None, {
            "ready": reason is None,
            "reason": reason,
            "model_version": bundle.version if bundle else None,
            "state": self.state.status(),
            "state_rebuild": rebuild,
            "queue": self.batcher.depth,
        }

    def render_metrics(self) -> bytes:
        """The Prometheus text, with the gauges that are read when scraped brought up to date."""
        self.metrics.queue_depth.set(self.batcher.depth)
        self.metrics.state_connected.set(1 if self.state.status().get("connected") else 0)
        data, _ = self.metrics.render()
        return data

    async def accept_events(self, events: list[Event]) -> tuple[list[str], bool]:
        """Appends a validated batch to the durable event log, when the service has one, then
        applies it to the user state; returns (event ids, durable).

        Durable first (the online learner reads the log, and the state is rebuilt from it), then
        the state: an acknowledged event is never lost, and a failed append changes nothing.
        """
        from recloop.events import EventLogError, validate_events

        try:
            validate_events(events)  # the client's problem (empty id, non-finite value): 422
        except EventLogError as exc:
            raise BadEvents(str(exc)) from None
        pairs = [(event.user_id, event.item_id) for event in events]
        event_log = self.event_log
        if event_log is None:
            await self.state.append_events(pairs)
            return [], False
        try:
            # SQLite fsyncs on commit: off the event loop, on one writer thread.
            ids = await asyncio.get_running_loop().run_in_executor(
                self._log_executor, event_log.append, events
            )
        except EventLogError as exc:
            log.error("event log append failed: %s", exc)
            raise Unavailable(f"event log unavailable, nothing was stored: {exc}") from None
        if self.logged_state is not None:
            await self.logged_state.appended([event_log.offset_of(i) for i in ids], pairs)
        else:
            await self.state.append_events(pairs)
        return ids, True

    async def recent_events(self, user_id: str) -> list[str]:
        """The user's recent items from the state store; 503 while the state is being rebuilt
        (a partly replayed state would answer without events the service acknowledged)."""
        if not self.state_ready:
            progress = self.logged_state.progress if self.logged_state is not None else None
            line = progress.line() if progress is not None else "starting"
            raise Unavailable(f"user state is being rebuilt from the event log: {line}")
        (recent,) = await self.state.get_sequences([user_id])
        return recent

    def spawn(self, coroutine: Awaitable[Any]) -> None:
        """Fire-and-forget work (cache writes) that must not delay the response."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ recommendations

    async def user_recommendations(self, user_id: str, k: int, exclude_seen: bool) -> bytes:
        """The JSON body of GET /v1/users/{user_id}/recommendations (validated arguments)."""
        arm = self.arms.model_for(user_id) if self.arms is not None else None
        bundle = arm.bundle if arm is not None else self.bundle
        recent = await self.recent_events(user_id)
        # The cache field names what the answer was computed from: model version, arguments and
        # a digest of the user's recent events. A result computed just before an event arrived
        # and written just after it is stored under the old digest and never served (the event
        # also deletes the user's cached entries); replicas agree because the digest is stable.
        field_name = f"{bundle.version}:{k}:{int(exclude_seen)}:{_digest(recent)}"
        if arm is not None:
            field_name = f"{arm.arm.name}:{field_name}"
        if self.config.cache:
            hit = await self.state.get_cached(user_id, field_name)
            if hit is not None:
                self.metrics.cache_hits.inc()
                if arm is not None:
                    arm.exposed(bundle.version, user_id, hit)
                return as_cache_hit(hit)
            self.metrics.cache_misses.inc()
        body = await self.recommender.for_user(bundle, user_id, recent, k, exclude_seen)
        if arm is not None:
            body = arm.exposed(bundle.version, user_id, with_arm(body, arm.arm.name))
        if self.config.cache:
            self.spawn(self.state.set_cached(user_id, field_name, body))
        return body


def dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _digest(recent: list[str]) -> str:
    """A short stable digest of a user's recent events ("0" when there are none)."""
    if not recent:
        return "0"
    return f"{len(recent)}-{zlib.crc32(chr(31).join(recent).encode()):08x}"
