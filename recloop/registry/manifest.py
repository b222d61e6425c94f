"""The manifest of a version (``manifest.json``), typed: parsed and validated in one place.

Keys, in the order they are written (strict JSON)::

    format          "recloop-model"
    format_version  1
    id              "v000007" (always equal to the directory name)
    created_at      ISO 8601, UTC
    kind            "full" | "delta"
    method          how it was made: "train", "int8", "distill", "online", "compact", ...
    parent          version id it was derived from, or null (always set for a delta)
    base            (delta only) id of the full version at the root of its chain
    chain_depth     (delta only) deltas between ``base`` and this version (1 = direct child)
    model           {"type": str, ...config}  as given by the publisher
    dataset         {"path", "checksum" | "manifest_sha256", "counts"} or null
    vocabulary      {"file": "items.parquet", "items": int | null} or null
    metrics         {name: number | ...}
    training        free dict: step, wall time, command line, ...
    tensors         {name: {"dtype": "float32", "shape": [..]}}  the version's FULL tensors (for a
                    delta: after applying it, so readers know final shapes without applying)
    sharding        (sharded versions only) {tensor: {"type", "world_size", "shape",
                    "shards": [{"rank", "offsets", "sizes"}], "files": [one per shard]}}: the
                    tensor is stored as those shard files, not in weights.safetensors (see
                    sharded.py); ``tensors`` still lists it whole, as readers load it
    files           {name: {"bytes": int, "sha256": hex}} for every file except manifest.json
    recloop_version the package version that wrote it
    delta           (delta only) {tensor: {"mode": "replace"} | {"mode": "rows", "rows":
                    "<name>.rows", "num_rows": int, "shape": [final shape]}}
    removed         (delta only) [tensor names dropped relative to the parent]

JSON policy: NaN and +-inf are *rejected* at publish time with a :class:`RegistryError` naming
the field (e.g. ``metrics.loss``) rather than silently stored as null: a non-finite metric
usually means a broken run, and null would be indistinguishable from "not measured".
Publishers that want null pass ``None``. numpy scalars and 0-dim tensors are converted with
``.item()``, tuples become lists and paths become strings; other types are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from recloop import __version__
from recloop.errors import RegistryError, undecodable
from recloop.registry.files import WEIGHTS
from recloop.registry.shards import TableSharding

MANIFEST = "manifest.json"
FORMAT = "recloop-model"
FORMAT_VERSION = 1

Kind = Literal["full", "delta"]
DeltaMode = Literal["replace", "rows"]


@dataclass(frozen=True)
class TensorMeta:
    """dtype (torch's name without "torch.") and shape of one stored tensor."""

    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorMeta:
        return cls(dtype_name(tensor), tuple(int(n) for n in tensor.shape))

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class FileMeta:
    """Size and sha256 of one file of a version."""

    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class VocabularyRef:
    """Which file of the version is its item vocabulary (row i = dense item i + 1)."""

    file: str
    items: int | None

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "items": self.items}


@dataclass(frozen=True)
class DeltaSpec:
    """How a delta stores one tensor: whole ("replace"), or some rows ("rows": the indices are
    tensor `rows` of the weights file, `shape` the tensor's final shape)."""

    mode: DeltaMode
    rows: str | None = None
    num_rows: int | None = None
    shape: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        if self.mode == "replace":
            return {"mode": "replace"}
        shape = list(self.shape) if self.shape is not None else None
        return {"mode": "rows", "rows": self.rows, "num_rows": self.num_rows, "shape": shape}


@dataclass(frozen=True)
class Manifest:
    """One version's manifest. ``base``/``chain_depth``/``delta``/``removed`` are None for a full
    version. ``model``, ``dataset``, ``metrics`` and ``training`` are the publisher's JSON."""

    id: str
    created_at: str
    kind: str
    method: str
    parent: str | None
    model: Mapping[str, Any]
    dataset: Mapping[str, Any] | None
    vocabulary: VocabularyRef | None
    metrics: Mapping[str, Any]
    training: Mapping[str, Any]
    tensors: Mapping[str, TensorMeta]
    files: Mapping[str, FileMeta]
    recloop_version: str
    base: str | None = None
    chain_depth: int | None = None
    delta: Mapping[str, DeltaSpec] | None = None
    removed: tuple[str, ...] | None = None
    format_version: int = FORMAT_VERSION
    sharding: Mapping[str, TableSharding] | None = None  # None: every tensor in the weights

    @property
    def model_type(self) -> str:
        return str(self.model["type"])

    @property
    def is_delta(self) -> bool:
        return self.kind == "delta"

    @property
    def vocabulary_file(self) -> str | None:
        return self.vocabulary.file if self.vocabulary is not None else None

    @property
    def shard_files(self) -> tuple[str, ...]:
        """The files holding sharded tensors (none for an unsharded version)."""
        return tuple(name for table in (self.sharding or {}).values() for name in table.files)

    @property
    def weights_bytes(self) -> int:
        """Bytes of the stored tensors: the weights file plus any shard files."""
        names = (WEIGHTS, *self.shard_files)
        return sum(self.files[name].bytes for name in names if name in self.files)

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to disk, keys in their documented order."""
        lineage = {} if self.base is None else {"base": self.base, "chain_depth": self.chain_depth}
        sharding = {}
        if self.sharding is not None:
            sharding["sharding"] = {name: t.to_json() for name, t in self.sharding.items()}
        out: dict[str, Any] = {
            "format": FORMAT,
            "format_version": self.format_version,
            "id": self.id,
            "created_at": self.created_at,
            "kind": self.kind,
            "method": self.method,
            "parent": self.parent,
            **lineage,
            "model": self.model,
            "dataset": self.dataset,
            "vocabulary": self.vocabulary.to_json() if self.vocabulary is not None else None,
            "metrics": self.metrics,
            "training": self.training,
            "tensors": {name: meta.to_json() for name, meta in self.tensors.items()},
            **sharding,
            "files": {name: meta.to_json() for name, meta in self.files.items()},
            "recloop_version": self.recloop_version,
        }
        if self.delta is not None:
            out["delta"] = {name: spec.to_json() for name, spec in self.delta.items()}
            out["removed"] = list(self.removed or ())
        return out


def read_manifest(directory: Path, version_id: str) -> Manifest:
    """The manifest of the version in `directory`; RegistryError naming the file when it is
    missing, unreadable, not JSON or not a valid recloop manifest."""
    path = directory / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(f"version {version_id} is partial: {path} is missing") from None
    except UnicodeDecodeError as exc:
        raise RegistryError(f"version {version_id}: {path}: {undecodable(exc)}") from None
    except OSError as exc:
        raise RegistryError(f"version {version_id}: cannot read {path} ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"version {version_id}: {path} is not valid JSON ({exc})") from exc
    try:
        return parse_manifest(data, version_id)
    except _Invalid as exc:
        raise RegistryError(f"version {version_id}: {path} {exc}") from None


class _Invalid(Exception):
    """What is wrong with a parsed manifest, completing "<path> ..."."""


def parse_manifest(data: Any, version_id: str) -> Manifest:
    """A Manifest from parsed JSON; _Invalid (the field at fault) for what readers rely on."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _Invalid("is not a recloop manifest")
    if data.get("id") != version_id:
        # A copied or renamed directory: its contents describe some other version.
        raise _Invalid(f"says id {data.get('id')!r}")
    files = _files(data.get("files"))
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("type"), str):
        raise _Invalid("has no model type ('model.type')")
    required: list[tuple[str, type]] = [("kind", str), ("tensors", dict)]
    if data.get("kind") == "delta":
        required += [("parent", str), ("base", str), ("chain_depth", int), ("delta", dict)]
    for key, kind in required:
        if not isinstance(data.get(key), kind):
            raise _Invalid(f"has no {key!r} ({kind.__name__})")
    is_delta = data["kind"] == "delta"
    return Manifest(
        id=version_id,
        created_at=str(data.get("created_at", "")),
        kind=data["kind"],
        method=str(data.get("method", "")),
        parent=_optional_str(data, "parent"),
        model=model,
        dataset=_optional_dict(data, "dataset"),
        vocabulary=_vocabulary(data.get("vocabulary")),
        metrics=_optional_dict(data, "metrics") or {},
        training=_optional_dict(data, "training") or {},
        tensors=_tensors(data["tensors"]),
        files=files,
        recloop_version=str(data.get("recloop_version", "")),
        base=data["base"] if is_delta else None,
        chain_depth=data["chain_depth"] if is_delta else None,
        delta=_delta(data["delta"]) if is_delta else None,
        removed=tuple(str(name) for name in data.get("removed") or []) if is_delta else None,
        format_version=int(data.get("format_version", FORMAT_VERSION)),
        sharding=_sharding(data.get("sharding"), files, data["tensors"]),
    )


def _files(files: Any) -> dict[str, FileMeta]:
    if not isinstance(files, dict):
        raise _Invalid("has no 'files' table")
    out = {}
    for name, meta in files.items():
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("bytes"), int)
            and isinstance(meta.get("sha256"), str)
        ):
            raise _Invalid(f"has a bad 'files' entry for {name!r} (expected bytes and sha256)")
        out[name] = FileMeta(meta["bytes"], meta["sha256"])
    return out


def _tensors(tensors: dict[str, Any]) -> dict[str, TensorMeta]:
    out = {}
    for name, meta in tensors.items():
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("dtype"), str)
            and isinstance(shape, list)
            and all(isinstance(n, int) for n in shape)
        ):
            raise _Invalid(f"has a bad 'tensors' entry for {name!r} (expected dtype and shape)")
        out[name] = TensorMeta(meta["dtype"], tuple(shape))
    return out


def _delta(delta: dict[str, Any]) -> dict[str, DeltaSpec]:
    out = {}
    for name, spec in delta.items():
        mode = spec.get("mode") if isinstance(spec, dict) else None
        if mode == "replace":
            out[name] = DeltaSpec("replace")
        elif mode == "rows":
            rows, shape = spec.get("rows"), spec.get("shape")
            if not isinstance(rows, str) or not isinstance(shape, list):
                raise _Invalid(f"has a bad 'delta' entry for {name!r} (expected rows and shape)")
            num_rows = spec.get("num_rows")
            shape_ints = tuple(int(n) for n in shape)
            out[name] = DeltaSpec(
                "rows", rows, num_rows if isinstance(num_rows, int) else None, shape_ints
            )
        else:
            raise _Invalid(f"has an unknown delta mode {mode!r} for tensor {name!r}")
    return out


def _sharding(
    sharding: Any, files: Mapping[str, FileMeta], tensors: Mapping[str, Any]
) -> dict[str, TableSharding] | None:
    """The sharded tables (None when absent: manifests from before sharding read unchanged).
    Each must be a listed tensor whose shard files are all listed, so verify() covers them."""
    if sharding is None:
        return None
    if not isinstance(sharding, dict):
        raise _Invalid("has a bad 'sharding' (expected {tensor: plan})")
    out = {}
    for name, entry in sharding.items():
        try:
            table = TableSharding.from_json(entry)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise _Invalid(f"has a bad 'sharding' entry for {name!r} ({exc})") from None
        if name not in tensors:
            raise _Invalid(f"shards tensor {name!r}, which its 'tensors' does not list")
        unlisted = [file for file in table.files if file not in files]
        if unlisted:
            raise _Invalid(f"does not list shard file {unlisted[0]} of {name!r} in 'files'")
        out[name] = table
    return out


def _vocabulary(vocabulary: Any) -> VocabularyRef | None:
    if vocabulary is None:
        return None
    if not isinstance(vocabulary, dict) or not isinstance(vocabulary.get("file"), str):
        raise _Invalid("has a bad 'vocabulary' (expected {'file': name, 'items': count})")
    items = vocabulary.get("items")
    return VocabularyRef(vocabulary["file"], items if isinstance(items, int) else None)


def _optional_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise _Invalid(f"has a bad {key!r} (expected a string or null)")
    return value


def _optional_dict(data: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = data.get(key)
    if value is not None and not isinstance(value, dict):
        raise _Invalid(f"has a bad {key!r} (expected an object or null)")
    return value


# ---------------------------------------------------------------------- writing


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
    sharding: str | None = None  # "row_wise x2" for a sharded version, else None
    problem: str | None = None  # why its manifest cannot be read; None for a healthy version

    @property
    def status(self) -> str:
        """The version's state: "ok", or "broken: <reason>" when its manifest cannot be read."""
        return "ok" if self.problem is None else f"broken: {self.problem}"

    def to_json(self) -> dict[str, Any]:
        """The row as plain JSON data (``recloop models list --json``)."""
        return {**dataclasses.asdict(self), "status": self.status}

    @classmethod
    def of(cls, manifest: Manifest, is_production: bool) -> VersionInfo:
        return cls(
            id=manifest.id,
            created_at=manifest.created_at,
            kind=manifest.kind,
            method=manifest.method,
            parent=manifest.parent,
            model_type=manifest.model_type,
            metrics=dict(manifest.metrics),
            is_production=is_production,
            chain_depth=manifest.chain_depth or 0,
            sharding=", ".join(t.describe() for t in (manifest.sharding or {}).values()) or None,
        )

    @classmethod
    def broken(cls, version_id: str, problem: str, is_production: bool) -> VersionInfo:
        return cls(version_id, "", "?", "?", None, "?", {}, is_production, problem=problem)


def new_manifest(
    *,
    kind: str,
    method: str,
    parent: str | None,
    model: Mapping[str, Any],
    dataset: Mapping[str, Any] | None,
    metrics: Mapping[str, Any],
    training: Mapping[str, Any],
    tensors: Mapping[str, TensorMeta],
    **rest: Any,
) -> Manifest:
    """A manifest still without id and files (set when the version is installed)."""
    return Manifest(
        id="",
        created_at=now(),
        kind=kind,
        method=method,
        parent=parent,
        model=model,
        dataset=dataset,
        vocabulary=None,
        metrics=metrics,
        training=training,
        tensors=tensors,
        files={},
        recloop_version=__version__,
        **rest,
    )


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def model_json(model: Mapping[str, Any]) -> dict[str, Any]:
    """A publisher's model description as manifest JSON; it must name its type."""
    value = jsonable(dict(model), "model")
    if not isinstance(value.get("type"), str) or not value["type"]:
        raise RegistryError("model must have a non-empty string 'type' (e.g. 'sasrec')")
    return dict(value)


def check_method(method: str) -> None:
    if not isinstance(method, str) or not method:
        raise RegistryError(f"method must be a non-empty string, got {method!r}")


def jsonable(value: Any, where: str) -> Any:
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
        return jsonable(value.item(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise RegistryError(f"{where}: key {key!r} is not a string")
            out[key] = jsonable(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise RegistryError(f"{where} is a {type(value).__name__}, which is not JSON data")
