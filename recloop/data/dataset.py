"""A prepared dataset directory, loaded: manifest, CSR sequences (memory-mapped), vocabularies."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from recloop.data.attributes import ITEM_ATTRIBUTES_FILE
from recloop.data.prepare import MANIFEST, sha256_file
from recloop.data.sequences import Sequences
from recloop.data.splits import Split, leave_one_out, time_split_by_fraction
from recloop.data.vocabulary import Vocabulary
from recloop.errors import DatasetError, undecodable

REQUIRED_FILES = ("offsets.npy", "items.npy", "timestamps.npy", "users.parquet", "items.parquet")


class SequenceDataset:
    """Opens a directory written by `recloop prepare`. Arrays are memory-mapped by default."""

    def __init__(self, directory: Path, *, mmap: bool = True, verify: bool = False) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not self.directory.is_dir():
            raise DatasetError(f"{self.directory}: no such dataset directory")
        if not manifest_path.is_file():
            raise DatasetError(
                f"{self.directory} is not a recloop dataset (no {MANIFEST}); "
                "create one with `recloop prepare`"
            )
        self.manifest: dict[str, Any] = _read_manifest(manifest_path)
        for name in REQUIRED_FILES:
            if not (self.directory / name).is_file():
                raise DatasetError(f"{self.directory}: dataset file {name} is missing")
        if verify:
            self.verify()
        mode: Literal["r"] | None = "r" if mmap else None
        arrays = {
            name: _load_array(self.directory / f"{name}.npy", mode)
            for name in ("offsets", "items", "timestamps")
        }
        try:
            self.sequences = Sequences(**arrays)
        except DatasetError as exc:
            raise DatasetError(f"{self.directory}: {exc}") from None

    def verify(self) -> None:
        """Checks every file against the sha256 recorded in the manifest."""
        for name, meta in self.manifest["files"].items():
            path = self.directory / name
            if not path.is_file():
                raise DatasetError(f"{self.directory}: dataset file {name} is missing")
            try:
                digest = sha256_file(path)
            except OSError as exc:
                raise DatasetError(f"{path}: cannot read the file ({exc.strerror})") from exc
            if not isinstance(meta, dict) or digest != meta.get("sha256"):
                raise DatasetError(f"{path}: checksum mismatch (file changed or corrupt)")

    @property
    def num_users(self) -> int:
        return int(self.manifest["counts"]["users"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["counts"]["items"])

    @property
    def num_events(self) -> int:
        return int(self.manifest["counts"]["events"])

    @property
    def has_timestamps(self) -> bool:
        return bool(self.manifest["time"] == "timestamp")

    @property
    def checksum(self) -> str:
        """Identifies this dataset's content (sha256 over the file checksums)."""
        import hashlib

        files = self.manifest["files"]
        joined = "".join(f"{name}:{files[name]['sha256']}" for name in sorted(files))
        return hashlib.sha256(joined.encode()).hexdigest()

    @cached_property
    def users(self) -> Vocabulary:
        return Vocabulary.read(self.directory / "users.parquet", first_id=0)

    @cached_property
    def items(self) -> Vocabulary:
        return Vocabulary.read(self.directory / "items.parquet", first_id=1)

    @cached_property
    def values(self) -> npt.NDArray[np.float32] | None:
        path = self.directory / "values.npy"
        return _load_array(path, "r") if path.is_file() else None

    @cached_property
    def item_attributes(self) -> npt.NDArray[np.int32] | None:
        """[num_items + 1, A] attribute ids of each item (0 = none), when the dataset was
        prepared with `--item-attributes`; see recloop.data.attributes."""
        path = self.directory / ITEM_ATTRIBUTES_FILE
        if not path.is_file():
            return None
        index: npt.NDArray[np.int32] = _load_array(path, None)
        if index.ndim != 2 or index.shape[0] != self.num_items + 1:
            raise DatasetError(
                f"{path}: shape {index.shape} does not match the {self.num_items} items"
            )
        return index

    def leave_one_out(self, min_length: int = 3) -> Split:
        return leave_one_out(self.sequences, min_length)

    def time_split(
        self, valid_fraction: float = 0.1, test_fraction: float = 0.1, targets: str = "all"
    ) -> Split:
        """Global time split at the quantiles leaving the given fractions of events."""
        if not self.has_timestamps:
            raise DatasetError(
                f"{self.directory}: has no timestamps (its source gives order only); "
                "a global time split needs real timestamps: use leave-one-out"
            )
        if targets not in ("all", "first"):
            raise DatasetError(f"targets must be 'all' or 'first', got {targets!r}")
        return time_split_by_fraction(
            self.sequences,
            valid_fraction,
            test_fraction,
            targets,  # type: ignore[arg-type]
        )

    def stats(self) -> dict[str, Any]:
        counts = self.manifest["counts"]
        users, items, events = counts["users"], counts["items"], counts["events"]
        return {
            "path": str(self.directory),
            "source": self.manifest["source"].get("format", self.manifest["source"].get("kind")),
            "users": users,
            "items": items,
            "events": events,
            "density": events / (users * items) if users and items else 0.0,
            "time": self.manifest["time"],
            "time_range": self.manifest["time_range"],
            "sequence_length": self.manifest["lengths"],
            "dropped": {
                "duplicates": counts.get("duplicates_dropped", 0),
                "short_users": counts.get("short_users_dropped", 0),
                "kcore_events": counts.get("kcore_events_dropped", 0),
            },
            "item_popularity": _popularity_summary(np.asarray(self.sequences.items), items),
            "recloop_version": self.manifest.get("recloop_version"),
        }


# Manifest keys the readers of a dataset rely on, and their JSON types.
_MANIFEST_KEYS: dict[str, type] = {
    "source": dict,
    "time": str,
    "time_range": dict,
    "lengths": dict,
    "counts": dict,
    "files": dict,
}


def _read_manifest(path: Path) -> dict[str, Any]:
    """A dataset's manifest.json, checked for what the readers use; DatasetError naming it."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: {undecodable(exc)}") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the dataset manifest ({exc.strerror})") from exc
    if not isinstance(manifest, dict) or manifest.get("kind") != "recloop-dataset":
        raise DatasetError(f"{path}: not a recloop dataset manifest")
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise DatasetError(f"{path}: the manifest has no {key!r} ({kind.__name__})")
    for key in ("users", "items", "events"):
        if not isinstance(manifest["counts"].get(key), int):
            raise DatasetError(f"{path}: the manifest has no integer counts.{key}")
    for name, meta in manifest["files"].items():
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            raise DatasetError(f"{path}: the manifest's entry for file {name!r} has no sha256")
    for name in REQUIRED_FILES:
        if name not in manifest["files"]:
            raise DatasetError(f"{path}: the manifest does not list the dataset file {name}")
    return manifest


def _load_array(path: Path, mode: Literal["r"] | None) -> npt.NDArray[Any]:
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise DatasetError(f"{path}: not a .npy file (it lacks the .npy magic bytes)")
        array: npt.NDArray[Any] = np.load(path, mmap_mode=mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # truncated, or an object array
        raise DatasetError(f"{path}: not a readable .npy array ({exc})") from exc
    return array


def _popularity_summary(items: npt.NDArray[np.int32], num_items: int) -> dict[str, float]:
    counts = np.bincount(items, minlength=num_items + 1)[1:]
    ordered = np.sort(counts)[::-1]
    total = max(int(ordered.sum()), 1)
    top = max(1, num_items // 10)
    return {
        "max_item_events": int(ordered[0]) if len(ordered) else 0,
        "top10pct_share": round(float(ordered[:top].sum()) / total, 4),
        "items_seen_once": int((counts == 1).sum()),
    }
