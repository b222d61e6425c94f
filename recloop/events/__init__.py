"""The durable event log: serving and ``recloop ingest`` append, online learners read.

It sits below both ``recloop.serve`` and ``recloop.online``: they talk to each other through it
(and the registry), never by importing one another. ``base`` is the interface (events, offsets,
validation), ``sqlite`` the embedded default, ``redis_streams`` the Redis Streams backend
(imported on demand, so the default never needs the Redis client), ``factory`` opens a log by
location and ``files`` reads events from JSON-lines / CSV files.
"""

from recloop.events.base import (
    DEFAULT_EVENT_TYPE,
    EVENT_FIELDS,
    Event,
    EventLog,
    EventLogError,
    LoggedEvent,
    event_problem,
    resume_offset,
    validate_events,
)
from recloop.events.factory import open_event_log
from recloop.events.files import FILE_BATCH_SIZE, read_events_file
from recloop.events.sqlite import SqliteEventLog

__all__ = [
    "DEFAULT_EVENT_TYPE",
    "EVENT_FIELDS",
    "FILE_BATCH_SIZE",
    "Event",
    "EventLog",
    "EventLogError",
    "LoggedEvent",
    "SqliteEventLog",
    "event_problem",
    "open_event_log",
    "read_events_file",
    "resume_offset",
    "validate_events",
]
