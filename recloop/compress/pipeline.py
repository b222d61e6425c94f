"""`recloop compress`: one registry version in, one compressed registry version out.

    recloop compress --registry R --version v000001 --method int8
    recloop compress --registry R --version v000001 --method prune-structured --sparsity 0.5
    recloop compress --registry R --version v000001 --method distill \
        --config configs/beauty/student.toml distill.alpha=0.5

Everything that can be checked is checked before any work: the version exists, the method
suits it (a quantized version cannot be quantized again, pruned or fine-tuned), the sparsity
is in (0, 1), the dataset matches the version's vocabulary, the student config is valid. A
refused request writes nothing. The new version's manifest records ``parent`` and ``method``,
the model config with its ``compression`` entry, the dataset and vocabulary of the parent, and
metrics: validation and test full-ranking metrics when the dataset is available, the weights
file size against the parent's, and for quantization the parity with the parent (top-10
overlap, score errors); for pruning the sparsity reached.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes

from recloop.compress.distill import (
    DistillConfig,
    build_student,
    distill,
    inherit_teacher_weights,
)
from recloop.compress.finetune import FitResult, evaluate_split, fit
from recloop.compress.prune import (
    apply_masks,
    check_sparsity,
    dead_items,
    prune_magnitude,
    prune_structured,
)
from recloop.compress.quantize import quantize_model, sample_histories, score_parity
from recloop.config import TrainConfig
from recloop.data.dataset import SequenceDataset
from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder
from recloop.models.compressed import CompressionSpec, count_dense_parameters
from recloop.models.factory import MODEL_TYPES, config_to_dict
from recloop.registry import Manifest, Registry, publish_version
from recloop.registry.loading import check_vocabulary, load_model
from recloop.registry.publish import inherited_side_files

METHODS = ("int8", "int4", "prune-magnitude", "prune-structured", "distill")
PRUNING = ("prune-magnitude", "prune-structured")
# A fine-tune after pruning is short: a few epochs from the pruned weights, smaller steps.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "lr": 5e-4,
    "warmup_steps": 20,
    "max_epochs": 3,
    "patience": 2,
}


@dataclass(frozen=True)
class CompressOptions:
    method: str
    sparsity: float | None = None  # prune-*: fraction of the dense weights removed, in (0, 1)
    dense_bits: int = 8  # int8 / int4: Linear weights int8 (8) or left float (32)
    data: Path | None = None  # dataset for fine-tuning and metrics (default: the version's)
    # Training of the fine-tune / the student ([train] table; defaults per method).
    train: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] | None = None  # distill: the student's [model] table (type + fields)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune_dead_items: bool = True  # prune-structured: drop table rows of items never trained on
    evaluate: bool = True  # full-ranking valid/test metrics (needs the dataset)
    show_progress: bool = True
    command: str | None = None

    def __post_init__(self) -> None:
        # The messages name the `recloop compress` options and config tables, as they always did.
        method = self.method
        if method not in METHODS:
            raise ConfigError(f"--method {method!r} is not one of: {', '.join(METHODS)}")
        if method in PRUNING:
            if self.sparsity is None:
                raise ConfigError(f"--method {method} needs --sparsity, a fraction in (0, 1)")
            check_sparsity(self.sparsity)
        elif self.sparsity is not None:
            raise ConfigError(f"--sparsity applies to pruning methods, not to {method}")
        if self.dense_bits not in (8, 32):
            raise ConfigError(f"--dense-bits must be 8 or 32, got {self.dense_bits}")
        if not isinstance(self.train, dict):
            raise ConfigError(f"[train] must be a table, got {self.train!r}")
        if self.student is not None and not isinstance(self.student, dict):
            raise ConfigError(f"[model] (student) must be a table, got {self.student!r}")
        if method == "distill" and not self.student:
            raise ConfigError("--method distill needs a student: a [model] table in --config")
        if method != "distill" and self.student:
            raise ConfigError(
                f"a [model] (student) table applies to --method distill, not {method}"
            )
        if not isinstance(self.distill, DistillConfig):
            raise ConfigError(f"[distill] must be a DistillConfig, got {self.distill!r}")
        for name in ("prune_dead_items", "evaluate", "show_progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")


@dataclass
class CompressResult:
    version: str
    parent: str
    method: str
    metrics: dict[str, float]
    model: SequentialEncoder = field(repr=False)
    fit: FitResult | None = field(default=None, repr=False)


def compress_version(registry: Registry, ref: str, options: CompressOptions) -> CompressResult:
    """Compresses version `ref` with `options.method` and publishes the result."""
    plan = _validate(registry, ref, options)
    model, _ = load_model(registry, plan.parent)
    metrics: dict[str, float] = {}
    training: dict[str, Any] = {"method": options.method}
    if options.method in ("int8", "int4"):
        compressed, result_fit = _quantize(model, plan, options, metrics, training), None
    elif options.method in PRUNING:
        compressed, result_fit = _prune(model, plan, options, metrics, training)
    else:  # distill
        compressed, result_fit = _distill(model, plan, options, training)
    compressed = compressed.cpu().eval()

    if result_fit is not None:
        training.update(_fit_summary(result_fit))
        training["train_config"] = dataclasses.asdict(plan.train)
    if plan.dataset is not None and options.evaluate:
        metrics.update(_split_metrics(compressed, plan.dataset))
    tensors = {k: v.detach().contiguous().cpu() for k, v in compressed.state_dict().items()}
    metrics.update(_size_metrics(tensors, plan.manifest, metrics))
    training["command"] = options.command or " ".join(sys.argv)
    version = _publish(registry, plan, compressed, tensors, options.method, metrics, training)
    return CompressResult(version, plan.parent, options.method, metrics, compressed, result_fit)


def _quantize(
    model: SequentialEncoder,
    plan: _Plan,
    options: CompressOptions,
    metrics: dict[str, float],
    training: dict[str, Any],
) -> SequentialEncoder:
    """int8 / int4 codes, and their score parity with the float parent."""
    embedding_bits = 8 if options.method == "int8" else 4
    compressed = quantize_model(
        model, embedding_bits=embedding_bits, linear_bits=options.dense_bits
    )
    histories = sample_histories(
        plan.dataset, num_items=_num_items(model), max_length=_max_length(model)
    )
    metrics.update(score_parity(model, compressed, histories).as_metrics())
    training["dense_bits"] = options.dense_bits
    return compressed


def _prune(
    model: SequentialEncoder,
    plan: _Plan,
    options: CompressOptions,
    metrics: dict[str, float],
    training: dict[str, Any],
) -> tuple[SequentialEncoder, FitResult]:
    """Magnitude or structured pruning, then a fine-tune from the pruned weights."""
    method = options.method
    dataset, sparsity = _checked(plan.dataset), check_sparsity(options.sparsity)
    before = count_dense_parameters(model)[0]
    after_step: Callable[[], None] | None = None
    if method == "prune-magnitude":
        compressed, masks = prune_magnitude(model, sparsity)

        def reapply_masks() -> None:  # pruned weights stay zero through the fine-tune
            apply_masks(compressed, masks)

        after_step = reapply_masks

    else:
        dead = dead_items(dataset) if options.prune_dead_items else None
        compressed = prune_structured(model, sparsity, dead=dead)
        if dead is not None:
            metrics["compression/dead_items_pruned"] = float(dead[1:].sum())
    result_fit = fit(
        compressed,
        dataset,
        plan.train,
        after_step=after_step,
        evaluate_start=True,
        description=method,
        show_progress=options.show_progress,
    )
    after = count_dense_parameters(compressed)[0]
    metrics["compression/target_sparsity"] = sparsity
    metrics["compression/dense_sparsity"] = 1.0 - after / max(before, 1)
    metrics["compression/dense_parameters"] = float(after)
    training["sparsity"] = sparsity
    return compressed, result_fit


def _distill(
    model: SequentialEncoder, plan: _Plan, options: CompressOptions, training: dict[str, Any]
) -> tuple[SequentialEncoder, FitResult]:
    """A student trained on the teacher's (`model`'s) soft targets."""
    student = build_student(model, options.student or {})
    if options.distill.init == "teacher":
        inherit_teacher_weights(model, student)
    result_fit = distill(
        model,
        student,
        _checked(plan.dataset),
        plan.train,
        options.distill,
        show_progress=options.show_progress,
    )
    training["distill"] = dataclasses.asdict(options.distill)
    training["student"] = dict(options.student or {})
    return student, result_fit


def _split_metrics(model: SequentialEncoder, dataset: SequenceDataset) -> dict[str, float]:
    """Full-ranking valid/ and test/ metrics of the compressed model."""
    split = dataset.leave_one_out()
    metrics: dict[str, float] = {}
    for name, examples in (("valid", split.valid), ("test", split.test)):
        values = evaluate_split(model, examples, split, _max_length(model))
        metrics.update({f"{name}/{k}": v for k, v in values.items()})
    return metrics


def _size_metrics(
    tensors: dict[str, Any], manifest: Manifest, metrics: dict[str, float]
) -> dict[str, float]:
    """Weights file size against the parent's, and test NDCG@10 relative to the parent's."""
    weights_bytes = len(safetensors_bytes(tensors, metadata={"format": "pt"}))
    parent_bytes = manifest.weights_bytes  # a sharded parent's shard files count too
    sizes = {
        "compression/weights_bytes": float(weights_bytes),
        "compression/parent_weights_bytes": float(parent_bytes),
        "compression/size_ratio": weights_bytes / parent_bytes,
    }
    parent_ndcg = manifest.metrics.get("test/NDCG@10")
    if isinstance(parent_ndcg, int | float) and parent_ndcg > 0 and "test/NDCG@10" in metrics:
        sizes["compression/relative_test_NDCG@10"] = metrics["test/NDCG@10"] / parent_ndcg
    return sizes


def _publish(
    registry: Registry,
    plan: _Plan,
    compressed: SequentialEncoder,
    tensors: dict[str, Any],
    method: str,
    metrics: dict[str, float],
    training: dict[str, Any],
) -> str:
    """The compressed version, a child of the parent with the parent's vocabulary files."""
    parent_id, manifest = plan.parent, plan.manifest
    return publish_version(
        registry,
        tensors,
        model=config_to_dict(compressed),
        dataset=manifest.dataset,
        metrics=metrics,
        parent=parent_id,
        method=method,
        training=training,
        side=inherited_side_files(registry, parent_id, manifest),
    )


# --------------------------------------------------------------------------- validation


@dataclass
class _Plan:
    parent: str
    manifest: Manifest
    dataset: SequenceDataset | None
    train: TrainConfig


def _validate(registry: Registry, ref: str, options: CompressOptions) -> _Plan:
    """Every check that does not need the weights; raises before anything is written."""
    method = options.method
    parent = registry.resolve(ref)
    manifest = registry.manifest(parent)
    model_json = manifest.model
    _check_parent(parent, manifest, method)
    needs_data = method in PRUNING or method == "distill"
    dataset = open_dataset(registry, parent, manifest, options.data, required=needs_data)
    train = _train_config(model_json, options)
    if method == "distill" and options.student is not None:
        _check_student(options.student, train)
    return _Plan(parent, manifest, dataset, train)


def _check_parent(parent: str, manifest: Manifest, method: str) -> None:
    """The version is a model type compression supports, and `method` applies to it."""
    model_json = manifest.model
    model_type = model_json.get("type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"version {parent} is a {model_type!r} model; compression supports "
            f"{', '.join(MODEL_TYPES)}"
        )
    spec = CompressionSpec.from_dict(model_json.get("compression") or {})
    if spec.is_quantized and method != "distill":
        raise ConfigError(
            f"--method {method} does not apply to version {parent}: it is quantized already "
            f"(embedding {spec.embedding_bits} bits, dense {spec.linear_bits} bits, "
            f"method {manifest.method!r}); compress its float parent "
            f"{manifest.parent} instead"
        )


def _train_config(model_json: Mapping[str, Any], options: CompressOptions) -> TrainConfig:
    """The fine-tune's / student's [train] table over the method's defaults."""
    train_values: dict[str, Any] = {"max_length": int(model_json.get("max_length", 50))}
    if options.method in PRUNING:
        train_values.update(FINETUNE_DEFAULTS)
    train_values.update(options.train)
    try:
        train = TrainConfig(**train_values)
    except TypeError as error:
        raise ConfigError(f"[train]: {error}") from None
    if train.item_attributes:
        raise ConfigError(
            "train.item_attributes applies to `recloop train`: a published version has its "
            "attributes folded into its item table already"
        )
    if train.max_length != int(model_json.get("max_length", 50)):
        raise ConfigError(
            f"train.max_length={train.max_length} differs from the version's window length "
            f"{model_json.get('max_length')}"
        )
    return train


def _check_student(student: dict[str, Any], train: TrainConfig) -> None:
    student_type = student.get("type")
    if student_type not in MODEL_TYPES:
        raise ConfigError(
            f"student model.type {student_type!r} is not one of {', '.join(MODEL_TYPES)}"
        )
    # Builds (tiny cost) to validate every field now rather than after loading the teacher.
    probe = dict(student)
    probe.pop("type")
    probe.update(num_items=1, max_length=train.max_length)
    from recloop.models.factory import build_model

    build_model(str(student_type), probe)


def open_dataset(
    registry: Registry,
    parent: str,
    manifest: Manifest,
    data: Path | None,
    *,
    required: bool,
) -> SequenceDataset | None:
    """The dataset given, else the version's own if its directory still exists."""
    if data is None:
        recorded = (manifest.dataset or {}).get("path")
        if recorded and Path(recorded, "manifest.json").is_file():
            data = Path(recorded)
    if data is None:
        if required:
            raise ConfigError(
                f"version {parent}'s dataset directory is not available; pass --data DIR"
            )
        return None
    dataset = SequenceDataset(Path(data))
    check_vocabulary(registry, parent, dataset.manifest["files"]["items.parquet"]["sha256"])
    return dataset


def _checked(dataset: SequenceDataset | None) -> SequenceDataset:
    if dataset is None:  # _validate requires one for these methods
        raise ConfigError("this method needs a dataset: pass --data DIR")
    return dataset


def _fit_summary(result: FitResult) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "best_step": result.best_step,
        "epochs": round(result.epochs, 3),
        "train_seconds": round(result.seconds, 2),
        "stopped_by": result.stopped_by,
        "history": result.history,
    }


def _num_items(model: SequentialEncoder) -> int:
    return int(model.item_embedding.num_items)


def _max_length(model: SequentialEncoder) -> int:
    return int(model.config.max_length)
