"""Typed experiment configs loaded from TOML, with `section.key=value` overrides.

An unknown section or key, or a value of the wrong type, is a `ConfigError` that names it
(and the file). Model sections are validated by the model's own config dataclass.

    [model]            # type = "sasrec" | "hstu" | "bsarec", then that model's config fields
    [train]            # TrainConfig
    [eval]             # evaluation during training (max_length comes from [train])
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from recloop.errors import ConfigError, undecodable

LossName = Literal["full_softmax", "sampled_softmax", "bce"]
NegativeSampling = Literal["uniform", "in_batch", "mixed"]
Schedule = Literal["constant", "cosine", "linear"]
ValidationProtocol = Literal["full", "sampled100"]
TrainingSamples = Literal["windows", "prefixes"]
# How the item table is split over the processes (recloop.train.sharding); "none" keeps a
# whole table in every process (data-parallel only).
ShardingType = Literal["none", "table_wise", "column_wise", "row_wise"]
# The sharded table's fused optimizer (state per row); "adam" runs on CUDA only.
SparseOptimizer = Literal["rowwise_adagrad", "adam"]


@dataclass(frozen=True)
class TrainConfig:
    loss: LossName = "full_softmax"
    # Sampled softmax and the full softmax's `bpr_weight` term: negatives drawn per step,
    # shared by every position in the batch.
    num_negatives: int = 256
    # Full softmax only: leave the items already in a position's window out of its softmax,
    # as full-ranking evaluation masks a user's history (a repeat of the target stays in), so
    # no step pushes the user vector away from what it just consumed. Off by default: it
    # lowered validation on Video Games and test on Beauty (configs/beauty/bsarec-ema-masked).
    mask_history: bool = False
    # Full softmax only: add this weight x a pairwise (BPR) loss of each position's target
    # against `num_negatives` items drawn uniformly (shared by the batch), i.e. a push on the
    # targets that rank below random items: what the sampled-100 protocol measures. 0 = off.
    bpr_weight: float = 0.0
    negatives: NegativeSampling = "uniform"
    batch_size: int = 256  # global batch (windows) over all processes
    max_length: int = 50
    # Windows per user kept for training, most recent first (None = all: every prefix once).
    max_windows_per_user: int | None = None
    # "windows": a causal model learns every prefix of a window at once (a target at every
    # position). "prefixes": each prefix is its own sample with its target at the last
    # position, as a non-causal model (bsarec) must train; about (mean length / 2) times the
    # encoder work per target on short-sequence data.
    samples: TrainingSamples = "windows"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    schedule: Schedule = "constant"
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at lr * min_lr_ratio
    # Clip the global gradient norm to this; 0 turns clipping off (TOML has no null).
    grad_clip: float | None = 1.0
    # Learn each item's row as a free row plus the mean of rows shared by its attributes
    # (brand, category, ...; a dataset prepared with --item-attributes), so rare items borrow
    # from the items they resemble. Training-time only: the published version folds the sum
    # into a plain item table, so serving, compression and the online learner see no change.
    item_attributes: bool = False
    # Keep an exponential moving average of the weights with this decay (e.g. 0.999) and
    # validate, select and publish the average (recloop.train.averaging). None = off.
    ema_decay: float | None = None
    max_epochs: int = 100
    max_steps: int | None = None
    max_minutes: float | None = None
    eval_every_epochs: int = 1
    eval_every_steps: int | None = None  # overrides eval_every_epochs when set
    patience: int = 10  # evaluations without improvement before stopping
    select_metric: str = "NDCG@10"
    # Protocol of the validation metrics that select the checkpoint and stop early: "full"
    # ranking (the default), or "sampled100" when the number a run is judged by is the SASRec
    # paper's sampled protocol. The test metrics a run publishes are full ranking either way.
    eval_protocol: ValidationProtocol = "full"
    # Drop all-padding columns of each batch (models count positions from the most recent
    # item, so outputs do not change).
    trim_padding: bool = True
    # Batch windows of similar length together (sorted within runs of 64 batches, then the
    # batches shuffled), so that trimming removes most padding on short-sequence data.
    bucket_by_length: bool = True
    bf16: bool = False
    seed: int = 42
    num_workers: int = 0  # batch building is ~1 ms; worker processes cost more on 2 cores
    eval_user_batch_size: int = 1024
    # Evaluate a seeded random subset of this many users (None = all): full ranking over a
    # million-item catalogue costs O(users x items), so large catalogues evaluate on a sample.
    eval_max_users: int | None = None
    # Model parallelism (needs the `recloop[sharded]` extra): the item table becomes a TorchRec
    # EmbeddingCollection sharded over the torchrun processes, updated by a fused sparse
    # optimizer in the backward pass; the encoder stays data-parallel.
    sharding: ShardingType = "none"
    sparse_optimizer: SparseOptimizer = "rowwise_adagrad"
    sparse_lr: float = 0.05  # the sharded table's learning rate (the schedule scales it)
    # The item table's bound (None: none): training refuses a dataset with more items, and an
    # online learner continuing this model keeps its table within it (online.max_items).
    max_items: int | None = None

    def __post_init__(self) -> None:
        _check_literals(self)
        if self.sparse_lr <= 0:
            raise ConfigError(f"train.sparse_lr must be > 0, got {self.sparse_lr}")
        positive = ("num_negatives", "batch_size", "max_length", "max_epochs", "patience")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ConfigError(
                f"train.grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip}"
            )
        optional = ("max_steps", "max_windows_per_user", "eval_every_steps", "eval_max_users")
        for name in (*optional, "max_items"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.{name} must be >= 1 or absent, got {value}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"train.max_minutes must be > 0, got {self.max_minutes}")
        selectable = {f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20, 50)} | {"MRR"}
        if self.select_metric not in selectable:
            raise ConfigError(
                f"train.select_metric must be one of {sorted(selectable)}, "
                f"got {self.select_metric!r}"
            )
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in (0, 1) or absent, got {self.ema_decay}")
        if self.bpr_weight < 0:
            raise ConfigError(f"train.bpr_weight must be >= 0, got {self.bpr_weight}")
        if self.bpr_weight and self.loss != "full_softmax":
            raise ConfigError(
                f"train.bpr_weight needs train.loss = 'full_softmax', got {self.loss!r}"
            )
        if self.mask_history and self.loss != "full_softmax":
            raise ConfigError(
                f"train.mask_history needs train.loss = 'full_softmax', got {self.loss!r}"
            )
        if self.num_workers < 0:
            raise ConfigError(f"train.num_workers must be >= 0, got {self.num_workers}")
        self._check_sharding()

    def _check_sharding(self) -> None:
        """What a sharded item table cannot do: every lookup goes through one TorchRec call per
        step, so losses that draw items after the forward (BCE, the BPR term) are refused, and
        the attribute-fused table is a different module."""
        if self.sharding == "none":
            return
        refused = {
            "train.loss = 'bce'": self.loss == "bce",
            "train.bpr_weight": bool(self.bpr_weight),
            "train.item_attributes": self.item_attributes,
        }
        for what, present in refused.items():
            if present:
                raise ConfigError(
                    f"train.sharding = {self.sharding!r} does not support {what}; use "
                    "train.loss = 'sampled_softmax' (or 'full_softmax' on a small catalogue)"
                )


@dataclass(frozen=True)
class ExperimentConfig:
    model: dict[str, Any]  # "type" plus the model config's fields (validated by the model)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = "<defaults>"

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "train": dataclasses.asdict(self.train)}


def read_toml(path: Path | str) -> dict[str, Any]:
    """The tables of a TOML config file; a missing file or bad TOML is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {undecodable(exc)}; a TOML file is UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from exc


def load_config(path: Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        raw = read_toml(path)
        source = str(path)
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw, source)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    unknown = set(raw) - {"model", "train", "meta"}
    if unknown:
        raise ConfigError(f"{source}: unknown section [{sorted(unknown)[0]}]")
    model = dict(raw.get("model", {"type": "sasrec"}))
    if "type" not in model:
        raise ConfigError(f"{source}: [model] needs a type (sasrec or hstu)")
    train = build_section(TrainConfig, raw.get("train", {}), "train", source)
    return ExperimentConfig(model=model, train=train, source=source)


def apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(
            f"override {item!r} must look like section.key=value (e.g. train.lr=3e-3)"
        )
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word is a string: model.type=hstu
    raw.setdefault(section, {})[name] = value


# Keys that existed once, and why they went: a config that still sets one gets the reason, not
# "unknown key" (an old config should say what to change, not look like a typo).
REMOVED_KEYS = {
    "train.compile": (
        "train.compile was removed: torch.compile measured slower than eager training on CPU "
        "for the models recloop ships (bench/results/train_speed.json, from "
        "`python bench/train_speed.py`, whose compiled rows wrap the model in torch.compile "
        "themselves, so the claim can be re-checked); delete the key (training runs eager)"
    ),
}


def build_section(cls: type[Any], values: dict[str, Any], section: str, source: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if f"{section}.{key}" in REMOVED_KEYS:
            raise ConfigError(f"{source}: {REMOVED_KEYS[f'{section}.{key}']}")
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key {section}.{key}; known keys: {', '.join(sorted(known))}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str, source: str) -> Any:
    """Checks a TOML value against a dataclass field type (ints are accepted as floats)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {name} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{source}: {name} must be a list of {len(args)}, got {value!r}")
        return tuple(_coerce(v, a, name, source) for v, a in zip(value, args, strict=True))
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{source}: {name} must be {expected}, got {value!r}")


def _check_literals(instance: Any) -> None:
    hints = typing.get_type_hints(type(instance))
    for f in fields(instance):
        hint = hints[f.name]
        if typing.get_origin(hint) is Literal and getattr(instance, f.name) not in hint.__args__:
            raise ConfigError(
                f"train.{f.name} must be one of {list(hint.__args__)}, "
                f"got {getattr(instance, f.name)!r}"
            )
