"""Interaction log -> recloop dataset directory.

Pipeline (polars, multi-threaded): read normalised chunks -> drop duplicates (policy) -> drop
users with too few events -> optional k-core -> dense ids (users 0..U-1, items 1..I, both in
ascending raw-id order so the mapping is reproducible) -> stable sort by (user, time, source
order) -> CSR arrays -> files in a temporary directory -> atomic rename to `out_dir`.

The dataset directory holds:

    offsets.npy      int64 [U + 1]   user u's events are items[offsets[u]:offsets[u + 1]]
    items.npy        int32 [E]       dense item ids, 1-based (0 = padding)
    timestamps.npy   int64 [E]       source timestamps, or source order when there are none
    values.npy       float32 [E]     optional (ratings)
    users.parquet    (id, raw)       vocabulary: row i is dense id i; raw ids ascend too, so
    items.parquet    (id, raw)       the table maps id -> raw and (binary search) raw -> id
    manifest.json    source, options, counts, lengths, checksums, recloop version

and, with item attributes (recloop.data.attributes), item_attributes.npy and attributes.parquet.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

import recloop
from recloop.data.attributes import (
    ATTRIBUTE_VOCAB_FILE,
    ITEM_ATTRIBUTES_FILE,
    attribute_index,
    read_item_attributes,
)
from recloop.data.readers import read_chunks
from recloop.data.table_formats import ColumnMap
from recloop.data.text_blocks import ProgressCallback
from recloop.data.vocabulary import Vocabulary
from recloop.errors import ConfigError, DatasetError

DuplicatePolicy = Literal["drop", "keep", "error"]
MANIFEST = "manifest.json"
DATASET_FORMAT_VERSION = 1
Notice = Callable[[str], None]


@dataclass(frozen=True)
class PrepareOptions:
    # Exact duplicates are rows equal in user, item, timestamp (and value/event when present).
    # Formats without timestamps have no duplicates by this definition: each line is its own
    # moment in the sequence, and a repeated item there is a real repeat.
    duplicates: DuplicatePolicy = "drop"
    # A user needs two events to give one training pair (prefix -> next item).
    min_user_events: int = 2
    # k-core: repeat until every user has >= user_core and every item >= item_core events.
    user_core: int = 0
    item_core: int = 0

    def __post_init__(self) -> None:
        if self.duplicates not in ("drop", "keep", "error"):
            raise ConfigError(
                f"duplicates must be 'drop', 'keep' or 'error', got {self.duplicates!r}"
            )
        for name in ("min_user_events", "user_core", "item_core"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class FileSource:
    path: Path
    format: str
    columns: ColumnMap | None = None

    def describe(self) -> dict[str, Any]:
        try:
            size, digest = self.path.stat().st_size, sha256_file(self.path)
        except OSError as exc:
            raise DatasetError(f"{self.path}: cannot read the file ({_reason(exc)})") from exc
        return {
            "kind": "file",
            "format": self.format,
            "path": str(self.path.resolve()),
            "bytes": size,
            "sha256": digest,
            "columns": asdict(self.columns) if self.columns else None,
        }

    def chunks(self, on_progress: ProgressCallback | None = None) -> Iterator[pl.DataFrame]:
        return read_chunks(self.path, self.format, self.columns, on_progress=on_progress)


@dataclass
class PrepareReport:
    """What preprocessing did, for the manifest and for the user."""

    raw_rows: int = 0
    duplicates_dropped: int = 0
    short_users_dropped: int = 0
    short_user_events_dropped: int = 0
    kcore_events_dropped: int = 0
    notices: list[str] = field(default_factory=list)


def prepare(
    chunks: Iterable[pl.DataFrame],
    source: dict[str, Any],
    out_dir: Path,
    options: PrepareOptions = PrepareOptions(),
    *,
    overwrite: bool = False,
    notice: Notice | None = None,
    item_attributes: Path | None = None,
) -> dict[str, Any]:
    """Builds the dataset directory `out_dir` from normalised chunks; returns its manifest.

    `item_attributes` is a JSON file raw item id -> attribute values (see
    recloop.data.attributes), read before anything is written. Nothing is written to `out_dir`
    unless everything succeeded: the files go to a temporary sibling directory that is renamed
    into place at the end.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    started = time.perf_counter()
    attributes = read_item_attributes(item_attributes) if item_attributes is not None else None
    report = PrepareReport()
    events, has_time = _clean_events(_collect(chunks, source), options, report)
    num_users = int(events["uid"].max()) + 1  # type: ignore[arg-type]
    num_items = int(events["iid"].max())  # type: ignore[arg-type]
    lengths = np.bincount(events["uid"].to_numpy(), minlength=num_users)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    def fill(tmp: Path) -> dict[str, Any]:
        event_types = _write_arrays(tmp, events, offsets)
        _write_vocab(events["user"], 0, tmp / "users.parquet")
        item_raw_ids = _write_vocab(events["item"], 1, tmp / "items.parquet")
        attribute_summary = None
        if attributes is not None:
            attribute_summary = _write_attributes(attributes, item_raw_ids, tmp)
        manifest = _manifest(
            source, options, report, has_time, events, lengths, num_users, num_items, tmp
        )
        manifest["prepare_seconds"] = round(time.perf_counter() - started, 3)
        if event_types is not None:
            manifest["event_types"] = event_types
        if attribute_summary is not None:
            manifest["item_attributes"] = {"source": str(item_attributes), **attribute_summary}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    manifest = _write_into_place(out_dir, overwrite, fill)
    if notice is not None:
        for message in report.notices:
            notice(message)
    return manifest


def _write_arrays(tmp: Path, events: pl.DataFrame, offsets: np.ndarray) -> list[str] | None:
    """The CSR arrays (offsets, items, timestamps, values) and the event-type codes; returns
    the event types in code order (None: the log has no event column)."""
    files: dict[str, np.ndarray] = {
        "offsets.npy": offsets,
        "items.npy": events["iid"].to_numpy().astype(np.int32, copy=False),
        "timestamps.npy": events["timestamp"].to_numpy().astype(np.int64, copy=False),
    }
    if "value" in events.columns:
        files["values.npy"] = events["value"].to_numpy().astype(np.float32)
    for name, array in files.items():
        np.save(tmp / name, np.ascontiguousarray(array))
    if "event" not in events.columns:
        return None
    types = sorted(events["event"].unique().to_list())
    codes = events["event"].replace_strict(types, list(range(len(types))))
    np.save(tmp / "events.npy", codes.to_numpy().astype(np.int16))
    return types


def with_source_order(chunks: Iterable[pl.DataFrame]) -> Iterator[pl.DataFrame]:
    """Adds `order` (0-based) and `line` (1-based row) to chunks from a generator."""
    first = 0
    for chunk in chunks:
        order = pl.int_range(first, first + chunk.height, eager=True, dtype=pl.Int64)
        yield chunk.with_columns(order=order, line=order + 1)
        first += chunk.height


def prepare_file(
    source: FileSource,
    out_dir: Path,
    options: PrepareOptions = PrepareOptions(),
    *,
    overwrite: bool = False,
    on_progress: ProgressCallback | None = None,
    notice: Notice | None = None,
    item_attributes: Path | None = None,
) -> dict[str, Any]:
    _check_out_dir(Path(out_dir), overwrite)  # fail before reading a large file
    described = source.describe() if source.path.is_file() else {"path": str(source.path)}
    return prepare(
        source.chunks(on_progress),
        described,
        out_dir,
        options,
        overwrite=overwrite,
        notice=notice,
        item_attributes=item_attributes,
    )


# --------------------------------------------------------------------------- steps


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Fails fast, before a long read, when `out_dir` could not be written at the end."""
    try:
        if out_dir.exists() and not overwrite:
            raise DatasetError(f"{out_dir}: output directory already exists (pass --overwrite)")
        if out_dir.exists() and not out_dir.is_dir():
            raise DatasetError(f"{out_dir}: exists and is not a directory")
        ancestor = out_dir.absolute().parent
        while not ancestor.exists():
            ancestor = ancestor.parent
    except OSError as exc:  # e.g. a parent directory that may not be searched
        raise DatasetError(f"{out_dir}: cannot check the output path ({_reason(exc)})") from exc
    if not ancestor.is_dir():
        raise DatasetError(f"{out_dir}: cannot create the output directory: {ancestor} is a file")
    try:
        # Root may write where the mode bits say no; only trying tells (and leaves nothing).
        os.rmdir(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".probe", dir=ancestor))
    except OSError as exc:
        raise DatasetError(
            f"{out_dir}: cannot create the output directory in {ancestor} ({exc.strerror})"
        ) from exc


def _reason(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror}{where}" if exc.strerror else str(exc)


def _write_into_place(
    out_dir: Path, overwrite: bool, fill: Callable[[Path], dict[str, Any]]
) -> dict[str, Any]:
    """Runs `fill(tmp)` in a temporary sibling directory of `out_dir`, renames that into place
    and returns what `fill` returned. On any failure nothing is left behind (not even the parent
    directories this made), and an OSError (disk full, read-only) becomes a DatasetError."""
    created: list[Path] = []
    tmp: Path | None = None
    try:
        _make_parents(out_dir.parent, created)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        result = fill(tmp)
        _move_into_place(tmp, out_dir, overwrite)
        return result
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        if isinstance(exc, OSError):
            raise DatasetError(f"{out_dir}: cannot write the dataset ({_reason(exc)})") from exc
        raise


def _make_parents(directory: Path, created: list[Path]) -> None:
    """`mkdir -p directory`, appending each directory it makes to `created`, outermost first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir()
        created.append(path)


def _collect(chunks: Iterable[pl.DataFrame], source: dict[str, Any]) -> pl.DataFrame:
    frames = list(chunks)
    if not frames:
        raise DatasetError(f"{source.get('path', 'input')}: no interactions")
    try:
        events = pl.concat(frames, how="vertical")
    except pl.exceptions.SchemaError:
        # One chunk had only integer ids and another string ids: treat all as strings.
        frames = [f.with_columns(pl.col("user", "item").cast(pl.String)) for f in frames]
        events = pl.concat(frames, how="vertical")
    return events


def _clean_events(
    events: pl.DataFrame, options: PrepareOptions, report: PrepareReport
) -> tuple[pl.DataFrame, bool]:
    """(events sorted by (user, time, order), filtered, with dense `uid` and `iid`; whether
    the source has timestamps)."""
    report.raw_rows = events.height
    has_time = events["timestamp"].null_count() == 0
    if not has_time:
        if events["timestamp"].null_count() != events.height:
            raise DatasetError("some rows have a timestamp and others do not")
        # No clock in the source: its order is the time order (SASRec / S3-Rec files).
        events = events.with_columns(timestamp=pl.col("order"))

    # One sort, up front: dense user ids follow raw ids in ascending order, so this is also
    # the final (user, time, source order) order, and every later step keeps it.
    events = events.sort(["user", "timestamp", "order"])
    events = _apply_duplicate_policy(events, options.duplicates, has_time, report)
    events = _drop_short_users(events, options.min_user_events, report)
    events = _k_core(events, options.user_core, options.item_core, report)
    if events.height == 0:
        raise DatasetError("no interactions left after filtering (check min_user_events/k-core)")

    # Dense ids in ascending raw-id order. Rows are sorted by user, so a user's id is the
    # number of user changes before it.
    user_starts = (pl.col("user") != pl.col("user").shift(1)).fill_null(True)
    events = events.with_columns(
        uid=(user_starts.cum_sum() - 1).cast(pl.Int64),
        iid=pl.col("item").rank("dense").cast(pl.Int32),
    )
    return events, has_time


def _apply_duplicate_policy(
    events: pl.DataFrame, policy: DuplicatePolicy, has_time: bool, report: PrepareReport
) -> pl.DataFrame:
    """`events` is sorted by (user, timestamp, order): exact duplicates share a user and a
    timestamp, so only rows next to a row with the same (user, timestamp) need the exact check,
    which keeps this linear and cheap when, as usual, timestamps within a user are distinct."""
    if policy == "keep" or not has_time:
        return events
    key = [c for c in ("user", "item", "timestamp", "value", "event") if c in events.columns]
    same_time = (pl.col("user") == pl.col("user").shift(1)) & (
        pl.col("timestamp") == pl.col("timestamp").shift(1)
    )
    candidate = events.select(
        (same_time.fill_null(False) | same_time.shift(-1).fill_null(False)).alias("c")
    ).to_series()
    if not candidate.any():
        return events
    index = pl.int_range(0, events.height, eager=True).filter(candidate)
    subset = events.filter(candidate)
    repeated = subset.select(pl.struct(key).is_first_distinct().not_()).to_series()
    count = int(repeated.sum())
    if count == 0:
        return events
    first = subset.filter(repeated).row(0, named=True)
    original = subset.filter(pl.all_horizontal(pl.col(c) == first[c] for c in key) & ~repeated).row(
        0, named=True
    )
    where = f"line {first['line']} repeats line {original['line']}"
    if policy == "error":
        raise DatasetError(f"{count} exact duplicate rows; first: {where} (user {first['user']})")
    report.duplicates_dropped = count
    report.notices.append(f"dropped {count} exact duplicate rows (first: {where})")
    drop = pl.Series("drop", [False] * events.height).scatter(index.filter(repeated), True)
    return events.filter(~drop)


def _drop_short_users(events: pl.DataFrame, min_events: int, report: PrepareReport) -> pl.DataFrame:
    if min_events <= 1:
        return events
    counts = events.group_by("user").len()
    short = counts.filter(pl.col("len") < min_events)
    if short.height == 0:
        return events
    example = events.join(short.head(1), on="user").row(0, named=True)
    report.short_users_dropped = short.height
    report.short_user_events_dropped = int(short["len"].sum())
    report.notices.append(
        f"dropped {short.height} users with fewer than {min_events} events "
        f"(e.g. user {example['user']} at line {example['line']}); "
        "set min_user_events to keep them"
    )
    return events.join(short.select("user"), on="user", how="anti", maintain_order="left")


def _k_core(
    events: pl.DataFrame, user_core: int, item_core: int, report: PrepareReport
) -> pl.DataFrame:
    if user_core <= 1 and item_core <= 1:
        return events
    before = events.height
    while True:
        keep = pl.lit(True)
        if user_core > 1:
            keep = keep & (pl.len().over("user") >= user_core)
        if item_core > 1:
            keep = keep & (pl.len().over("item") >= item_core)
        filtered = events.filter(keep)
        if filtered.height == events.height:
            break
        events = filtered
    report.kcore_events_dropped = before - events.height
    if report.kcore_events_dropped:
        report.notices.append(
            f"k-core (users >= {user_core}, items >= {item_core}) removed "
            f"{report.kcore_events_dropped} events"
        )
    return events


def _write_vocab(raw: pl.Series, first_id: int, path: Path) -> pl.Series:
    """Writes (id, raw) rows. Ids follow raw ids in ascending order, so the one table is sorted
    both ways: row i holds dense id first_id + i (id -> raw) and raw ids ascend, so a binary
    search maps raw -> id. `Vocabulary` gives both directions. Returns the raw ids in id order."""
    unique = raw.unique().sort()
    Vocabulary(unique, first_id).write(path)
    return unique


def _write_attributes(
    attributes: dict[str, frozenset[str]], item_raw_ids: pl.Series, directory: Path
) -> dict[str, int]:
    """Writes item_attributes.npy and attributes.parquet; `item_raw_ids` in dense id order."""
    found = attribute_index(attributes, [str(raw) for raw in item_raw_ids.to_list()])
    np.save(directory / ITEM_ATTRIBUTES_FILE, found.index)
    _write_vocab(pl.Series(found.names, dtype=pl.String), 1, directory / ATTRIBUTE_VOCAB_FILE)
    return found.summary()


def _manifest(
    source: dict[str, Any],
    options: PrepareOptions,
    report: PrepareReport,
    has_time: bool,
    events: pl.DataFrame,
    lengths: np.ndarray,
    num_users: int,
    num_items: int,
    directory: Path,
) -> dict[str, Any]:
    timestamps = events["timestamp"]
    return {
        "kind": "recloop-dataset",
        "format_version": DATASET_FORMAT_VERSION,
        "recloop_version": recloop.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "options": asdict(options),
        "time": "timestamp" if has_time else "source_order",
        "id_types": {"user": str(events["user"].dtype), "item": str(events["item"].dtype)},
        "counts": {
            "users": num_users,
            "items": num_items,
            "events": int(events.height),
            "raw_rows": report.raw_rows,
            "duplicates_dropped": report.duplicates_dropped,
            "short_users_dropped": report.short_users_dropped,
            "short_user_events_dropped": report.short_user_events_dropped,
            "kcore_events_dropped": report.kcore_events_dropped,
        },
        "lengths": {
            "min": int(lengths.min()),
            "max": int(lengths.max()),
            "mean": round(float(lengths.mean()), 4),
            "median": float(np.median(lengths)),
        },
        "time_range": {"min": int(timestamps.min()), "max": int(timestamps.max())},  # type: ignore[arg-type]
        "files": {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(directory.iterdir())
            if p.name != MANIFEST
        },
    }


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not overwrite:
            raise DatasetError(f"{out_dir}: output directory appeared while preparing")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(old, out_dir)  # the dataset that was there stays
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
