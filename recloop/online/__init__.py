"""Online learning: the durable event log that serving appends to and learners consume.

Only stdlib modules are imported here; the Redis backend (``recloop.online.events_redis``) is
imported on demand by :func:`recloop.online.events.open_event_log`.
"""

from recloop.online.events import (
    Event,
    EventLog,
    EventLogError,
    LoggedEvent,
    SqliteEventLog,
    open_event_log,
    read_events_file,
    resume_offset,
)

__all__ = [
    "Event",
    "EventLog",
    "EventLogError",
    "LoggedEvent",
    "SqliteEventLog",
    "open_event_log",
    "read_events_file",
    "resume_offset",
]
