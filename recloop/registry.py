"""The model registry: the one writer (and the checked reader) of recloop model artefacts.

Training publishes here, serving loads from here; later the online learner publishes deltas and
compression publishes compressed versions. Layout::

    ROOT/
      versions/v000001/          one immutable version
        weights.safetensors      tensors (safetensors, never pickle)
        items.parquet ...        any extra files the publisher gave (vocabulary, metrics.csv, ...)
        manifest.json            written last into the temp dir; lists every other file
      aliases.json               {"production": id, "history": [...], "log": [...]}
      .tmp-*                     in-progress (or crashed) publishes; ignored, removed by gc()

Publishing is crash-safe and safe under concurrent publishers: everything is written and fsynced
into ``ROOT/.tmp-<random>/`` and the directory is then ``os.rename``-d to
``versions/v{n:06d}`` with n = highest existing number + 1. A directory rename is atomic, so a
reader sees either the whole version or nothing; if another publisher took that number first the
rename fails (the target exists and is not empty) and we retry with the next number.

Manifest (``manifest.json``, strict JSON)::

    format          "recloop-model"
    format_version  1
    id              "v000007" (always equal to the directory name)
    created_at      ISO 8601, UTC
    kind            "full" | "delta" (see below)
    method          how it was made: "train", "int8", "distill", "online", "compact", ...
    parent          version id it was derived from, or null (always set for a delta)
    model           {"type": str, "config": {...}, ...}  as given by the publisher
    dataset         {"path", "manifest_sha256", "counts"} (see dataset_reference) or null
    vocabulary      {"file": "items.parquet", "items": int | null} or null
    metrics         {name: number | ...}
    training        free dict: step, wall time, command line, ...
    tensors         {name: {"dtype": "float32", "shape": [..]}}  the version's FULL tensors (for a
                    delta: after applying it, so readers know final shapes without applying)
    files           {name: {"bytes": int, "sha256": hex}} for every file except manifest.json
    recloop_version the package version that wrote it

Delta versions (``publish_delta``): ``kind="delta"``, ``parent`` required, plus::

    base            id of the full version at the root of the delta chain
    chain_depth     number of deltas between ``base`` and this version (1 = direct child)
    delta           {tensor name: {"mode": "replace"} | {"mode": "rows", "rows": "<name>.rows",
                     "num_rows": int, "shape": [final shape]}}; weights.safetensors then holds
                    only the changed tensors, and for "rows" the new rows plus an int64 tensor
                    ``<name>.rows`` of their indices (rows past the parent's row count grow the
                    tensor, contiguously)
    removed         [tensor names dropped relative to the parent]

A delta inherits the parent's ``model`` (unless given), ``dataset`` and vocabulary; the inherited
vocabulary file is hard-linked into the delta's directory (copied where links are impossible), so
every version still lists and checksums every file it uses and versions stay self-contained.
``load_tensors`` on a delta loads ``base`` and applies each delta in order, verifying every version
in the chain; ``compact`` turns a chain back into one full version. Versions are never deleted
(``gc`` only removes ``.tmp-*`` leftovers), so a chain's versions are always there.

JSON policy: manifests are strict JSON. NaN and +-inf are *rejected* at publish time with a
:class:`RegistryError` naming the field (e.g. ``metrics.loss``) rather than silently stored as
null: a non-finite metric usually means a broken run, and null would be indistinguishable from
"not measured". Publishers that want null pass ``None``. numpy scalars and 0-dim tensors are
converted with ``.item()``, tuples become lists and paths become strings; other types are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import save_file

from recloop import __version__
from recloop.errors import RegistryError, undecodable
from recloop.fsutil import fsync_dir

__all__ = [
    "MANIFEST",
    "WEIGHTS",
    "Registry",
    "RowUpdate",
    "VersionInfo",
    "dataset_reference",
    "format_versions_table",
]

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
ALIASES = "aliases.json"
FORMAT = "recloop-model"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"
# Refs that name a moving pointer rather than a version.
LATEST = "latest"
PRODUCTION = "production"

# ASCII digits only, bounded: a reference is checked before it becomes a path.
_ID_RE = re.compile(r"v([0-9]{6,18})\Z", re.ASCII)
# Plain file names only: no directories, no hidden files (those would clash with .tmp-* / locks).
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_RESERVED_NAMES = frozenset({MANIFEST, WEIGHTS})
# Each failed rename means another publisher just won a number; this many in a row is not a race.
_MAX_ATTEMPTS = 1000
_BLOCK = 1 << 20
# A delta stores the indices of a "rows" update of tensor NAME as tensor NAME + ROWS_SUFFIX.
ROWS_SUFFIX = ".rows"
_COMPLEX = (torch.complex32, torch.complex64, torch.complex128)

# (id, manifest) of the versions a version is built from, base first, the version itself last.
_Chain = list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class VersionInfo:
    """One row of :meth:`Registry.list` (a manifest summary; nothing is hashed)."""

    id: str
    created_at: str
    kind: str
    method: str
    parent: str | None
    model_type: str
    metrics: dict[str, Any]
    is_production: bool
    chain_depth: int = 0  # deltas between this version and its base; 0 for a full version
    problem: str | None = None  # why its manifest cannot be read; None for a healthy version

    @property
    def status(self) -> str:
        """The version's state: "ok", or "broken: <reason>" when its manifest cannot be read."""
        return "ok" if self.problem is None else f"broken: {self.problem}"

    def to_json(self) -> dict[str, Any]:
        """The row as plain JSON data (``recloop models list --json``)."""
        return {**dataclasses.asdict(self), "status": self.status}


@dataclass(frozen=True)
class RowUpdate:
    """New contents for some rows of a tensor, for :meth:`Registry.publish_delta` ("rows").

    `rows` (integer [N], unique, >= 0; stored as int64) index dim 0 of the tensor, `values`
    [N, *trailing dims] (the tensor's dtype) are their new contents. Rows at or past the parent's
    row count grow the tensor: they must then cover ``parent_rows .. max(rows)`` without holes.
    """

    rows: torch.Tensor
    values: torch.Tensor


class Registry:
    """A directory of immutable, checksummed model versions plus a ``production`` pointer."""

    def __init__(self, root: Path | str, *, create: bool = True) -> None:
        self.root = Path(root)
        self._versions = self.root / "versions"
        if create:
            self._versions.mkdir(parents=True, exist_ok=True)
        elif not self._versions.is_dir():
            raise RegistryError(f"{self.root}: not a model registry (no versions/ directory)")

    # ------------------------------------------------------------------ publishing

    def publish(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        model: Mapping[str, Any],
        dataset: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        parent: str | None = None,
        method: str = "train",
        training: Mapping[str, Any] | None = None,
        extra_files: Mapping[str, Path | bytes] | None = None,
        vocabulary_file: str | None = None,
    ) -> str:
        """Writes a new full version atomically and returns its id (``v000001``, ...)."""
        extra = dict(extra_files or {})
        # Validate everything cheap before touching the disk, so bad arguments leave no trace.
        _check_tensors(tensors)
        _check_extra_files(extra, vocabulary_file)
        _check_method(method)
        manifest = _new_manifest(
            kind="full",
            method=method,
            parent=self.resolve(parent) if parent is not None else None,
            model=_model_json(model),
            dataset=_jsonable(dict(dataset), "dataset") if dataset is not None else None,
            metrics=_jsonable(dict(metrics or {}), "metrics"),
            training=_jsonable(dict(training or {}), "training"),
            tensors={name: _tensor_meta(t) for name, t in tensors.items()},
        )

        def fill(tmp: Path) -> dict[str, dict[str, Any]]:
            self._write_weights(tensors, tmp / WEIGHTS)
            _write_extras(extra, tmp)
            if vocabulary_file is not None:
                manifest["vocabulary"] = _vocabulary(tmp / vocabulary_file, manifest["dataset"])
            return {}

        return self._write_version(manifest, fill)

    def publish_delta(
        self,
        parent: str,
        changes: Mapping[str, torch.Tensor | RowUpdate],
        *,
        removed: Sequence[str] = (),
        metrics: Mapping[str, Any] | None = None,
        method: str = "online",
        training: Mapping[str, Any] | None = None,
        extra_files: Mapping[str, Path | bytes] | None = None,
        vocabulary_file: str | None = None,
        model: Mapping[str, Any] | None = None,
    ) -> str:
        """Writes a delta version on top of `parent` (full or delta) and returns its id.

        `changes` maps tensor names to a whole new tensor ("replace": same dtype as the parent's,
        any shape; the only way to add a tensor) or a :class:`RowUpdate` ("rows"). `removed`
        names parent tensors to drop. `model` defaults to the parent's: pass the updated config
        when new items grow the item table. The vocabulary is the parent's (hard-linked) unless
        `vocabulary_file` names one of `extra_files`; a new one may not have fewer items, since
        the dense ids of existing items cannot change. Everything is validated against the
        parent's manifest before anything is written: a bad delta leaves no trace.
        """
        extra = dict(extra_files or {})
        _check_extra_files(extra, vocabulary_file)
        _check_method(method)
        parent_id = self.resolve(parent)
        parent_manifest = self._read_manifest(parent_id)
        base, depth = _chain_position(parent_id, parent_manifest)
        plan = _plan_delta(parent_manifest.get("tensors") or {}, changes, removed)
        inherited = parent_manifest.get("vocabulary") if vocabulary_file is None else None
        if inherited is not None and inherited.get("file") in extra:
            raise RegistryError(
                f"extra file {inherited['file']!r} would shadow the vocabulary inherited from "
                f"{parent_id}; pass vocabulary_file={inherited['file']!r} to replace it"
            )
        manifest = _new_manifest(
            kind="delta",
            method=method,
            parent=parent_id,
            lineage={"base": base, "chain_depth": depth},
            model=_model_json(model if model is not None else parent_manifest["model"]),
            dataset=parent_manifest.get("dataset"),
            metrics=_jsonable(dict(metrics or {}), "metrics"),
            training=_jsonable(dict(training or {}), "training"),
            tensors=plan.tensors,
        )
        manifest["delta"] = plan.delta
        manifest["removed"] = plan.removed

        def fill(tmp: Path) -> dict[str, dict[str, Any]]:
            self._write_weights(plan.stored, tmp / WEIGHTS)
            _write_extras(extra, tmp)
            if vocabulary_file is not None:
                # No dataset-count check: online learning grows the vocabulary past the dataset.
                manifest["vocabulary"] = _vocabulary(tmp / vocabulary_file, None)
                _check_vocabulary_growth(manifest["vocabulary"], parent_manifest.get("vocabulary"))
                return {}
            if inherited is None:
                return {}
            manifest["vocabulary"] = dict(inherited)
            name = str(inherited["file"])
            return {name: self._link_file(parent_id, parent_manifest, name, tmp)}

        return self._write_version(manifest, fill)

    def compact(self, ref: str, *, training: Mapping[str, Any] | None = None) -> str:
        """Publishes the tensors of `ref` (typically a delta chain) as one new full version.

        The new version has method "compact", parent `ref`, and the model, dataset, vocabulary,
        metrics, training and extra files of `ref` (files hard-linked, not rewritten); deltas
        published on top of it start a fresh, short chain. `training` replaces the training
        record of `ref` (a publisher's counters that the new chain resets). Returns its id.
        """
        version_id = self.resolve(ref)
        source = self._read_manifest(version_id)
        tensors = self.load_tensors(version_id)  # verifies every version of the chain
        if training is not None:
            training = _jsonable(dict(training), "training")
        manifest = _new_manifest(
            kind="full",
            method="compact",
            parent=version_id,
            model=source["model"],
            dataset=source.get("dataset"),
            metrics=source.get("metrics") or {},
            training=(source.get("training") or {}) if training is None else training,
            tensors={name: _tensor_meta(t) for name, t in tensors.items()},
        )
        manifest["vocabulary"] = source.get("vocabulary")

        def fill(tmp: Path) -> dict[str, dict[str, Any]]:
            self._write_weights(tensors, tmp / WEIGHTS)
            return {
                name: self._link_file(version_id, source, name, tmp)
                for name in source["files"]
                if name != WEIGHTS
            }

        return self._write_version(manifest, fill)

    def _write_version(
        self, manifest: dict[str, Any], fill: Callable[[Path], dict[str, dict[str, Any]]]
    ) -> str:
        """Creates a temp dir, lets `fill` write the version's files into it, checksums them and
        installs it. `fill` returns the file entries it already knows (linked files), which are
        not hashed again: those bytes were hashed when their first version was published.
        """
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))
        try:
            known = fill(tmp)
            manifest["files"] = {
                path.name: known.get(path.name)
                or {"bytes": path.stat().st_size, "sha256": _sha256(path)}
                for path in sorted(tmp.iterdir())
            }
            return self._install(tmp, manifest)
        except BaseException:
            # Includes KeyboardInterrupt: nothing half-written may survive a failed publish.
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _link_file(
        self, version_id: str, manifest: Mapping[str, Any], name: str, tmp: Path
    ) -> dict[str, Any]:
        """Shares file `name` of an existing version with the version being built in `tmp`.

        A hard link costs nothing however big the file (deltas come every few seconds), and is
        safe because versions are immutable. Returns the file's manifest entry.
        """
        meta = manifest["files"].get(name)
        source = self._versions / version_id / name
        if not isinstance(meta, dict):
            raise RegistryError(f"version {version_id}: {MANIFEST} does not list file {name}")
        if not source.is_file():
            raise RegistryError(f"version {version_id} is partial: file {name} is missing")
        try:
            os.link(source, tmp / name)
        except OSError:  # e.g. a filesystem without hard links
            shutil.copyfile(source, tmp / name)
            _fsync_file(tmp / name)
        return dict(meta)

    @staticmethod
    def _write_weights(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        try:
            save_file(cpu, path, metadata={"format": "pt"})
        except (RuntimeError, ValueError) as exc:
            # Typically tied weights sharing storage; the publisher must pass each tensor once.
            raise RegistryError(f"cannot write {WEIGHTS}: {exc}") from exc
        _fsync_file(path)

    def _install(self, tmp: Path, manifest: dict[str, Any]) -> str:
        """Renames the finished temp dir to the next free version id; retries on a lost race."""
        number = self._max_number() + 1
        for _ in range(_MAX_ATTEMPTS):
            version_id = _format_id(number)
            # The id lives in the manifest too, so it is rewritten (still invisible) per attempt.
            manifest["id"] = version_id
            _write_json(tmp / MANIFEST, manifest, durable=True)
            fsync_dir(tmp)
            try:
                os.rename(tmp, self._versions / version_id)
            except OSError as exc:
                # Linux reports ENOTEMPTY for an existing version dir, other systems EEXIST.
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise RegistryError(f"cannot install version {version_id}: {exc}") from exc
                number = max(number + 1, self._max_number() + 1)
                continue
            # Make the new directory entry itself durable, not just the files in it.
            fsync_dir(self._versions)
            return version_id
        raise RegistryError(f"{self.root}: no free version id after {_MAX_ATTEMPTS} attempts")

    def _max_number(self) -> int:
        return max((n for n, _ in self._scan()), default=0)

    def _scan(self) -> list[tuple[int, str]]:
        """(number, id) of every version directory, ascending. Anything else is ignored."""
        found = []
        for entry in os.scandir(self._versions):
            match = _ID_RE.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry.name))
        return sorted(found)

    # ------------------------------------------------------------------ reading

    def list(self) -> list[VersionInfo]:
        """Every version, oldest first (by number, so v1000000 sorts after v999999).

        A version whose manifest cannot be read (corrupt, unreadable, incomplete) is listed
        with the reason in `problem` rather than failing the whole listing.
        """
        production = self.production()
        infos = []
        for _, version_id in self._scan():
            try:
                m = self._read_manifest(version_id)
            except RegistryError as exc:
                infos.append(_broken_info(version_id, str(exc), version_id == production))
                continue
            infos.append(
                VersionInfo(
                    id=version_id,
                    created_at=str(m.get("created_at", "")),
                    kind=str(m.get("kind", "")),
                    method=str(m.get("method", "")),
                    parent=m.get("parent"),
                    model_type=str((m.get("model") or {}).get("type", "")),
                    metrics=dict(m.get("metrics") or {}),
                    is_production=version_id == production,
                    chain_depth=_chain_depth(m),
                )
            )
        return infos

    def manifest(self, ref: str) -> dict[str, Any]:
        """The manifest of `ref` (not checksum-verified; see :meth:`verify`)."""
        return self._read_manifest(self.resolve(ref))

    def path(self, ref: str) -> Path:
        """The directory of `ref`. Treat it as read-only: versions are immutable."""
        return self._versions / self.resolve(ref)

    def file(self, ref: str, name: str, *, verify: bool = True) -> Path:
        """Path of one file of a version (e.g. the vocabulary), checked against its sha256."""
        version_id = self.resolve(ref)
        manifest = self._read_manifest(version_id)
        if name not in manifest["files"]:
            raise RegistryError(
                f"version {version_id} has no file {name!r} "
                f"(it has: {', '.join(sorted(manifest['files']))})"
            )
        if verify:
            self._verify_file(version_id, name, manifest["files"][name])
        return self._versions / version_id / name

    def load_tensors(
        self, ref: str, *, verify: bool = True, device: str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The full tensors of `ref`; with `verify` every file is checked against its manifest
        first (for a delta: every file of every version in its chain, base included).
        """
        chain = self._chain(self.resolve(ref))
        if verify:
            for version_id, manifest in chain:
                self._verify(version_id, manifest)
        tensors = self._materialise(chain)
        if torch.device(device).type == "cpu":
            return tensors
        return {name: t.to(device) for name, t in tensors.items()}

    def read_delta(self, ref: str) -> tuple[dict[str, torch.Tensor | RowUpdate], Sequence[str]]:
        """(changes, removed) that delta version `ref` itself stores, as given to
        :meth:`publish_delta`: whole tensors for "replace", :class:`RowUpdate` for "rows".

        Only the delta's weights file is read and checked against its sha256, not its chain:
        for a reader that already holds the parent's tensors (a server applying deltas).
        """
        version_id = self.resolve(ref)
        manifest = self._read_manifest(version_id)
        delta = manifest.get("delta")
        if manifest.get("kind") != "delta" or not isinstance(delta, dict):
            raise RegistryError(
                f"version {version_id} is kind {manifest.get('kind')!r}, not a delta"
            )
        meta = manifest["files"].get(WEIGHTS)
        if not isinstance(meta, dict):
            raise RegistryError(f"version {version_id}: manifest does not list {WEIGHTS}")
        self._verify_file(version_id, WEIGHTS, meta)
        changes: dict[str, torch.Tensor | RowUpdate] = {}
        with self._open_weights(version_id) as read:
            for name, spec in delta.items():
                mode = spec.get("mode") if isinstance(spec, dict) else None
                if mode == "rows":
                    changes[name] = RowUpdate(rows=read(spec["rows"]), values=read(name))
                elif mode == "replace":
                    changes[name] = read(name)
                else:
                    raise RegistryError(
                        f"version {version_id}: unknown delta mode {mode!r} for tensor {name!r}"
                    )
        return changes, [str(name) for name in manifest.get("removed") or []]

    def verify(self, ref: str) -> None:
        """Raises RegistryError unless every file listed in the manifest has its sha256.

        For a delta, every version of its chain is verified: it cannot be loaded without them.
        Files present in the directory but absent from the manifest are not checked: nothing in
        recloop reads a file the manifest does not list.
        """
        for version_id, manifest in self._chain(self.resolve(ref)):
            self._verify(version_id, manifest)

    def _chain(self, version_id: str) -> _Chain:
        """(id, manifest) of `version_id` and the versions it is built on, base first."""
        chain = [(version_id, self._read_manifest(version_id))]
        while chain[-1][1].get("kind") == "delta":
            child_id, child = chain[-1]
            parent_id = child.get("parent")
            # Parents always have lower numbers (they existed first); checking it also makes a
            # cycle in hand-edited manifests impossible.
            if not isinstance(parent_id, str) or _number(parent_id) >= _number(child_id):
                raise RegistryError(f"version {child_id}: delta has invalid parent {parent_id!r}")
            if not (self._versions / parent_id).is_dir():
                raise RegistryError(f"version {child_id}: its parent {parent_id} is missing")
            chain.append((parent_id, self._read_manifest(parent_id)))
        base_id, base = chain[-1]
        if base.get("kind") != "full":
            raise RegistryError(
                f"version {base_id} is kind {base.get('kind')!r}; "
                "this recloop version can only load 'full' and 'delta' versions"
            )
        chain.reverse()
        for depth, (delta_id, delta) in enumerate(chain[1:], start=1):
            if delta.get("base") != base_id or delta.get("chain_depth") != depth:
                raise RegistryError(
                    f"version {delta_id}: manifest says base {delta.get('base')!r} at depth "
                    f"{delta.get('chain_depth')!r}, but its chain is base {base_id} "
                    f"at depth {depth}"
                )
        return chain

    def _materialise(
        self, chain: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> dict[str, torch.Tensor]:
        """The full tensors at the end of `chain` (base first).

        Each tensor is read once, from the version that last wrote it whole (the base or a
        "replace"), allocated once at its final size, then patched in place by the later row
        updates: one copy of a big table however long the chain, and no work for the updates
        a later "replace" overwrote.
        """
        final = chain[-1][1]["tensors"]
        origin = _origins(chain, final)
        tensors: dict[str, torch.Tensor] = {}
        filled: dict[str, int] = {}  # rows written so far: growth must be contiguous
        for index, (version_id, manifest) in enumerate(chain):
            whole = [name for name, at in origin.items() if at == index]
            patches = [
                (name, spec)
                for name, spec in (manifest.get("delta") or {}).items()
                if spec["mode"] == "rows" and name in origin and origin[name] < index
            ]
            if not whole and not patches:
                continue
            with self._open_weights(version_id) as read:
                for name in whole:
                    stored = read(name)
                    tensors[name] = _grown(stored, final[name]["shape"], version_id, name)
                    filled[name] = stored.shape[0] if stored.ndim else 0
                for name, spec in patches:
                    filled[name] = _patch_rows(
                        tensors[name],
                        read(name),
                        read(spec["rows"]),
                        filled[name],
                        version_id,
                        name,
                    )
        for name, tensor in tensors.items():
            if tensor.ndim and filled[name] != tensor.shape[0]:
                raise RegistryError(
                    f"version {chain[-1][0]}: rows {filled[name]}..{tensor.shape[0] - 1} of tensor "
                    f"{name!r} are never written by its chain"
                )
        return {name: tensors[name] for name in final}

    @contextlib.contextmanager
    def _open_weights(self, version_id: str) -> Iterator[Callable[[str], torch.Tensor]]:
        """A reader of single tensors from a version's weights file (errors name the version)."""
        path = self._versions / version_id / WEIGHTS
        if not path.is_file():
            raise RegistryError(f"version {version_id} is partial: {WEIGHTS} is missing")
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise RegistryError(f"version {version_id}: cannot read {WEIGHTS}: {exc}") from exc

        def read(name: str) -> torch.Tensor:
            try:
                # A fresh copy, not a view of the file: patching it in place is safe.
                tensor: torch.Tensor = handle.get_tensor(name)  # type: ignore[no-untyped-call]
            except Exception as exc:
                raise RegistryError(
                    f"version {version_id}: cannot read tensor {name!r} from {WEIGHTS}: {exc}"
                ) from exc
            return tensor

        with handle:
            yield read

    def _verify(self, version_id: str, manifest: dict[str, Any]) -> None:
        files = manifest["files"]
        if WEIGHTS not in files:
            raise RegistryError(f"version {version_id}: manifest does not list {WEIGHTS}")
        for name, meta in files.items():
            self._verify_file(version_id, name, meta)

    def _verify_file(self, version_id: str, name: str, meta: Mapping[str, Any]) -> None:
        path = self._versions / version_id / name
        if not path.is_file():
            raise RegistryError(f"version {version_id} is partial: file {name} is missing")
        try:
            size = path.stat().st_size
            # Size first: a truncated file is reported as such, and without reading it.
            digest = _sha256(path) if size == meta.get("bytes") else None
        except OSError as exc:
            raise RegistryError(f"version {version_id}: cannot read {path} ({exc})") from exc
        if size != meta.get("bytes"):
            raise RegistryError(
                f"version {version_id} is corrupt: file {name} has {size} bytes, "
                f"manifest says {meta.get('bytes')}"
            )
        if digest != meta.get("sha256"):
            raise RegistryError(
                f"version {version_id} is corrupt: file {name} does not match its sha256 "
                "in the manifest"
            )

    def _read_manifest(self, version_id: str) -> dict[str, Any]:
        """The manifest of `version_id`, checked for the keys readers rely on; RegistryError
        naming the file when it is missing, unreadable, not JSON or not a recloop manifest."""
        path = self._versions / version_id / MANIFEST
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RegistryError(f"version {version_id} is partial: {path} is missing") from None
        except UnicodeDecodeError as exc:
            raise RegistryError(f"version {version_id}: {path}: {undecodable(exc)}") from None
        except OSError as exc:
            raise RegistryError(f"version {version_id}: cannot read {path} ({exc})") from None
        try:
            manifest: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"version {version_id}: {path} is not valid JSON ({exc})") from exc
        problem = _manifest_problem(manifest, version_id)
        if problem is not None:
            raise RegistryError(f"version {version_id}: {path} {problem}")
        return manifest

    # ------------------------------------------------------------------ refs and aliases

    def resolve(self, ref: str) -> str:
        """A version id for `ref`: a version id, "latest", or "production" (error if unset)."""
        if ref == LATEST:
            versions = self._scan()
            if not versions:
                raise RegistryError(f"{self.root}: the registry has no versions yet")
            return versions[-1][1]
        if ref == PRODUCTION:
            production = self.production()
            if production is None:
                raise RegistryError(
                    f"{self.root}: no version has been promoted to production "
                    "(promote one, or ask for 'latest')"
                )
            return production
        if not isinstance(ref, str) or not _ID_RE.match(ref):
            raise RegistryError(
                f"{ref!r} is not a version reference (expected e.g. 'v000001', "
                f"'{LATEST}' or '{PRODUCTION}')"
            )
        if not (self._versions / ref).is_dir():
            raise RegistryError(f"unknown version {ref} in {self.root}")
        return ref

    def production(self) -> str | None:
        """The production version id, or None if nothing was ever promoted."""
        production = self._read_aliases().get("production")
        return production if isinstance(production, str) else None

    def promote(self, ref: str) -> str:
        """Points production at `ref` (after verifying it) and returns its id."""
        version_id = self.resolve(ref)
        # Never point serving at something it would refuse to load (for a delta: its whole chain).
        self.verify(version_id)
        with self._aliases_lock():
            aliases = self._read_aliases()
            if aliases.get("production") == version_id:
                return version_id  # no-op, so a rollback does not land on the same version
            now = _now()
            aliases["production"] = version_id
            aliases["history"].append({"version": version_id, "at": now})
            aliases["log"].append({"action": "promote", "version": version_id, "at": now})
            self._write_aliases(aliases)
        return version_id

    def rollback(self) -> str:
        """Returns production to the previously promoted version; returns that version's id."""
        with self._aliases_lock():
            aliases = self._read_aliases()
            history = aliases["history"]
            if len(history) < 2:
                raise RegistryError(
                    f"{self.root}: nothing to roll back to "
                    f"({'no version was ever promoted' if not history else 'only one promotion'})"
                )
            current, previous = history[-1]["version"], history[-2]["version"]
            self.verify(self.resolve(previous))
            history.pop()
            aliases["production"] = previous
            aliases["log"].append(
                {"action": "rollback", "from": current, "version": previous, "at": _now()}
            )
            self._write_aliases(aliases)
        return str(previous)

    def _read_aliases(self) -> dict[str, Any]:
        path = self.root / ALIASES
        try:
            aliases = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"production": None, "history": [], "log": []}
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{path}: not valid JSON ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise RegistryError(f"{path}: {undecodable(exc)}") from None
        except OSError as exc:
            raise RegistryError(f"{path}: cannot read the aliases file ({exc})") from exc
        if not isinstance(aliases, dict) or not isinstance(aliases.get("history"), list):
            raise RegistryError(f"{path}: not a recloop aliases file")
        aliases.setdefault("log", [])
        return aliases

    def _write_aliases(self, aliases: dict[str, Any]) -> None:
        # Temp file + os.replace: readers see the old or the new file, never a torn one.
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + "aliases-", suffix=".json", dir=self.root)
        os.close(fd)
        tmp = Path(name)
        try:
            _write_json(tmp, aliases, durable=True)
            os.replace(tmp, self.root / ALIASES)
            fsync_dir(self.root)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _aliases_lock(self) -> Iterator[None]:
        # Serialises read-modify-write of aliases.json across threads and processes.
        fd = os.open(self.root / ".aliases.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    # ------------------------------------------------------------------ housekeeping

    def gc(self, max_age_seconds: float = 3600) -> int:
        """Removes temp dirs/files of publishes that crashed over `max_age_seconds` ago.

        Age is the newest mtime of the entry and its direct children, so a publish still writing
        a large file is not mistaken for a crashed one. Returns how many entries were removed.
        """
        cutoff = time.time() - max_age_seconds
        removed = 0
        for entry in self.root.iterdir():
            if not entry.name.startswith(TMP_PREFIX):
                continue
            try:
                newest = entry.stat().st_mtime
                if entry.is_dir():
                    newest = max([newest, *(c.stat().st_mtime for c in entry.iterdir())])
            except FileNotFoundError:
                continue  # its publish just finished (renamed) or another gc removed it
            if newest >= cutoff:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed


# ---------------------------------------------------------------------- helpers


def dataset_reference(directory: Path | str) -> dict[str, Any]:
    """The ``dataset`` manifest entry for a prepared dataset directory: path, checksum, counts."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise RegistryError(f"{directory}: no dataset manifest.json to reference")
    try:
        counts = json.loads(path.read_text()).get("counts", {})
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}: not valid JSON ({exc})") from exc
    return {"path": str(directory.resolve()), "manifest_sha256": _sha256(path), "counts": counts}


def format_versions_table(infos: Sequence[VersionInfo]) -> Table:
    """A rich table for ``recloop models list``; production is marked in the first column."""
    table = Table(title="model versions")
    table.add_column("", no_wrap=True)
    table.add_column("id", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("kind")
    table.add_column("method")
    table.add_column("parent")
    table.add_column("model")
    table.add_column("metrics", min_width=36, overflow="fold")
    broken = [info for info in infos if info.problem is not None]
    if broken:
        table.caption = f"{len(broken)} broken version(s): their manifest cannot be read"
    for info in infos:
        if info.problem is not None:
            marks = ["[bold green]production[/]"] * info.is_production + ["[bold red]broken[/]"]
            table.add_row(", ".join(marks), info.id, "", "?", "?", "?", "?", escape(info.status))
            continue
        table.add_row(
            "[bold green]production[/]" if info.is_production else "",
            info.id,
            info.created_at.replace("T", " ")[:16],  # to the minute, to keep rows narrow
            f"{info.kind} (depth {info.chain_depth})" if info.chain_depth else info.kind,
            info.method,
            info.parent or "-",
            info.model_type,
            ", ".join(f"{k}={_format_metric(v)}" for k, v in _headline(info.metrics)) or "-",
        )
    return table


HEADLINE_METRICS = ("test/HR@10", "test/NDCG@10", "valid/NDCG@10")


def _headline(metrics: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The few metrics a version list shows: the headline ones if present, else the first 3."""
    chosen = [(k, metrics[k]) for k in HEADLINE_METRICS if k in metrics]
    return chosen or list(metrics.items())[:3]


def _broken_info(version_id: str, problem: str, is_production: bool) -> VersionInfo:
    return VersionInfo(
        id=version_id,
        created_at="",
        kind="?",
        method="?",
        parent=None,
        model_type="?",
        metrics={},
        is_production=is_production,
        problem=problem,
    )


def _manifest_problem(manifest: Any, version_id: str) -> str | None:
    """What is wrong with a parsed manifest (completing "<path> ..."), or None: the keys and
    types that every reader relies on (see the module docstring)."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return "is not a recloop manifest"
    if manifest.get("id") != version_id:
        # A copied or renamed directory: its contents describe some other version.
        return f"says id {manifest.get('id')!r}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "has no 'files' table"
    for name, meta in files.items():
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("bytes"), int)
            and isinstance(meta.get("sha256"), str)
        ):
            return f"has a bad 'files' entry for {name!r} (expected bytes and sha256)"
    model = manifest.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("type"), str):
        return "has no model type ('model.type')"
    required: list[tuple[str, type]] = [("kind", str), ("tensors", dict)]
    if manifest.get("kind") == "delta":
        required += [("parent", str), ("base", str), ("chain_depth", int), ("delta", dict)]
    for key, kind in required:
        if not isinstance(manifest.get(key), kind):
            return f"has no {key!r} ({kind.__name__})"
    return None


def _chain_depth(manifest: Mapping[str, Any]) -> int:
    depth = manifest.get("chain_depth")
    return depth if isinstance(depth, int) else 0


def _format_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _format_id(number: int) -> str:
    return f"v{number:06d}"


def _number(version_id: str) -> int:
    match = _ID_RE.match(version_id)
    if not match:
        raise RegistryError(f"{version_id!r} is not a version id")
    return int(match.group(1))


def _new_manifest(
    *,
    kind: str,
    method: str,
    parent: str | None,
    model: Any,
    dataset: Any,
    metrics: Any,
    training: Any,
    tensors: dict[str, dict[str, Any]],
    lineage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A manifest with every key in its documented order; ``files`` is filled in last."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "id": None,  # set for each rename attempt, see _install
        "created_at": _now(),
        "kind": kind,
        "method": method,
        "parent": parent,
        **(lineage or {}),
        "model": model,
        "dataset": dataset,
        "vocabulary": None,
        "metrics": metrics,
        "training": training,
        "tensors": tensors,
        "files": {},
        "recloop_version": __version__,
    }


def _model_json(model: Mapping[str, Any]) -> Any:
    model_json = _jsonable(dict(model), "model")
    if not isinstance(model_json.get("type"), str) or not model_json["type"]:
        raise RegistryError("model must have a non-empty string 'type' (e.g. 'sasrec')")
    return model_json


def _check_method(method: str) -> None:
    if not isinstance(method, str) or not method:
        raise RegistryError(f"method must be a non-empty string, got {method!r}")


def _tensor_meta(tensor: torch.Tensor) -> dict[str, Any]:
    return {"dtype": _dtype_name(tensor), "shape": list(tensor.shape)}


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


# ---------------------------------------------------------------------- deltas


@dataclass(frozen=True)
class _DeltaPlan:
    """A validated delta: what its weights file stores and what its manifest says."""

    stored: dict[str, torch.Tensor]
    delta: dict[str, dict[str, Any]]
    tensors: dict[str, dict[str, Any]]
    removed: list[str]


def _chain_position(parent_id: str, parent: Mapping[str, Any]) -> tuple[str, int]:
    """(base, chain_depth) of a delta published on top of `parent`."""
    kind = parent.get("kind")
    if kind == "full":
        return parent_id, 1
    if kind == "delta":
        return str(parent["base"]), int(parent["chain_depth"]) + 1
    raise RegistryError(f"version {parent_id} is kind {kind!r}; deltas apply to full or delta")


def _plan_delta(
    parent: Mapping[str, Mapping[str, Any]],
    changes: Mapping[str, torch.Tensor | RowUpdate],
    removed: Sequence[str],
) -> _DeltaPlan:
    """Validates a delta against the parent's tensor table (names, dtypes, shapes) and plans it."""
    if isinstance(removed, str):  # a lone name would otherwise be read letter by letter
        raise RegistryError("removed must be a sequence of tensor names, not a string")
    dropped = sorted(set(removed))
    for name in dropped:
        if name not in parent:
            raise RegistryError(f"cannot remove tensor {name!r}: the parent has no such tensor")
        if name in changes:
            raise RegistryError(f"tensor {name!r} is both changed and removed")
    if not changes and not dropped:
        raise RegistryError("a delta needs at least one changed or removed tensor")
    stored: dict[str, torch.Tensor] = {}
    delta: dict[str, dict[str, Any]] = {}
    tensors = {name: dict(meta) for name, meta in parent.items() if name not in dropped}
    for name, change in changes.items():
        if not isinstance(name, str) or not name:
            raise RegistryError(f"tensor names must be non-empty strings, got {name!r}")
        if isinstance(change, RowUpdate):
            rows, shape = _check_row_update(name, change, parent.get(name))
            index_name = name + ROWS_SUFFIX
            if index_name in changes:
                raise RegistryError(
                    f"tensor {name!r} gets row updates, whose indices are stored as "
                    f"{index_name!r}, but this delta also changes a tensor named {index_name!r}"
                )
            stored[name], stored[index_name] = change.values, rows
            delta[name] = {
                "mode": "rows",
                "rows": index_name,
                "num_rows": len(rows),
                "shape": shape,
            }
            tensors[name] = {"dtype": _dtype_name(change.values), "shape": shape}
        elif isinstance(change, torch.Tensor):
            _check_replacement(name, change, parent.get(name))
            stored[name] = change
            delta[name] = {"mode": "replace"}
            tensors[name] = _tensor_meta(change)
        else:
            raise RegistryError(
                f"change of tensor {name!r} is a {type(change).__name__}, "
                "not a torch.Tensor or RowUpdate"
            )
    if not tensors:
        raise RegistryError("this delta would leave the version with no tensors")
    return _DeltaPlan(stored=stored, delta=delta, tensors=tensors, removed=dropped)


def _check_replacement(name: str, tensor: torch.Tensor, parent: Mapping[str, Any] | None) -> None:
    if tensor.layout != torch.strided:
        raise RegistryError(f"tensor {name!r} is {tensor.layout}; only dense tensors are saved")
    # A delta fine-tunes: a new dtype means a new model, which is a full publish.
    if parent is not None and _dtype_name(tensor) != parent["dtype"]:
        raise RegistryError(
            f"tensor {name!r} is {_dtype_name(tensor)} but {parent['dtype']} in the parent"
        )


def _check_row_update(
    name: str, update: RowUpdate, parent: Mapping[str, Any] | None
) -> tuple[torch.Tensor, list[int]]:
    """(rows as CPU int64, final shape) of a valid row update; RegistryError otherwise."""
    rows, values = update.rows, update.values
    if parent is None:
        raise RegistryError(
            f"tensor {name!r} is not in the parent: a new tensor is given whole "
            "(a plain tensor, mode 'replace'), not as a RowUpdate"
        )
    shape = [int(n) for n in parent["shape"]]
    if not isinstance(rows, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise RegistryError(f"row update of {name!r}: rows and values must be torch.Tensors")
    if rows.ndim != 1 or rows.dtype.is_floating_point or rows.dtype in (torch.bool, *_COMPLEX):
        raise RegistryError(
            f"row update of {name!r}: rows must be a 1-d integer tensor, "
            f"got {rows.dtype} {list(rows.shape)}"
        )
    if not shape:
        raise RegistryError(f"tensor {name!r} is a scalar; replace it instead of updating rows")
    if values.layout != torch.strided:
        raise RegistryError(f"row update of {name!r}: values are {values.layout}, not dense")
    if _dtype_name(values) != parent["dtype"]:
        raise RegistryError(
            f"row update of {name!r}: values are {_dtype_name(values)} "
            f"but the tensor is {parent['dtype']}"
        )
    if list(values.shape) != [len(rows), *shape[1:]]:
        raise RegistryError(
            f"row update of {name!r}: values have shape {list(values.shape)}, expected "
            f"{[len(rows), *shape[1:]]} ({len(rows)} rows of the tensor's trailing dims)"
        )
    rows = rows.detach().to("cpu", torch.int64)
    shape[0] += _grown_rows(name, rows, shape[0])
    return rows, shape


def _grown_rows(name: str, rows: torch.Tensor, parent_rows: int) -> int:
    """How many rows `rows` adds past `parent_rows`; RegistryError unless they are unique,
    >= 0 and grow the tensor without holes (a hole would be a row nobody ever wrote)."""
    if len(rows) == 0:
        return 0
    # numpy, not torch.sort: torch's multi-threaded sort is ~50x slower on a busy machine.
    ordered = np.sort(rows.numpy())
    if ordered[0] < 0:
        raise RegistryError(f"row update of {name!r}: negative row {int(ordered[0])}")
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(repeated):
        row = int(ordered[repeated[0]])
        raise RegistryError(f"row update of {name!r}: row {row} is given more than once")
    new = ordered[np.searchsorted(ordered, parent_rows) :]
    holes = np.flatnonzero(new != np.arange(parent_rows, parent_rows + len(new)))
    if len(holes):
        # Sorted and unique: the first mismatch is the first row that is skipped.
        missing = parent_rows + int(holes[0])
        raise RegistryError(
            f"row update of {name!r} grows the tensor from {parent_rows} to {int(new[-1]) + 1} "
            f"rows but row {missing} is missing: new rows must be contiguous"
        )
    return len(new)


def _check_vocabulary_growth(new: Mapping[str, Any], parent: Mapping[str, Any] | None) -> None:
    before, after = (parent or {}).get("items"), new.get("items")
    # items.parquet row i is dense item i + 1: a vocabulary can only be appended to.
    if isinstance(before, int) and isinstance(after, int) and after < before:
        raise RegistryError(
            f"vocabulary file {new['file']} has {after} items but the parent's has {before}: "
            "a delta's vocabulary may only grow"
        )


def _origins(
    chain: Sequence[tuple[str, Mapping[str, Any]]], final: Mapping[str, Any]
) -> dict[str, int]:
    """For each final tensor, the index in `chain` of the version that last wrote it whole."""
    origin = dict.fromkeys(final, 0)
    for index, (version_id, manifest) in enumerate(chain[1:], start=1):
        delta = manifest.get("delta")
        if not isinstance(delta, dict):
            raise RegistryError(f"version {version_id}: delta manifest has no 'delta' table")
        for name, spec in delta.items():
            mode = spec.get("mode") if isinstance(spec, dict) else None
            if mode not in ("replace", "rows"):
                raise RegistryError(
                    f"version {version_id}: unknown delta mode {mode!r} for tensor {name!r}"
                )
            if mode == "replace" and name in origin:
                origin[name] = index
    return origin


def _grown(stored: torch.Tensor, shape: Sequence[int], version_id: str, name: str) -> torch.Tensor:
    """`stored`, or a copy of it at the larger final `shape` (new rows filled by later deltas)."""
    if list(stored.shape) == list(shape):
        return stored
    if stored.ndim == 0 or list(stored.shape[1:]) != list(shape[1:]) or stored.shape[0] > shape[0]:
        raise RegistryError(
            f"version {version_id}: tensor {name!r} has shape {list(stored.shape)}, which cannot "
            f"grow to its final shape {list(shape)}"
        )
    grown = stored.new_empty(list(shape))
    grown[: stored.shape[0]] = stored
    return grown


def _patch_rows(
    target: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    filled: int,
    version_id: str,
    name: str,
) -> int:
    """Writes `values` into rows `rows` of `target` in place; returns the new number of written
    rows. Checked so a bad file cannot index out of range or leave unwritten rows behind."""
    fits = (
        rows.dtype == torch.int64
        and rows.ndim == 1
        and values.dtype == target.dtype
        and list(values.shape) == [len(rows), *target.shape[1:]]
    )
    if not fits:
        raise RegistryError(
            f"version {version_id}: row update of {name!r} (rows {rows.dtype} "
            f"{list(rows.shape)}, values {values.dtype} {list(values.shape)}) does not fit the "
            f"tensor ({target.dtype} {list(target.shape)})"
        )
    if len(rows) == 0:
        return filled
    # Rows are unique (checked at publish), so in-range new rows are exactly filled..top.
    # numpy for the reductions: torch's threaded ones are slow for this size on a busy machine.
    index = rows.numpy()
    grown = filled + int(np.count_nonzero(index >= filled))
    if int(index.min()) < 0 or int(index.max()) >= grown or grown > target.shape[0]:
        raise RegistryError(
            f"version {version_id}: row update of {name!r} writes rows outside 0..{grown - 1} "
            f"or past the tensor's {target.shape[0]} rows"
        )
    target.index_copy_(0, rows, values)
    return grown


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _check_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    if not tensors:
        raise RegistryError("publish needs at least one tensor")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise RegistryError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise RegistryError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.layout != torch.strided:
            raise RegistryError(f"tensor {name!r} is {tensor.layout}; only dense tensors are saved")


def _check_file_name(name: str) -> None:
    if not isinstance(name, str) or not _FILE_NAME_RE.match(name) or ".." in name:
        raise RegistryError(
            f"extra file name {name!r} must be a plain file name (letters, digits, '_', '-', '.')"
        )
    if name in _RESERVED_NAMES:
        raise RegistryError(f"extra file name {name!r} is reserved by the registry")


def _check_extra_files(extra: Mapping[str, Path | bytes], vocabulary_file: str | None) -> None:
    for name in extra:
        _check_file_name(name)
    if vocabulary_file is not None and vocabulary_file not in extra:
        raise RegistryError(
            f"vocabulary_file {vocabulary_file!r} is not one of the extra files "
            f"({', '.join(sorted(extra)) or 'none given'})"
        )


def _write_extras(extra: Mapping[str, Path | bytes], directory: Path) -> None:
    for name, source in extra.items():
        _write_extra(name, source, directory / name)


def _write_extra(name: str, source: Path | bytes, target: Path) -> None:
    if isinstance(source, bytes):
        target.write_bytes(source)
    else:
        source = Path(source)
        if not source.is_file():
            raise RegistryError(f"extra file {name!r}: {source} does not exist or is not a file")
        shutil.copyfile(source, target)
    _fsync_file(target)


def _vocabulary(path: Path, dataset: Mapping[str, Any] | None) -> dict[str, Any]:
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
    return {"file": path.name, "items": items}


def _jsonable(value: Any, where: str) -> Any:
    """`value` as plain JSON data, or RegistryError naming the offending field (see module doc)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RegistryError(
                f"{where} is {value}: manifests are strict JSON and reject NaN/inf "
                "(pass None if the value is unknown)"
            )
        return float(value)
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.ndim == 0):
        return _jsonable(value.item(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise RegistryError(f"{where}: key {key!r} is not a string")
            out[key] = _jsonable(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise RegistryError(f"{where} is a {type(value).__name__}, which is not JSON data")


def _write_json(path: Path, data: Any, *, durable: bool) -> None:
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            digest.update(chunk)
    return digest.hexdigest()
