"""Test helper: independent commands run side by side. A fresh interpreter spends most of a
short CLI run importing torch; commands that do not depend on each other need not wait for
each other's imports (the suite runs on a 2-core machine with its own process mostly idle)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["run_together"]


def run_together(
    commands: Sequence[Sequence[str]], **options: Any
) -> list[subprocess.CompletedProcess[str]]:
    """``subprocess.run(command, capture_output=True, text=True, check=False, **options)`` for
    every command at once; the results in the order of ``commands``. Each run has its own
    thread draining its pipes, so a chatty command never blocks on a full pipe."""
    settings = {"capture_output": True, "text": True, "check": False, **options}
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        futures = [pool.submit(subprocess.run, list(command), **settings) for command in commands]
        return [future.result() for future in futures]
