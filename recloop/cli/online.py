"""`recloop ingest` and `recloop online`: events into the durable log, and the learner that
turns them into delta versions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from recloop.cli.common import RegistryOption, stderr, stdout
from recloop.errors import ConfigError

if TYPE_CHECKING:
    from recloop.events import EventLog
    from recloop.online.config import OnlineConfig
    from recloop.online.learner import RunSummary
    from recloop.train.distributed import DistContext

EventLogOption = Annotated[str, typer.Option(help="The event log: a path (SQLite) or redis://...")]
FromOption = Annotated[
    str, typer.Option("--from", help="Version to fine-tune (resumes this learner's own).")
]
OnlineConfigOption = Annotated[
    Path | None, typer.Option(help="TOML file with an \\[online] section.")
]
OnlineRunDirOption = Annotated[
    Path, typer.Option(help="Learner state, prequential.csv and its plot.")
]
HistoryDataOption = Annotated[
    Path | None, typer.Option(help="Dataset for history and replay (default: the model's).")
]
AttributesOption = Annotated[
    Path | None, typer.Option(help="JSON item -> attribute list, to initialise new items.")
]
FollowOption = Annotated[bool, typer.Option(help="Keep consuming new events until stopped.")]
MaxEventsOption = Annotated[int | None, typer.Option(help="Stop after this many events.")]
ThreadsOption = Annotated[
    int | None,
    typer.Option(help="torch threads (default: the cores given / recloop processes here)."),
]
ExperimentOption = Annotated[
    Path | None, typer.Option(help="Experiment TOML: learn for one arm (--arm).")
]
ArmOption = Annotated[str | None, typer.Option(help="The arm this learner trains.")]
LearnFromOption = Annotated[
    str, typer.Option(help="Under --experiment: all events, or only the arm's own users' (own).")
]
OverridesArgument = Annotated[list[str] | None, typer.Argument(help="online.key=value overrides.")]


def ingest_command(
    file: Annotated[Path, typer.Argument(help="Events: JSON lines or CSV with a header.")],
    event_log: EventLogOption = "events.sqlite",
    batch_size: Annotated[int, typer.Option(help="Events per durable append.")] = 10_000,
) -> None:
    """Append a file of events (user_id, item_id[, timestamp, event_type, value]) to the log."""
    from recloop.events import open_event_log, read_events_file

    if not file.is_file():
        raise ConfigError(f"{file}: no such events file")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    appended, first, last = 0, None, None
    with open_event_log(event_log) as log:
        # Batch by batch: a bad line stops the run with file:line, and the batches before it
        # stay appended (their ids were printed as they were made durable).
        for batch in read_events_file(file, batch_size=batch_size):
            ids = log.append(batch)
            appended += len(ids)
            first = first or ids[0]
            last = ids[-1]
            stderr.print(f"appended {appended:,} events (last id {last})", highlight=False)
        total = log.count()
    stdout.print(
        f"{appended:,} events from {file} appended to {event_log} (ids {first}..{last}); "
        f"the log holds {total:,}",
        highlight=False,
    )


def online_command(
    registry: RegistryOption,
    event_log: EventLogOption = "events.sqlite",
    start: FromOption = "latest",
    config: OnlineConfigOption = None,
    run_dir: OnlineRunDirOption = Path("runs/online"),
    data: HistoryDataOption = None,
    attributes: AttributesOption = None,
    follow: FollowOption = False,
    max_events: MaxEventsOption = None,
    threads: ThreadsOption = None,
    experiment: ExperimentOption = None,
    arm: ArmOption = None,
    learn_from: LearnFromOption = "all",
    overrides: OverridesArgument = None,
) -> None:
    """Fine-tune the model on new events and publish delta versions (test-then-train)."""
    import logging

    import torch

    from recloop.events import open_event_log
    from recloop.online.config import load_online_config
    from recloop.online.learner import OnlineLearner
    from recloop.registry import Registry
    from recloop.threads import claim_threads

    if max_events is not None and max_events < 1:
        raise ConfigError(f"--max-events must be >= 1, got {max_events}")
    # Registered while it learns, so that a server started beside it takes its share.
    with claim_threads("online", threads) as choice:
        torch.set_num_threads(choice.threads)
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
        settings = load_online_config(config, overrides or [])
        context = _distributed(settings.sharding)
        with open_event_log(event_log) as opened:
            log, settings, start = _for_arm(opened, settings, start, experiment, arm, learn_from)
            arguments = (Registry(registry, create=False), log, settings, run_dir)
            options: dict[str, Any] = {"start": start, "data": data, "attributes": attributes}
            if context is not None:
                from recloop.online.sharded import ShardedOnlineLearner

                learner: OnlineLearner = ShardedOnlineLearner(
                    *arguments, context=context, **options
                )
            else:
                learner = OnlineLearner(*arguments, **options)
            # Said once it really starts: an error before that stays a one-line message.
            stderr.print(f"recloop online: {choice.describe()}", highlight=False)
            stderr.print(
                f"learning from {event_log} after offset {learner.offset} on {learner.version}",
                highlight=False,
            )
            summary = learner.run(follow=follow, max_events=max_events, show_progress=True)
        if context is None or context.is_main:
            _print_summary(summary, run_dir)


def _for_arm(
    log: EventLog,
    settings: OnlineConfig,
    start: str,
    experiment: Path | None,
    arm: str | None,
    learn_from: str,
) -> tuple[EventLog, OnlineConfig, str]:
    """Under --experiment: the arm's events (recloop.experiments.learning), its own consumer
    name (consumer-ARM, which the arm's `learner` key names) and its ref as the start."""
    import dataclasses

    if experiment is None:
        if arm is not None or learn_from != "all":
            raise ConfigError("--arm and --learn-from need --experiment")
        return log, settings, start
    from recloop.experiments import load_experiment
    from recloop.experiments.learning import learner_events

    if arm is None:
        raise ConfigError("--experiment needs --arm NAME (the arm this learner trains)")
    if start != "latest":
        raise ConfigError("--from and --experiment: the arm's ref is where the learner starts")
    loaded = load_experiment(experiment)
    events = learner_events(log, loaded, arm, learn_from)
    consumer = f"{settings.consumer}-{arm}"
    return events, dataclasses.replace(settings, consumer=consumer), loaded.arm(arm).ref


def _distributed(sharding: str) -> DistContext | None:
    """The process group of a sharded learner under torchrun (None: one plain process)."""
    import os

    from recloop.train.distributed import init_distributed

    if sharding == "none":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "recloop online under torchrun needs online.sharding='row_wise' (one process "
                "otherwise learns every event)"
            )
        return None
    return init_distributed("cpu")


def _print_summary(summary: RunSummary, run_dir: Path) -> None:
    from recloop.online.prequential import describe

    totals = summary.totals
    stdout.print(
        f"{summary.events:,} events in {summary.seconds:.1f}s, offset {summary.offset}, "
        f"{len(summary.published)} version(s) published, newest {summary.version}; "
        f"{summary.admitted} new item(s); prequential HR@10 "
        f"{describe(totals)} "
        f"over {totals['scored']:,} events (plot: {run_dir / 'prequential.png'})",
        highlight=False,
    )
    phases = summary.timings["phases"]
    split = ", ".join(
        f"{name} {phase['share']:.0%}"
        for name, phase in sorted(phases.items(), key=lambda item: -item[1]["seconds"])
    )
    stdout.print(
        f"{summary.timings['events_per_second']:,.0f} events/s; time: {split} "
        f"({run_dir / 'timings.json'})",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest_command)
    app.command("online")(online_command)
