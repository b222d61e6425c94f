"""The registry's store: versions on disk, installed atomically, checksummed, listed, read.

Layout::

    ROOT/
      versions/v000001/          one immutable version
        weights.safetensors      tensors (safetensors, never pickle)
        <tensor>.shard-00000-of-00002.safetensors ...  a sharded table's files (sharded.py)
        items.parquet ...        side files the publisher gave (see sidefiles.py)
        manifest.json            written last into the temp dir; lists every other file
      aliases.json               {"production": id, "history": [...], "log": [...]}
      .tmp-*                     in-progress (or crashed) publishes; ignored, removed by gc()

Publishing is crash-safe and safe under concurrent publishers: everything is written and fsynced
into ``ROOT/.tmp-<random>/`` and the directory is then ``os.rename``-d to
``versions/v{n:06d}`` with n = highest existing number + 1. A directory rename is atomic, so a
reader sees either the whole version or nothing; if another publisher took that number first the
rename fails (the target exists and is not empty) and we retry with the next number.

A delta (``publish_delta``, see deltas.py) inherits the parent's ``model`` (unless given),
``dataset`` and vocabulary; the inherited vocabulary file is hard-linked into the delta's
directory (copied where links are impossible), so every version still lists and checksums every
file it uses and versions stay self-contained. ``load_tensors`` on a delta loads ``base`` and
applies each delta in order, verifying every version in the chain; ``compact`` turns a chain
back into one full version. Versions are never deleted (``gc`` only removes ``.tmp-*``
leftovers), so a chain's versions are always there.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from recloop.errors import RegistryError
from recloop.fsutil import fsync_dir
from recloop.registry import deltas
from recloop.registry import sharded as sharded_io
from recloop.registry.aliases import TMP_PREFIX, Aliases
from recloop.registry.deltas import Change, RowUpdate
from recloop.registry.files import (
    WEIGHTS,
    TensorReader,
    check_tensors,
    link_or_copy,
    open_weights,
    remove_stale_temps,
    sha256,
    verify_file,
    write_json,
    write_weights,
)
from recloop.registry.manifest import (
    MANIFEST,
    FileMeta,
    Manifest,
    TensorMeta,
    VersionInfo,
    check_method,
    jsonable,
    model_json,
    new_manifest,
    read_manifest,
)
from recloop.registry.sharded import BlockReader, ShardedTable
from recloop.registry.shards import TENSOR_NAME
from recloop.registry.sidefiles import (
    REMAPPED_FILE,
    check_extra_files,
    inherited_vocabulary,
    vocabulary_ref,
    write_extras,
)

# Refs that name a moving pointer rather than a version.
LATEST = "latest"
PRODUCTION = "production"

# ASCII digits only, bounded: a reference is checked before it becomes a path.
_ID_RE = re.compile(r"v([0-9]{6,18})\Z", re.ASCII)
# Each failed rename means another publisher just won a number; this many in a row is not a race.
_MAX_ATTEMPTS = 1000

# Fills a version's temp dir; returns the manifest (with its vocabulary) and the entries of
# files it linked from another version (hashed when first published: not hashed again).
_Fill = Callable[[Path], tuple[Manifest, dict[str, FileMeta]]]


class Registry:
    """A directory of immutable, checksummed model versions plus a ``production`` pointer."""

    def __init__(self, root: Path | str, *, create: bool = True) -> None:
        self.root = Path(root)
        self._versions = self.root / "versions"
        if create:
            self._versions.mkdir(parents=True, exist_ok=True)
        elif not self._versions.is_dir():
            raise RegistryError(f"{self.root}: not a model registry (no versions/ directory)")
        self._aliases = Aliases(self.root)

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
        sharded: ShardedTable | None = None,
    ) -> str:
        """Writes a new full version atomically and returns its id (``v000001``, ...).

        `sharded` is a table stored as the shard files its ranks wrote (see sharded.py); it
        is not one of `tensors`, and loads gathered like any other tensor."""
        extra = dict(extra_files or {})
        # Validate everything cheap before touching the disk, so bad arguments leave no trace.
        check_tensors(tensors, allow_empty=sharded is not None)
        check_extra_files(extra, vocabulary_file)
        check_method(method)
        metas = {name: TensorMeta.of(t) for name, t in tensors.items()}
        if sharded is not None:
            metas[sharded.name] = sharded_io.check_table(
                sharded, tensors, {*extra, WEIGHTS, MANIFEST}
            )
        manifest = new_manifest(
            kind="full",
            method=method,
            parent=self.resolve(parent) if parent is not None else None,
            model=model_json(model),
            dataset=jsonable(dict(dataset), "dataset") if dataset is not None else None,
            metrics=jsonable(dict(metrics or {}), "metrics"),
            training=jsonable(dict(training or {}), "training"),
            tensors=metas,
        )

        def fill(tmp: Path) -> tuple[Manifest, dict[str, FileMeta]]:
            write_weights(tensors, tmp / WEIGHTS)
            write_extras(extra, tmp)
            done = manifest
            if sharded is not None:
                done = done.replace(sharding=sharded_io.install(sharded, tmp))
            if vocabulary_file is None:
                return done, {}
            return done.replace(vocabulary=vocabulary_ref(tmp / vocabulary_file, done.dataset)), {}

        return self._write_version(fill)

    def publish_delta(
        self,
        parent: str,
        changes: Mapping[str, Change],
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
        dense ids cannot change. All is checked before anything is written: no trace if bad.
        """
        extra = dict(extra_files or {})
        check_extra_files(extra, vocabulary_file, delta=True)
        check_method(method)
        parent_id = self.resolve(parent)
        source = self._read_manifest(parent_id)
        base, depth = deltas.chain_position(parent_id, source)
        plan = deltas.plan_delta(source.tensors, changes, removed)
        inherited = inherited_vocabulary(parent_id, source, vocabulary_file, extra)
        manifest = new_manifest(
            kind="delta",
            method=method,
            parent=parent_id,
            base=base,
            chain_depth=depth,
            model=model_json(model if model is not None else source.model),
            dataset=source.dataset,
            metrics=jsonable(dict(metrics or {}), "metrics"),
            training=jsonable(dict(training or {}), "training"),
            tensors=plan.tensors,
            delta=plan.delta,
            removed=plan.removed,
        )

        def fill(tmp: Path) -> tuple[Manifest, dict[str, FileMeta]]:
            write_weights(plan.stored, tmp / WEIGHTS)
            write_extras(extra, tmp)
            if vocabulary_file is not None:
                # No dataset-count check: online learning grows the vocabulary past the dataset.
                vocabulary = vocabulary_ref(tmp / vocabulary_file, None)
                deltas.check_vocabulary_growth(vocabulary, source.vocabulary)
                return manifest.replace(vocabulary=vocabulary), {}
            if inherited is None:
                return manifest, {}
            linked = {inherited.file: self._link_file(parent_id, source, inherited.file, tmp)}
            return manifest.replace(vocabulary=inherited), linked

        return self._write_version(fill)

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
        manifest = new_manifest(
            kind="full",
            method="compact",
            parent=version_id,
            model=source.model,
            dataset=source.dataset,
            metrics=source.metrics,
            training=source.training if training is None else jsonable(dict(training), "training"),
            tensors={name: TensorMeta.of(t) for name, t in tensors.items()},
        ).replace(vocabulary=source.vocabulary)

        def fill(tmp: Path) -> tuple[Manifest, dict[str, FileMeta]]:
            write_weights(tensors, tmp / WEIGHTS)
            # A sharded table is gathered into the new weights file: its shards are not linked.
            # A delta's remapped ids are news to its parent only: a full version has none.
            skip = {WEIGHTS, REMAPPED_FILE, *source.shard_files}
            names = [n for n in source.files if n not in skip]
            return manifest, {
                name: self._link_file(version_id, source, name, tmp) for name in names
            }

        return self._write_version(fill)

    def _write_version(self, fill: _Fill) -> str:
        """Creates a temp dir, lets `fill` write the version's files into it, checksums them and
        installs it. Files `fill` linked from another version are not hashed again."""
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))
        try:
            manifest, known = fill(tmp)
            files = {
                path.name: known.get(path.name) or FileMeta(path.stat().st_size, sha256(path))
                for path in sorted(tmp.iterdir())
            }
            return self._install(tmp, manifest.replace(files=files))
        except BaseException:
            # Includes KeyboardInterrupt: nothing half-written may survive a failed publish.
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _link_file(self, version_id: str, manifest: Manifest, name: str, tmp: Path) -> FileMeta:
        """Shares file `name` of an existing version (immutable) with the version in `tmp`."""
        meta = manifest.files.get(name)
        source = self._versions / version_id / name
        if meta is None:
            raise RegistryError(f"version {version_id}: {MANIFEST} does not list file {name}")
        if not source.is_file():
            raise RegistryError(f"version {version_id} is partial: file {name} is missing")
        link_or_copy(source, tmp / name)
        return meta

    def _install(self, tmp: Path, manifest: Manifest) -> str:
        """Renames the finished temp dir to the next free version id; retries on a lost race."""
        number = self._max_number() + 1
        for _ in range(_MAX_ATTEMPTS):
            version_id = f"v{number:06d}"
            # The id lives in the manifest too, so it is rewritten (still invisible) per attempt.
            write_json(tmp / MANIFEST, manifest.replace(id=version_id).to_json(), durable=True)
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
                manifest = self._read_manifest(version_id)
            except RegistryError as exc:
                infos.append(VersionInfo.broken(version_id, str(exc), version_id == production))
                continue
            infos.append(VersionInfo.of(manifest, version_id == production))
        return infos

    def manifest(self, ref: str) -> Manifest:
        """The manifest of `ref` (not checksum-verified; see :meth:`verify`)."""
        return self._read_manifest(self.resolve(ref))

    def path(self, ref: str) -> Path:
        """The directory of `ref`. Treat it as read-only: versions are immutable."""
        return self._versions / self.resolve(ref)

    def file(self, ref: str, name: str, *, verify: bool = True) -> Path:
        """Path of one file of a version (e.g. the vocabulary), checked against its sha256."""
        version_id = self.resolve(ref)
        manifest = self._read_manifest(version_id)
        if name not in manifest.files:
            raise RegistryError(
                f"version {version_id} has no file {name!r} "
                f"(it has: {', '.join(sorted(manifest.files))})"
            )
        if verify:
            self._verify_file(version_id, name, manifest.files[name])
        return self._versions / version_id / name

    def load_tensors(
        self, ref: str, *, verify: bool = True, device: str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The full tensors of `ref`; with `verify` every file is checked against its manifest
        first (for a delta: every file of every version in its chain, base included).
        """
        chain = self.chain(self.resolve(ref))
        if verify:
            for version_id, manifest in chain:
                self._verify(version_id, manifest)
        opener = sharded_io.sharded_opener(self._open_weights, self.path, chain)
        tensors = deltas.materialise(chain, opener)
        if torch.device(device).type == "cpu":
            return tensors
        return {name: t.to(device) for name, t in tensors.items()}

    def table_reader(
        self, ref: str, name: str = TENSOR_NAME, *, verify: bool = True
    ) -> BlockReader:
        """(row_start, row_end, col_start, col_end) -> that block of 2-d tensor `name`, read
        from just the files it overlaps without assembling the table (how N training processes
        load a version written by M); see sharded.table_reader. With `verify` each file is
        checked against its sha256 before it is first read."""
        version_id = self.resolve(ref)
        manifest = self._read_manifest(version_id)

        def verify_file(name: str) -> None:
            if verify:
                self._verify_file(version_id, name, _listed(version_id, manifest, name))

        load = lambda: self.load_tensors(version_id, verify=verify)  # noqa: E731
        return sharded_io.table_reader(self.path(version_id), manifest, name, verify_file, load)

    def read_delta(self, ref: str) -> tuple[dict[str, Change], Sequence[str]]:
        """(changes, removed) that delta version `ref` itself stores, as given to
        :meth:`publish_delta`: whole tensors for "replace", :class:`RowUpdate` for "rows".

        Only the delta's weights file is read and checked against its sha256, not its chain:
        for a reader that already holds the parent's tensors (a server applying deltas).
        """
        version_id = self.resolve(ref)
        manifest = self._read_manifest(version_id)
        if not manifest.is_delta:
            raise RegistryError(f"version {version_id} is kind {manifest.kind!r}, not a delta")
        self._verify_file(version_id, WEIGHTS, _listed(version_id, manifest, WEIGHTS))
        with self._open_weights(version_id) as read:
            return deltas.read_changes(version_id, manifest, read)

    def verify(self, ref: str) -> None:
        """Raises RegistryError unless every file listed in the manifest has its sha256.

        For a delta, every version of its chain is verified: it cannot be loaded without them.
        Files present in the directory but absent from the manifest are not checked: nothing in
        recloop reads a file the manifest does not list.
        """
        for version_id, manifest in self.chain(self.resolve(ref)):
            self._verify(version_id, manifest)

    def chain(self, version_id: str) -> deltas.Chain:
        """(id, manifest) of `version_id` and the versions it is built on, base first."""
        return deltas.full_chain(version_id, self._read_manifest, self._exists)

    def deltas_after(self, current: str, target: str, limit: int) -> deltas.Chain:
        """The deltas that lead from version `current` to `target` (see deltas.deltas_after)."""
        return deltas.deltas_after(current, target, self.manifest, self._exists, limit)

    def _exists(self, version_id: str) -> bool:
        return (self._versions / version_id).is_dir()

    def _open_weights(self, version_id: str) -> AbstractContextManager[TensorReader]:
        return open_weights(self._versions / version_id, version_id)

    def _verify(self, version_id: str, manifest: Manifest) -> None:
        if WEIGHTS not in manifest.files:
            raise RegistryError(f"version {version_id}: manifest does not list {WEIGHTS}")
        for name, meta in manifest.files.items():
            self._verify_file(version_id, name, meta)

    def _verify_file(self, version_id: str, name: str, meta: FileMeta) -> None:
        verify_file(self._versions / version_id, version_id, name, meta.bytes, meta.sha256)

    def _read_manifest(self, version_id: str) -> Manifest:
        return read_manifest(self._versions / version_id, version_id)

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
        if not self._exists(ref):
            raise RegistryError(f"unknown version {ref} in {self.root}")
        return ref

    def production(self) -> str | None:
        """The production version id, or None if nothing was ever promoted."""
        return self._aliases.production()

    def promote(self, ref: str) -> str:
        """Points production at `ref` (after verifying it) and returns its id."""
        version_id = self.resolve(ref)
        # Never point serving at something it would refuse to load (for a delta: its whole chain).
        self.verify(version_id)
        return self._aliases.promote(version_id)

    def rollback(self) -> str:
        """Returns production to the previously promoted version; returns that version's id."""
        return self._aliases.rollback(lambda previous: self.verify(self.resolve(previous)))

    # ------------------------------------------------------------------ housekeeping

    def gc(self, max_age_seconds: float = 3600) -> int:
        """Removes temp dirs/files of publishes that crashed over `max_age_seconds` ago
        (files.remove_stale_temps); returns how many entries were removed."""
        return remove_stale_temps(self.root, TMP_PREFIX, max_age_seconds)


def _listed(version_id: str, manifest: Manifest, name: str) -> FileMeta:
    meta = manifest.files.get(name)
    if meta is None:
        raise RegistryError(f"version {version_id}: manifest does not list {name}")
    return meta


__all__ = ["LATEST", "PRODUCTION", "Registry", "RowUpdate", "VersionInfo"]
