"""Progress bars for long steps: rate and ETA, quiet when stderr is not a terminal (CI logs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

stderr = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second (rich's own speed column is for bytes)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{speed:,.0f} {self.unit}/s")


@contextmanager
def progress_bar(
    description: str, total: float | None, unit: str = "items"
) -> Iterator[Callable[[float], None]]:
    """Yields `advance(n)`. `unit="bytes"` shows MB and MB/s; otherwise counts and items/s."""
    columns: tuple[ProgressColumn, ...]
    if unit == "bytes":
        columns = (DownloadColumn(), TransferSpeedColumn())
    else:
        columns = (MofNCompleteColumn(), RateColumn(unit))
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        *columns,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
        disable=not stderr.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=total)

        def advance(n: float) -> None:
            progress.update(task, advance=n)

        yield advance
