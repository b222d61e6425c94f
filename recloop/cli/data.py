"""`recloop prepare`, `generate` and `stats`: interaction logs in, dataset directories out."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from recloop.cli.common import JsonOption, stderr, stdout
from recloop.errors import ConfigError, undecodable

if TYPE_CHECKING:
    from collections.abc import Callable

    from recloop.data.prepare import PrepareOptions
    from recloop.data.synthetic import SyntheticConfig
    from recloop.data.table_formats import ColumnMap

FORMAT_HELP = (
    "movielens-dat (UserID::MovieID::Rating::Timestamp), ml100k (u.data, tab-separated), "
    "movielens-csv (ratings.csv), sasrec ('user item' per line, file order = time), "
    "s3rec ('user item1 item2 ...' per line), csv, parquet (columns set by --*-col), "
    "synthetic (the built-in generator; --input is an optional TOML/JSON generator config)"
)

FormatOption = Annotated[str, typer.Option("--format", "-f", help=FORMAT_HELP)]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to create.")]
InputOption = Annotated[
    Path | None, typer.Option("--input", "-i", help="Input log (or synthetic config).")
]
ThreadsOption = Annotated[
    int | None, typer.Option(help="Preprocessing threads (default: all cores).")
]
DuplicatesOption = Annotated[str, typer.Option(help="Exact duplicates: drop, keep or error.")]
MinUserEventsOption = Annotated[int, typer.Option(help="Drop users with fewer events.")]
UserCoreOption = Annotated[int, typer.Option(help="k-core: min events per user.")]
ItemCoreOption = Annotated[int, typer.Option(help="k-core: min events per item.")]
UserColOption = Annotated[str, typer.Option(help="csv/parquet: user column.")]
ItemColOption = Annotated[str, typer.Option(help="csv/parquet: item column.")]
TimeColOption = Annotated[
    str, typer.Option(help="csv/parquet: timestamp column ('none': file order).")
]
ValueColOption = Annotated[str | None, typer.Option(help="csv/parquet: value column.")]
EventColOption = Annotated[str | None, typer.Option(help="csv/parquet: event-type column.")]
SeparatorOption = Annotated[str, typer.Option(help="csv: field separator.")]
UsersOption = Annotated[int | None, typer.Option(help="synthetic: number of users.")]
ItemsOption = Annotated[int | None, typer.Option(help="synthetic: number of items.")]
SeedOption = Annotated[int | None, typer.Option(help="synthetic: random seed.")]
ItemAttributesOption = Annotated[
    Path | None,
    typer.Option(help="JSON item -> attribute list (S3-Rec item2attributes.json layout)."),
]


def prepare(
    format: FormatOption,
    out: OutOption,
    input: InputOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    threads: ThreadsOption = None,
    duplicates: DuplicatesOption = "drop",
    min_user_events: MinUserEventsOption = 2,
    user_core: UserCoreOption = 0,
    item_core: ItemCoreOption = 0,
    user_col: UserColOption = "user_id",
    item_col: ItemColOption = "item_id",
    time_col: TimeColOption = "timestamp",
    value_col: ValueColOption = None,
    event_col: EventColOption = None,
    separator: SeparatorOption = ",",
    users: UsersOption = None,
    items: ItemsOption = None,
    seed: SeedOption = None,
    item_attributes: ItemAttributesOption = None,
) -> None:
    """Read an interaction log and write a recloop dataset directory (CSR + vocab + manifest)."""
    from recloop.data.threads import configure_threads

    pool = configure_threads(threads)  # before polars is imported: it sizes its pool once
    from recloop.data.prepare import PrepareOptions
    from recloop.data.readers import FORMATS
    from recloop.data.table_formats import ColumnMap

    if format not in FORMATS:
        raise ConfigError(f"--format {format!r} is not one of: {', '.join(FORMATS)}")
    options = PrepareOptions(
        duplicates=duplicates,  # type: ignore[arg-type]  # validated by PrepareOptions
        min_user_events=min_user_events,
        user_core=user_core,
        item_core=item_core,
    )
    if format == "synthetic":
        if item_attributes is not None:
            raise ConfigError("--item-attributes applies to a log file, not --format synthetic")
        config = synthetic_config(input, users=users, items=items, seed=seed)
        manifest = prepare_synthetic(config, out, options, overwrite, _notice)
    else:
        if input is None:
            raise ConfigError(f"--input is required for --format {format}")
        columns = None
        if format in ("csv", "parquet"):
            columns = ColumnMap(
                user=user_col,
                item=item_col,
                timestamp=None if time_col.lower() == "none" else time_col,
                value=value_col,
                event=event_col,
                separator=separator,
            )
        manifest = _prepare_log(input, format, columns, out, options, overwrite, item_attributes)
    _print_prepared(manifest, out, pool)


def _notice(message: str) -> None:
    stderr.print(f"[yellow]note:[/] {message}", highlight=False)


def _prepare_log(
    input: Path,
    format: str,
    columns: ColumnMap | None,
    out: Path,
    options: PrepareOptions,
    overwrite: bool,
    item_attributes: Path | None,
) -> dict[str, Any]:
    """A log file to a dataset, with a progress bar over its bytes (Parquet: its rows)."""
    from recloop.data.prepare import FileSource, prepare_file
    from recloop.progress import progress_bar

    if format == "parquet" and input.is_file():
        from recloop.data.table_formats import parquet_rows

        total, unit = float(parquet_rows(input)), "rows"
    else:
        total, unit = float(input.stat().st_size) if input.is_file() else 0.0, "bytes"
    with progress_bar(f"reading {input.name}", total, unit) as advance:
        return prepare_file(
            FileSource(input, format, columns),
            out,
            options,
            overwrite=overwrite,
            on_progress=advance,
            notice=_notice,
            item_attributes=item_attributes,
        )


def _print_prepared(manifest: dict[str, Any], out: Path, pool: int) -> None:
    counts = manifest["counts"]
    stdout.print(
        f"wrote {out}: {counts['users']:,} users, {counts['items']:,} items, "
        f"{counts['events']:,} events in {manifest['prepare_seconds']:.2f} s "
        f"({pool} threads)",
        highlight=False,
    )
    if "item_attributes" in manifest:
        found = manifest["item_attributes"]
        stdout.print(
            f"item attributes: {found['attributes']:,} values, "
            f"{found['items_with_attributes']:,} of {counts['items']:,} items have some, "
            f"{found['unknown_items']:,} items of the file are not in the log",
            highlight=False,
        )


def synthetic_config(
    path: Path | None, *, users: int | None, items: int | None, seed: int | None
) -> SyntheticConfig:
    """The generator's config: the TOML/JSON file (if any), then the command-line counts."""
    from recloop.data.synthetic import SyntheticConfig

    values = _read_generator_file(path) if path is not None else {}
    for key, value in (("num_users", users), ("num_items", items), ("seed", seed)):
        if value is not None:
            values[key] = value
    num_items = values.get("num_items")
    if isinstance(num_items, int) and "num_topics" not in values:
        # Small catalogues get fewer topics, so each topic keeps several items.
        topics = max(1, min(SyntheticConfig.num_topics, num_items // 8))
        values["num_topics"] = topics
        values.setdefault("topics_per_user", min(SyntheticConfig.topics_per_user, topics))
    return SyntheticConfig.from_dict(values)


def _read_generator_file(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such synthetic config file")
    try:
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse synthetic config: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {undecodable(exc)}; a config file is UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the synthetic config ({exc.strerror})") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a synthetic config is a table (TOML) or object (JSON)")
    return values


def prepare_synthetic(
    config: SyntheticConfig,
    out: Path,
    options: PrepareOptions,
    overwrite: bool,
    notice: Callable[[str], None] | None,
) -> dict[str, Any]:
    """The generator's users, chunk by chunk, straight into a dataset directory."""
    from dataclasses import asdict

    from recloop.data.prepare import prepare, with_source_order
    from recloop.data.synthetic import generate_events
    from recloop.progress import progress_bar

    chunk_users = 100_000
    with progress_bar("generating synthetic users", config.num_users, "users") as advance:

        def chunks() -> Any:
            for chunk in generate_events(config, chunk_users=chunk_users):
                advance(min(chunk_users, chunk["user"].n_unique()))
                yield chunk

        source = {"kind": "synthetic", "format": "synthetic", "config": asdict(config)}
        return prepare(
            with_source_order(chunks()), source, out, options, overwrite=overwrite, notice=notice
        )


def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")],
    users: Annotated[int, typer.Option(help="Number of users.")] = 10_000,
    items: Annotated[int, typer.Option(help="Number of items.")] = 5_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    config: Annotated[Path | None, typer.Option(help="TOML/JSON generator config.")] = None,
) -> None:
    """Write a synthetic interaction log as Parquet (columns user, item, timestamp)."""
    from recloop.data.synthetic import generate_log

    synthetic = synthetic_config(config, users=users, items=items, seed=seed)
    rows = generate_log(synthetic, out)
    stdout.print(f"wrote {out}: {rows:,} events", highlight=False)


def stats(
    directory: Annotated[Path, typer.Argument(help="A dataset directory.")],
    json_output: JsonOption = False,
) -> None:
    """Summarise a prepared dataset: users, items, events, lengths, popularity."""
    from recloop.data.dataset import SequenceDataset

    summary = SequenceDataset(directory).stats()
    if json_output:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"dataset {directory}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    lengths = summary["sequence_length"]
    rows = [
        ("source", str(summary["source"])),
        ("users", f"{summary['users']:,}"),
        ("items", f"{summary['items']:,}"),
        ("events", f"{summary['events']:,}"),
        ("density", f"{summary['density']:.3e}"),
        ("time", summary["time"]),
        (
            "sequence length",
            f"min {lengths['min']}, median {lengths['median']:g}, "
            f"mean {lengths['mean']:.2f}, max {lengths['max']}",
        ),
        ("top 10% items' share", f"{summary['item_popularity']['top10pct_share']:.1%}"),
        ("dropped", ", ".join(f"{k} {v:,}" for k, v in summary["dropped"].items())),
    ]
    for key, value in rows:
        table.add_row(key, value)
    stdout.print(table)


def register(app: typer.Typer) -> None:
    app.command()(prepare)
    app.command()(generate)
    app.command()(stats)
