"""The `[online]` section of a TOML file: the online learner's settings, validated on load,
and the loss it fine-tunes with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from recloop.config import (
    LossName,
    NegativeSampling,
    TrainConfig,
    apply_override,
    build_section,
    read_toml,
)
from recloop.errors import ConfigError
from recloop.registry import Manifest
from recloop.train.precision import resolve_bf16


@dataclass(frozen=True)
class OnlineConfig:
    """The `[online]` section of a TOML file (or `online.key=value` overrides)."""

    consumer: str = "online-learner"  # the event-log consumer name; one learner per name
    batch_events: int = 256  # events per micro-batch: one read, one scoring pass, the steps
    steps_per_batch: int = 2  # 2 beat 1 (and 1 with more replay) on bench/online_replay.py
    # Older users' sequences mixed into every step (0 = none). 64 with the learning rates
    # below beat 128 with half of them on the first 24,000 Beauty replay events
    # (bench/results/online_replay-lr-validation.json); replay windows are short, so the step
    # costs about the same either way (bench/results/online-profile.json).
    replay_windows: int = 64
    # Which positions a step learns: "new", only those whose target is one of the micro-batch's
    # events (replay windows: their last `replay_positions`); "all", every position of every
    # window, its older ones learned again at each step. "new" costs a few targets per event
    # instead of a user's whole window (bench/online_replay.py compares the two).
    train_positions: Literal["new", "all"] = "new"
    replay_positions: int = 1
    # > 0: the positions "new" leaves out are learned too, with a sampled softmax over this
    # many mixed negatives (log-q corrected): far cheaper per position than the full softmax,
    # and on the Beauty replay it keeps what learning every position gave (bench/online_replay.py).
    context_negatives: int = 2048
    # The share of those positions learned at each step (a random draw, weighted by
    # 1 / share): a touched user's older positions are relearned at every step anyway.
    context_fraction: float = 1.0
    # bf16 operands for the losses' catalogue-wide matmuls (the full softmax on the new
    # positions, the sampled softmax against its negatives); the softmax and the gradients'
    # sums stay fp32. "auto": on where the CPU has native bf16 (recloop.train.precision).
    # Off by default: on an avx512_bf16 CPU the learner's losses took 19% longer per step with
    # it (bench/results/online-profile-bf16.json), the casts costing more than the matmuls
    # save, although the sampled softmax alone ran faster with it in a microbenchmark.
    bf16: bool | Literal["auto"] = False
    lr: float = 1e-3  # AdamW, dense weights (the base model's own training rate)
    embedding_lr: float = 2e-3  # lazy Adam, item rows
    train_dense: bool = True  # False: only item rows learn (smaller deltas)
    # "auto": the loss (and negatives) the starting model was trained with, from its manifest;
    # fine-tuning a full-softmax model with sampled softmax shifts its scores (measured on the
    # Beauty replay: below the frozen model), so the objective stays what it was.
    loss: LossName | Literal["auto"] = "auto"
    num_negatives: int | None = None  # sampled softmax; None: the starting model's (or 256)
    negatives: NegativeSampling | Literal["auto"] = "auto"
    grad_clip: float | None = 1.0
    admit_after: int = 2  # occurrences before an unseen item joins the vocabulary ("count")
    # Bounded item tables (recloop.online.slots): None = the table grows with every admitted
    # item, as before; N = it never holds more than N items (None here takes the starting
    # model's `train.max_items`). Single-process only. When it is full, an admitted item
    # takes the slot of the row `evict` picks ("lru": least recently seen; "decayed": lowest
    # time-decayed frequency); rows seen in the last `evict_ttl` events are never evicted
    # (a new item waits, pending, until one may go).
    max_items: int | None = None
    evict: Literal["lru", "decayed"] = "lru"
    evict_ttl: int = 0
    # "count": admit at `admit_after` occurrences; "decayed": when the occurrences, each
    # halved every `decay_half_life` events, add up to `admit_after` (a burst admits, a
    # trickle spread over a long time does not). `decay_half_life` also drives evict="decayed".
    admit: Literal["count", "decayed"] = "count"
    decay_half_life: float = 10_000.0
    # Items counted while pending, at most (the least recently seen is forgotten first), so an
    # unbounded id stream keeps memory flat; None: 4 x max_items (unbounded without max_items).
    max_pending: int | None = None
    new_item_init: Literal["cooccurrence", "attributes"] = "cooccurrence"
    publish_every_events: int = 2000
    publish_every_seconds: float = 5.0  # also publish pending work this often (0 = never)
    compact_every: int = 20  # deltas in a chain before compaction into a full version (0: never)
    promote: bool = False  # move production to each publish (also done when production is
    # the version being fine-tuned, so a service following production follows the learner)
    exclude_seen: bool = True  # prequential ranking masks the user's history items
    # Also rank every event with the frozen starting model (the prequential comparison); one
    # more forward and full-catalogue scoring per event, measured by bench/online_replay.py.
    score_frozen: bool = True
    seed: int = 0
    poll_seconds: float = 0.2  # --follow: wait between empty reads
    # Under torchrun: "row_wise" shards the item table over the processes (TorchRec, fused
    # row-wise Adagrad at `table_lr`: fbgemm's CPU kernels have no Adam), each learning the
    # events of its own users (recloop.online.sharded). `table_headroom` rows are reserved
    # for admitted items.
    sharding: Literal["none", "row_wise"] = "none"
    table_lr: float = 0.01
    # The Adagrad state is multiplied by this before each step (1 = plain Adagrad, whose steps
    # shrink as 1/sqrt(steps): an online learner would slowly stop learning).
    table_state_decay: float = 0.99
    table_headroom: int = 4096

    def __post_init__(self) -> None:
        if self.num_negatives is not None and self.num_negatives < 1:
            raise ConfigError(f"online.num_negatives must be >= 1, got {self.num_negatives}")
        positive = (
            "batch_events", "steps_per_batch", "admit_after", "replay_positions", "table_headroom"
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"online.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("replay_windows", "compact_every", "context_negatives"):
            if getattr(self, name) < 0:
                raise ConfigError(f"online.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "embedding_lr", "table_lr", "poll_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"online.{name} must be > 0, got {getattr(self, name)}")
        if self.publish_every_events < 1:
            raise ConfigError(
                f"online.publish_every_events must be >= 1, got {self.publish_every_events}"
            )
        if self.publish_every_seconds < 0:
            raise ConfigError(
                f"online.publish_every_seconds must be >= 0, got {self.publish_every_seconds}"
            )
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ConfigError(
                f"online.grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip}"
            )
        if not 0 < self.context_fraction <= 1:
            raise ConfigError(
                f"online.context_fraction must be in (0, 1], got {self.context_fraction}"
            )
        if not 0 < self.table_state_decay <= 1:
            raise ConfigError(
                f"online.table_state_decay must be in (0, 1], got {self.table_state_decay}"
            )
        if self.sharding not in ("none", "row_wise"):
            raise ConfigError(
                f"online.sharding must be 'none' or 'row_wise', got {self.sharding!r}"
            )
        if self.train_positions not in ("new", "all"):
            raise ConfigError(
                f"online.train_positions must be 'new' or 'all', got {self.train_positions!r}"
            )
        if not self.consumer.strip():
            raise ConfigError("online.consumer must not be empty")
        self._check_bounded_table()

    def _check_bounded_table(self) -> None:
        for name in ("max_items", "max_pending"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ConfigError(f"online.{name} must be >= 1 (or unset), got {value!r}")
        if self.evict_ttl < 0:
            raise ConfigError(f"online.evict_ttl must be >= 0 events, got {self.evict_ttl}")
        if not self.decay_half_life > 0:
            raise ConfigError(
                f"online.decay_half_life must be > 0 events, got {self.decay_half_life}"
            )
        if self.evict not in ("lru", "decayed"):
            raise ConfigError(f"online.evict must be 'lru' or 'decayed', got {self.evict!r}")
        if self.admit not in ("count", "decayed"):
            raise ConfigError(f"online.admit must be 'count' or 'decayed', got {self.admit!r}")
        if self.max_items is not None and self.sharding != "none":
            raise ConfigError(
                "online.max_items is single-process only: a row-wise sharded table "
                "(online.sharding = 'row_wise') cannot evict rows; unset one of them"
            )

    @property
    def pending_limit(self) -> int | None:
        """Items counted while pending, at most (None: no limit)."""
        if self.max_pending is not None:
            return self.max_pending
        return None if self.max_items is None else 4 * self.max_items


def load_online_config(path: Path | None, overrides: Sequence[str] = ()) -> OnlineConfig:
    """`[online]` of a TOML file (other sections ignored) plus `online.key=value` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        raw = read_toml(path)
        source = str(path)
    for item in overrides:
        if not item.strip().startswith("online."):
            raise ConfigError(f"override {item!r} must look like online.key=value")
        apply_override(raw, item)
    config: OnlineConfig = build_section(OnlineConfig, raw.get("online", {}), "online", source)
    return config


def loss_config(config: OnlineConfig, origin: Manifest) -> TrainConfig:
    """The training loss settings: the config's, with "auto" filled from how the origin
    version was trained (sampled softmax with 256 uniform negatives when it does not say).
    History masking follows the origin's training whenever the loss is the full softmax."""
    trained = (origin.training.get("config") or {}).get("train") or {}
    loss = config.loss if config.loss != "auto" else trained.get("loss", "sampled_softmax")
    negatives = config.negatives if config.negatives != "auto" else trained.get("negatives")
    count = config.num_negatives or trained.get("num_negatives") or 256
    mask_history = loss == "full_softmax" and bool(trained.get("mask_history", False))
    return TrainConfig(
        loss=loss,
        negatives=negatives or "uniform",
        num_negatives=int(count),
        mask_history=mask_history,
        bf16=resolve_bf16(config.bf16),
    )


def context_loss_config(config: OnlineConfig) -> TrainConfig | None:
    """The loss of the positions "new" leaves out (None: they are not learned): a sampled
    softmax over `context_negatives` mixed negatives."""
    if not config.context_negatives or config.train_positions != "new":
        return None
    return TrainConfig(
        loss="sampled_softmax",
        negatives="mixed",
        num_negatives=config.context_negatives,
        bf16=resolve_bf16(config.bf16),
    )
