"""Where the learner's wall time goes: seconds per phase of its loop, written with each run.

The phases are reading the log, scoring (test-then-train ranking by the online and the frozen
model), the optimizer steps, publishing (diff, files, manifest, commit, compaction) and the
plot. `RUN/timings.json` holds the last run's split, so a slow learner shows what to change.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TIMINGS_NAME = "timings.json"


class PhaseTimes:
    """Wall seconds spent in each named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def report(self, events: int, total_seconds: float) -> dict[str, Any]:
        """Per phase: seconds and share of the run; events/s over the whole run."""
        phases = {
            name: {"seconds": round(value, 3), "share": round(value / max(total_seconds, 1e-9), 4)}
            for name, value in sorted(self.seconds.items())
        }
        other = total_seconds - sum(self.seconds.values())
        phases["other"] = {
            "seconds": round(other, 3),
            "share": round(other / max(total_seconds, 1e-9), 4),
        }
        return {
            "events": events,
            "seconds": round(total_seconds, 3),
            "events_per_second": round(events / max(total_seconds, 1e-9), 1),
            "phases": phases,
        }

    def write(self, run_dir: Path, events: int, total_seconds: float) -> dict[str, Any]:
        report = self.report(events, total_seconds)
        tmp = run_dir / f".{TIMINGS_NAME}.tmp"
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(run_dir / TIMINGS_NAME)
        return report
