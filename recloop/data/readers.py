"""Streaming readers for interaction logs.

Every reader yields polars DataFrames of bounded size ("chunks") with one normalised schema:

    user       Int64 or String   raw user id as in the source
    item       Int64 or String   raw item id as in the source
    timestamp  Int64 or null     seconds (or the source's unit); null when the format has none
    line       Int64             1-based line (text) or row (Parquet) in the source, for messages
    order      Int64             0-based position of the event in the source: ties in time keep it
    value      Float64           optional (ratings, watch time, ...)
    event      String            optional (click, purchase, ...)

Text formats are read in blocks of ``block_bytes`` cut at a newline, so memory is bounded by
the block size, not the file size. Parsing and validation are vectorised polars expressions;
a bad line raises `DatasetError` naming the file, the line and the field. Text must be UTF-8
(a leading byte order mark is skipped): the bytes are checked as they are read, and the first
byte that is not UTF-8, or a NUL, is a `DatasetError` naming its line and byte offset. A file
passed by mistake (gzip, zip, Parquet, PNG, UTF-16, ...) is named as what it is.

The formats live beside this module: ``line_formats`` (MovieLens, SASRec, S3-Rec: fixed
line layouts) and ``table_formats`` (csv and Parquet with named columns, see `ColumnMap`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import polars as pl

from recloop.data.line_formats import read_line_format
from recloop.data.table_formats import ColumnMap, read_csv, read_parquet
from recloop.data.text_blocks import ProgressCallback
from recloop.data.textcheck import read_errors
from recloop.errors import DatasetError

Format = Literal[
    "movielens-dat", "ml100k", "movielens-csv", "sasrec", "s3rec", "csv", "parquet", "synthetic"
]
FORMATS: tuple[str, ...] = (
    "movielens-dat",
    "ml100k",
    "movielens-csv",
    "sasrec",
    "s3rec",
    "csv",
    "parquet",
    "synthetic",
)
DEFAULT_BLOCK_BYTES = 32 * 1024 * 1024


def read_chunks(
    path: Path,
    fmt: str,
    columns: ColumnMap | None = None,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    on_progress: ProgressCallback | None = None,
) -> Iterator[pl.DataFrame]:
    """Yields normalised chunks of the log at `path` in format `fmt` (see module docstring)."""
    path = Path(path)
    if fmt not in FORMATS or fmt == "synthetic":
        readable = ", ".join(f for f in FORMATS if f != "synthetic")
        raise DatasetError(f"unknown input format {fmt!r}; file formats are: {readable}")
    with read_errors(path):
        if not path.exists():
            raise DatasetError(f"{path}: no such file")
        if path.is_dir():
            raise DatasetError(f"{path}: is a directory, expected a file")
        if path.stat().st_size == 0:
            raise DatasetError(f"{path}: file is empty (no interactions)")
    if fmt == "parquet":
        yield from read_parquet(path, columns or ColumnMap(), on_progress)
    elif fmt == "csv":
        yield from read_csv(path, columns or ColumnMap(), block_bytes, on_progress)
    else:
        yield from read_line_format(path, fmt, block_bytes, on_progress)
