"""What users did next: each served list's hit@k and NDCG@k, attributed to the arm that served it.

For one exposure (a list served to a user at time t by an arm), the **window** is the user's
next events with timestamp >= t: at most ``window_events`` of them, and only those within
``window_seconds`` of t (either limit may be off; see :class:`recloop.experiments.Experiment`).
The exposure is a **hit** when one of those events is an item among the list's first k; its
**NDCG@k** is ``1 / log2(1 + rank)`` of the first such event's item (rank 1 = the top of the
list), 0 for a miss. It **settles** at the first hit, after ``window_events`` events, or once
``window_seconds`` have passed; until then it is *pending* and counts in no rate.

Two users of one rule (:class:`Window`): :func:`attribute` settles every exposure of the logs
at once (``recloop experiment report``), and :class:`OutcomeTracker` settles the exposures one
serving replica made as the shared event log's events reach it (the per-arm counters of its
``/metrics``). Both credit the arm named in the exposure, never the user's arm as assigned now,
so a changed salt or share cannot move an outcome to another arm.
"""

from __future__ import annotations

import functools
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from recloop.events.base import Event, LoggedEvent
from recloop.events.exposures import Exposure
from recloop.experiments.config import Experiment

DEFAULT_MAX_PENDING = 200_000  # exposures a tracker keeps open (the oldest users' are dropped)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A settled exposure."""

    arm: str
    version: str
    rank: int | None  # 1-based position of the first hit among the first k items; None: miss

    @property
    def hit(self) -> bool:
        return self.rank is not None

    @property
    def ndcg(self) -> float:
        return 0.0 if self.rank is None else 1.0 / math.log2(1 + self.rank)


@dataclass
class ArmTotals:
    """Running totals of one arm's settled exposures (what the statistics are made of)."""

    exposures: int = 0
    hits: int = 0
    ndcg_sum: float = 0.0
    ndcg_sq_sum: float = 0.0
    pending: int = 0  # exposures whose window is still open (not in the rates)
    # Users as clusters (the report knows them; live counters do not: users stays 0). Sums
    # over users u of n_u^2, h_u^2, h_u n_u, g_u^2, g_u n_u, where n_u, h_u, g_u are user u's
    # settled exposures, hits and NDCG sum: the delta-method variance of a ratio of cluster
    # sums (recloop.experiments.stats), since one user's lists are not independent.
    users: int = 0
    user_n_sq: float = 0.0
    user_hit_sq: float = 0.0
    user_hit_n: float = 0.0
    user_ndcg_sq: float = 0.0
    user_ndcg_n: float = 0.0

    def add(self, outcome: Outcome) -> None:
        self.exposures += 1
        self.hits += int(outcome.hit)
        self.ndcg_sum += outcome.ndcg
        self.ndcg_sq_sum += outcome.ndcg**2

    def add_user(self, exposures: int, hits: int, ndcg: float) -> None:
        """One user's settled exposures, hits and NDCG sum (also counted by :meth:`add`)."""
        self.users += 1
        self.user_n_sq += exposures * exposures
        self.user_hit_sq += hits * hits
        self.user_hit_n += hits * exposures
        self.user_ndcg_sq += ndcg * ndcg
        self.user_ndcg_n += ndcg * exposures

    def to_json(self) -> dict[str, float | int]:
        return {
            "exposures": self.exposures,
            "hits": self.hits,
            "ndcg_sum": self.ndcg_sum,
            "ndcg_sq_sum": self.ndcg_sq_sum,
            "pending": self.pending,
            "users": self.users,
        }


@dataclass
class Window:
    """One exposure's window, fed the user's later events in time order."""

    exposure: Exposure
    k: int
    max_events: int | None
    deadline: float  # the exposure's time + window_seconds (inf: no time limit)
    seen: int = 0
    positions: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open(cls, experiment: Experiment, exposure: Exposure) -> Window:
        seconds = experiment.window_seconds
        deadline = math.inf if seconds is None else exposure.timestamp + seconds
        positions: dict[str, int] = {}
        for rank, item in enumerate(exposure.items[: experiment.k], start=1):
            positions.setdefault(item, rank)
        return cls(exposure, experiment.k, experiment.window_events, deadline, 0, positions)

    def observe(self, event: Event) -> Outcome | None:
        """The outcome, when this event settles the exposure; None otherwise (also for an
        event from before the exposure, which is not in its window)."""
        if event.timestamp < self.exposure.timestamp:
            return None
        if event.timestamp > self.deadline:
            return self._settle(None)
        self.seen += 1
        rank = self.positions.get(event.item_id)
        if rank is not None:
            return self._settle(rank)
        if self.max_events is not None and self.seen >= self.max_events:
            return self._settle(None)
        return None

    def expire(self, now: float) -> Outcome | None:
        """A miss once the time window has passed; None while it is open."""
        return self._settle(None) if now > self.deadline else None

    def _settle(self, rank: int | None) -> Outcome:
        return Outcome(self.exposure.arm, self.exposure.version, rank)


def attribute(
    experiment: Experiment, exposures: Iterable[Exposure], events: Iterable[LoggedEvent], now: float
) -> dict[str, ArmTotals]:
    """Per-arm totals of the experiment's exposures against the event log, as of ``now``.

    Exposures of other experiments (an old one in the same log) and of arms the file no longer
    names are skipped: the report is about this experiment.
    """
    by_user: dict[str, list[tuple[float, int, Event]]] = {}
    for logged in events:
        event = logged.event
        by_user.setdefault(event.user_id, []).append((event.timestamp, logged.offset, event))
    for timeline in by_user.values():
        timeline.sort(key=lambda entry: (entry[0], entry[1]))
    totals = {name: ArmTotals() for name in experiment.arm_names}
    clusters: dict[tuple[str, str], list[float]] = {}  # (arm, user) -> [exposures, hits, ndcg]
    for exposure in exposures:
        if exposure.experiment != experiment.name or exposure.arm not in totals:
            continue
        outcome = _settle(experiment, exposure, by_user.get(exposure.user_id, []), now)
        if outcome is None:
            totals[exposure.arm].pending += 1
            continue
        totals[exposure.arm].add(outcome)
        cluster = clusters.setdefault((exposure.arm, exposure.user_id), [0, 0, 0.0])
        cluster[0] += 1
        cluster[1] += int(outcome.hit)
        cluster[2] += outcome.ndcg
    for (arm, _), (count, hits, ndcg) in clusters.items():
        totals[arm].add_user(int(count), int(hits), ndcg)
    return totals


def _settle(
    experiment: Experiment,
    exposure: Exposure,
    timeline: Sequence[tuple[float, int, Event]],
    now: float,
) -> Outcome | None:
    window = Window.open(experiment, exposure)
    start = bisect_left(timeline, exposure.timestamp, key=lambda entry: entry[0])
    for _, _, event in timeline[start:]:
        outcome = window.observe(event)
        if outcome is not None:
            return outcome
    return window.expire(now)


def _observe(event: Event, window: Window) -> Outcome | None:
    return window.observe(event)


class OutcomeTracker:
    """Settles the exposures one replica served, from the events it reads afterwards.

    ``served`` opens a window; ``observe`` feeds events (in log order, from the shared event
    log, so a user's next event counts whichever replica received it); ``expire`` closes the
    windows whose time has passed. Each settled exposure goes to ``on_outcome``. At most
    ``max_pending`` windows stay open: beyond that the oldest users' windows are dropped
    (counted in ``dropped``, never as misses).
    """

    def __init__(
        self,
        experiment: Experiment,
        on_outcome: Callable[[Outcome], None],
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self.experiment = experiment
        self.on_outcome = on_outcome
        self.max_pending = max_pending
        self.windows: dict[str, list[Window]] = {}  # user -> open windows, oldest first
        self.pending = 0
        self.dropped = 0

    def served(self, exposure: Exposure) -> None:
        self.windows.setdefault(exposure.user_id, []).append(Window.open(self.experiment, exposure))
        self.pending += 1
        while self.pending > self.max_pending:
            user = next(iter(self.windows))  # the user whose windows were opened first
            dropped = self.windows.pop(user)
            self.pending -= len(dropped)
            self.dropped += len(dropped)

    def observe(self, events: Iterable[Event]) -> None:
        for event in events:
            open_windows = self.windows.get(event.user_id)
            if open_windows:
                self._update(event.user_id, open_windows, functools.partial(_observe, event))

    def expire(self, now: float) -> None:
        for user, open_windows in list(self.windows.items()):
            self._update(user, open_windows, lambda w: w.expire(now))

    def _update(
        self, user: str, open_windows: list[Window], step: Callable[[Window], Outcome | None]
    ) -> None:
        still_open = []
        for window in open_windows:
            outcome = step(window)
            if outcome is None:
                still_open.append(window)
            else:
                self.pending -= 1
                self.on_outcome(outcome)
        if still_open:
            self.windows[user] = still_open
        else:
            del self.windows[user]
