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
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import polars as pl

from recloop.data.textcheck import UTF8_BOM, TextCheck, check_signature, read_errors
from recloop.errors import DatasetError

if TYPE_CHECKING:
    import pyarrow.parquet as pq

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
ProgressCallback = Callable[[int], None]  # called with the number of bytes/rows just consumed


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


@dataclass(frozen=True)
class _LineLayout:
    """A line-oriented text format: separator, fixed field names (None = variable, S3-Rec)."""

    separator: str  # literal separator; " " means any run of spaces/tabs
    fields: tuple[str, ...] | None
    header: tuple[str, ...] | None = None  # expected header line, if the format has one


_LAYOUTS: dict[str, _LineLayout] = {
    "movielens-dat": _LineLayout("::", ("UserID", "MovieID", "Rating", "Timestamp")),
    "ml100k": _LineLayout("\t", ("user id", "item id", "rating", "timestamp")),
    "movielens-csv": _LineLayout(
        ",",
        ("userId", "movieId", "rating", "timestamp"),
        header=("userId", "movieId", "rating", "timestamp"),
    ),
    "sasrec": _LineLayout(" ", ("user", "item")),
    "s3rec": _LineLayout(" ", None),
}


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
        yield from _read_parquet(path, columns or ColumnMap(), on_progress)
    elif fmt == "csv":
        yield from _read_csv(path, columns or ColumnMap(), block_bytes, on_progress)
    else:
        yield from _read_lines(path, _LAYOUTS[fmt], block_bytes, on_progress)


# --------------------------------------------------------------------------- text blocks


def _blocks(path: Path, block_bytes: int, control: bytes = b"\0") -> Iterator[tuple[bytes, int]]:
    """Yields (block, bytes consumed) with every block ending at a line boundary.

    The bytes are checked as they are read (see `TextCheck`), so a binary or non-UTF-8 file
    fails at its first bad byte, naming its line and byte offset, without being read whole.
    A leading UTF-8 byte order mark is skipped (it is counted as consumed).
    """
    check = TextCheck(path, control)
    with read_errors(path), open(path, "rb") as f:
        data = f.read(block_bytes)
        check_signature(path, data)
        skipped = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
        data, rest = data[skipped:], b""
        check.offset = skipped  # offsets in messages are those of the file
        while data:
            check.feed(data)
            data = rest + data
            cut = data.rfind(b"\n")
            if cut < 0:  # a line longer than the block: keep reading
                rest = data
            else:
                yield data[: cut + 1], cut + 1 + skipped
                rest, skipped = data[cut + 1 :], 0
            data = f.read(block_bytes)
        check.feed(b"", final=True)
        if rest:
            yield rest + b"\n", len(rest) + skipped


def _block_lines(path: Path, block: bytes, first_line: int) -> pl.Series:
    """One String row per line of `block`, blank lines included (as null) so numbering holds."""
    # \x1f (ASCII unit separator) never appears in these logs (`_blocks` refuses it), so each
    # line is one field. The leading newline (a null row, dropped) keeps polars from taking a
    # block that starts like a zlib stream ("x^", "x\x01") for compressed data.
    try:
        frame = pl.read_csv(
            io.BytesIO(b"\n" + block),
            separator="\x1f",
            has_header=False,
            quote_char=None,
            new_columns=["line"],
            schema={"line": pl.String},
            truncate_ragged_lines=True,
        )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DatasetError(
            f"{path}: cannot read the lines from line {first_line} on ({_first_line(exc)})"
        ) from exc
    return frame.to_series().slice(1)


def _read_lines(
    path: Path,
    layout: _LineLayout,
    block_bytes: int,
    on_progress: ProgressCallback | None,
) -> Iterator[pl.DataFrame]:
    first_line = 1
    first_event = 0
    header_pending = layout.header is not None
    for block, consumed in _blocks(path, block_bytes, control=b"\0\x1f"):
        lines = _block_lines(path, block, first_line)
        frame = pl.DataFrame(
            {"raw": lines, "line": pl.int_range(first_line, first_line + len(lines), eager=True)}
        )
        first_line += len(lines)
        if header_pending:
            frame = _check_header(path, frame, layout)
            header_pending = False
        chunk = _parse_lines(path, frame, layout, first_event)
        first_event += chunk.height
        if on_progress is not None:
            on_progress(consumed)
        if chunk.height:
            yield chunk


def _check_header(path: Path, frame: pl.DataFrame, layout: _LineLayout) -> pl.DataFrame:
    header = (frame["raw"][0] or "").strip()
    expected = layout.separator.join(layout.header or ())
    if header != expected:
        raise DatasetError(f"{path}: line 1 is {header!r}, expected the header {expected!r}")
    return frame.slice(1)


def _split_expr(layout: _LineLayout) -> pl.Expr:
    raw = pl.col("raw").str.strip_chars()
    if layout.separator == " ":  # whitespace formats tolerate runs of spaces and tabs
        raw = raw.str.replace_all(r"[ \t]+", " ")
    return raw.str.split(layout.separator)


def _parse_lines(
    path: Path, frame: pl.DataFrame, layout: _LineLayout, first_event: int
) -> pl.DataFrame:
    frame = frame.filter(pl.col("raw").is_not_null() & (pl.col("raw").str.strip_chars() != ""))
    frame = frame.with_columns(fields=_split_expr(layout)).with_columns(
        n=pl.col("fields").list.len()
    )
    if layout.fields is None:
        return _parse_s3rec(path, frame, first_event)
    expected = len(layout.fields)
    bad = frame.filter(pl.col("n") != expected)
    if bad.height:
        _raise_field_count(path, bad.row(0, named=True), expected, layout.separator)
    parsed = frame.select(
        "line",
        *[
            pl.col("fields").list.get(i).alias(name)
            for i, name in enumerate(("user", "item", "a", "b")[:expected])
        ],
    )
    user = _as_int(path, parsed, "user", layout.fields[0])
    item = _as_int(path, parsed, "item", layout.fields[1])
    columns = {"user": user, "item": item}
    if expected == 4:  # user, item, rating, timestamp
        columns["value"] = _as_float(path, parsed, "a", layout.fields[2])
        columns["timestamp"] = _as_int(path, parsed, "b", layout.fields[3])
    else:
        columns["timestamp"] = pl.Series("timestamp", [None] * parsed.height, dtype=pl.Int64)
    order = pl.int_range(first_event, first_event + parsed.height, eager=True, dtype=pl.Int64)
    return pl.DataFrame(
        {
            "user": columns["user"],
            "item": columns["item"],
            "timestamp": columns["timestamp"],
            "line": parsed["line"].cast(pl.Int64),
            "order": order,
            **({"value": columns["value"]} if "value" in columns else {}),
        }
    )


def _parse_s3rec(path: Path, frame: pl.DataFrame, first_event: int) -> pl.DataFrame:
    short = frame.filter(pl.col("n") < 2)
    if short.height:
        row = short.row(0, named=True)
        raise DatasetError(
            f"{path}: line {row['line']} has {row['n']} field, expected "
            "'user item1 item2 ...' (space-separated, at least one item)"
        )
    users = frame.select("line", user=pl.col("fields").list.first())
    user = _as_int(path, users, "user", "user")
    exploded = (
        frame.with_columns(user=user)
        .select("line", "user", item=pl.col("fields").list.slice(1))
        .explode("item")
    )
    item = _as_int(path, exploded, "item", "item")
    n = exploded.height
    return pl.DataFrame(
        {
            "user": exploded["user"],
            "item": item,
            "timestamp": pl.Series("timestamp", [None] * n, dtype=pl.Int64),
            "line": exploded["line"].cast(pl.Int64),
            "order": pl.int_range(first_event, first_event + n, eager=True, dtype=pl.Int64),
        }
    )


def _raise_field_count(path: Path, row: dict[str, object], expected: int, sep: str) -> None:
    hint = ""
    raw = str(row["raw"])
    others = [s for s in ("::", "\t", ",", ";", "|", " ") if s != sep and s in raw.strip()]
    if others and row["n"] == 1:
        hint = f"; the line contains {others[0]!r}: is this the right --format?"
    raise DatasetError(
        f"{path}: line {row['line']} has {row['n']} fields, expected {expected} "
        f"separated by {sep!r}{hint} (line: {raw[:80]!r})"
    )


def _as_int(path: Path, frame: pl.DataFrame, column: str, field: str) -> pl.Series:
    parsed = frame[column].cast(pl.Int64, strict=False)
    bad = frame.filter(parsed.is_null() & frame[column].is_not_null())
    if bad.height:
        row = bad.row(0, named=True)
        raise DatasetError(f"{path}: line {row['line']}: {field} {row[column]!r} is not an integer")
    return parsed.alias(column)


def _as_float(path: Path, frame: pl.DataFrame, column: str, field: str) -> pl.Series:
    parsed = frame[column].cast(pl.Float64, strict=False)
    bad = frame.filter(parsed.is_null() & frame[column].is_not_null())
    if bad.height:
        row = bad.row(0, named=True)
        raise DatasetError(f"{path}: line {row['line']}: {field} {row[column]!r} is not a number")
    return parsed.alias("value")


# --------------------------------------------------------------------------- generic tables


def _read_csv(
    path: Path, columns: ColumnMap, block_bytes: int, on_progress: ProgressCallback | None
) -> Iterator[pl.DataFrame]:
    header: list[str] = []
    first_row = 0
    # The header is parsed once, from the first block; each block is parsed without it.
    for index, (block, consumed) in enumerate(_blocks(path, block_bytes)):
        body = block
        if index == 0:
            header_line, _, body = block.partition(b"\n")
            text = header_line.decode("utf-8").rstrip("\r")  # `_blocks` checked it is UTF-8
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
            f"{_first_line(exc)} (is --separator {columns.separator!r} right?)"
        ) from exc
    position = {name: i for i, name in enumerate(header)}
    wanted = _wanted_columns(columns)
    return frame.select(pl.col(names[position[name]]).alias(name) for name in wanted)


def _read_parquet(
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
                f"{path}: Parquet data after row {first_row} is corrupt ({_first_line(exc)})"
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
            f"{path}: not a readable Parquet file ({_first_line(exc)}); {hint}"
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


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
