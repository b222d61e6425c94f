"""`recloop compress` and `recloop export`: a registry version in, a compressed version (or
exported encoder files) out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer

from recloop.cli.common import RegistryOption, VersionOption, command_line, stdout
from recloop.errors import ConfigError

if TYPE_CHECKING:
    from recloop.compress.distill import DistillConfig
    from recloop.compress.export import ExportReport
    from recloop.compress.pipeline import CompressResult

CONFIG_SECTIONS = ("model", "train", "distill", "meta")

MethodOption = Annotated[
    str, typer.Option(help="int8, int4, prune-magnitude, prune-structured or distill.")
]
SparsityOption = Annotated[
    float | None, typer.Option(help="Pruning: fraction of dense weights removed, in (0, 1).")
]
CompressDataOption = Annotated[
    Path | None, typer.Option(help="Dataset (default: the version's own, if present).")
]
CompressConfigOption = Annotated[
    Path | None,
    typer.Option(
        help="TOML: \\[model] (the student, for distill; a training config fits), "
        "\\[train], \\[distill]."
    ),
]
DenseBitsOption = Annotated[
    int, typer.Option(help="int8/int4: Linear weights int8 (8) or left float (32).")
]
KeepDeadItemsOption = Annotated[
    bool, typer.Option(help="prune-structured: keep table rows of never-trained items.")
]
MaxMinutesOption = Annotated[
    float | None, typer.Option(help="Fine-tune / distillation wall-clock budget.")
]
EvaluateOption = Annotated[
    bool, typer.Option(help="Record valid/test full-ranking metrics (needs the dataset).")
]
OverridesArgument = Annotated[
    list[str] | None,
    typer.Argument(help="section.key=value overrides, e.g. distill.alpha=0.7"),
]
# The metrics `recloop compress` prints, when the method produced them.
SHOWN_METRICS = (
    "test/NDCG@10",
    "test/HR@10",
    "compression/size_ratio",
    "compression/relative_test_NDCG@10",
    "compression/dense_sparsity",
    "parity/top10_overlap",
    "parity/max_score_error",
)


def compress_command(
    registry: RegistryOption,
    method: MethodOption,
    version: VersionOption = "latest",
    sparsity: SparsityOption = None,
    data: CompressDataOption = None,
    config: CompressConfigOption = None,
    dense_bits: DenseBitsOption = 8,
    keep_dead_items: KeepDeadItemsOption = False,
    max_minutes: MaxMinutesOption = None,
    evaluate: EvaluateOption = True,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads.")] = None,
    overrides: OverridesArgument = None,
) -> None:
    """Compress a registry version and publish the result as a new version (prints its id)."""
    import torch

    from recloop.compress.pipeline import CompressOptions, compress_version
    from recloop.registry import Registry

    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    extra = list(overrides or [])
    if max_minutes is not None:
        extra.append(f"train.max_minutes={max_minutes}")
    tables = _config_tables(config, extra)
    options = CompressOptions(
        method=method,
        sparsity=sparsity,
        dense_bits=dense_bits,
        data=data,
        train=tables.train,
        student=tables.student,
        distill=tables.distill,
        prune_dead_items=not keep_dead_items,
        evaluate=evaluate,
        command=command_line(),
    )
    result = compress_version(Registry(registry, create=False), version, options)
    _print_compressed(result)


class _ConfigTables(NamedTuple):
    student: dict[str, Any] | None  # [model], for distill
    train: dict[str, Any]  # only the keys given: each method keeps its own defaults for the rest
    distill: DistillConfig


def _config_tables(path: Path | None, overrides: list[str]) -> _ConfigTables:
    """The --config file's tables with the overrides applied, [train] and [distill] checked."""
    from recloop.compress.distill import DistillConfig
    from recloop.config import TrainConfig, build_section

    raw = read_config(path, overrides)
    source = str(path) if path is not None else "<command line>"
    train_values = dict(raw.get("train", {}))
    train = build_section(TrainConfig, train_values, "train", source)
    return _ConfigTables(
        student=dict(raw["model"]) if "model" in raw else None,
        train={key: getattr(train, key) for key in train_values},
        distill=build_section(DistillConfig, dict(raw.get("distill", {})), "distill", source),
    )


def _print_compressed(result: CompressResult) -> None:
    metrics = result.metrics
    summary = "  ".join(f"{key} {metrics[key]:.4g}" for key in SHOWN_METRICS if key in metrics)
    stdout.print(
        f"{result.method} of {result.parent} published as {result.version}: {summary}",
        highlight=False,
    )
    print(result.version)


def export_command(
    registry: RegistryOption,
    out: Annotated[Path, typer.Option(help="New directory for the exported files.")],
    version: VersionOption = "latest",
    data: Annotated[
        Path | None, typer.Option(help="Dataset whose test histories check parity.")
    ] = None,
    quantize_dense: Annotated[
        bool, typer.Option(help="Also write encoder.int8.onnx (ORT dynamic int8 dense layers).")
    ] = True,
    torchscript: Annotated[
        bool, typer.Option(help="Also try a TorchScript trace (kept if it matches).")
    ] = True,
    samples: Annotated[int, typer.Option(help="Histories the parity check runs on.")] = 512,
) -> None:
    """Export a version's user encoder to ONNX (and TorchScript), checked against torch."""
    from recloop.compress.export import export_encoder
    from recloop.compress.pipeline import open_dataset
    from recloop.compress.quantize import sample_histories
    from recloop.registry import Registry
    from recloop.registry.loading import load_model

    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty directory")
    store = Registry(registry, create=False)
    resolved = store.resolve(version)
    manifest = store.manifest(resolved)
    dataset = open_dataset(store, resolved, manifest, data, required=False)
    model, _ = load_model(store, resolved)
    histories = sample_histories(
        dataset,
        num_items=int(model.item_embedding.num_items),
        max_length=int(model.config.max_length),
        count=samples,
    ).numpy()
    report = export_encoder(
        model, out, histories, quantize_dense=quantize_dense, torchscript=torchscript
    )
    _print_export(report)


def _print_export(report: ExportReport) -> None:
    parity = report.onnx_parity
    stdout.print(
        f"{report.onnx} ({report.onnx_bytes:,} bytes): max query error "
        f"{parity.max_query_error:.3g}, top-10 overlap {parity.top10_overlap:.4f}",
        highlight=False,
    )
    stdout.print(
        f"{report.tables}: item_table (the graph's input of that name) and scoring_table (what "
        "its query vectors are scored against)",
        highlight=False,
    )
    if report.onnx_int8 is not None and report.onnx_int8_parity is not None:
        int8 = report.onnx_int8_parity
        stdout.print(
            f"{report.onnx_int8} ({report.onnx_int8_bytes:,} bytes, int8 dense): max query "
            f"error {int8.max_query_error:.3g}, max score error {int8.max_score_error:.3g}, "
            f"top-10 overlap {int8.top10_overlap:.4f}",
            highlight=False,
        )
    if report.torchscript is not None:
        stdout.print(f"{report.torchscript} (TorchScript trace, parity checked)")
    elif report.torchscript_error is not None:
        stdout.print(f"TorchScript not written: {report.torchscript_error}", highlight=False)


def read_config(path: Path | None, overrides: list[str]) -> dict[str, Any]:
    """The TOML tables of a compress config, with `section.key=value` overrides applied."""
    from recloop.config import apply_override, read_toml

    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    unknown = sorted(set(raw) - set(CONFIG_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{path or 'overrides'}: unknown section [{unknown[0]}]; "
            f"expected {', '.join(CONFIG_SECTIONS)}"
        )
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path or 'overrides'}: [{name}] must be a table")
    return raw


def register(app: typer.Typer) -> None:
    app.command("compress")(compress_command)
    app.command("export")(export_command)
