"""Item ids that changed meaning along a chain of deltas (a bounded online table reused the
rows of evicted items), and what of a served bundle follows them.

The catalogue gives those ids their new raw ids (``Vocabulary.extended``); the index takes
the rows' new vectors like any changed row, so a reused id never answers with the evicted
item's vector; the training histories drop the evicted items' entries
(``UserHistory.remapped``); the result cache needs nothing, its entries being keyed by version.
A full load of the last version gives the same bundle (tests/test_eviction.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from recloop.data.history import UserHistory
from recloop.registry import Manifest, Registry
from recloop.registry.sidefiles import read_remapped
from recloop.serve.delta import NotApplicable


def chain_remapped(registry: Registry, chain: Sequence[tuple[str, Manifest]]) -> dict[int, str]:
    """Dense id -> raw id for every id the deltas of `chain` (oldest first) remapped: the
    last remap of an id wins."""
    remapped: dict[int, str] = {}
    for version, manifest in chain:
        remapped.update(read_remapped(registry, version, manifest))
    return remapped


def check_rows_written(
    remapped: dict[int, str], table_rows: npt.NDArray[np.int64] | None, target: str
) -> None:
    """NotApplicable when a remapped id's row was not written by the deltas: the index would
    keep the evicted item's vector under the new name (a full load has no such index)."""
    if not remapped or table_rows is None:
        return
    missing = np.setdiff1d(np.fromiter(remapped, np.int64, len(remapped)), table_rows)
    if len(missing):
        raise NotApplicable(f"{target} remaps item {int(missing[0])} without writing its row")


def remapped_history(history: UserHistory | None, remapped: dict[int, str]) -> UserHistory | None:
    """`history` in the ids after the remap (shared when nothing was remapped)."""
    if history is None or not remapped:
        return history
    return history.remapped(remapped)


def without_remapped(
    popular: npt.NDArray[np.int64], remapped: dict[int, str]
) -> npt.NDArray[np.int64]:
    """The popularity fallback without the remapped ids (their new items' popularity is
    unknown until a version with item counts says it)."""
    if not remapped:
        return popular
    return popular[~np.isin(popular, np.fromiter(remapped, np.int64, len(remapped)))]
