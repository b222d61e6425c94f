"""The online learner: events in, delta versions out, with exact event accounting.

    recloop online --registry registry --event-log events.db            # until caught up
    recloop online --registry registry --event-log events.db --follow   # run as a service

Each turn reads a micro-batch of events after the current offset and
1. maps them to dense ids; an unseen item is counted and, after `admit_after` occurrences,
   joins the vocabulary with a row initialised from its co-occurring items or attributes;
2. scores every event with the online model (and, with `score_frozen`, the frozen starting
   model) before learning from it (prequential HR@10, logged to RUN/prequential.csv, plotted);
3. appends the items to the users' sequences and takes optimizer steps on the touched users'
   sequences plus a replay sample of other users' (so it does not forget): the full softmax
   on the batch's new events' positions, a sampled softmax on the windows' other positions
   (`context_negatives`; recloop.online.steps), AdamW on the dense weights, lazy Adam on the
   item rows. Time per phase goes to RUN/timings.json (recloop.online.timings).
Every `publish_every_events` events or `publish_every_seconds` seconds it publishes a delta
version (changed rows, new rows, moved dense weights, grown vocabulary, the event offset it
covers) and commits that offset; every `compact_every` deltas it compacts the chain.

With `max_items` the table stops growing there: admitted items then take the rows of evicted
ones, a remap the next delta records (recloop.online.bounded; user sequences follow it).

Crash safety: the published manifest is the source of truth. A restarted learner continues
from its newest published version and that version's offset, so no event is lost and none is
applied twice to a published version; the work since the last publish is redone. User
sequences and pending new items are rebuilt by replaying the log up to that offset, and the
optimizer and RNG state saved with each publish make the restarted run take exactly the steps
the uninterrupted run would have taken.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recloop.data.vocabulary import Vocabulary
from recloop.errors import ConfigError
from recloop.events import EventLog, LoggedEvent, resume_offset
from recloop.models.factory import config_to_dict
from recloop.online.bounded import BoundedTable, bounded_table
from recloop.online.config import OnlineConfig, context_loss_config, loss_config
from recloop.online.control import crash_point, progress, stop_on_signals
from recloop.online.history import base_history
from recloop.online.items import ItemAttributes, PendingItems, initial_row
from recloop.online.optim import LazyAdam, grow_rows
from recloop.online.prequential import (
    PrequentialLog,
    PrequentialTotals,
    rank_targets,
    totals_from_ranks,
)
from recloop.online.resume import (
    OnlineState,
    find_resume_version,
    load_item_counts,
    prune_learner_states,
    restore_learner_state,
    save_learner_state,
    vocabulary_file,
)
from recloop.online.steps import Sample, train_step
from recloop.online.timings import PhaseTimes
from recloop.registry import Delta, Manifest, Registry, RowUpdate, SideFiles, publish_version
from recloop.registry.deltas import diff_state
from recloop.registry.loading import load_model

log = logging.getLogger("recloop.online")


TABLE = "item_embedding.weight"
PLOT_EVERY_SECONDS = 60.0  # RUN/prequential.png is redrawn at most this often, and at the end
CONTEXT_ITEMS = 10  # a user's most recent items taken as a new item's co-occurrence context


@dataclass
class RunSummary:
    version: str  # the newest published version (or the start version if nothing was new)
    offset: int
    events: int  # applied in this run
    published: list[str]
    admitted: int  # new items admitted in this run
    totals: dict[str, float | int]
    seconds: float
    timings: dict[str, Any]  # seconds per phase of the loop (also RUN/timings.json)


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
        _check_trainable(self.version, manifest)
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
        self.vocabulary = Vocabulary.read(vocabulary_file(registry, manifest))
        self._published_items = self.vocabulary.num_items
        self._published = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.item_counts = load_item_counts(registry, manifest, self.vocabulary.num_items)

        self.max_length = int(self.model.config.max_length)
        self.pending = PendingItems.for_config(config)
        self.sequences: dict[str, list[int]] = {}
        origin = registry.manifest(self.state.origin)
        self._base = base_history(data, origin, self.vocabulary)
        self.item_table = bounded_table(config, origin, self.vocabulary, self._base, self.state)
        self._now = self.offset  # the offset of the event being applied
        self._loss_config = loss_config(config, origin)
        self._context_config = context_loss_config(config)
        self._rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        self._build_optimizers()
        self._restore_learner_state()
        self._replay_log()
        self.prequential = PrequentialLog(self.run_dir, self.offset)
        self._unpublished_events = 0
        self._last_publish = time.monotonic()
        self._last_plot = time.monotonic()
        self.times = PhaseTimes()

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

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """By the name their moments are saved under."""
        return {"dense": self.dense_optimizer, "rows": self.row_optimizer}

    def _restore_learner_state(self) -> None:
        self._pending_restored = restore_learner_state(
            self.run_dir, self.offset, self._optimizers(), self._rng, self.pending
        )

    def _save_learner_state(self, offset: int) -> None:
        pending = self.pending if self.item_table.bounded else None
        save_learner_state(self.run_dir, offset, self._optimizers(), self._rng, pending)

    def _prune_learner_states(self, keep_offset: int) -> None:
        prune_learner_states(self.run_dir, keep_offset)

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
        self.item_table.clean(user, known, self._now)  # drops items of rows reused since
        return known

    def _observe(self, logged: LoggedEvent, *, admit: bool) -> tuple[list[int], int]:
        """Applies one event to the user state: (the user's sequence before it, its dense
        item id or 0 when the item is not, or not yet, in the vocabulary)."""
        raw = logged.event.item_id
        self._now = logged.offset
        sequence = self.sequence(logged.event.user_id)
        admitted_at = self.state.admitted.get(raw)
        item = self.vocabulary.dense(raw)
        if item and admitted_at is not None and logged.offset < admitted_at:
            item = 0  # replaying: the item was admitted later than this event
        counting = admit or not self._pending_restored  # else restored with the state
        if not item:
            context = sequence[-CONTEXT_ITEMS:]
            if counting and self.pending.observe(raw, context, logged.offset) and admit:
                item = self._admit(raw, logged.offset, sequence)
        elif admitted_at == logged.offset and counting:
            self.pending.admit(raw)  # replaying the admitting event
        before = list(sequence)
        if item:
            self.item_table.touch(item, logged.offset)
            sequence.append(item)
            del sequence[: -(self.max_length + 1)]
            if admit:
                self._count(item)
        return before, item

    def _admit(self, raw: str, offset: int, sequence: list[int]) -> int:
        """Admits `raw`, seen in `sequence`'s user's event (0 when a bounded table has no row
        it may evict: it stays pending)."""
        used = self.vocabulary.num_items
        slot = self.item_table.slot_for(used, offset)
        if slot is None:
            return 0
        context = self.pending.admit(raw)
        table = self.model.item_embedding.weight.detach()
        neighbours = context
        if self.attributes is not None and self.config.new_item_init == "attributes":
            neighbours = self.attributes.neighbours(raw, self.vocabulary) or context
        row = initial_row(table, [i for i in neighbours if i != slot])  # [D]
        if slot <= used and isinstance(self.item_table, BoundedTable):  # a reused row
            self.item_table.reuse(
                slot, raw, row, offset, self.model, self.row_optimizer, self.item_counts
            )
            sequence[:] = [i for i in sequence if i != slot]  # the evicted item's entries
            return slot
        item = self.vocabulary.add(raw)
        embedding = self.model.item_embedding
        embedding.weight = grow_rows(embedding.weight, row.unsqueeze(0), self.row_optimizer)
        embedding.num_items = self.vocabulary.num_items
        self.model.config.num_items = self.vocabulary.num_items
        self.state.admitted[raw] = offset
        self.item_table.assign(item, offset)
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
        new_events: dict[str, int] = {}  # user -> items appended to their sequence in this batch
        self.item_table.batch_start = batch[0].offset
        for logged in batch:
            before, item = self._observe(logged, admit=True)
            user = logged.event.user_id
            new_events[user] = new_events.get(user, 0) + (1 if item else 0)
            if before:  # an event with no history cannot be ranked by a sequence model
                prefixes.append(before)
                targets.append(item)
        self.model.eval()
        exclude = self.config.exclude_seen
        with self.times.phase("score"):
            online = rank_targets(self.model, prefixes, targets, exclude_seen=exclude)
        frozen = None
        if self.config.score_frozen:
            with self.times.phase("score_frozen"):
                frozen = rank_targets(self.frozen, prefixes, targets, exclude_seen=exclude)
        samples = self._touched_samples(new_events)
        with self.times.phase("train"):
            for _ in range(self.config.steps_per_batch):
                self._train_step(samples + self._replay_sample())
        self.offset = batch[-1].offset
        self._unpublished_events += len(batch)
        totals = totals_from_ranks(online, frozen, len(batch))
        self.state.totals.add(totals)
        self.prequential.append(self.offset, totals, self.state.totals)
        return totals

    def _touched_samples(self, new_events: dict[str, int]) -> list[Sample]:
        """The touched users' windows, each with how many of its last positions to learn:
        the batch's new events ("new"), or every position ("all")."""
        every = self.config.train_positions == "all"
        return [
            (self.sequence(user), None if every else count)
            for user, count in new_events.items()
            if every or count > 0
        ]

    def _replay_count(self) -> int:
        """Replay windows per step (a sharded learner's process draws its share)."""
        return self.config.replay_windows

    def _replay_sample(self) -> list[Sample]:
        count = self._replay_count()
        if count == 0:
            return []
        positions = None if self.config.train_positions == "all" else self.config.replay_positions
        users = self._base.users if self._base is not None else None
        if users:
            picks = self._rng.integers(0, len(users), size=count)
            return [(self.sequence(users.raw(int(i))), positions) for i in picks]
        touched = list(self.sequences)
        if not touched:
            return []
        picks = self._rng.integers(0, len(touched), size=count)
        return [(self.sequence(touched[int(i)]), positions) for i in picks]

    def _train_step(self, samples: Sequence[Sample]) -> None:
        optimizers: list[torch.optim.Optimizer] = [self.row_optimizer]
        if self.config.train_dense:
            optimizers.insert(0, self.dense_optimizer)
        train_step(
            self.model,
            samples,
            optimizers,
            self._loss_config,
            num_items=self.vocabulary.num_items,
            grad_clip=self.config.grad_clip,
            context_config=self._context_config,
            context_fraction=self.config.context_fraction,
        )

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
        with self.times.phase("publish"):
            return self._publish()

    def _publish(self) -> str:
        started = time.perf_counter()
        remapped = dict(self.item_table.remapped)
        changes = diff_state(self._published, self.model.state_dict(), TABLE, sorted(remapped))
        grown = self.vocabulary.num_items != self._published_items or bool(remapped)
        vocabulary = self.vocabulary.parquet_bytes() if grown else None  # None: the parent's
        parent = self.version
        self.state.offset = self.offset
        self.state.deltas += 1
        # Learner state first, keyed by offset: if the publish below never happens, the restart
        # resumes from an older offset and ignores this file.
        self._save_learner_state(self.offset)
        crash_point("state-saved")
        version = publish_version(
            self.registry,
            Delta(parent, changes),
            model=config_to_dict(self.model),
            metrics={f"online/{k}": v for k, v in self.state.totals.summary().items()},
            method="online",
            training={"online": self.state.to_json(), "config": dataclasses.asdict(self.config)},
            side=SideFiles(vocabulary=vocabulary, item_counts=self.item_counts, remapped=remapped),
        )
        crash_point("published")
        self.events.commit(self.config.consumer, self.offset)
        crash_point("committed")
        if self.config.promote or self.registry.production() == parent:
            self.registry.promote(version)
        self.version = version
        self._published_items = self.vocabulary.num_items
        self.item_table.remapped.clear()
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
        # An admission into a reused row may replace an evicted item's entry: count those too.
        admitted_before = len(self.state.admitted) + self.item_table.forgotten
        total = None if follow else max(self.events.last_offset() - self.offset, 0)
        if max_events is not None and total is not None:
            total = min(total, max_events)
        applied = 0
        with stop_on_signals(stop, enabled=follow), progress(total, show_progress) as advance:
            while not stop.is_set():
                limit = self.config.batch_events
                if max_events is not None:
                    limit = min(limit, max_events - applied)
                    if limit <= 0:
                        break
                with self.times.phase("read"):
                    batch = self.events.read(self.offset, limit)
                if not batch:
                    if not follow:
                        break
                    if self.due():
                        published.append(self.publish())
                    stop.wait(self.config.poll_seconds)
                    continue
                self.process(batch)
                crash_point("batch")
                applied += len(batch)
                advance(len(batch))
                if self.due():
                    published.append(self.publish())
            published.append(self.publish())
        with self.times.phase("plot"):
            self.prequential.plot()
        seconds = time.perf_counter() - started
        timings = self.times.write(self.run_dir, applied, seconds)
        done = [v for v in published if v is not None]
        return RunSummary(
            version=self.version,
            offset=self.offset,
            events=applied,
            published=done,
            admitted=len(self.state.admitted) + self.item_table.forgotten - admitted_before,
            totals=self.state.totals.summary(),
            seconds=seconds,
            timings=timings,
        )


def _check_trainable(version: str, manifest: Manifest) -> None:
    if manifest.model.get("compression"):
        # Quantized codes cannot take gradient steps, and pruned tables cannot grow rows.
        raise ConfigError(
            f"version {version} is compressed (method {manifest.method!r}); "
            f"the online learner needs a plain float model: start it from "
            f"{manifest.parent} and compress what it publishes"
        )
