"""The one publish path: the trainer, the online learner and the compressor all call
:func:`publish_version`, which names the side files (sidefiles.py) and picks a full or a
delta publish from what it is given."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recloop.errors import RegistryError
from recloop.registry.deltas import Change
from recloop.registry.manifest import Manifest
from recloop.registry.sharded import ShardedTable
from recloop.registry.sidefiles import (
    ITEM_COUNTS_FILE,
    REMAPPED_FILE,
    VOCABULARY_FILE,
    item_counts_bytes,
    remapped_bytes,
)
from recloop.registry.store import Registry


@dataclass(frozen=True)
class Delta:
    """The weights of a delta version: what changed on top of `parent`."""

    parent: str
    changes: Mapping[str, Change]
    removed: Sequence[str] = ()


@dataclass(frozen=True)
class SideFiles:
    """The files a version carries beside its weights. `vocabulary` None on a delta means
    "the parent's" (hard-linked); `item_counts` is an int64 array [num_items + 1] or its .npy
    file or bytes; `other` are further named files (metrics.csv, curves.png, ...)."""

    vocabulary: Path | bytes | None = None
    item_counts: np.ndarray | Path | bytes | None = None
    other: Mapping[str, Path | bytes] = field(default_factory=dict)
    vocabulary_name: str = VOCABULARY_FILE
    # A delta's dense ids that now mean other raw ids (dense id -> raw id; with `vocabulary`).
    remapped: Mapping[int, str] = field(default_factory=dict)

    def extra_files(self) -> dict[str, Path | bytes]:
        files = dict(self.other)
        if self.vocabulary is not None:
            files[self.vocabulary_name] = self.vocabulary
        if isinstance(self.item_counts, np.ndarray):
            files[ITEM_COUNTS_FILE] = item_counts_bytes(self.item_counts)
        elif self.item_counts is not None:
            files[ITEM_COUNTS_FILE] = self.item_counts
        if self.remapped:
            files[REMAPPED_FILE] = remapped_bytes(self.remapped)
        return files


def publish_version(
    registry: Registry,
    weights: Mapping[str, torch.Tensor] | Delta,
    *,
    model: Mapping[str, Any],
    method: str,
    side: SideFiles = SideFiles(),
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None,
    parent: str | None = None,
    sharded: ShardedTable | None = None,
) -> str:
    """Publishes a full version (`weights` a state dict, plus the `sharded` table its ranks
    wrote, if any) or a delta (`weights` a Delta, which names its parent; its dataset is the
    parent's); returns the new version's id."""
    vocabulary_file = side.vocabulary_name if side.vocabulary is not None else None
    if isinstance(weights, Delta):
        if sharded is not None:
            raise RegistryError("a delta is never sharded: its rows are published whole")
        return registry.publish_delta(
            weights.parent,
            weights.changes,
            removed=weights.removed,
            model=model,
            metrics=metrics,
            method=method,
            training=training,
            extra_files=side.extra_files(),
            vocabulary_file=vocabulary_file,
        )
    return registry.publish(
        weights,
        model=model,
        dataset=dataset,
        metrics=metrics,
        parent=parent,
        method=method,
        training=training,
        extra_files=side.extra_files(),
        vocabulary_file=vocabulary_file,
        sharded=sharded,
    )


def inherited_side_files(registry: Registry, version: str, manifest: Manifest) -> SideFiles:
    """The vocabulary and item counts of `version` (checksum-verified), for a version derived
    from it (compression) to carry unchanged."""
    vocabulary = manifest.vocabulary_file
    has_vocabulary = vocabulary is not None and vocabulary in manifest.files
    return SideFiles(
        vocabulary=registry.file(version, vocabulary) if has_vocabulary and vocabulary else None,
        vocabulary_name=vocabulary or VOCABULARY_FILE,
        item_counts=(
            registry.file(version, ITEM_COUNTS_FILE) if ITEM_COUNTS_FILE in manifest.files else None
        ),
    )
