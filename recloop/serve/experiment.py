"""Serving an experiment: one model per arm, each user's lists from their arm, exposures logged.

``recloop serve --experiment FILE`` (with ``--event-log``) loads every arm's version before the
port is bound (a ref that names nothing is one error line, exit 2, and nothing is served). The
control arm's holder is the service's own (``Service.holder``: /v1/model, POST
/v1/recommendations and similar items use it); every other arm has its own
:class:`~recloop.serve.holder.ModelHolder` on its ref, followed like the service's with
``--follow``, so a promotion or a learner's delta reaches the arm that serves that ref.

``GET /v1/users/{id}/recommendations`` answers from the user's arm (the stable hash of
:meth:`recloop.experiments.Experiment.assign`: every replica agrees) and names the arm and its
version in the body. Each answer (from the cache too) is an **exposure**: appended to the
exposure log beside the event log in batches (every ``FLUSH_SECONDS`` and at shutdown) for
``recloop experiment report``, and opened in this replica's :class:`OutcomeTracker`, which the
shared event log's tail settles, whichever replica received the user's next events. The
tracker's outcomes are the per-arm counters of ``/metrics``: each replica counts the lists it
served, so Prometheus ``sum by (arm)`` over replicas is the fleet's total. A restart forgets
open windows (the counters are for watching; the report, from the logs, is the measurement).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from recloop.errors import RecloopError, RegistryError
from recloop.events.base import EventLog
from recloop.events.exposures import Exposure, ExposureLog, open_exposure_log
from recloop.experiments.config import Arm, Experiment, arm_version, resolve_arms
from recloop.experiments.outcomes import Outcome, OutcomeTracker
from recloop.registry import Registry
from recloop.serve.bundle import LoadOptions, ModelBundle
from recloop.serve.holder import ModelHolder
from recloop.serve.metrics import ServiceMetrics
from recloop.serve.state.sync import every

log = logging.getLogger("recloop.serve")

FLUSH_SECONDS = 1.0  # exposures are appended to their log this often
TAIL_BATCH = 10_000  # events read per tail step


class ExperimentMetrics:
    """Per-arm counters of the lists this replica served and their settled outcomes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["experiment", "arm"]
        self.exposures = Counter(
            "recloop_experiment_exposures", "lists served, by arm", labels, registry=registry
        )
        self.settled = Counter(
            "recloop_experiment_settled",
            "served lists whose outcome window closed, by arm",
            labels,
            registry=registry,
        )
        self.hits = Counter(
            "recloop_experiment_hits",
            "settled lists the user's next events hit (hit@k), by arm",
            labels,
            registry=registry,
        )
        self.ndcg = Counter(
            "recloop_experiment_ndcg",
            "sum of NDCG@k of the first hit over settled lists, by arm",
            labels,
            registry=registry,
        )
        self.pending = Gauge(
            "recloop_experiment_pending",
            "served lists whose outcome window is still open on this replica",
            ["experiment"],
            registry=registry,
        )


class ArmHolder(ModelHolder):
    """A holder that follows an arm: its ref's version, or with a ``learner`` the newest
    version that learner published from it (:func:`recloop.experiments.config.arm_version`)."""

    def __init__(self, registry: Registry, options: LoadOptions, arm: Arm) -> None:
        super().__init__(registry, options, arm.ref)
        self.arm = arm

    def load(self, ref: str | None = None) -> tuple[ModelBundle, str | None]:
        return super().load(arm_version(self.registry, self.arm) if ref is None else ref)

    def follow_target(self) -> str | None:
        try:
            return arm_version(self.registry, self.arm)
        except RegistryError:
            return None


def service_holder(
    experiment: Experiment | None, registry: Registry, load: LoadOptions, ref: str
) -> ModelHolder:
    """The service's holder: the control arm's under an experiment, else one on ``ref``."""
    if experiment is None:
        return ModelHolder(registry, load, ref)
    return ArmHolder(registry, load, experiment.arm(experiment.control))


@dataclass(frozen=True)
class ArmModel:
    arm: Arm
    holder: ModelHolder
    arms: ExperimentArms

    def exposed(self, version: str, user_id: str, body: bytes) -> bytes:
        """Records ``body``, a list this arm served to ``user_id``; returns it."""
        self.arms.exposed(self, version, user_id, body)
        return body

    @property
    def bundle(self) -> ModelBundle:
        bundle = self.holder.current
        if bundle is None:
            raise RecloopError(f"arm {self.arm.name!r}: no model loaded")
        return bundle


class ExperimentArms:
    """The arms' models, the exposure log and this replica's outcome tracker."""

    def __init__(
        self,
        experiment: Experiment,
        registry: Registry,
        load: LoadOptions,
        control: ModelHolder,
        event_log: EventLog,
        metrics: CollectorRegistry,
    ) -> None:
        resolve_arms(registry, experiment)  # every ref names a version, before anything loads
        self.experiment = experiment
        self.models = {
            arm.name: ArmModel(
                arm,
                control if arm.name == experiment.control else ArmHolder(registry, load, arm),
                self,
            )
            for arm in experiment.arms
        }
        self.event_log = event_log
        self.metrics = ExperimentMetrics(metrics)
        self.tracker = OutcomeTracker(experiment, self._settled)
        self.exposure_log: ExposureLog = open_exposure_log(event_log)
        self._buffer: list[Exposure] = []
        self._cursor = event_log.last_offset()  # outcomes of lists served from now on
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recloop-exp")

    def preload(self) -> None:
        """Loads every arm but the control (the service loads that one), blocking."""
        for name, model in self.models.items():
            if name != self.experiment.control:
                model.holder.load(None)

    def model_for(self, user_id: str) -> ArmModel:
        return self.models[self.experiment.assign(user_id).name]

    def exposed(self, model: ArmModel, version: str, user_id: str, body: bytes) -> None:
        """Records a served list (on the event loop: the window opens before any later event
        can be read); the log append happens in the next flush."""
        items = tuple(str(entry["item_id"]) for entry in json.loads(body)["items"])
        exposure = Exposure(
            self.experiment.name, model.arm.name, version, user_id, items, time.time()
        )
        self._buffer.append(exposure)
        self.tracker.served(exposure)
        self.metrics.exposures.labels(self.experiment.name, model.arm.name).inc()

    def _settled(self, outcome: Outcome) -> None:
        labels = (self.experiment.name, outcome.arm)
        self.metrics.settled.labels(*labels).inc()
        if outcome.hit:
            self.metrics.hits.labels(*labels).inc()
            self.metrics.ndcg.labels(*labels).inc(outcome.ndcg)

    # ------------------------------------------------------------------ background work

    async def flush(self) -> None:
        """Appends the buffered exposures to the exposure log (off the event loop). A failed
        append is logged and those exposures are dropped (they are measurement only)."""
        batch, self._buffer = self._buffer, []
        if not batch:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self.exposure_log.append, batch
            )
        except RecloopError as exc:
            log.error("experiment: %d exposures not logged: %s", len(batch), exc)

    async def tail(self) -> None:
        """Feeds the event log's new events to the tracker, then closes expired windows."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await loop.run_in_executor(
                self._executor, self.event_log.read, self._cursor, TAIL_BATCH
            )
            if not batch:
                break
            self.tracker.observe(logged.event for logged in batch)
            self._cursor = batch[-1].offset
        self.tracker.expire(time.time())
        self.metrics.pending.labels(self.experiment.name).set(self.tracker.pending)

    async def follow(self, grace_seconds: float) -> None:
        """Moves every arm but the control (the service follows that one) to its ref's
        version; a version that fails to load leaves the arm on its old one."""
        loop = asyncio.get_running_loop()
        for name, model in self.models.items():
            target = model.holder.follow_target()
            current = model.holder.current
            if name == self.experiment.control or target is None:
                continue
            if current is not None and current.version == target:
                continue
            try:
                await loop.run_in_executor(None, model.holder.load, target)
            except RecloopError as exc:
                log.error("experiment arm %s: not swapping to %s: %s", name, target, exc)
                continue
            if current is not None and current.needs_close:
                loop.call_later(grace_seconds, current.close)

    def start(
        self, tail_seconds: float, follow_seconds: float | None, grace_seconds: float
    ) -> list[asyncio.Task[None]]:
        """The background tasks: flush exposures, tail the event log, follow the arms' refs."""
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(every(FLUSH_SECONDS, self.flush)),
            loop.create_task(every(tail_seconds, self.tail)),
        ]
        if follow_seconds:
            follow = functools.partial(self.follow, grace_seconds)
            tasks.append(loop.create_task(every(follow_seconds, follow)))
        return tasks

    async def stop(self) -> None:
        await self.flush()
        self._executor.shutdown(wait=True)
        self.exposure_log.close()
        for name, model in self.models.items():
            if name != self.experiment.control and model.holder.current is not None:
                model.holder.current.close()

    def describe(self) -> dict[str, Any]:
        """The experiment as /v1/model shows it."""
        return {
            "name": self.experiment.name,
            "control": self.experiment.control,
            "k": self.experiment.k,
            "arms": [
                {
                    "name": model.arm.name,
                    "ref": model.arm.ref,
                    "share": model.arm.share,
                    "model_version": model.holder.current.version
                    if model.holder.current is not None
                    else None,
                }
                for model in self.models.values()
            ],
        }


def with_arm(body: bytes, arm: str) -> bytes:
    """A recommendations body with ``"arm"`` right after its leading ``{"cached":false,``."""
    prefix = b'{"cached":false,'
    return prefix + f'"arm":{json.dumps(arm)},'.encode() + body[len(prefix) :]


def open_arms(
    experiment: Experiment | None,
    control: ModelHolder,
    event_log: EventLog | None,
    metrics: ServiceMetrics,
) -> ExperimentArms | None:
    """The experiment's arms when the service runs one (every ref checked), else None; the
    other arms load with the control's registry and options."""
    if experiment is None:
        return None
    if event_log is None:  # ServiceConfig refuses this; kept for the type checker
        raise RecloopError("experiment: --experiment needs --event-log")
    return ExperimentArms(
        experiment, control.registry, control.options, control, event_log, metrics.registry
    )
