"""What a chain of registry deltas does to a served model's weights, without touching them.

The service holds the weights of the version it serves as a state dict of CPU tensors that no
one writes to. Moving it along a chain of delta versions (the online learner publishes one
every few seconds) builds a *new* state dict: tensors a delta does not touch are shared with
the old one, touched ones are copied once and patched (copy-on-write), so the old version keeps
serving unchanged until the swap and costs no extra memory for what did not change.

:func:`delta_chain` finds the deltas between two versions, :func:`check_model_change` refuses
what is more than new weights and a grown item table, :func:`patch_state` applies the changes
and :func:`model_from_state` puts the result in a model without copying it again. Anything a
delta path cannot take raises :class:`NotApplicable` with the reason: the caller then loads the
version in full.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from recloop.models.base import SequentialEncoder
from recloop.models.factory import MODEL_TYPES, build_model
from recloop.registry import Registry, RowUpdate
from recloop.serve.engines.export import TABLE_KEY

# A longer chain means the service fell far behind the learner; a full load is as cheap then.
MAX_CHAIN = 64

Change = torch.Tensor | RowUpdate


class NotApplicable(Exception):
    """The target version cannot be reached by applying deltas; the message says why."""


@dataclass(frozen=True)
class PatchedState:
    """The state dict after a chain of deltas, and what differs from the one it started from.

    ``table_rows`` are the item table rows written (sorted, unique; new rows included), or
    None when the table was replaced whole.
    """

    state: dict[str, torch.Tensor]
    changed: frozenset[str]
    table_rows: npt.NDArray[np.int64] | None


def delta_chain(registry: Registry, current: str, target: str) -> list[tuple[str, dict[str, Any]]]:
    """(id, manifest) of each delta from ``current`` (exclusive) to ``target`` (inclusive),
    oldest first. NotApplicable unless ``target`` descends from ``current`` through deltas."""
    chain: list[tuple[str, dict[str, Any]]] = []
    version = target
    while version != current:
        if len(chain) == MAX_CHAIN:
            raise NotApplicable(f"{target} is more than {MAX_CHAIN} deltas after {current}")
        manifest = registry.manifest(version)
        if manifest.get("kind") != "delta":
            raise NotApplicable(
                f"{target} does not descend from {current} through deltas "
                f"({version} is a {manifest.get('kind')} version)"
            )
        parent = manifest.get("parent")
        if not isinstance(parent, str):
            raise NotApplicable(f"delta {version} names no parent")
        chain.append((version, manifest))
        version = parent
    chain.reverse()
    return chain


def check_model_change(old: Mapping[str, Any], new: Mapping[str, Any], version: str) -> None:
    """NotApplicable unless ``new`` (a manifest's ``model``) is ``old`` with at most a larger
    ``num_items``: any other change is a new architecture, which needs a new export. Keys
    left out mean their defaults, as when the model is built."""
    old, new = _with_defaults(old), _with_defaults(new)
    if new.get("type") != old.get("type"):
        raise NotApplicable(
            f"{version} changes the model type from {old.get('type')} to {new.get('type')}"
        )
    keys = sorted(
        key
        for key in set(old) | set(new)
        if key != "num_items" and old.get(key, None) != new.get(key, None)
    )
    if keys:
        raise NotApplicable(f"{version} changes the model config: {', '.join(keys)}")
    before, after = old.get("num_items"), new.get("num_items")
    if not isinstance(before, int) or not isinstance(after, int) or after < before:
        raise NotApplicable(f"{version} changes num_items from {before} to {after}")


def _with_defaults(model_json: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest's ``model`` with the config fields it leaves out at their defaults."""
    entry = MODEL_TYPES.get(str(model_json.get("type")))
    if entry is None:
        raise NotApplicable(f"unknown model type {model_json.get('type')!r}")
    defaults = {
        field.name: field.default
        for field in dataclasses.fields(entry[0])
        if field.default is not dataclasses.MISSING
    }
    return {**defaults, **model_json}


def patch_state(
    base: Mapping[str, torch.Tensor],
    deltas: Sequence[tuple[str, Mapping[str, Change], Sequence[str]]],
) -> PatchedState:
    """Applies (version, changes, removed) deltas in order to a copy-on-write view of ``base``.

    ``base`` and its tensors are never written: a tensor is copied the first time a delta
    patches its rows (allocated at its grown size when rows are added) and patched in place
    after that, so a chain costs one copy per changed tensor; a replaced tensor is the delta's
    own (freshly read) tensor. Rows past a tensor's end must extend it without holes.
    """
    state = dict(base)
    owned: set[str] = set()  # tensors this call allocated: safe to write
    table_rows: list[npt.NDArray[np.int64]] = []
    table_replaced = False
    for version, changes, removed in deltas:
        if removed:
            raise NotApplicable(f"{version} removes tensors {sorted(removed)[:3]}")
        for name, change in changes.items():
            if name not in state:
                raise NotApplicable(f"{version} adds tensor {name!r}: a new architecture")
            if isinstance(change, RowUpdate):
                state[name] = _patch_rows(state[name], change, name in owned, version, name)
                if name == TABLE_KEY:
                    table_rows.append(change.rows.numpy())
            else:
                state[name] = change
                table_replaced = table_replaced or name == TABLE_KEY
            owned.add(name)
    rows = None if table_replaced else np.unique(np.concatenate([_NO_ROWS, *table_rows]))
    return PatchedState(state=state, changed=frozenset(owned), table_rows=rows)


_NO_ROWS = np.zeros(0, dtype=np.int64)


def _patch_rows(
    tensor: torch.Tensor, update: RowUpdate, owned: bool, version: str, name: str
) -> torch.Tensor:
    """``tensor`` with ``update`` written into it: in place when ``owned``, else a copy."""
    rows, values = update.rows, update.values
    if rows.dtype != torch.int64 or rows.ndim != 1 or values.dtype != tensor.dtype:
        raise NotApplicable(
            f"{version}: row update of {name!r} has rows {rows.dtype} and values "
            f"{values.dtype} for a {tensor.dtype} tensor"
        )
    if list(values.shape) != [len(rows), *tensor.shape[1:]]:
        raise NotApplicable(
            f"{version}: row update of {name!r} has values {list(values.shape)} for a tensor "
            f"of shape {list(tensor.shape)}"
        )
    size = len(tensor)
    index = rows.numpy()
    top = int(index.max()) + 1 if len(index) else size
    grown = max(size, top)
    if len(index) and int(index.min()) < 0:
        raise NotApplicable(f"{version}: row update of {name!r} writes row {int(index.min())}")
    # Rows are unique (checked at publish): the new ones are exactly size..grown-1, or a hole.
    if int(np.count_nonzero(index >= size)) != grown - size:
        raise NotApplicable(
            f"{version}: row update of {name!r} grows it from {size} to {grown} rows without "
            f"writing every one of rows {size}..{grown - 1}"
        )
    if not owned or grown > size:  # the first write (or a growth): into a new tensor
        fresh = tensor.new_empty((grown, *tensor.shape[1:]))
        fresh[:size] = tensor
        tensor = fresh
    tensor.index_copy_(0, rows, values)
    return tensor


def model_from_state(
    model_json: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> SequentialEncoder:
    """A model in eval mode built from a manifest's ``model`` that uses the tensors of ``state``
    as its weights (no copy). NotApplicable when the weights do not fit the config."""
    try:
        model = copy.deepcopy(_skeleton(json.dumps(model_json, sort_keys=True)))
        model.load_state_dict(state, strict=True, assign=True)
    except Exception as exc:  # shapes, names, or a module that cannot be built on "meta"
        raise NotApplicable(f"the patched weights do not fit the model config: {exc}") from None
    left = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if left:
        raise NotApplicable(f"the model has state the registry does not store: {left[:3]}")
    model.eval()
    return model


@functools.lru_cache(maxsize=4)
def _skeleton(model_json: str) -> SequentialEncoder:
    """The model of a config on the "meta" device: structure only, no memory, no init. Built
    once per config (~10 ms under load), then deep-copied per delta (~2 ms)."""
    config = json.loads(model_json)
    with torch.device("meta"):
        return build_model(str(config.pop("type", "")), config)
