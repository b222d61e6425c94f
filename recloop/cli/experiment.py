"""`recloop experiment report`: per-arm outcomes of an experiment, from the exposure and event
logs (see recloop.experiments and docs/experiments.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from recloop.cli.common import stdout

experiment_app = typer.Typer(help="Experiments: traffic split between versions, measured.")

ExperimentFileOption = Annotated[
    Path, typer.Option("--experiment", help="The experiment TOML `recloop serve` ran.")
]
EventLogOption = Annotated[
    str, typer.Option(help="The event log the service wrote: a path (SQLite) or redis://...")
]
PlotOption = Annotated[Path | None, typer.Option(help="Write the per-arm plot here (PNG).")]
JsonOutOption = Annotated[Path | None, typer.Option("--json", help="Write the report as JSON.")]


@experiment_app.command("report")
def report_command(
    experiment: ExperimentFileOption,
    event_log: EventLogOption = "events.sqlite",
    plot: PlotOption = Path("experiment.png"),
    json_out: JsonOutOption = None,
) -> None:
    """Exposures, hit@k and NDCG@k per arm with 95% intervals, and each arm vs the control."""
    from rich.table import Table

    from recloop.errors import ConfigError
    from recloop.events import open_event_log
    from recloop.experiments import load_experiment
    from recloop.experiments.report import experiment_report, plot_report, table_rows, write_json

    loaded = load_experiment(experiment)
    if not Path(event_log).exists() and "://" not in event_log:
        raise ConfigError(f"--event-log {event_log}: no such event log")
    with open_event_log(event_log) as log:
        report = experiment_report(loaded, log)
    k = loaded.k
    title = f"experiment {loaded.name} (95% intervals, users as clusters; * : excludes 0)"
    table = Table(title=title)
    for column in ("arm", "ref", "users", "exposures", "pending", f"hit@{k}", f"NDCG@{k}"):
        table.add_column(column)
    table.add_column(f"Δ hit@{k} vs {loaded.control}")
    table.add_column(f"Δ NDCG@{k} vs {loaded.control}")
    for row in table_rows(report):
        table.add_row(*row)
    stdout.print(table)
    if json_out is not None:
        write_json(report, json_out)
        stdout.print(f"report: {json_out}", highlight=False)
    if plot is not None:
        plot_report(report, plot)
        stdout.print(f"plot: {plot}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(experiment_app, name="experiment")
