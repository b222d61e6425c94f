"""The served model version and its atomic hot swap, by a full load or along deltas.

A request takes a reference to the current :class:`~recloop.serve.bundle.ModelBundle` when it
starts and uses only that bundle until it ends, so swapping ``ModelHolder.current`` (one
attribute assignment, atomic for Python readers) never changes a model under a request:
in-flight requests finish on the old version, new ones start on the new version, and the old
one is freed when the last reference goes.

Two ways to the next version. :func:`recloop.serve.bundle.load_bundle` loads one in full
(ONNX export, index build: seconds). :func:`apply_deltas` moves the served bundle along
registry deltas (the online learner's, every few seconds) in milliseconds to a second: the new
bundle shares everything the deltas do not touch with the old one and copies what they do (see
:mod:`recloop.serve.delta`), reuses the ONNX graph with the new weights, updates the index
copy-on-write and extends the vocabulary. :meth:`ModelHolder.load` takes that path whenever the
target descends from the served version through deltas, and falls back to a full load (logging
why) otherwise. Nothing the old bundle uses is ever written, so requests still running on it
are unaffected.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from recloop.data.vocabulary import Vocabulary
from recloop.errors import (
    DatasetError,
    EngineParityError,
    RecloopError,
    RegistryError,
    ServingError,
)
from recloop.models.base import SequentialEncoder
from recloop.registry import Manifest, Registry
from recloop.registry.sidefiles import ITEM_COUNTS_FILE
from recloop.serve.bundle import (
    LoadOptions,
    ModelBundle,
    check_catalog,
    index_details,
    index_for,
    load_bundle,
    new_engine,
    popular_items,
)
from recloop.serve.delta import (
    NotApplicable,
    PatchedState,
    check_model_change,
    delta_chain,
    patch_state,
    patched_model,
)
from recloop.serve.engines.base import InferenceEngine
from recloop.serve.engines.export import TABLE_KEY, item_table, item_vectors
from recloop.serve.engines.factory import engine_with_weights, warmup
from recloop.serve.engines.parity import reference_queries
from recloop.serve.indexes.base import ItemIndex
from recloop.serve.remap import (
    chain_remapped,
    check_rows_written,
    remapped_history,
    without_remapped,
)

log = logging.getLogger("recloop.serve")


def apply_deltas(
    registry: Registry, current: ModelBundle, target: str, options: LoadOptions
) -> ModelBundle:
    """The bundle of ``target``, a delta (or chain of deltas) on top of ``current``'s version,
    built from ``current`` without changing it (copy-on-write).

    Weights: only the tensors the deltas change are copied and patched. Engine: the same ONNX
    graph with the new weights (no export), or a torch engine on the new model; parity-checked
    against the new model like a full load (EngineParityError refuses the version). Index:
    ``current``'s updated copy-on-write with the changed and new items' vectors. Vocabulary:
    extended with the new items, and ids a bounded table reused renamed (recloop.serve.remap).
    Popularity: from the version's item_counts.npy, as a full load; the served one's (less
    reused ids) when the delta has none. User history: shared (the training dataset does not
    change with deltas; items new to the catalogue are not in it), or without the items of
    reused ids.

    Raises NotApplicable (why) when the target is not such a descendant or changes more than
    weights and the number of items (then load it in full), RecloopError when it is broken.
    """
    started = time.perf_counter()
    if current.model is None or not current.state:
        raise NotApplicable(f"the served bundle of {current.version} keeps no weights")
    chain = delta_chain(registry, current.version, target)
    for version, manifest in chain:
        check_model_change(current.manifest.model, manifest.model, version)
    deltas = [(version, *registry.read_delta(version)) for version, _ in chain]
    patched = patch_state(current.state, deltas)
    manifest = chain[-1][1]
    model = patched_model(manifest.model, patched.state)
    num_items = int(model.item_embedding.num_items)
    remapped = chain_remapped(registry, chain)  # ids a bounded table reused (serve.remap)
    check_rows_written(remapped, patched.table_rows, target)
    catalog = _next_catalog(registry, current, target, manifest, remapped)
    check_catalog(target, catalog, num_items)
    engine = _next_engine(current, model, patched, target, options)
    index = _next_index(current, model, patched, engine, options)
    history = remapped_history(current.history, remapped)
    popular = without_remapped(current.popular, remapped)  # a delta without counts: no news
    if ITEM_COUNTS_FILE in manifest.files:
        popular = popular_items(registry, target, manifest, history, num_items)
    seconds = time.perf_counter() - started
    return ModelBundle(
        version=target,
        manifest=manifest,
        engine=engine,
        index=index,
        catalog=catalog,
        history=history,
        popular=popular,
        max_length=int(model.config.max_length),
        load_seconds=seconds,
        details={
            **_delta_details(current, index, patched, len(chain), seconds, options),
            "remapped_items": len(remapped),
        },
        model=model,
        state=patched.state,
        incremental=current.incremental.for_version(model, target) if current.incremental else None,
    )


def _delta_details(
    current: ModelBundle,
    index: ItemIndex,
    patched: PatchedState,
    deltas: int,
    seconds: float,
    options: LoadOptions,
) -> dict[str, Any]:
    """What /v1/model reports about a bundle made by apply_deltas from ``current``."""
    rows = patched.table_rows
    return {
        "shards": options.shards,
        **index_details(index),
        "applied_delta": True,
        "apply_seconds": round(seconds, 4),
        "delta_from": current.version,
        "deltas_applied": deltas,
        "changed_tensors": sorted(patched.changed),
        "changed_item_rows": None if rows is None else int(np.count_nonzero(rows)),
        "new_items": index.num_items - current.catalog.num_items,
        "index_drift": round(index.drift(), 4),
    }


def _next_catalog(
    registry: Registry,
    current: ModelBundle,
    target: str,
    manifest: Manifest,
    remapped: dict[int, str],
) -> Vocabulary:
    """``current``'s catalogue when the vocabulary file is the same, else extended by the new
    items, with the `remapped` ids' new raw ids (a vocabulary renumbered otherwise is
    NotApplicable: a full load builds it from scratch)."""
    name = manifest.vocabulary_file
    if not name:
        raise ServingError(f"version {target} records no item vocabulary; cannot serve it")
    ours = current.manifest.vocabulary_file
    theirs, served = manifest.files.get(name), current.manifest.files.get(ours or "")
    if theirs is not None and served is not None and theirs.sha256 == served.sha256:
        return current.catalog  # the same file: inherited by the delta (hard-linked)
    try:
        return current.catalog.extended(registry.file(target, name), remapped)
    except DatasetError as exc:
        raise NotApplicable(str(exc)) from None


def _next_engine(
    current: ModelBundle,
    model: SequentialEncoder,
    patched: PatchedState,
    target: str,
    options: LoadOptions,
) -> InferenceEngine:
    """The current engine with the new weights, parity-checked (also on the changed items);
    a new build (ONNX export) only when the graph cannot take them."""
    rows = patched.table_rows
    try:
        engine = engine_with_weights(
            current.engine,
            model,
            patched.changed,
            rows=None if rows is None else rows[rows > 0],
            label=target,
        )
    except EngineParityError:
        raise  # the new weights disagree with themselves: refuse the version
    except ServingError as exc:
        log.warning("delta %s: building a new engine (%s)", target, exc)
        return new_engine(model, options, target)
    warmup(engine)
    return engine


def _next_index(
    current: ModelBundle,
    model: SequentialEncoder,
    patched: PatchedState,
    engine: InferenceEngine,
    options: LoadOptions,
) -> ItemIndex:
    """``current``'s index with the changed and new items' vectors (copy-on-write); built
    anew when the whole table was replaced."""
    if patched.table_rows is None:
        return index_for(
            item_table(model), options, engine.encode, current.history, engine.max_length
        )
    ids = patched.table_rows[patched.table_rows > 0]  # row 0 is padding, never indexed
    try:
        index = current.index.updated(ids, item_vectors(model, ids))
    except ServingError as exc:  # e.g. an index kind that cannot copy itself
        raise NotApplicable(f"the index cannot take the delta: {exc}") from None
    if index.num_items != model.item_embedding.num_items:
        raise ServingError(
            f"index has {index.num_items} items after the delta but the model has "
            f"{model.item_embedding.num_items}"
        )
    return index


class ModelHolder:
    """The current bundle, and loading the next one in the background with an atomic swap.

    Cached results need no invalidation here: the service's result cache keys every entry by
    the model version it was computed with (see ``recloop.serve.service``), so a swap, including
    one to a delta that changed a few rows, makes every older entry unreachable at once.
    """

    def __init__(self, registry: Registry, options: LoadOptions, ref: str) -> None:
        self.registry = registry
        self.options = options
        self.ref = ref
        self.current: ModelBundle | None = None
        self.last_error: str | None = None
        self.swaps = 0
        self._load_lock = threading.Lock()  # one load (or index swap) at a time
        self._rebuilding: threading.Thread | None = None  # the background IVF rebuild

    def resolve_default(self) -> str:
        return self.registry.resolve(self.ref)

    def load(self, ref: str | None = None) -> tuple[ModelBundle, str | None]:
        """Blocking: loads `ref` (default: the holder's ref), swaps it in, returns
        (new bundle, previous version). A delta (chain) on top of the served version is
        applied to it (apply_deltas), anything else loaded in full. On failure the current
        bundle stays and the error is raised. Loading the version already served is a no-op."""
        with self._load_lock:
            target = self.registry.resolve(self.ref if ref is None else ref)
            current = self.current
            if current is not None and current.version == target:
                return current, current.version
            try:
                bundle = self._next_bundle(current, target)
            except RecloopError as exc:
                self.last_error = f"{target}: {exc}"
                raise
            previous = current.version if current is not None else None
            self.current = bundle  # the swap: one reference assignment
            self.swaps += 1
            self.last_error = None
            how = "applied deltas" if bundle.details.get("applied_delta") else "loaded"
            log.info(
                "serving %s (previous %s), %s in %.3fs",
                target,
                previous,
                how,
                bundle.load_seconds,
            )
            self._maybe_rebuild_index(bundle)
            return bundle, previous

    def _next_bundle(self, current: ModelBundle | None, target: str) -> ModelBundle:
        if current is not None:
            try:
                return apply_deltas(self.registry, current, target, self.options)
            except NotApplicable as why:
                log.info("loading %s in full: %s", target, why)
        return load_bundle(self.registry, target, self.options)

    # ------------------------------------------------------------------ index rebuild

    def _maybe_rebuild_index(self, bundle: ModelBundle) -> None:
        """Starts a background rebuild of the served index once deltas moved enough items
        past its training (IVF drift); at most one at a time."""
        if bundle.index.drift() <= self.options.rebuild_drift:
            return
        if self._rebuilding is not None and self._rebuilding.is_alive():
            return
        self._rebuilding = threading.Thread(
            target=self._rebuild_index, args=(bundle,), name="recloop-index-rebuild", daemon=True
        )
        self._rebuilding.start()

    def _rebuild_index(self, bundle: ModelBundle) -> None:
        """Builds a fresh index for ``bundle`` (what a full load would build) and swaps in a
        copy of the bundle that uses it, if that version is still served. When deltas moved the
        service on meanwhile (a rebuild of 1M items takes a minute; deltas come every few
        seconds), the new index first catches up: the item rows that differ between the two
        versions' tables are updated in it, and it is offered to the newer bundle instead."""
        started = time.perf_counter()
        model = bundle.model
        if model is None:  # only bundles from apply_deltas drift, and they keep their model
            return
        try:
            index = index_for(
                item_table(model),
                self.options,
                lambda batch: reference_queries(model, batch),  # not the served engine's
                bundle.history,
                bundle.max_length,
            )
            for _ in range(MAX_CATCH_UP):
                with self._load_lock:
                    current = self.current
                    if current is bundle:
                        self.current = replace(
                            bundle,
                            index=index,
                            details={
                                **bundle.details,
                                **index_details(index),
                                "index_drift": 0.0,
                                "index_rebuilt_seconds": round(time.perf_counter() - started, 2),
                            },
                        )
                        seconds = time.perf_counter() - started
                        log.info("%s: index rebuilt in %.1fs", bundle.version, seconds)
                        return
                if current is None or current.model is None or not _can_catch_up(bundle, current):
                    break
                ids = _changed_rows(bundle.state[TABLE_KEY], current.state[TABLE_KEY])
                index = index.updated(ids, item_vectors(current.model, ids))
                bundle = current
            log.info("index rebuild of %s dropped: the service moved on", bundle.version)
        except Exception:  # a background thread: log it, keep serving the drifted index
            log.exception("index rebuild of %s failed", bundle.version)

    def follow_target(self) -> str | None:
        """The version the holder's ref points at now, or None when it cannot be resolved."""
        try:
            return self.registry.resolve(self.ref)
        except RegistryError:
            return None


MAX_CATCH_UP = 8  # versions a rebuilt index follows before it is dropped as hopelessly behind


def _can_catch_up(old: ModelBundle, new: ModelBundle) -> bool:
    """Whether an index built for ``old`` becomes ``new``'s by updating the rows that differ:
    ``new`` has the same table shape or more items, and an index that drifted (a bundle from
    a full load has a freshly trained one)."""
    before, after = old.state.get(TABLE_KEY), new.state.get(TABLE_KEY)
    if before is None or after is None or new.index.drift() == 0:
        return False
    return after.shape[1:] == before.shape[1:] and after.shape[0] >= before.shape[0]


def _changed_rows(
    before: torch.Tensor, after: torch.Tensor, block: int = 65536
) -> npt.NDArray[np.int64]:
    """Ids of the item rows that differ from table ``before`` to ``after`` (which may have more
    rows: new items), padding excluded; compared a block at a time to bound the memory."""
    old, new = before.numpy(), after.numpy()
    changed = []
    for start in range(0, len(old), block):
        stop = min(start + block, len(old))
        changed.append(start + np.flatnonzero((old[start:stop] != new[start:stop]).any(axis=1)))
    ids = np.concatenate([*changed, np.arange(len(old), len(new))]).astype(np.int64)
    return ids[ids > 0]
