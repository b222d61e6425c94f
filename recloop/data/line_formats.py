"""The line-oriented text formats: MovieLens (.dat, u.data, ratings.csv), SASRec and S3-Rec
(see ``recloop.data.readers`` for the chunks they yield)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recloop.data.text_blocks import ProgressCallback, first_message_line, text_blocks
from recloop.errors import DatasetError


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


def read_line_format(
    path: Path, fmt: str, block_bytes: int, on_progress: ProgressCallback | None
) -> Iterator[pl.DataFrame]:
    """Normalised chunks of a log in one of the line formats (`fmt`: a key of _LAYOUTS)."""
    return _read_lines(path, _LAYOUTS[fmt], block_bytes, on_progress)


# --------------------------------------------------------------------------- text blocks


def _block_lines(path: Path, block: bytes, first_line: int) -> pl.Series:
    """One String row per line of `block`, blank lines included (as null) so numbering holds."""
    # \x1f (ASCII unit separator) never appears in these logs (`text_blocks` refuses it), so each
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
            f"{path}: cannot read the lines from line {first_line} on ({first_message_line(exc)})"
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
    for block, consumed in text_blocks(path, block_bytes, control=b"\0\x1f"):
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
