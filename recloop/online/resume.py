"""What a restarted learner resumes from: the online state a published version records, the
version to continue from, and the learner state (optimizer moments, RNG streams) saved beside
each publish, keyed by the event offset it covers."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from recloop.errors import RegistryError
from recloop.online.items import PendingItems
from recloop.online.prequential import PrequentialTotals
from recloop.registry import Manifest, Registry
from recloop.registry.sidefiles import read_item_counts, vocabulary_path
from recloop.train.checkpoint import flatten_optimizer, restore_optimizer, restore_rng, rng_state


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


def vocabulary_file(registry: Registry, manifest: Manifest) -> Path:
    """The version's vocabulary side file."""
    if not manifest.vocabulary_file:
        raise RegistryError("the version records no item vocabulary; the learner needs one")
    return vocabulary_path(registry, manifest.id, manifest)


def load_item_counts(registry: Registry, manifest: Manifest, num_items: int) -> np.ndarray:
    """The version's per-item interaction counts [num_items + 1] (zeros where absent)."""
    counts = np.zeros(num_items + 1, dtype=np.int64)
    loaded = read_item_counts(registry, manifest.id, manifest)
    if loaded is not None:
        counts[: min(len(loaded), len(counts))] = loaded[: len(counts)]
    return counts


# --------------------------------------------------------------------------- learner state


PENDING_FILE = "pending.json"


def state_dir(run_dir: Path, offset: int) -> Path:
    return run_dir / "state" / f"offset-{offset:012d}"


def save_learner_state(
    run_dir: Path,
    offset: int,
    optimizers: dict[str, torch.optim.Optimizer],
    rng: np.random.Generator,
    pending: PendingItems | None = None,
) -> None:
    """Each optimizer's moments (NAME.safetensors), the torch RNG streams, the numpy
    generator's state and (a bounded table's) pending items, written to a temporary directory
    and renamed into place."""
    path = state_dir(run_dir, offset)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta: dict[str, Any] = {"offset": offset}
    for name, optimizer in optimizers.items():
        tensors, groups = flatten_optimizer(optimizer)
        save_file(tensors, str(tmp / f"{name}.safetensors"))
        meta[name] = {"param_groups": groups}
    save_file(rng_state(), str(tmp / "rng.safetensors"))
    meta["numpy_rng"] = rng.bit_generator.state
    if pending is not None:  # the log replay cannot rebuild a bounded pending set exactly
        (tmp / PENDING_FILE).write_text(json.dumps(pending.to_json()))
    (tmp / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def restore_learner_state(
    run_dir: Path,
    offset: int,
    optimizers: dict[str, torch.optim.Optimizer],
    rng: np.random.Generator,
    pending: PendingItems | None = None,
) -> bool:
    """Optimizer moments and RNG streams saved when the resumed version was published, and
    `pending` when they were saved with it (returns whether it was restored). Absent (a first
    start, or a version published elsewhere): fresh moments."""
    path = state_dir(run_dir, offset)
    if not (path / "state.json").is_file():
        return False
    meta = json.loads((path / "state.json").read_text())
    if meta.get("offset") != offset:
        return False
    for name, optimizer in optimizers.items():
        restore_optimizer(optimizer, load_file(str(path / f"{name}.safetensors")), meta[name])
    restore_rng(load_file(str(path / "rng.safetensors")))
    rng.bit_generator.state = meta["numpy_rng"]
    if pending is not None and (path / PENDING_FILE).is_file():
        pending.restore(json.loads((path / PENDING_FILE).read_text()))
        return True
    return False


def prune_learner_states(run_dir: Path, keep_offset: int) -> None:
    for old in (run_dir / "state").glob("offset-*"):
        if old.name != state_dir(run_dir, keep_offset).name:
            shutil.rmtree(old, ignore_errors=True)
