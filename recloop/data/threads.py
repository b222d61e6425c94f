"""Thread count for polars, which fixes its thread pool when it is first imported.

`recloop prepare --threads N` calls `configure_threads` before anything imports polars; a
library user does the same, or sets POLARS_MAX_THREADS in the environment.
"""

from __future__ import annotations

import os
import sys

from recloop.errors import ConfigError


def configure_threads(threads: int | None) -> int:
    """Sets the polars thread pool size; returns the size in effect."""
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if "polars" not in sys.modules:
        if threads is not None:
            os.environ["POLARS_MAX_THREADS"] = str(threads)
        import polars as pl

        return int(pl.thread_pool_size())
    import polars as pl

    size = int(pl.thread_pool_size())
    if threads is not None and size != threads:
        raise ConfigError(
            f"threads={threads} requested but polars was already imported with {size} threads; "
            "set POLARS_MAX_THREADS before importing polars (the recloop CLI does this)"
        )
    return size
