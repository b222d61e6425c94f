"""The `recloop` command: one sub-command per stage of the loop, one module per stage.

Heavy libraries (polars, torch) are imported inside commands, after `--threads` has been
applied, because polars fixes its thread pool size when it is imported; importing this package
costs typer and rich only (`recloop --help` stays fast).
"""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from recloop.cli import compress, data, demo, experiment, models, online, serve, train
from recloop.cli.common import stderr
from recloop.errors import RecloopError

app = typer.Typer(
    name="recloop",
    help="Large sequential recommenders: prepare data, train, serve, learn online.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# In the order `recloop --help` lists them: the loop's stages, then the tour and the registry.
for stage in (data, train, serve, online, compress, demo):
    stage.register(app)
models.register(app)
experiment.register(app)


def main() -> None:
    """Console entry point: domain errors become one clear line and exit status 2."""
    try:
        app()
    except RecloopError as exc:
        # One line, printed as is: a message quoting a file's text may hold "[...]" (rich
        # markup) or line breaks (some library messages).
        message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
        sys.exit(2)


__all__ = ["app", "main"]
