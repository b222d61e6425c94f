"""The training loop's progress: a rich bar with loss and tokens/s on a terminal, periodic
lines (validation results) otherwise."""

from __future__ import annotations

from typing import Any


class Progress:
    """A rich progress bar with loss and tokens/s on a terminal; periodic lines otherwise.
    `prefix` starts every logged line (a fine-tune names itself: "prune-magnitude: ...")."""

    def __init__(
        self, total: int, done: int, *, enabled: bool, label: str = "train", prefix: str = ""
    ) -> None:
        self.enabled = enabled
        self.prefix = prefix
        self.bar: Any = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        from recloop.progress import stderr

        self.bar = RichProgress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:,.0f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=stderr,
            disable=not stderr.is_terminal,
        )
        self.task = self.bar.add_task(label, total=total, completed=done, loss=0.0, rate=0.0)
        self.bar.start()

    def update(self, step: int, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, rate=rate)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        from recloop.progress import stderr

        stderr.print(self.prefix + message, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
