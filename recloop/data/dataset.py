"""A prepared dataset directory, loaded: manifest, CSR sequences (memory-mapped), vocabularies."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from recloop.data.attributes import ITEM_ATTRIBUTES_FILE
from recloop.data.prepare import MANIFEST, sha256_file
from recloop.data.sequences import Sequences
from recloop.data.splits import Split, leave_one_out, time_split_by_fraction
from recloop.errors import DatasetError

REQUIRED_FILES = ("offsets.npy", "items.npy", "timestamps.npy", "users.parquet", "items.parquet")


@dataclass(frozen=True)
class Vocabulary:
    """Dense id <-> raw id, both directions. Dense ids start at `first_id` (items: 1)."""

    raw_by_id: npt.NDArray[Any]  # [N], raw id of dense id first_id + i
    first_id: int

    def __len__(self) -> int:
        return len(self.raw_by_id)

    @cached_property
    def _sorted(self) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
        # `recloop prepare` assigns ids in ascending raw order, so this is usually the identity;
        # sorting keeps lookups right for any vocabulary.
        order = np.argsort(self.raw_by_id, kind="stable")
        return self.raw_by_id[order], order.astype(np.int64) + self.first_id

    def to_raw(self, ids: npt.ArrayLike) -> npt.NDArray[Any]:
        index = np.asarray(ids, dtype=np.int64) - self.first_id
        if index.size and (index.min() < 0 or index.max() >= len(self.raw_by_id)):
            raise DatasetError(f"dense id out of range [{self.first_id}, {self.last_id}]")
        return self.raw_by_id[index]

    def to_dense(self, raw: npt.ArrayLike, missing: int = -1) -> npt.NDArray[np.int64]:
        """Dense ids of `raw` ids; `missing` where a raw id is not in the vocabulary."""
        keys, ids = self._sorted
        query = np.asarray(raw, dtype=keys.dtype)
        pos = np.clip(np.searchsorted(keys, query), 0, max(len(keys) - 1, 0))
        found = keys[pos] == query if len(keys) else np.zeros(query.shape, dtype=bool)
        return np.where(found, ids[pos], missing)

    @property
    def last_id(self) -> int:
        return self.first_id + len(self.raw_by_id) - 1


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
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{manifest_path}: not valid JSON ({exc})") from exc
        if self.manifest.get("kind") != "recloop-dataset":
            raise DatasetError(f"{manifest_path}: not a recloop dataset manifest")
        for name in REQUIRED_FILES:
            if not (self.directory / name).is_file():
                raise DatasetError(f"{self.directory}: dataset file {name} is missing")
        if verify:
            self.verify()
        mode: Literal["r"] | None = "r" if mmap else None
        self.sequences = Sequences(
            offsets=np.load(self.directory / "offsets.npy", mmap_mode=mode),
            items=np.load(self.directory / "items.npy", mmap_mode=mode),
            timestamps=np.load(self.directory / "timestamps.npy", mmap_mode=mode),
        )

    def verify(self) -> None:
        """Checks every file against the sha256 recorded in the manifest."""
        for name, meta in self.manifest["files"].items():
            path = self.directory / name
            if not path.is_file():
                raise DatasetError(f"{self.directory}: dataset file {name} is missing")
            if sha256_file(path) != meta["sha256"]:
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
        return Vocabulary(_read_raw(self.directory / "users.parquet"), first_id=0)

    @cached_property
    def items(self) -> Vocabulary:
        return Vocabulary(_read_raw(self.directory / "items.parquet"), first_id=1)

    @cached_property
    def values(self) -> npt.NDArray[np.float32] | None:
        path = self.directory / "values.npy"
        return np.load(path, mmap_mode="r") if path.is_file() else None

    @cached_property
    def item_attributes(self) -> npt.NDArray[np.int32] | None:
        """[num_items + 1, A] attribute ids of each item (0 = none), when the dataset was
        prepared with `--item-attributes`; see recloop.data.attributes."""
        path = self.directory / ITEM_ATTRIBUTES_FILE
        if not path.is_file():
            return None
        index: npt.NDArray[np.int32] = np.load(path)
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
                "duplicates": counts["duplicates_dropped"],
                "short_users": counts["short_users_dropped"],
                "kcore_events": counts["kcore_events_dropped"],
            },
            "item_popularity": _popularity_summary(np.asarray(self.sequences.items), items),
            "recloop_version": self.manifest["recloop_version"],
        }


def _read_raw(path: Path) -> npt.NDArray[Any]:
    import polars as pl

    column = pl.read_parquet(path, columns=["raw"]).to_series()
    if column.dtype == pl.String:
        return np.asarray(column.to_list(), dtype=object)
    return column.to_numpy()


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
