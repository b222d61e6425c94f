"""Online learning under an experiment: which events an arm's learner learns from.

``recloop online --experiment FILE --arm NAME --learn-from all|own``:

* ``all``: the arm's learner reads every event, whichever arm's list the user saw. More data,
  faster learning; but the arms no longer differ only in their model: a control that learns
  from the treatment's users learns from behaviour the treatment caused (Monolith's point: it
  is not a clean control), and the measured difference shrinks toward 0.
* ``own``: the learner reads only the events of users assigned to its arm
  (:class:`ArmEvents`), so each arm is a closed loop: model -> its users' behaviour -> model.
  The comparison is clean, at the price of each learner seeing only its share of the traffic.

See docs/experiments.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from recloop.events.base import Event, EventLog, LoggedEvent
from recloop.experiments.config import Experiment

LEARN_FROM = ("all", "own")


class ArmEvents(EventLog):
    """The events of one arm's users, as an event log view over the whole log.

    Offsets are the underlying log's: ``read(after, limit)`` skips other arms' events and
    returns up to ``limit`` of this arm's, reading on past batches with none of them, so an
    empty answer still means the log is exhausted. Everything else is the underlying log's.
    """

    def __init__(self, events: EventLog, experiment: Experiment, arm: str) -> None:
        experiment.arm(arm)  # ConfigError naming the arms when there is no such arm
        self.events = events
        self.experiment = experiment
        self.arm = arm
        self.backend = events.backend

    def mine(self, event: Event) -> bool:
        return self.experiment.assign(event.user_id).name == self.arm

    def read(self, after: int, limit: int) -> list[LoggedEvent]:
        while True:
            batch = self.events.read(after, limit)
            if not batch:
                return []
            kept = [logged for logged in batch if self.mine(logged.event)]
            if kept:
                return kept
            after = batch[-1].offset

    def append(self, events: Sequence[Event]) -> list[str]:
        return self.events.append(events)

    def offset_of(self, event_id: str) -> int:
        return self.events.offset_of(event_id)

    def committed(self, consumer: str) -> int:
        return self.events.committed(consumer)

    def commit(self, consumer: str, offset: int) -> None:
        self.events.commit(consumer, offset)

    def last_offset(self) -> int:
        return self.events.last_offset()

    def count(self) -> int:
        return self.events.count()

    def close(self) -> None:
        self.events.close()


def learner_events(events: EventLog, experiment: Experiment, arm: str, learn_from: str) -> EventLog:
    """The log an arm's learner reads: all of it, or only its own users' events."""
    experiment.arm(arm)
    if learn_from == "all":
        return events
    if learn_from == "own":
        return ArmEvents(events, experiment, arm)
    from recloop.errors import ConfigError

    raise ConfigError(f"--learn-from must be one of {', '.join(LEARN_FROM)}, got {learn_from!r}")
