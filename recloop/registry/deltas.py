"""Deltas: the only code that understands how a delta version changes its parent's tensors.

A delta (``kind="delta"``) stores only what changed: whole tensors ("replace": the only way
to add one) and row updates ("rows": new contents for some rows of dim 0, plus an int64 index
tensor ``<name>.rows``; rows past the parent's row count grow the tensor, contiguously), and
names the tensors it drops (``removed``). Here: :func:`diff_state` (what a publisher changed),
:func:`plan_delta` (validated against the parent, what to store and record), the chain walk
(:func:`lineage`, :func:`deltas_after`), and applying a chain, in place while a version is
materialised (:func:`materialise`) or copy-on-write over a live state
(:func:`apply_copy_on_write`); both patch rows with :func:`patch_rows`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch

from recloop.errors import RegistryError
from recloop.registry.files import TensorReader
from recloop.registry.manifest import DeltaSpec, Manifest, TensorMeta, VocabularyRef, dtype_name

# A delta stores the indices of a "rows" update of tensor NAME as tensor NAME + ROWS_SUFFIX.
ROWS_SUFFIX = ".rows"
_COMPLEX = (torch.complex32, torch.complex64, torch.complex128)
_ID_RE = re.compile(r"v([0-9]{6,18})\Z", re.ASCII)


@dataclass(frozen=True)
class RowUpdate:
    """New contents for some rows of a tensor, for :meth:`Registry.publish_delta` ("rows").

    `rows` (integer [N], unique, >= 0; stored as int64) index dim 0 of the tensor, `values`
    [N, *trailing dims] (the tensor's dtype) are their new contents. Rows at or past the parent's
    row count grow the tensor: they must then cover ``parent_rows .. max(rows)`` without holes.
    """

    rows: torch.Tensor
    values: torch.Tensor


Change = torch.Tensor | RowUpdate
# (id, manifest) of versions along a chain.
Chain = list[tuple[str, Manifest]]


class NotADescendant(RegistryError):
    """A version is not reachable from another through a short enough chain of deltas."""


# ---------------------------------------------------------------------- making a delta


def diff_state(
    published: dict[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    row_table: str,
    always: Sequence[int] = (),
) -> dict[str, Change]:
    """What changed in `state` since `published`: changed and new rows of `row_table` (and
    its rows `always`, changed or not: rows that now mean another item), whole tensors for
    anything else that moved. Updates `published` to match `state`."""
    changes: dict[str, Change] = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        old = published.get(name)
        if name == row_table and old is not None:
            count = len(old)
            differs = (tensor[:count] != old).any(dim=1)
            differs[[row for row in always if row < count]] = True
            moved = torch.nonzero(differs).squeeze(1)
            rows = torch.cat([moved, torch.arange(count, len(tensor))])
            if len(rows):
                values = tensor[rows].clone()
                changes[name] = RowUpdate(rows=rows, values=values)
                grown = torch.cat([old, torch.zeros(len(tensor) - count, *old.shape[1:])])
                grown[rows] = values
                published[name] = grown
        elif old is None or old.shape != tensor.shape or not torch.equal(old, tensor):
            copy = tensor.clone()
            changes[name] = copy
            published[name] = copy
    return changes


@dataclass(frozen=True)
class DeltaPlan:
    """A validated delta: what its weights file stores and what its manifest says."""

    stored: dict[str, torch.Tensor]
    delta: dict[str, DeltaSpec]
    tensors: dict[str, TensorMeta]
    removed: tuple[str, ...]


def chain_position(parent_id: str, parent: Manifest) -> tuple[str, int]:
    """(base, chain_depth) of a delta published on top of `parent`."""
    if parent.kind == "full":
        return parent_id, 1
    if parent.kind == "delta" and parent.base is not None and parent.chain_depth is not None:
        return parent.base, parent.chain_depth + 1
    raise RegistryError(
        f"version {parent_id} is kind {parent.kind!r}; deltas apply to full or delta"
    )


def plan_delta(
    parent: Mapping[str, TensorMeta], changes: Mapping[str, Change], removed: Sequence[str]
) -> DeltaPlan:
    """Validates a delta against the parent's tensor table (names, dtypes, shapes) and plans it."""
    if isinstance(removed, str):  # a lone name would otherwise be read letter by letter
        raise RegistryError("removed must be a sequence of tensor names, not a string")
    dropped = tuple(sorted(set(removed)))
    for name in dropped:
        if name not in parent:
            raise RegistryError(f"cannot remove tensor {name!r}: the parent has no such tensor")
        if name in changes:
            raise RegistryError(f"tensor {name!r} is both changed and removed")
    if not changes and not dropped:
        raise RegistryError("a delta needs at least one changed or removed tensor")
    stored: dict[str, torch.Tensor] = {}
    delta: dict[str, DeltaSpec] = {}
    tensors = {name: meta for name, meta in parent.items() if name not in dropped}
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
            delta[name] = DeltaSpec("rows", index_name, len(rows), shape)
            tensors[name] = TensorMeta(dtype_name(change.values), shape)
        elif isinstance(change, torch.Tensor):
            _check_replacement(name, change, parent.get(name))
            stored[name] = change
            delta[name] = DeltaSpec("replace")
            tensors[name] = TensorMeta.of(change)
        else:
            raise RegistryError(
                f"change of tensor {name!r} is a {type(change).__name__}, "
                "not a torch.Tensor or RowUpdate"
            )
    if not tensors:
        raise RegistryError("this delta would leave the version with no tensors")
    return DeltaPlan(stored=stored, delta=delta, tensors=tensors, removed=dropped)


def _check_replacement(name: str, tensor: torch.Tensor, parent: TensorMeta | None) -> None:
    if tensor.layout != torch.strided:
        raise RegistryError(f"tensor {name!r} is {tensor.layout}; only dense tensors are saved")
    # A delta fine-tunes: a new dtype means a new model, which is a full publish.
    if parent is not None and dtype_name(tensor) != parent.dtype:
        raise RegistryError(
            f"tensor {name!r} is {dtype_name(tensor)} but {parent.dtype} in the parent"
        )


def _check_row_update(
    name: str, update: RowUpdate, parent: TensorMeta | None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(rows as CPU int64, final shape) of a valid row update; RegistryError otherwise."""
    rows, values = update.rows, update.values
    if parent is None:
        raise RegistryError(
            f"tensor {name!r} is not in the parent: a new tensor is given whole "
            "(a plain tensor, mode 'replace'), not as a RowUpdate"
        )
    shape = list(parent.shape)
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
    if dtype_name(values) != parent.dtype:
        raise RegistryError(
            f"row update of {name!r}: values are {dtype_name(values)} "
            f"but the tensor is {parent.dtype}"
        )
    if list(values.shape) != [len(rows), *shape[1:]]:
        raise RegistryError(
            f"row update of {name!r}: values have shape {list(values.shape)}, expected "
            f"{[len(rows), *shape[1:]]} ({len(rows)} rows of the tensor's trailing dims)"
        )
    rows = rows.detach().to("cpu", torch.int64)
    shape[0] += _grown_rows(name, rows, shape[0])
    return rows, tuple(shape)


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


# ---------------------------------------------------------------------- chains


def lineage(
    version_id: str,
    read: Callable[[str], Manifest],
    exists: Callable[[str], bool],
    *,
    until: str | None = None,
    limit: int | None = None,
) -> Chain:
    """(id, manifest) of `version_id` and the versions it is built on, newest first: up to
    the first full version, or `until`, or `limit` versions, whichever comes first."""
    chain = [(version_id, read(version_id))]
    while chain[-1][1].is_delta and chain[-1][0] != until:
        if limit is not None and len(chain) >= limit:
            break
        child_id, child = chain[-1]
        parent_id = child.parent
        # Parents always have lower numbers (they existed first); checking it also makes a
        # cycle in hand-edited manifests impossible.
        if not isinstance(parent_id, str) or _number(parent_id) >= _number(child_id):
            raise RegistryError(f"version {child_id}: delta has invalid parent {parent_id!r}")
        if not exists(parent_id):
            raise RegistryError(f"version {child_id}: its parent {parent_id} is missing")
        chain.append((parent_id, read(parent_id)))
    return chain


def full_chain(
    version_id: str, read: Callable[[str], Manifest], exists: Callable[[str], bool]
) -> Chain:
    """(id, manifest) of `version_id` and every version it is built on, base first; checked
    against what each delta's manifest says of its base and depth."""
    chain = lineage(version_id, read, exists)
    base_id, base = chain[-1]
    if base.kind != "full":
        raise RegistryError(
            f"version {base_id} is kind {base.kind!r}; "
            "this recloop version can only load 'full' and 'delta' versions"
        )
    chain.reverse()
    for depth, (delta_id, delta) in enumerate(chain[1:], start=1):
        if delta.base != base_id or delta.chain_depth != depth:
            raise RegistryError(
                f"version {delta_id}: manifest says base {delta.base!r} at depth "
                f"{delta.chain_depth!r}, but its chain is base {base_id} at depth {depth}"
            )
    return chain


def deltas_after(
    current: str,
    target: str,
    read: Callable[[str], Manifest],
    exists: Callable[[str], bool],
    limit: int,
) -> Chain:
    """(id, manifest) of each delta from `current` (exclusive) to `target` (inclusive), oldest
    first. NotADescendant unless `target` descends from `current` through <= `limit` deltas."""
    walked = lineage(target, read, exists, until=current, limit=limit + 1)
    last_id, last = walked[-1]
    if last_id != current:
        if last.is_delta:
            raise NotADescendant(f"{target} is more than {limit} deltas after {current}")
        raise NotADescendant(
            f"{target} does not descend from {current} through deltas "
            f"({last_id} is a {last.kind} version)"
        )
    return list(reversed(walked[:-1]))


def _number(version_id: str) -> int:
    match = _ID_RE.match(version_id)
    if not match:
        raise RegistryError(f"{version_id!r} is not a version id")
    return int(match.group(1))


# ---------------------------------------------------------------------- applying


def read_changes(
    version_id: str, manifest: Manifest, read: TensorReader
) -> tuple[dict[str, Change], list[str]]:
    """(changes, removed) that delta `manifest` stores, as given to ``publish_delta``."""
    if not manifest.is_delta or manifest.delta is None:
        raise RegistryError(f"version {version_id} is kind {manifest.kind!r}, not a delta")
    changes: dict[str, Change] = {}
    for name, spec in manifest.delta.items():
        if spec.mode == "rows" and spec.rows is not None:
            changes[name] = RowUpdate(rows=read(spec.rows), values=read(name))
        else:
            changes[name] = read(name)
    return changes, list(manifest.removed or ())


def materialise(
    chain: Chain, open_weights: Callable[[str], AbstractContextManager[TensorReader]]
) -> dict[str, torch.Tensor]:
    """The full tensors at the end of `chain` (base first).

    Each tensor is read once, from the version that last wrote it whole (the base or a
    "replace"), allocated once at its final size, then patched in place by the later row
    updates: one copy of a big table however long the chain, and no work for the updates
    a later "replace" overwrote.
    """
    final = chain[-1][1].tensors
    origin = _origins(chain, final)
    tensors: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}  # rows written so far: growth must be contiguous
    for index, (version_id, manifest) in enumerate(chain):
        whole = [name for name, at in origin.items() if at == index]
        patches = [
            (name, spec)
            for name, spec in (manifest.delta or {}).items()
            if spec.mode == "rows" and name in origin and origin[name] < index
        ]
        if not whole and not patches:
            continue
        with open_weights(version_id) as read:
            for name in whole:
                stored = read(name)
                tensors[name] = _grown(stored, final[name].shape, version_id, name)
                filled[name] = stored.shape[0] if stored.ndim else 0
            for name, spec in patches:
                update = RowUpdate(rows=read(str(spec.rows)), values=read(name))
                where = f"version {version_id}"
                tensors[name], filled[name] = patch_rows(
                    tensors[name], update, filled[name], owned=True, where=where, name=name
                )
    for name, tensor in tensors.items():
        if tensor.ndim and filled[name] != tensor.shape[0]:
            raise RegistryError(
                f"version {chain[-1][0]}: rows {filled[name]}..{tensor.shape[0] - 1} of tensor "
                f"{name!r} are never written by its chain"
            )
        if list(tensor.shape) != list(final[name].shape):
            raise RegistryError(
                f"version {chain[-1][0]}: tensor {name!r} ends with shape {list(tensor.shape)}, "
                f"manifest says {list(final[name].shape)}"
            )
    return {name: tensors[name] for name in final}


def apply_copy_on_write(
    base: Mapping[str, torch.Tensor], deltas: Sequence[tuple[str, Mapping[str, Change]]]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(state, names it owns) after applying (version, changes) deltas in order to `base`.

    `base` and its tensors are never written: a tensor is copied the first time a delta
    patches its rows (allocated at its grown size when rows are added) and patched in place
    after that, so a chain costs one copy per changed tensor; a replaced tensor is the delta's
    own (freshly read) tensor.
    """
    state = dict(base)
    owned: set[str] = set()  # tensors this call allocated: safe to write
    for version, changes in deltas:
        for name, change in changes.items():
            if isinstance(change, RowUpdate):
                tensor = state[name]
                state[name], _ = patch_rows(
                    tensor, change, len(tensor), owned=name in owned, where=version, name=name
                )
            else:
                state[name] = change
            owned.add(name)
    return state, owned


def patch_rows(
    tensor: torch.Tensor, update: RowUpdate, size: int, *, owned: bool, where: str, name: str
) -> tuple[torch.Tensor, int]:
    """(`tensor` with `update` written into it, rows now written), where the first `size`
    rows of `tensor` hold data. In place when `owned` and the rows fit its allocation,
    otherwise into a new tensor. Checked so a bad file cannot index out of range or leave a
    hole of unwritten rows (rows are unique: checked at publish)."""
    rows, values = update.rows, update.values
    fits = (
        rows.dtype == torch.int64
        and rows.ndim == 1
        and values.dtype == tensor.dtype
        and list(values.shape) == [len(rows), *tensor.shape[1:]]
    )
    if not fits:
        raise RegistryError(
            f"{where}: row update of {name!r} (rows {rows.dtype} {list(rows.shape)}, values "
            f"{values.dtype} {list(values.shape)}) does not fit the tensor "
            f"({tensor.dtype} {list(tensor.shape)})"
        )
    if len(rows) == 0:
        return tensor, size
    # numpy for the reductions: torch's threaded ones are slow for this size on a busy machine.
    index = rows.numpy()
    if int(index.min()) < 0:
        raise RegistryError(f"{where}: row update of {name!r} writes row {int(index.min())}")
    grown = max(size, int(index.max()) + 1)
    if int(np.count_nonzero(index >= size)) != grown - size:
        raise RegistryError(
            f"{where}: row update of {name!r} grows it from {size} to {grown} rows without "
            f"writing every one of rows {size}..{grown - 1}"
        )
    if not owned or grown > len(tensor):  # the first write (or a growth): into a new tensor
        fresh = tensor.new_empty((max(grown, len(tensor)), *tensor.shape[1:]))
        fresh[:size] = tensor[:size]
        tensor = fresh
    tensor.index_copy_(0, rows, values)
    return tensor, grown


def _origins(chain: Chain, final: Mapping[str, TensorMeta]) -> dict[str, int]:
    """For each final tensor, the index in `chain` of the version that last wrote it whole."""
    origin = dict.fromkeys(final, 0)
    for index, (_, manifest) in enumerate(chain[1:], start=1):
        for name, spec in (manifest.delta or {}).items():
            if spec.mode == "replace" and name in origin:
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


def check_vocabulary_growth(new: VocabularyRef, parent: VocabularyRef | None) -> None:
    """RegistryError when a delta's vocabulary has fewer items than its parent's."""
    before = parent.items if parent is not None else None
    # items.parquet row i is dense item i + 1: a vocabulary can only be appended to.
    if isinstance(before, int) and isinstance(new.items, int) and new.items < before:
        raise RegistryError(
            f"vocabulary file {new.file} has {new.items} items but the parent's has "
            f"{before}: a delta's vocabulary may only grow"
        )
