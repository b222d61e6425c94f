"""Sharded versions: a table stored as one file per shard, its plan in the manifest.

A table sharded over N training processes (recloop.train.sharding) is published without ever
being gathered: each rank writes its own shard with :func:`write_shard`, and the publishing
rank hands the plan and the files to ``Registry.publish(..., sharded=ShardedTable(...))``. The
files are hard-linked into the version (no copy of a big table where the filesystem allows) as
``<tensor>.shard-00000-of-00002.safetensors`` ..., checksummed like every file; the manifest
records ``sharding`` (plan + files) and lists the tensor whole in ``tensors``.

Readers see no difference: ``load_tensors`` gathers the table (:func:`sharded_opener` wraps the
weights reader of each version of a chain, so deltas on top of a sharded base apply as
usual), and :func:`block_reader` reads any [rows, cols] block from just the overlapping shard
files, which is how the training side reshards on load into another world size.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recloop.errors import RegistryError
from recloop.fsutil import fsync_dir
from recloop.registry.files import WEIGHTS, TensorReader, fsync_file, link_or_copy
from recloop.registry.manifest import Manifest, TensorMeta
from recloop.registry.shards import TENSOR_NAME, ShardingPlan, TableShard, TableSharding

# The key of the one tensor in a shard file (readers accept any single key).
SHARD_KEY = "shard"
# Reads the block [row_start:row_end, col_start:col_end] of a table.
BlockReader = Callable[[int, int, int, int], torch.Tensor]
# Opens the weights of a version (by id) as a TensorReader.
Opener = Callable[[str], AbstractContextManager[TensorReader]]


@dataclass(frozen=True)
class ShardedTable:
    """A table to publish sharded: `files[i]` (already written by :func:`write_shard`) holds
    ``plan.shards[i]``. The files are hard-linked into the version: do not modify them in
    place afterwards (write_shard replaces a file, which leaves the version's link intact)."""

    plan: ShardingPlan
    files: tuple[Path, ...]
    name: str = TENSOR_NAME


def write_shard(path: Path, rows: torch.Tensor) -> None:
    """Writes one rank's shard (a 2-d tensor) to `path` durably and atomically: a temp file
    renamed over `path`, so a reader never sees half a shard, and rewriting a path later never
    changes a version that links the old file."""
    path = Path(path)
    if not isinstance(rows, torch.Tensor) or rows.ndim != 2:
        raise RegistryError(f"shard {path}: expected a 2-d tensor, got {_describe(rows)}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({SHARD_KEY: rows.detach().to("cpu").contiguous()}, tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def shard_file_name(name: str, index: int, count: int) -> str:
    return f"{name}.shard-{index:05d}-of-{count:05d}.safetensors"


# ---------------------------------------------------------------------- publishing


def check_table(
    table: ShardedTable, dense: Mapping[str, torch.Tensor], taken: Collection[str]
) -> TensorMeta:
    """The gathered tensor's meta, after checking (reading only headers) that the plan tiles
    the table and each file holds its shard; RegistryError naming the fault otherwise.
    `taken` are the version's other file names, which no shard file may shadow."""
    if not isinstance(table, ShardedTable):
        raise RegistryError(f"sharded must be a ShardedTable, got {type(table).__name__}")
    name, plan = table.name, table.plan
    if not isinstance(name, str) or not name:
        raise RegistryError(f"a sharded tensor needs a non-empty name, got {name!r}")
    if name in dense:
        raise RegistryError(
            f"tensor {name!r} is given both sharded and in the dense tensors: pass it once"
        )
    plan.check_tiles()
    for shard in plan.shards:
        if not 0 <= shard.rank < plan.world_size:
            raise RegistryError(
                f"sharding plan of {name!r}: shard {shard.to_json()} has a rank outside "
                f"world size {plan.world_size}"
            )
    files = tuple(table.files)
    if len(files) != len(plan.shards):
        raise RegistryError(
            f"sharded tensor {name!r}: {len(plan.shards)} shards in the plan but "
            f"{len(files)} shard files"
        )
    for index, (shard, path) in enumerate(zip(plan.shards, files, strict=True)):
        target = shard_file_name(name, index, len(files))
        if target in taken:
            raise RegistryError(f"shard file name {target} clashes with another file")
        _check_shard_file(Path(path), shard, f"shard {index} of {name!r}")
    return TensorMeta("float32", (plan.num_rows, plan.dim))


def _check_shard_file(path: Path, shard: TableShard, what: str) -> None:
    if not path.is_file():
        raise RegistryError(f"{what}: {path} does not exist or is not a file")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            if len(keys) != 1:
                raise RegistryError(f"{what}: {path} holds {len(keys)} tensors, expected one")
            part = handle.get_slice(keys[0])
            shape, dtype = list(part.get_shape()), part.get_dtype()
    except RegistryError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise RegistryError(f"{what}: cannot read {path}: {exc}") from exc
    if shape != [shard.rows, shard.cols] or dtype != "F32":
        raise RegistryError(
            f"{what}: {path} holds a {dtype} {shape} tensor; the plan says float32 "
            f"[{shard.rows}, {shard.cols}] (offsets [{shard.row_offset}, {shard.col_offset}])"
        )


def install(table: ShardedTable, tmp: Path) -> dict[str, TableSharding]:
    """Links the (checked) shard files into the version being built in `tmp`; returns the
    manifest's ``sharding`` entry. A link costs nothing; a copy only across filesystems."""
    count = len(table.files)
    names = tuple(shard_file_name(table.name, i, count) for i in range(count))
    for source, name in zip(table.files, names, strict=True):
        link_or_copy(Path(source), tmp / name)
    return {table.name: TableSharding(table.plan, names)}


# ---------------------------------------------------------------------- reading


def sharded_opener(opener: Opener, directory: Callable[[str], Path], chain: Any) -> Opener:
    """`opener` for the versions of `chain` ((id, manifest) pairs), where reading a sharded
    tensor gathers it from its shard files (a fresh tensor: patching it in place is safe)."""
    manifests: dict[str, Manifest] = dict(chain)

    @contextlib.contextmanager
    def open_version(version_id: str) -> Iterator[TensorReader]:
        sharding = manifests[version_id].sharding or {}
        if not sharding:
            with opener(version_id) as read:
                yield read
            return
        with opener(version_id) as dense:

            def read(name: str) -> torch.Tensor:
                table = sharding.get(name)
                if table is None:
                    return dense(name)
                plan = table.plan
                block = block_reader(directory(version_id), version_id, name, table)
                return block(0, plan.num_rows, 0, plan.dim)

            yield read

    return open_version


def block_reader(
    directory: Path,
    version_id: str,
    name: str,
    table: TableSharding,
    on_read: Callable[[str], None] = lambda file: None,
) -> BlockReader:
    """Reads blocks of sharded tensor `name` from the overlapping shard files only (each
    through a safetensors slice: only the block's bytes are read). `on_read` is called with a
    file's name before it is first read (the registry verifies it there)."""
    plan = table.plan

    def read(row_start: int, row_end: int, col_start: int, col_end: int) -> torch.Tensor:
        where = f"version {version_id}: tensor {name!r}"
        _check_block(where, (plan.num_rows, plan.dim), row_start, row_end, col_start, col_end)
        out = torch.empty(row_end - row_start, col_end - col_start, dtype=torch.float32)
        for shard, file in zip(plan.shards, table.files, strict=True):
            top, bottom = _common(row_start, row_end, shard.row_offset, shard.rows)
            left, right = _common(col_start, col_end, shard.col_offset, shard.cols)
            if top >= bottom or left >= right:
                continue
            on_read(file)
            rows = slice(top - shard.row_offset, bottom - shard.row_offset)
            cols = slice(left - shard.col_offset, right - shard.col_offset)
            part = _read_slice(directory / file, f"{where}, shard file {file}", rows, cols)
            if part.dtype != torch.float32:
                raise RegistryError(f"{where}: shard file {file} is {part.dtype}, not float32")
            out[top - row_start : bottom - row_start, left - col_start : right - col_start] = part
        return out

    return read


def _common(start: int, end: int, offset: int, size: int) -> tuple[int, int]:
    """The part of [start, end) inside [offset, offset + size) (empty when start >= end)."""
    return max(start, offset), min(end, offset + size)


def plain_block_reader(
    directory: Path, version_id: str, name: str, meta: TensorMeta
) -> BlockReader:
    """Reads blocks of the unsharded 2-d tensor `name` from the version's weights file."""

    def read(row_start: int, row_end: int, col_start: int, col_end: int) -> torch.Tensor:
        where = f"version {version_id}: tensor {name!r}"
        _check_block(where, meta.shape, row_start, row_end, col_start, col_end)
        if row_start == row_end or col_start == col_end:
            return torch.empty(row_end - row_start, col_end - col_start, dtype=_dtype(meta))
        rows, cols = slice(row_start, row_end), slice(col_start, col_end)
        return _read_slice(directory / WEIGHTS, where, rows, cols, key=name)

    return read


def _check_block(
    where: str, shape: tuple[int, ...], row_start: int, row_end: int, col_start: int, col_end: int
) -> None:
    if len(shape) != 2:
        raise RegistryError(f"{where} has shape {list(shape)}; blocks are read of 2-d tensors")
    rows, cols = shape
    if not (0 <= row_start <= row_end <= rows and 0 <= col_start <= col_end <= cols):
        raise RegistryError(
            f"{where}: block rows {row_start}..{row_end}, cols {col_start}..{col_end} is "
            f"outside its [{rows}, {cols}] shape"
        )


def _read_slice(
    path: Path, where: str, rows: slice, cols: slice, key: str | None = None
) -> torch.Tensor:
    if not path.is_file():
        raise RegistryError(f"{where}: {path.name} is missing")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            part = handle.get_slice(key if key is not None else next(iter(handle.keys())))
            block: torch.Tensor = part[rows, cols]
    except Exception as exc:  # safetensors raises its own error types
        raise RegistryError(f"{where}: cannot read {path.name}: {exc}") from exc
    expected = [rows.stop - rows.start, cols.stop - cols.start]
    if list(block.shape) != expected:
        raise RegistryError(
            f"{where}: {path.name} gave a {list(block.shape)} block, expected {expected}"
        )
    return block


def _dtype(meta: TensorMeta) -> torch.dtype:
    dtype = getattr(torch, meta.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise RegistryError(f"unknown dtype {meta.dtype!r} in a manifest")
    return dtype


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.ndim}-d tensor {list(value.shape)}"
    return f"a {type(value).__name__}"


def table_reader(
    directory: Path,
    manifest: Manifest,
    name: str,
    verify_file: Callable[[str], None],
    load: Callable[[], Mapping[str, torch.Tensor]],
) -> BlockReader:
    """A BlockReader of 2-d tensor `name` of the version `manifest` describes (stored in
    `directory`): from its shard files, from its weights file (an unsharded full version), or
    from `load`-ed tensors (a delta: its chain is materialised once, on the first read).
    `verify_file` is called once per file before that file is first read."""
    version_id = manifest.id
    meta = manifest.tensors.get(name)
    if meta is None:
        raise RegistryError(
            f"version {version_id} has no tensor {name!r} (it has: {', '.join(manifest.tensors)})"
        )
    _check_block(f"version {version_id}: tensor {name!r}", meta.shape, 0, 0, 0, 0)
    verified: set[str] = set()

    def verify_once(file: str) -> None:
        if file not in verified:
            verify_file(file)
            verified.add(file)

    table = (manifest.sharding or {}).get(name)
    if table is not None:
        return block_reader(directory, version_id, name, table, verify_once)
    if not manifest.is_delta:
        plain = plain_block_reader(directory, version_id, name, meta)

        def read_plain(row_start: int, row_end: int, col_start: int, col_end: int) -> torch.Tensor:
            verify_once(WEIGHTS)
            return plain(row_start, row_end, col_start, col_end)

        return read_plain
    loaded: list[torch.Tensor] = []

    def read_loaded(row_start: int, row_end: int, col_start: int, col_end: int) -> torch.Tensor:
        where = f"version {version_id}: tensor {name!r}"
        _check_block(where, meta.shape, row_start, row_end, col_start, col_end)
        if not loaded:
            loaded.append(load()[name])
        return loaded[0][row_start:row_end, col_start:col_end].clone()

    return read_loaded
