"""The `recloop` command: one sub-command per stage of the loop.

Heavy libraries (polars, torch) are imported inside commands, after `--threads` has been
applied, because polars fixes its thread pool size when it is imported.
"""

from __future__ import annotations

import json
import math
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from recloop.errors import ConfigError, RecloopError

app = typer.Typer(
    name="recloop",
    help="Large sequential recommenders: prepare data, train, serve, learn online.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

FORMAT_HELP = (
    "movielens-dat (UserID::MovieID::Rating::Timestamp), ml100k (u.data, tab-separated), "
    "movielens-csv (ratings.csv), sasrec ('user item' per line, file order = time), "
    "s3rec ('user item1 item2 ...' per line), csv, parquet (columns set by --*-col), "
    "synthetic (the built-in generator; --input is an optional TOML/JSON generator config)"
)


def main() -> None:
    """Console entry point: domain errors become one clear line and exit status 2."""
    try:
        app()
    except RecloopError as exc:
        stderr.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


@app.command()
def prepare(
    format: Annotated[str, typer.Option("--format", "-f", help=FORMAT_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to create.")],
    input: Annotated[
        Path | None, typer.Option("--input", "-i", help="Input log (or synthetic config).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    threads: Annotated[
        int | None, typer.Option(help="Preprocessing threads (default: all cores).")
    ] = None,
    duplicates: Annotated[
        str, typer.Option(help="Exact duplicates: drop, keep or error.")
    ] = "drop",
    min_user_events: Annotated[int, typer.Option(help="Drop users with fewer events.")] = 2,
    user_core: Annotated[int, typer.Option(help="k-core: min events per user.")] = 0,
    item_core: Annotated[int, typer.Option(help="k-core: min events per item.")] = 0,
    user_col: Annotated[str, typer.Option(help="csv/parquet: user column.")] = "user_id",
    item_col: Annotated[str, typer.Option(help="csv/parquet: item column.")] = "item_id",
    time_col: Annotated[
        str, typer.Option(help="csv/parquet: timestamp column ('none': file order).")
    ] = "timestamp",
    value_col: Annotated[str | None, typer.Option(help="csv/parquet: value column.")] = None,
    event_col: Annotated[str | None, typer.Option(help="csv/parquet: event-type column.")] = None,
    separator: Annotated[str, typer.Option(help="csv: field separator.")] = ",",
    users: Annotated[int | None, typer.Option(help="synthetic: number of users.")] = None,
    items: Annotated[int | None, typer.Option(help="synthetic: number of items.")] = None,
    seed: Annotated[int | None, typer.Option(help="synthetic: random seed.")] = None,
) -> None:
    """Read an interaction log and write a recloop dataset directory (CSR + vocab + manifest)."""
    from recloop.data.threads import configure_threads

    pool = configure_threads(threads)
    from recloop.data.prepare import FileSource, PrepareOptions, prepare_file
    from recloop.data.readers import FORMATS, ColumnMap
    from recloop.progress import progress_bar

    if format not in FORMATS:
        raise ConfigError(f"--format {format!r} is not one of: {', '.join(FORMATS)}")
    options = PrepareOptions(
        duplicates=duplicates,  # type: ignore[arg-type]  # validated by PrepareOptions
        min_user_events=min_user_events,
        user_core=user_core,
        item_core=item_core,
    )

    def notice(message: str) -> None:
        stderr.print(f"[yellow]note:[/] {message}", highlight=False)

    if format == "synthetic":
        config = _synthetic_config(input, users=users, items=items, seed=seed)
        manifest = _prepare_synthetic(config, out, options, overwrite, notice)
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
        source = FileSource(input, format, columns)
        if format == "parquet" and input.is_file():
            from recloop.data.readers import parquet_rows

            total, unit = float(parquet_rows(input)), "rows"
        else:
            total, unit = float(input.stat().st_size) if input.is_file() else 0.0, "bytes"
        with progress_bar(f"reading {input.name}", total, unit) as advance:
            manifest = prepare_file(
                source, out, options, overwrite=overwrite, on_progress=advance, notice=notice
            )
    counts = manifest["counts"]
    stdout.print(
        f"wrote {out}: {counts['users']:,} users, {counts['items']:,} items, "
        f"{counts['events']:,} events in {manifest['prepare_seconds']:.2f} s "
        f"({pool} threads)",
        highlight=False,
    )


def _synthetic_config(
    path: Path | None, *, users: int | None, items: int | None, seed: int | None
) -> Any:
    from recloop.data.synthetic import SyntheticConfig

    values: dict[str, object] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: no such synthetic config file")
        text = path.read_text()
        try:
            values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot parse synthetic config: {exc}") from exc
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


def _prepare_synthetic(
    config: Any, out: Path, options: Any, overwrite: bool, notice: Any
) -> dict[str, Any]:
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


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")],
    users: Annotated[int, typer.Option(help="Number of users.")] = 10_000,
    items: Annotated[int, typer.Option(help="Number of items.")] = 5_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    config: Annotated[Path | None, typer.Option(help="TOML/JSON generator config.")] = None,
) -> None:
    """Write a synthetic interaction log as Parquet (columns user, item, timestamp)."""
    from recloop.data.synthetic import generate_log

    synthetic = _synthetic_config(config, users=users, items=items, seed=seed)
    rows = generate_log(synthetic, out)
    stdout.print(f"wrote {out}: {rows:,} events", highlight=False)


@app.command()
def stats(
    directory: Annotated[Path, typer.Argument(help="A dataset directory.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
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


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its files.")] = Path(
        "demo-run"
    ),
    users: Annotated[int, typer.Option(help="Synthetic users.")] = 5_000,
    items: Annotated[int, typer.Option(help="Synthetic items.")] = 2_000,
) -> None:
    """The whole loop on the embedded default (synthetic data); later stages join as they land."""
    from recloop.data.threads import configure_threads

    configure_threads(None)
    from recloop.data.dataset import SequenceDataset
    from recloop.data.prepare import PrepareOptions
    from recloop.data.splits import leave_one_out

    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    stdout.rule("1. prepare: synthetic interaction log -> dataset")
    config = _synthetic_config(None, users=users, items=items, seed=0)
    _prepare_synthetic(config, data_dir, PrepareOptions(), True, None)
    stats(data_dir, json_output=False)
    dataset = SequenceDataset(data_dir, verify=True)
    split = leave_one_out(dataset.sequences)
    stdout.print(
        f"leave-one-out split: {split.train.num_events:,} training events, "
        f"{len(split.valid):,} validation and {len(split.test):,} test users",
        highlight=False,
    )
    stdout.print(
        f"popularity baseline on validation: HR@10 = {_popularity_hr10(split):.4f} "
        "(the number a sequential model must beat)",
        highlight=False,
    )


def _popularity_hr10(split: Any) -> float:
    import numpy as np

    counts = np.bincount(np.asarray(split.train.items))
    counts[0] = 0
    top = np.argsort(-counts, kind="stable")[:10]
    hits = np.isin(split.valid.targets, top)
    return float(hits.mean()) if len(hits) else math.nan


if __name__ == "__main__":
    main()
