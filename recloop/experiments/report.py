"""``recloop experiment report``: the exposure and event logs -> per-arm table, JSON and plot."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recloop.events.base import EventLog, LoggedEvent
from recloop.events.exposures import open_exposure_log
from recloop.experiments.config import Experiment
from recloop.experiments.outcomes import attribute
from recloop.experiments.stats import summarize

READ_BATCH = 10_000


def _all_events(log: EventLog) -> Iterator[LoggedEvent]:
    after = 0
    while batch := log.read(after, READ_BATCH):
        yield from batch
        after = batch[-1].offset


def experiment_report(
    experiment: Experiment, event_log: EventLog, now: float | None = None
) -> dict[str, Any]:
    """The summary (see :func:`recloop.experiments.stats.summarize`) of every exposure in the
    log beside ``event_log``, settled against all of its events as of ``now``."""
    with open_exposure_log(event_log) as exposures:
        served = exposures.read_all()
    now = time.time() if now is None else now
    totals = attribute(experiment, served, _all_events(event_log), now)
    report = summarize(experiment, totals)
    report["as_of"] = now
    return report


def _interval(estimate: dict[str, float]) -> str:
    return f"{estimate['value']:.4f} [{estimate['low']:.4f}, {estimate['high']:.4f}]"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per arm: arm, ref, users, exposures, pending, hit@k, NDCG@k, and the differences."""
    rows = []
    for name, arm in report["arms"].items():
        diff = arm.get("vs_control")
        rows.append(
            [
                name,
                arm["ref"],
                f"{arm['users']:,}",
                f"{arm['exposures']:,}",
                f"{arm['pending']:,}",
                _interval(arm["hit"]),
                _interval(arm["ndcg"]),
                "control" if diff is None else _difference(diff["hit"]),
                "control" if diff is None else _difference(diff["ndcg"]),
            ]
        )
    return rows


def _difference(estimate: dict[str, Any]) -> str:
    mark = " *" if estimate["significant"] else ""
    return f"{estimate['value']:+.4f} [{estimate['low']:+.4f}, {estimate['high']:+.4f}]{mark}"


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def plot_report(report: dict[str, Any], path: Path) -> None:
    """hit@k and NDCG@k of each arm with 95% interval error bars, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["arms"])
    k = report["k"]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for axis, metric, label in zip(axes, ("hit", "ndcg"), (f"hit@{k}", f"NDCG@{k}"), strict=True):
        values = [report["arms"][n][metric] for n in names]
        centre = [v["value"] for v in values]
        errors = [
            [v["value"] - v["low"] for v in values],
            [v["high"] - v["value"] for v in values],
        ]
        axis.bar(names, centre, yerr=errors, capsize=6, color="#4c72b0")
        axis.set_title(f"{label} (95% CI)")
        for position, name in enumerate(names):
            count = report["arms"][name]["exposures"]
            axis.annotate(f"n={count:,}", (position, 0), ha="center", va="bottom", fontsize=8)
    figure.suptitle(f"experiment {report['experiment']['name']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
