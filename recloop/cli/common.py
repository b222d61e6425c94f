"""What every stage's commands share: the two consoles and the options named alike everywhere."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

RegistryOption = Annotated[Path, typer.Option("--registry", help="Model registry directory.")]
VersionOption = Annotated[str, typer.Option(help="Version id, latest or production.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def command_line() -> str:
    """The command as the user typed it, recorded in the manifests it publishes."""
    return "recloop " + " ".join(sys.argv[1:])
