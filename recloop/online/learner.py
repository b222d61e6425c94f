"""The online learner: events in, delta versions out, with exact event accounting.

    recloop online --registry registry --event-log events.db            # until caught up
    recloop online --registry registry --event-log events.db --follow   # run as a service

Each turn reads a micro-batch of events after the current offset and
1. maps them to dense ids; an unseen item is counted and, after `admit_after` occurrences,
   joins the vocabulary with a row initialised from its co-occurring items or attributes;
2. scores every event with the online model and the frozen starting model before learning
   from it (prequential HR@10, logged to RUN/prequential.csv and plotted);
3. appends the items to the users' sequences and takes optimizer steps on the touched users'
   sequences plus a replay sample of other users' (so it does not forget): AdamW on the dense
   weights, lazy Adam on the item rows (a delta then holds only the rows that moved).
Every `publish_every_events` events or `publish_every_seconds` seconds it publishes a delta
version (changed rows, new rows, moved dense weights, grown vocabulary, the event offset it
covers) and commits that offset; every `compact_every` deltas it compacts the chain.

Crash safety: the published manifest is the source of truth. A restarted learner continues
from its newest published version and that version's offset, so no event is lost and none is
applied twice to a published version; the work since the last publish is redone. User
sequences and pending new items are rebuilt by replaying the log up to that offset, and the
optimizer and RNG state saved with each publish make the restarted run take exactly the steps
the uninterrupted run would have taken.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from recloop.config import (
    LossName,
    NegativeSampling,
    TrainConfig,
    apply_override,
    build_section,
    read_toml,
)
from recloop.data.history import UserHistory
from recloop.data.sequences import PADDING_ID
from recloop.data.vocabulary import Vocabulary
from recloop.errors import ConfigError, RegistryError
from recloop.events import EventLog, LoggedEvent, resume_offset
from recloop.models.factory import config_to_dict
from recloop.online.items import ItemAttributes, PendingItems, initial_row
from recloop.online.optim import LazyAdam, grow_rows
from recloop.online.prequential import (
    PrequentialLog,
    PrequentialTotals,
    rank_targets,
    totals_from_ranks,
)
from recloop.registry import Delta, Manifest, Registry, RowUpdate, SideFiles, publish_version
from recloop.registry.deltas import diff_state
from recloop.registry.loading import load_model
from recloop.registry.sidefiles import read_item_counts, vocabulary_path
from recloop.train.checkpoint import flatten_optimizer, restore_optimizer, restore_rng, rng_state
from recloop.train.losses import next_item_loss

log = logging.getLogger("recloop.online")

# Fault injection for the crash-safety tests: "<point>:<n>" kills this process with SIGKILL
# the n-th time it reaches <point> (batch, state-saved, published, committed).
CRASH_ENV = "RECLOOP_ONLINE_CRASH_AT"
_crash_counts: dict[str, int] = {}

TABLE = "item_embedding.weight"
PLOT_EVERY_SECONDS = 60.0  # RUN/prequential.png is redrawn at most this often, and at the end
TOKENS_PER_CHUNK = 8192  # padded positions per forward pass of a training step
CONTEXT_ITEMS = 10  # a user's most recent items taken as a new item's co-occurrence context


@dataclass(frozen=True)
class OnlineConfig:
    """The `[online]` section of a TOML file (or `online.key=value` overrides)."""

    consumer: str = "online-learner"  # the event-log consumer name; one learner per name
    batch_events: int = 256  # events per micro-batch: one read, one scoring pass, the steps
    steps_per_batch: int = 2  # 2 beat 1 (and 1 with more replay) on bench/online_replay.py
    replay_windows: int = 128  # older users' sequences mixed into every step (0 = none)
    lr: float = 5e-4  # AdamW, dense weights (small: the model is already trained)
    embedding_lr: float = 1e-3  # lazy Adam, item rows
    train_dense: bool = True  # False: only item rows learn (smaller deltas)
    # "auto": the loss (and negatives) the starting model was trained with, from its manifest;
    # fine-tuning a full-softmax model with sampled softmax shifts its scores (measured on the
    # Beauty replay: below the frozen model), so the objective stays what it was.
    loss: LossName | Literal["auto"] = "auto"
    num_negatives: int | None = None  # sampled softmax; None: the starting model's (or 256)
    negatives: NegativeSampling | Literal["auto"] = "auto"
    grad_clip: float | None = 1.0
    admit_after: int = 2  # occurrences before an unseen item joins the vocabulary
    new_item_init: Literal["cooccurrence", "attributes"] = "cooccurrence"
    publish_every_events: int = 2000
    publish_every_seconds: float = 5.0  # also publish pending work this often (0 = never)
    compact_every: int = 20  # deltas in a chain before compaction into a full version (0: never)
    promote: bool = False  # move production to each publish (also done when production is
    # the version being fine-tuned, so a service following production follows the learner)
    exclude_seen: bool = True  # prequential ranking masks the user's history items
    seed: int = 0
    poll_seconds: float = 0.2  # --follow: wait between empty reads

    def __post_init__(self) -> None:
        if self.num_negatives is not None and self.num_negatives < 1:
            raise ConfigError(f"online.num_negatives must be >= 1, got {self.num_negatives}")
        positive = ("batch_events", "steps_per_batch", "admit_after")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"online.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("replay_windows", "compact_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"online.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "embedding_lr", "poll_seconds"):
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
        if not self.consumer.strip():
            raise ConfigError("online.consumer must not be empty")


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


@dataclass
class OnlineState:
    """What a published online version records in `training.online`, to resume from it."""

    consumer: str
    origin: str  # the version the learner started from (the frozen baseline)
    offset: int  # every event up to here is in this version
    totals: PrequentialTotals = field(default_factory=PrequentialTotals)
    admitted: dict[str, int] = field(default_factory=dict)  # raw item -> offset of admission
    deltas: int = 0  # deltas since the last full version

    def to_json(self) -> dict[str, Any]:
        return {
            "consumer": self.consumer,
            "origin": self.origin,
            "offset": self.offset,
            "totals": self.totals.to_json(),
            "admitted": self.admitted,
            "deltas": self.deltas,
        }

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> OnlineState | None:
        data = manifest.training.get("online")
        if not isinstance(data, dict):
            return None
        return cls(
            consumer=str(data["consumer"]),
            origin=str(data["origin"]),
            offset=int(data["offset"]),
            totals=PrequentialTotals.from_json(data.get("totals")),
            admitted={str(k): int(v) for k, v in (data.get("admitted") or {}).items()},
            # A full version (a compaction) starts a new chain, whatever count it records:
            # compacted manifests used to copy the count of the chain they ended.
            deltas=0 if manifest.kind == "full" else int(data.get("deltas", 0)),
        )


def find_resume_version(registry: Registry, start: str, consumer: str) -> str:
    """The version to continue from: `start` itself if this consumer published it, else the
    newest version this consumer published from `start`'s lineage, else `start`."""
    version = registry.resolve(start)
    state = OnlineState.from_manifest(registry.manifest(version))
    if state is not None and state.consumer == consumer:
        return version
    for info in reversed(registry.list()):
        if info.problem is not None:  # a broken version is nobody's to resume
            continue
        other = OnlineState.from_manifest(registry.manifest(info.id))
        if other is not None and other.consumer == consumer and other.origin == version:
            return info.id
    return version


@dataclass
class RunSummary:
    version: str  # the newest published version (or the start version if nothing was new)
    offset: int
    events: int  # applied in this run
    published: list[str]
    admitted: int  # new items admitted in this run
    totals: dict[str, float | int]
    seconds: float


class OnlineLearner:
    """Consumes an event log and publishes delta versions; see the module docstring."""

    def __init__(
        self,
        registry: Registry,
        events: EventLog,
        config: OnlineConfig,
        run_dir: Path,
        *,
        start: str = "latest",
        data: Path | None = None,
        attributes: Path | None = None,
    ) -> None:
        self.registry = registry
        self.events = events
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config.new_item_init == "attributes" and attributes is None:
            raise ConfigError("online.new_item_init = 'attributes' needs --attributes FILE")
        self.attributes = ItemAttributes.from_json(attributes) if attributes else None

        self.version = find_resume_version(registry, start, config.consumer)
        manifest = registry.manifest(self.version)
        if manifest.model.get("compression"):
            # Quantized codes cannot take gradient steps, and pruned tables cannot grow rows.
            raise ConfigError(
                f"version {self.version} is compressed (method {manifest.method!r}); "
                f"the online learner needs a plain float model: start it from "
                f"{manifest.parent} and compress what it publishes"
            )
        resumed = OnlineState.from_manifest(manifest)
        if resumed is not None and resumed.consumer == config.consumer:
            self.state = resumed
            self.offset = resume_offset(events, config.consumer, resumed.offset)
        else:
            self.state = OnlineState(config.consumer, self.version, 0)
            self.offset = resume_offset(events, config.consumer, None)
            self.state.offset = self.offset
        self.model, _ = load_model(registry, self.version)
        self.frozen, _ = load_model(registry, self.state.origin)
        self.vocabulary = Vocabulary.read(_vocabulary_file(registry, manifest))
        self._published_items = self.vocabulary.num_items
        self._published = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.item_counts = _item_counts(registry, manifest, self.vocabulary.num_items)

        self.max_length = int(self.model.config.max_length)
        self.pending = PendingItems(config.admit_after)
        self.sequences: dict[str, list[int]] = {}
        self._base = _base_history(data, registry.manifest(self.state.origin), self.vocabulary)
        self._loss_config = _loss_config(config, registry.manifest(self.state.origin))
        self._rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        self._build_optimizers()
        self._restore_learner_state()
        self._replay_log()
        self.prequential = PrequentialLog(self.run_dir, self.offset)
        self._unpublished_events = 0
        self._last_publish = time.monotonic()
        self._last_plot = time.monotonic()

    # ------------------------------------------------------------------ set-up

    def _build_optimizers(self) -> None:
        table = self.model.item_embedding.weight
        dense = [p for n, p in self.model.named_parameters() if n != TABLE]
        for param in dense:
            param.requires_grad_(self.config.train_dense)
        self.dense_optimizer = torch.optim.AdamW(
            dense, lr=self.config.lr, betas=(0.9, 0.98), weight_decay=0.0
        )
        self.row_optimizer = LazyAdam([table], lr=self.config.embedding_lr)

    def _state_dir(self, offset: int) -> Path:
        return self.run_dir / "state" / f"offset-{offset:012d}"

    def _restore_learner_state(self) -> None:
        """Optimizer moments and RNG streams saved when the resumed version was published.
        Absent (a first start, or a version published elsewhere): fresh moments."""
        path = self._state_dir(self.offset)
        if not (path / "state.json").is_file():
            return
        meta = json.loads((path / "state.json").read_text())
        if meta.get("offset") != self.offset:
            return
        restore_optimizer(
            self.dense_optimizer, load_file(str(path / "dense.safetensors")), meta["dense"]
        )
        rows = load_file(str(path / "rows.safetensors"))
        restore_optimizer(self.row_optimizer, rows, meta["rows"])
        restore_rng(load_file(str(path / "rng.safetensors")))
        self._rng.bit_generator.state = meta["numpy_rng"]

    def _save_learner_state(self, offset: int) -> None:
        path = self._state_dir(offset)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        dense, dense_groups = flatten_optimizer(self.dense_optimizer)
        rows, row_groups = flatten_optimizer(self.row_optimizer)
        save_file(dense, str(tmp / "dense.safetensors"))
        save_file(rows, str(tmp / "rows.safetensors"))
        save_file(rng_state(), str(tmp / "rng.safetensors"))
        meta = {
            "offset": offset,
            "dense": {"param_groups": dense_groups},
            "rows": {"param_groups": row_groups},
            "numpy_rng": self._rng.bit_generator.state,
        }
        (tmp / "state.json").write_text(json.dumps(meta))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)

    def _prune_learner_states(self, keep_offset: int) -> None:
        for old in (self.run_dir / "state").glob("offset-*"):
            if old.name != self._state_dir(keep_offset).name:
                shutil.rmtree(old, ignore_errors=True)

    def _replay_log(self) -> None:
        """Rebuilds user sequences and pending items from the log up to the resumed offset,
        with the same rules as live processing (an item counts as known from its admission)."""
        after = 0
        while after < self.offset:
            batch = self.events.read(after, 10_000)
            batch = [e for e in batch if e.offset <= self.offset]
            if not batch:
                break
            for logged in batch:
                self._observe(logged, admit=False)
            after = batch[-1].offset

    # ------------------------------------------------------------------ one event

    def sequence(self, user: str) -> list[int]:
        known = self.sequences.get(user)
        if known is None:
            base = self._base.items(user) if self._base is not None else np.zeros(0, np.int64)
            known = base[-(self.max_length + 1) :].tolist()
            self.sequences[user] = known
        return known

    def _observe(self, logged: LoggedEvent, *, admit: bool) -> tuple[list[int], int]:
        """Applies one event to the user state: (the user's sequence before it, its dense
        item id or 0 when the item is not, or not yet, in the vocabulary)."""
        raw = logged.event.item_id
        sequence = self.sequence(logged.event.user_id)
        before = list(sequence)
        admitted_at = self.state.admitted.get(raw)
        item = self.vocabulary.dense(raw)
        if item and admitted_at is not None and logged.offset < admitted_at:
            item = 0  # replaying: the item was admitted later than this event
        if not item:
            if self.pending.observe(raw, sequence[-CONTEXT_ITEMS:]) and admit:
                item = self._admit(raw, logged.offset)
        elif admitted_at == logged.offset:
            self.pending.admit(raw)  # replaying the admitting event
        if item:
            sequence.append(item)
            del sequence[: -(self.max_length + 1)]
            if admit:
                self._count(item)
        return before, item

    def _admit(self, raw: str, offset: int) -> int:
        context = self.pending.admit(raw)
        table = self.model.item_embedding.weight.detach()
        neighbours = context
        if self.attributes is not None and self.config.new_item_init == "attributes":
            neighbours = self.attributes.neighbours(raw, self.vocabulary) or context
        row = initial_row(table, neighbours)  # [D]
        item = self.vocabulary.add(raw)
        embedding = self.model.item_embedding
        embedding.weight = grow_rows(embedding.weight, row.unsqueeze(0), self.row_optimizer)
        embedding.num_items = self.vocabulary.num_items
        self.model.config.num_items = self.vocabulary.num_items
        self.state.admitted[raw] = offset
        log.info("admitted item %r as %d after %d occurrences", raw, item, self.config.admit_after)
        return item

    def _count(self, item: int) -> None:
        if item >= len(self.item_counts):
            grown = np.zeros(self.vocabulary.num_items + 1, dtype=np.int64)
            grown[: len(self.item_counts)] = self.item_counts
            self.item_counts = grown
        self.item_counts[item] += 1

    # ------------------------------------------------------------------ one micro-batch

    def process(self, batch: Sequence[LoggedEvent]) -> PrequentialTotals:
        """Test, then train, on one micro-batch; returns its prequential counts."""
        prefixes: list[list[int]] = []
        targets: list[int] = []
        touched: dict[str, None] = {}
        for logged in batch:
            before, item = self._observe(logged, admit=True)
            touched[logged.event.user_id] = None
            if before:  # an event with no history cannot be ranked by a sequence model
                prefixes.append(before)
                targets.append(item)
        self.model.eval()
        online = rank_targets(self.model, prefixes, targets, exclude_seen=self.config.exclude_seen)
        frozen = rank_targets(self.frozen, prefixes, targets, exclude_seen=self.config.exclude_seen)
        windows = [self.sequences[user] for user in touched]
        for _ in range(self.config.steps_per_batch):
            self._train_step(windows + self._replay_sample())
        self.offset = batch[-1].offset
        self._unpublished_events += len(batch)
        totals = totals_from_ranks(online, frozen, len(batch))
        self.state.totals.add(totals)
        self.prequential.append(self.offset, totals, self.state.totals)
        return totals

    def _replay_sample(self) -> list[list[int]]:
        count = self.config.replay_windows
        if count == 0:
            return []
        users = self._base.users if self._base is not None else None
        if users:
            picks = self._rng.integers(0, len(users), size=count)
            return [self.sequence(users.raw(int(i))) for i in picks]
        touched = list(self.sequences)
        if not touched:
            return []
        picks = self._rng.integers(0, len(touched), size=count)
        return [self.sequences[touched[int(i)]] for i in picks]

    def _train_step(self, sequences: Sequence[Sequence[int]]) -> None:
        """One optimizer step on every prefix of `sequences` (their last max_length + 1 items).

        Windows are sorted by length and run in chunks, each padded only to its own longest:
        a batch of mostly short histories then costs its real tokens, not B x max_length.
        A non-causal model (BSARec) learns each prefix as its own window, with its target at
        the last position, as it was trained (`train.samples = "prefixes"`).
        """
        usable = [s[-(self.max_length + 1) :] for s in sequences if len(s) >= 2]
        last_only = not self.model.causal
        if last_only:
            usable = [s[: end + 1] for s in usable for end in range(1, len(s))]
        usable.sort(key=len)
        if not usable:
            return
        total_tokens = sum(len(s) - 1 for s in usable)
        self.dense_optimizer.zero_grad(set_to_none=True)
        self.row_optimizer.zero_grad(set_to_none=True)
        self.model.train()
        num_items = self.vocabulary.num_items
        for inputs, targets in _padded_chunks(usable, TOKENS_PER_CHUNK, last_only):
            hidden = self.model(inputs, last_only=last_only)  # [B, W or 1, D]
            loss_sum, _ = next_item_loss(
                self.model, hidden, targets, self._loss_config, num_items, inputs=inputs
            )
            (loss_sum / total_tokens).backward()  # type: ignore[no-untyped-call]
        if self.config.grad_clip:  # None or 0: no clipping
            params = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        table = self.model.item_embedding.weight
        if table.grad is not None:
            table.grad[PADDING_ID] = 0.0  # the padding row stays zero
        if self.config.train_dense:
            self.dense_optimizer.step()
        self.row_optimizer.step()
        self.model.eval()

    # ------------------------------------------------------------------ publishing

    def due(self) -> bool:
        if self._unpublished_events == 0:
            return False
        if self._unpublished_events >= self.config.publish_every_events:
            return True
        every = self.config.publish_every_seconds
        return every > 0 and time.monotonic() - self._last_publish >= every

    def publish(self, *, force: bool = False) -> str | None:
        """Publishes what changed since the last version (None when no event was applied since;
        `force`: publish the model's changes anyway, e.g. rows edited by an operator)."""
        if self._unpublished_events == 0 and not force:
            return None
        started = time.perf_counter()
        changes = diff_state(self._published, self.model.state_dict(), TABLE)
        grown = self.vocabulary.num_items != self._published_items
        vocabulary = self.vocabulary.parquet_bytes() if grown else None  # None: the parent's
        parent = self.version
        self.state.offset = self.offset
        self.state.deltas += 1
        # Learner state first, keyed by offset: if the publish below never happens, the restart
        # resumes from an older offset and ignores this file.
        self._save_learner_state(self.offset)
        _crash_point("state-saved")
        version = publish_version(
            self.registry,
            Delta(parent, changes),
            model=config_to_dict(self.model),
            metrics={f"online/{k}": v for k, v in self.state.totals.summary().items()},
            method="online",
            training={"online": self.state.to_json(), "config": dataclasses.asdict(self.config)},
            side=SideFiles(vocabulary=vocabulary, item_counts=self.item_counts),
        )
        _crash_point("published")
        self.events.commit(self.config.consumer, self.offset)
        _crash_point("committed")
        if self.config.promote or self.registry.production() == parent:
            self.registry.promote(version)
        self.version = version
        self._published_items = self.vocabulary.num_items
        self._unpublished_events = 0
        self._last_publish = time.monotonic()
        rows = changes.get(TABLE)
        log.info(
            "published %s (parent %s): offset %d, %d rows, %.2fs",
            version,
            parent,
            self.offset,
            len(rows.rows) if isinstance(rows, RowUpdate) else 0,
            time.perf_counter() - started,
        )
        if self.config.compact_every and self.state.deltas >= self.config.compact_every:
            self._compact()
        self._prune_learner_states(self.offset)
        if time.monotonic() - self._last_plot > PLOT_EVERY_SECONDS:
            self.prequential.plot()  # ~0.5 s of matplotlib: not at every publish
            self._last_plot = time.monotonic()
        return version

    def _compact(self) -> None:
        # The compacted version records a chain of zero deltas, so a learner restarted from
        # it waits `compact_every` deltas again before the next compaction.
        self.state.deltas = 0
        training = {"online": self.state.to_json(), "config": dataclasses.asdict(self.config)}
        compacted = self.registry.compact(self.version, training=training)
        if self.registry.production() == self.version:
            self.registry.promote(compacted)
        log.info("compacted %s into full version %s", self.version, compacted)
        self.version = compacted

    # ------------------------------------------------------------------ the loop

    def run(
        self,
        *,
        follow: bool = False,
        max_events: int | None = None,
        stop: threading.Event | None = None,
        show_progress: bool = False,
    ) -> RunSummary:
        """Processes events until caught up (or, with `follow`, until `stop` is set or
        SIGINT/SIGTERM), publishing as configured; publishes what is left before returning."""
        stop = stop or threading.Event()
        started = time.perf_counter()
        published: list[str | None] = []
        admitted_before = len(self.state.admitted)
        total = None if follow else max(self.events.last_offset() - self.offset, 0)
        if max_events is not None and total is not None:
            total = min(total, max_events)
        applied = 0
        with _stop_on_signals(stop, enabled=follow), _progress(total, show_progress) as advance:
            while not stop.is_set():
                limit = self.config.batch_events
                if max_events is not None:
                    limit = min(limit, max_events - applied)
                    if limit <= 0:
                        break
                batch = self.events.read(self.offset, limit)
                if not batch:
                    if not follow:
                        break
                    if self.due():
                        published.append(self.publish())
                    stop.wait(self.config.poll_seconds)
                    continue
                self.process(batch)
                _crash_point("batch")
                applied += len(batch)
                advance(len(batch))
                if self.due():
                    published.append(self.publish())
            published.append(self.publish())
        self.prequential.plot()
        done = [v for v in published if v is not None]
        return RunSummary(
            version=self.version,
            offset=self.offset,
            events=applied,
            published=done,
            admitted=len(self.state.admitted) - admitted_before,
            totals=self.state.totals.summary(),
            seconds=time.perf_counter() - started,
        )


def _padded_chunks(
    windows: Sequence[Sequence[int]], max_tokens: int, last_only: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs [B, W], targets [B, W]) left-padded chunks of length-sorted `windows`, each
    chunk at most `max_tokens` padded positions (and at least one window). With `last_only`,
    targets are [B, 1]: each window's last item, the target of its last position only."""
    start = 0
    while start < len(windows):
        end = start + 1
        while end < len(windows) and (end + 1 - start) * (len(windows[end]) - 1) <= max_tokens:
            end += 1
        chunk = windows[start:end]
        width = len(chunk[-1]) - 1  # the longest: windows are sorted by length
        inputs = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.zeros((len(chunk), 1 if last_only else width), dtype=torch.long)
        for row, window in enumerate(chunk):
            n = len(window) - 1
            inputs[row, width - n :] = torch.tensor(window[:-1])
            if last_only:
                targets[row, 0] = window[-1]
            else:
                targets[row, width - n :] = torch.tensor(window[1:])
        yield inputs, targets
        start = end


def _base_history(
    data: Path | None, origin_manifest: Manifest, vocabulary: Vocabulary
) -> UserHistory | None:
    """`data`, or the dataset the origin version was trained on when it is still there."""
    if data is None:
        recorded = (origin_manifest.dataset or {}).get("path")
        data = Path(recorded) if recorded and Path(recorded).is_dir() else None
    if data is None:
        log.warning("no training dataset: sequences start from the event log alone")
        return None
    return UserHistory.open(data, vocabulary)


def _loss_config(config: OnlineConfig, origin: Manifest) -> TrainConfig:
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
    )


def _vocabulary_file(registry: Registry, manifest: Manifest) -> Path:
    if not manifest.vocabulary_file:
        raise RegistryError("the version records no item vocabulary; the learner needs one")
    return vocabulary_path(registry, manifest.id, manifest)


def _item_counts(registry: Registry, manifest: Manifest, num_items: int) -> np.ndarray:
    counts = np.zeros(num_items + 1, dtype=np.int64)
    loaded = read_item_counts(registry, manifest.id, manifest)
    if loaded is not None:
        counts[: min(len(loaded), len(counts))] = loaded[: len(counts)]
    return counts


def _crash_point(name: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def _stop_on_signals(stop: threading.Event, *, enabled: bool) -> Iterator[None]:
    """SIGINT/SIGTERM set `stop`, so the loop publishes its pending work and returns."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _progress(total: int | None, enabled: bool) -> Any:
    if not enabled or total is None:
        return nullcontext(lambda n: None)
    from recloop.progress import progress_bar

    return progress_bar("online learning", total, unit="events")
