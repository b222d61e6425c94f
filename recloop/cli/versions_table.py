"""The version list as a rich table, for ``recloop models list``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table

from recloop.registry.manifest import VersionInfo

HEADLINE_METRICS = ("test/HR@10", "test/NDCG@10", "valid/NDCG@10")


def format_versions_table(infos: Sequence[VersionInfo]) -> Table:
    """A rich table for ``recloop models list``; production is marked in the first column."""
    table = Table(title="model versions")
    table.add_column("", no_wrap=True)
    table.add_column("id", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("kind")
    table.add_column("method")
    table.add_column("parent")
    table.add_column("model")
    table.add_column("metrics", min_width=36, overflow="fold")
    broken = [info for info in infos if info.problem is not None]
    if broken:
        table.caption = f"{len(broken)} broken version(s): their manifest cannot be read"
    for info in infos:
        if info.problem is not None:
            marks = ["[bold green]production[/]"] * info.is_production + ["[bold red]broken[/]"]
            table.add_row(", ".join(marks), info.id, "", "?", "?", "?", "?", escape(info.status))
            continue
        table.add_row(
            "[bold green]production[/]" if info.is_production else "",
            info.id,
            info.created_at.replace("T", " ")[:16],  # to the minute, to keep rows narrow
            _kind(info),
            info.method,
            info.parent or "-",
            info.model_type,
            ", ".join(f"{k}={_format_metric(v)}" for k, v in _headline(info.metrics)) or "-",
        )
    return table


def _kind(info: VersionInfo) -> str:
    """The kind column: full, delta (depth 3), full, sharded row_wise x2."""
    kind = f"{info.kind} (depth {info.chain_depth})" if info.chain_depth else info.kind
    return f"{kind}, sharded {info.sharding}" if info.sharding else kind


def _headline(metrics: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The few metrics a version list shows: the headline ones if present, else the first 3."""
    chosen = [(k, metrics[k]) for k in HEADLINE_METRICS if k in metrics]
    return chosen or list(metrics.items())[:3]


def _format_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
