"""The generic table formats, csv and Parquet, whose columns a `ColumnMap` names (see
``recloop.data.readers`` for the chunks they yield)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from recloop.data.text_blocks import ProgressCallback, first_message_line, text_blocks
from recloop.data.textcheck import read_errors
from recloop.errors import DatasetError

if TYPE_CHECKING:
    import pyarrow.parquet as pq


@dataclass(frozen=True)
class ColumnMap:
    """Which source columns hold what, for the generic `csv` and `parquet` formats."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = "timestamp"  # None: no time column, file order is time order
    value: str | None = None
    event: str | None = None
    separator: str = ","

    def __post_init__(self) -> None:
        if len(self.separator) != 1 or self.separator in '"\r\n':
            raise DatasetError(
                f"csv separator must be one character other than a quote or a line break, "
                f"got {self.separator!r}"
            )
        named = [c for c in (self.user, self.item, self.timestamp, self.value, self.event) if c]
        if len(set(named)) != len(named):
            raise DatasetError(f"column map names the same column twice: {named}")


def read_csv(
    path: Path, columns: ColumnMap, block_bytes: int, on_progress: ProgressCallback | None
) -> Iterator[pl.DataFrame]:
    header: list[str] = []
    first_row = 0
    # The header is parsed once, from the first block; each block is parsed without it.
    for index, (block, consumed) in enumerate(text_blocks(path, block_bytes)):
        body = block
        if index == 0:
            header_line, _, body = block.partition(b"\n")
            text = header_line.decode("utf-8").rstrip("\r")  # `text_blocks` checked it is UTF-8
            header = [h.strip().strip('"') for h in text.split(columns.separator)]
            _check_columns(path, header, columns, "header line 1")
        if body.strip():
            frame = _csv_rows(path, body, header, columns, first_row)
            lines = pl.int_range(first_row + 2, first_row + 2 + frame.height, eager=True)
            chunk = _normalise_table(
                path, frame.with_columns(__line=lines), columns, first_row, "line"
            )
            first_row += frame.height
            if on_progress is not None:
                on_progress(consumed)
            yield chunk
        elif on_progress is not None:
            on_progress(consumed)
    if first_row == 0:
        raise DatasetError(f"{path}: has a header but no rows (no interactions)")


def _csv_rows(
    path: Path, body: bytes, header: list[str], columns: ColumnMap, first_row: int
) -> pl.DataFrame:
    """The wanted columns (as strings) of the CSV rows in `body`, which has no header line.

    polars reads `body` behind a header of its own ("c0,c1,..."): a block whose first bytes
    look like a zlib stream ("x^", "x\x01") would otherwise be taken for compressed data.
    """
    names = [f"c{i}" for i in range(len(header))]
    prefix = columns.separator.join(f'"{name}"' for name in names).encode() + b"\n"
    try:
        frame = pl.read_csv(
            io.BytesIO(prefix + body),
            separator=columns.separator,
            has_header=True,
            schema=dict.fromkeys(names, pl.String),
        )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DatasetError(
            f"{path}: could not parse CSV rows after line {first_row + 1}: "
            f"{first_message_line(exc)} (is --separator {columns.separator!r} right?)"
        ) from exc
    position = {name: i for i, name in enumerate(header)}
    wanted = _wanted_columns(columns)
    return frame.select(pl.col(names[position[name]]).alias(name) for name in wanted)


def read_parquet(
    path: Path, columns: ColumnMap, on_progress: ProgressCallback | None
) -> Iterator[pl.DataFrame]:
    parquet = _open_parquet(path)
    _check_columns(path, parquet.schema_arrow.names, columns, "the Parquet schema")
    first_row = 0
    batches = parquet.iter_batches(batch_size=1_000_000, columns=_wanted_columns(columns))
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # pyarrow: OSError, ArrowInvalid, ... for a corrupt page
            raise DatasetError(
                f"{path}: Parquet data after row {first_row} is corrupt ({first_message_line(exc)})"
            ) from exc
        if batch is None:
            break
        frame = pl.DataFrame(batch)
        rows = pl.int_range(first_row + 1, first_row + 1 + frame.height, eager=True)
        yield _normalise_table(path, frame.with_columns(__line=rows), columns, first_row, "row")
        first_row += frame.height
        if on_progress is not None:
            on_progress(batch.num_rows)
    if first_row == 0:
        raise DatasetError(f"{path}: has no rows (no interactions)")


def parquet_rows(path: Path) -> int:
    """Rows of a Parquet file, from its footer; DatasetError naming it when it is not one."""
    return int(_open_parquet(path).metadata.num_rows)


def _open_parquet(path: Path) -> pq.ParquetFile:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        with read_errors(path), open(path, "rb") as f:
            head = f.read(4)
        hint = (
            "it starts like Parquet but its footer is missing or corrupt (a truncated copy?)"
            if head == b"PAR1"
            else "it does not start with the Parquet magic bytes: is --format right?"
        )
        raise DatasetError(
            f"{path}: not a readable Parquet file ({first_message_line(exc)}); {hint}"
        ) from exc


def _wanted_columns(columns: ColumnMap) -> list[str]:
    named = (columns.user, columns.item, columns.timestamp, columns.value, columns.event)
    return [c for c in named if c]


def _check_columns(path: Path, available: list[str], columns: ColumnMap, where: str) -> None:
    for role, name in (
        ("user", columns.user),
        ("item", columns.item),
        ("timestamp", columns.timestamp),
        ("value", columns.value),
        ("event", columns.event),
    ):
        if name and name not in available:
            raise DatasetError(
                f"{path}: {role} column {name!r} not found in {where}; columns are {available}"
            )
        if name and available.count(name) > 1:
            raise DatasetError(f"{path}: {role} column {name!r} appears twice in {where}")


def _normalise_table(
    path: Path, frame: pl.DataFrame, columns: ColumnMap, first_row: int, unit: str
) -> pl.DataFrame:
    """`frame` carries `__line`, the source line (CSV) or row (Parquet) named by `unit`."""
    out: dict[str, pl.Series] = {}
    for role, name in (("user", columns.user), ("item", columns.item)):
        series = frame[name]
        missing = frame.filter(series.is_null())
        if missing.height:
            raise DatasetError(
                f"{path}: {unit} {missing['__line'][0]}: {role} column {name!r} is empty"
            )
        out[role] = _id_series(series).alias(role)
    if columns.timestamp:
        out["timestamp"] = _timestamp_series(path, frame, columns.timestamp, unit)
    else:
        out["timestamp"] = pl.Series("timestamp", [None] * frame.height, dtype=pl.Int64)
    out["line"] = frame["__line"].cast(pl.Int64).alias("line")
    out["order"] = pl.int_range(
        first_row, first_row + frame.height, eager=True, dtype=pl.Int64
    ).alias("order")
    if columns.value:
        value = frame[columns.value].cast(pl.Float64, strict=False)
        bad = frame.filter(value.is_null() & frame[columns.value].is_not_null())
        if bad.height:
            raise DatasetError(
                f"{path}: {unit} {bad['__line'][0]}: value column {columns.value!r} has "
                f"{bad[columns.value][0]!r}, not a number"
            )
        out["value"] = value.alias("value")
    if columns.event:
        out["event"] = frame[columns.event].cast(pl.String).fill_null("").alias("event")
    return pl.DataFrame(out)


_INTEGER_RE = re.compile(r"^-?\d+$")


def _id_series(series: pl.Series) -> pl.Series:
    """Integer ids stay integers; anything else is kept as a string id."""
    if series.dtype.is_integer():
        return series.cast(pl.Int64)
    as_text = series.cast(pl.String).str.strip_chars()
    as_int = as_text.cast(pl.Int64, strict=False)
    if as_int.null_count() == 0:
        return as_int
    return as_text


def _timestamp_series(path: Path, frame: pl.DataFrame, name: str, unit: str) -> pl.Series:
    series = frame[name]
    if series.dtype.is_integer():
        parsed = series.cast(pl.Int64)
    elif series.dtype.is_float():
        parsed = series.cast(pl.Int64, strict=False)
    elif isinstance(series.dtype, pl.Datetime):
        parsed = series.dt.epoch("s")
    elif isinstance(series.dtype, pl.Date):
        parsed = series.cast(pl.Datetime("ms")).dt.epoch("s")
    else:
        text = series.cast(pl.String).str.strip_chars()
        parsed = text.cast(pl.Int64, strict=False)
        if (parsed.is_null() & text.is_not_null()).any():
            parsed = parsed.fill_null(_datetime_seconds(text))
    bad = frame.filter(parsed.is_null())
    if bad.height:
        raise DatasetError(
            f"{path}: {unit} {bad['__line'][0]}: timestamp column {name!r} has "
            f"{bad[name][0]!r}, not an integer or an ISO date-time"
        )
    return parsed.alias("timestamp")


def _datetime_seconds(text: pl.Series) -> pl.Series:
    """ISO date-times as epoch seconds; null where the text is not one."""
    try:
        return text.str.to_datetime(strict=False, time_unit="ms").dt.epoch("s")
    except pl.exceptions.ComputeError:  # polars found no date-time format at all
        return pl.Series(text.name, [None] * len(text), dtype=pl.Int64)
