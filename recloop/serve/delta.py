"""Serving a chain of registry deltas: moving a live bundle's weights without touching them.

The service holds the weights of the version it serves as a state dict of CPU tensors that no
one writes to. Moving it along a chain of delta versions (the online learner publishes one
every few seconds) builds a *new* state dict copy-on-write (``recloop.registry.deltas``), so
the old version keeps serving unchanged until the swap and costs no extra memory for what did
not change. What is serving's own: :func:`delta_chain` and :func:`check_model_change` refuse
what is more than new weights and a grown item table, :func:`patch_state` records what changed
for the engine and index, :func:`patched_model` builds the model. Anything a delta path cannot
take raises :class:`NotApplicable` with the reason: the caller then loads the version in full.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from recloop.errors import RegistryError
from recloop.models.base import SequentialEncoder
from recloop.models.factory import MODEL_TYPES
from recloop.registry import Manifest, Registry, RowUpdate, model_from_state
from recloop.registry.deltas import Change, NotADescendant, apply_copy_on_write
from recloop.serve.engines.export import TABLE_KEY

# A longer chain means the service fell far behind the learner; a full load is as cheap then.
MAX_CHAIN = 64


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


def delta_chain(registry: Registry, current: str, target: str) -> list[tuple[str, Manifest]]:
    """(id, manifest) of each delta from ``current`` (exclusive) to ``target`` (inclusive),
    oldest first. NotApplicable unless ``target`` descends from ``current`` through deltas."""
    try:
        return registry.deltas_after(current, target, MAX_CHAIN)
    except NotADescendant as exc:
        raise NotApplicable(str(exc)) from None


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
    """Applies (version, changes, removed) deltas in order to a copy-on-write view of ``base``
    (never written; see ``recloop.registry.deltas.apply_copy_on_write``). NotApplicable for
    a delta that removes or adds tensors (a new architecture) or writes rows it cannot."""
    table_rows: list[npt.NDArray[np.int64]] = []
    table_replaced = False
    for version, changes, removed in deltas:
        if removed:
            raise NotApplicable(f"{version} removes tensors {sorted(removed)[:3]}")
        for name, change in changes.items():
            if name not in base:
                raise NotApplicable(f"{version} adds tensor {name!r}: a new architecture")
            if isinstance(change, RowUpdate):
                if name == TABLE_KEY:
                    table_rows.append(change.rows.numpy())
            else:
                table_replaced = table_replaced or name == TABLE_KEY
    try:
        state, owned = apply_copy_on_write(base, [(v, changes) for v, changes, _ in deltas])
    except RegistryError as exc:
        raise NotApplicable(str(exc)) from None
    rows = None if table_replaced else np.unique(np.concatenate([_NO_ROWS, *table_rows]))
    return PatchedState(state=state, changed=frozenset(owned), table_rows=rows)


_NO_ROWS = np.zeros(0, dtype=np.int64)


def patched_model(
    model_json: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> SequentialEncoder:
    """The model of ``model_json`` on the patched ``state`` (no copy); NotApplicable when the
    weights do not fit its config (then a full load says exactly what is wrong)."""
    try:
        return model_from_state(model_json, state)
    except RegistryError as exc:
        raise NotApplicable(str(exc)) from None
