"""The side files a version carries beside its weights, by name, and their readers/writers.

Publishers add them as extra files; readers (serving, the learner, compression) ask for them
here rather than by literal names. The manifest lists and checksums every one of them.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from recloop.errors import RegistryError
from recloop.registry.files import WEIGHTS, write_file
from recloop.registry.manifest import MANIFEST, Manifest, VocabularyRef

VOCABULARY_FILE = "items.parquet"  # (id, raw): row i is dense item i + 1
ITEM_COUNTS_FILE = "item_counts.npy"  # int64 [num_items + 1] events per dense id (popularity)
# A delta's item ids that changed meaning (a bounded online table reused their rows):
# {"ids": [dense ids], "raw": [their new raw ids]}; the delta's vocabulary file says the same.
REMAPPED_FILE = "remapped_items.json"
METRICS_FILE = "metrics.csv"  # the training run's metric history
CURVES_FILE = "curves.png"  # its loss / validation plot

# Plain file names only: no directories, no hidden files (those would clash with .tmp-* / locks).
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_RESERVED_NAMES = frozenset({MANIFEST, WEIGHTS})

ExtraFiles = Mapping[str, Path | bytes]


class VersionFiles(Protocol):
    """What the readers need of a Registry (a protocol: the store imports this module)."""

    def file(self, ref: str, name: str, *, verify: bool = True) -> Path: ...


# ---------------------------------------------------------------------- item counts


def item_counts_bytes(counts: npt.NDArray[np.int64]) -> bytes:
    """The .npy bytes of ITEM_COUNTS_FILE (index = dense id)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(counts, dtype=np.int64), allow_pickle=False)
    return buffer.getvalue()


def read_item_counts(registry: VersionFiles, version: str, manifest: Manifest) -> np.ndarray | None:
    """The version's per-item event counts (checksum-verified), None when it has none."""
    if ITEM_COUNTS_FILE not in manifest.files:
        return None
    raw = registry.file(version, ITEM_COUNTS_FILE).read_bytes()
    counts: np.ndarray = np.load(io.BytesIO(raw), allow_pickle=False)
    return counts


# ---------------------------------------------------------------------- remapped items


def remapped_bytes(remapped: Mapping[int, str]) -> bytes:
    """The JSON of REMAPPED_FILE (dense id -> new raw id), ids in ascending order."""
    ids = sorted(remapped)
    return json.dumps({"ids": ids, "raw": [remapped[i] for i in ids]}).encode()


def read_remapped(registry: VersionFiles, version: str, manifest: Manifest) -> dict[int, str]:
    """The dense ids delta `version` gives to new raw ids (checksum-verified; {} for none)."""
    if REMAPPED_FILE not in manifest.files:
        return {}
    try:
        data = json.loads(registry.file(version, REMAPPED_FILE).read_bytes())
        ids, raw = data["ids"], data["raw"]
        if len(ids) != len(raw) or not all(isinstance(i, int) and i > 0 for i in ids):
            raise ValueError("ids and raw differ in length, or an id is not an integer >= 1")
        return {int(i): str(r) for i, r in zip(ids, raw, strict=True)}
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"version {version}: {REMAPPED_FILE} is malformed ({exc})") from None


def check_remapped(extra: ExtraFiles, vocabulary_file: str | None, delta: bool) -> None:
    """A remap comes with the delta's own vocabulary file, which gives the ids their new raw
    ids: RegistryError otherwise."""
    if REMAPPED_FILE not in extra:
        return
    if not delta:
        raise RegistryError(f"{REMAPPED_FILE} belongs to deltas; a full version has none")
    if vocabulary_file is None:
        raise RegistryError(
            f"a delta with {REMAPPED_FILE} must carry its own vocabulary file (vocabulary_file)"
        )


# ---------------------------------------------------------------------- vocabulary


def vocabulary_path(registry: VersionFiles, version: str, manifest: Manifest) -> Path:
    """The version's vocabulary file (checksum-verified); RegistryError when it has none."""
    if manifest.vocabulary is None:
        raise RegistryError(f"version {version} records no item vocabulary")
    return registry.file(version, manifest.vocabulary.file)


def vocabulary_ref(path: Path, dataset: Mapping[str, Any] | None) -> VocabularyRef:
    """The manifest's ``vocabulary`` entry for vocabulary file `path` (items counted for
    parquet, checked against the dataset's item count when one is given)."""
    items: int | None = None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # only needed here; keeps `import recloop.registry` light

        try:
            items = int(pq.read_metadata(path).num_rows)
        except Exception as exc:  # pyarrow raises several error types for a bad file
            raise RegistryError(
                f"vocabulary file {path.name} is not readable parquet: {exc}"
            ) from exc
        expected = ((dataset or {}).get("counts") or {}).get("items")
        # items.parquet row i is dense item i + 1: a mismatch means the vocab of another dataset.
        if isinstance(expected, int) and expected != items:
            raise RegistryError(
                f"vocabulary file {path.name} has {items} items but dataset counts say {expected}"
            )
    return VocabularyRef(path.name, items)


# ---------------------------------------------------------------------- extra files


def check_extra_files(
    extra: ExtraFiles, vocabulary_file: str | None, *, delta: bool = False
) -> None:
    for name in extra:
        _check_file_name(name)
    check_remapped(extra, vocabulary_file, delta)
    if vocabulary_file is not None and vocabulary_file not in extra:
        raise RegistryError(
            f"vocabulary_file {vocabulary_file!r} is not one of the extra files "
            f"({', '.join(sorted(extra)) or 'none given'})"
        )


def write_extras(extra: ExtraFiles, directory: Path) -> None:
    for name, source in extra.items():
        write_file(name, source, directory / name)


def _check_file_name(name: str) -> None:
    if not isinstance(name, str) or not _FILE_NAME_RE.match(name) or ".." in name:
        raise RegistryError(
            f"extra file name {name!r} must be a plain file name (letters, digits, '_', '-', '.')"
        )
    if name in _RESERVED_NAMES:
        raise RegistryError(f"extra file name {name!r} is reserved by the registry")


def inherited_vocabulary(
    parent_id: str, parent: Manifest, vocabulary_file: str | None, extra: Mapping[str, Any]
) -> VocabularyRef | None:
    """The vocabulary a delta inherits from its parent: none when it brings its own."""
    inherited = parent.vocabulary if vocabulary_file is None else None
    if inherited is not None and inherited.file in extra:
        raise RegistryError(
            f"extra file {inherited.file!r} would shadow the vocabulary inherited from "
            f"{parent_id}; pass vocabulary_file={inherited.file!r} to replace it"
        )
    return inherited
