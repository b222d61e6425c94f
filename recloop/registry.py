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
    kind            "full" (implemented) | "delta" (planned, see below)
    method          how it was made: "train", "int8", "distill", "online", ...
    parent          version id it was derived from, or null
    model           {"type": str, "config": {...}, ...}  as given by the publisher
    dataset         {"path", "manifest_sha256", "counts"} (see dataset_reference) or null
    vocabulary      {"file": "items.parquet", "items": int | null} or null
    metrics         {name: number | ...}
    training        free dict: step, wall time, command line, ...
    tensors         {name: {"dtype": "float32", "shape": [..]}}  contents of weights.safetensors
    files           {name: {"bytes": int, "sha256": hex}} for every file except manifest.json
    recloop_version the package version that wrote it

Planned delta versions (not implemented; ``publish`` only writes ``kind="full"``):
``kind="delta"`` with ``parent`` required, plus

    base            id of the full version at the root of the delta chain
    chain_depth     number of deltas between ``base`` and this version (1 = direct child)
    delta           {tensor name: {"mode": "replace"} | {"mode": "rows", "rows": "<name>.rows",
                     "num_rows": int}}; weights.safetensors then holds only the changed tensors,
                     and for "rows" the new rows plus an int64 tensor ``<name>.rows`` of indices
    removed         [tensor names dropped relative to the parent]

``load_tensors`` on a delta will load ``base`` and apply each delta in order, verifying every
version in the chain.

JSON policy: manifests are strict JSON. NaN and +-inf are *rejected* at publish time with a
:class:`RegistryError` naming the field (e.g. ``metrics.loss``) rather than silently stored as
null: a non-finite metric usually means a broken run, and null would be indistinguishable from
"not measured". Publishers that want null pass ``None``. numpy scalars and 0-dim tensors are
converted with ``.item()``, tuples become lists and paths become strings; other types are refused.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from safetensors.torch import load_file, save_file

from recloop import __version__
from recloop.errors import RegistryError

__all__ = [
    "MANIFEST",
    "WEIGHTS",
    "Registry",
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

_ID_RE = re.compile(r"^v(\d{6,})$")
# Plain file names only: no directories, no hidden files (those would clash with .tmp-* / locks).
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_RESERVED_NAMES = frozenset({MANIFEST, WEIGHTS})
# Each failed rename means another publisher just won a number; this many in a row is not a race.
_MAX_ATTEMPTS = 1000
_BLOCK = 1 << 20


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
        for name in extra:
            _check_file_name(name)
        if vocabulary_file is not None and vocabulary_file not in extra:
            raise RegistryError(
                f"vocabulary_file {vocabulary_file!r} is not one of the extra files "
                f"({', '.join(sorted(extra)) or 'none given'})"
            )
        if not isinstance(method, str) or not method:
            raise RegistryError(f"method must be a non-empty string, got {method!r}")
        model_json = _jsonable(dict(model), "model")
        if not isinstance(model_json.get("type"), str) or not model_json["type"]:
            raise RegistryError("model must have a non-empty string 'type' (e.g. 'sasrec')")
        parent_id = self.resolve(parent) if parent is not None else None
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "id": None,  # set for each rename attempt, see _install
            "created_at": _now(),
            "kind": "full",
            "method": method,
            "parent": parent_id,
            "model": model_json,
            "dataset": _jsonable(dict(dataset), "dataset") if dataset is not None else None,
            "vocabulary": None,
            "metrics": _jsonable(dict(metrics or {}), "metrics"),
            "training": _jsonable(dict(training or {}), "training"),
            "tensors": {
                name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                for name, t in tensors.items()
            },
            "files": {},
            "recloop_version": __version__,
        }

        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))
        try:
            self._write_weights(tensors, tmp / WEIGHTS)
            for name, source in extra.items():
                _write_extra(name, source, tmp / name)
            if vocabulary_file is not None:
                manifest["vocabulary"] = _vocabulary(tmp / vocabulary_file, manifest["dataset"])
            manifest["files"] = {
                path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
                for path in sorted(tmp.iterdir())
            }
            return self._install(tmp, manifest)
        except BaseException:
            # Includes KeyboardInterrupt: nothing half-written may survive a failed publish.
            shutil.rmtree(tmp, ignore_errors=True)
            raise

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
            _fsync_dir(tmp)
            try:
                os.rename(tmp, self._versions / version_id)
            except OSError as exc:
                # Linux reports ENOTEMPTY for an existing version dir, other systems EEXIST.
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise RegistryError(f"cannot install version {version_id}: {exc}") from exc
                number = max(number + 1, self._max_number() + 1)
                continue
            # Make the new directory entry itself durable, not just the files in it.
            _fsync_dir(self._versions)
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
        """Every version, oldest first (by number, so v1000000 sorts after v999999)."""
        production = self.production()
        infos = []
        for _, version_id in self._scan():
            m = self._read_manifest(version_id)
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
        """The tensors of `ref`; with `verify` every file is checked against the manifest first."""
        version_id = self.resolve(ref)
        manifest = self._read_manifest(version_id)
        if manifest.get("kind") != "full":
            raise RegistryError(
                f"version {version_id} is kind {manifest.get('kind')!r}; "
                "this recloop version can only load 'full' versions"
            )
        if verify:
            self._verify(version_id, manifest)
        path = self._versions / version_id / WEIGHTS
        if not path.is_file():
            raise RegistryError(f"version {version_id} is partial: {WEIGHTS} is missing")
        try:
            return load_file(path, device=device)
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise RegistryError(f"version {version_id}: cannot read {WEIGHTS}: {exc}") from exc

    def verify(self, ref: str) -> None:
        """Raises RegistryError unless every file listed in the manifest has its sha256.

        Files present in the directory but absent from the manifest are not checked: nothing in
        recloop reads a file the manifest does not list.
        """
        version_id = self.resolve(ref)
        self._verify(version_id, self._read_manifest(version_id))

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
        size = path.stat().st_size
        # Size first: a truncated file is reported as such, and without reading it.
        if size != meta.get("bytes"):
            raise RegistryError(
                f"version {version_id} is corrupt: file {name} has {size} bytes, "
                f"manifest says {meta.get('bytes')}"
            )
        if _sha256(path) != meta.get("sha256"):
            raise RegistryError(
                f"version {version_id} is corrupt: file {name} does not match its sha256 "
                "in the manifest"
            )

    def _read_manifest(self, version_id: str) -> dict[str, Any]:
        path = self._versions / version_id / MANIFEST
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise RegistryError(f"version {version_id} is partial: {MANIFEST} is missing") from None
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryError(
                f"version {version_id}: {MANIFEST} is not valid JSON ({exc})"
            ) from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise RegistryError(f"version {version_id}: {MANIFEST} is not a recloop manifest")
        if manifest.get("id") != version_id:
            # A copied or renamed directory: its contents describe some other version.
            raise RegistryError(f"version {version_id}: {MANIFEST} says id {manifest.get('id')!r}")
        if not isinstance(manifest.get("files"), dict):
            raise RegistryError(f"version {version_id}: {MANIFEST} has no 'files' table")
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
        # Never point serving at something it would refuse to load.
        self._verify(version_id, self._read_manifest(version_id))
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
            self._verify(previous, self._read_manifest(self.resolve(previous)))
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
            aliases = json.loads(path.read_text())
        except FileNotFoundError:
            return {"production": None, "history": [], "log": []}
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{path}: not valid JSON ({exc})") from exc
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
            _fsync_dir(self.root)
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
    for info in infos:
        table.add_row(
            "[bold green]production[/]" if info.is_production else "",
            info.id,
            info.created_at.replace("T", " ")[:16],  # to the minute, to keep rows narrow
            info.kind,
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


def _format_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _format_id(number: int) -> str:
    return f"v{number:06d}"


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            digest.update(chunk)
    return digest.hexdigest()
