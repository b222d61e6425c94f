"""A loaded model version (engine + index + vocabulary + fallback) and its atomic hot swap.

A request takes a reference to the current :class:`ModelBundle` when it starts and uses only
that bundle until it ends, so swapping ``ModelHolder.current`` (one attribute assignment, atomic
for Python readers) never changes a model under a request: in-flight requests finish on the old
version, new ones start on the new version, and the old one is freed when the last reference
goes.

Two ways to the next version. :func:`load_bundle` loads one in full (ONNX export, index build:
seconds). :func:`apply_deltas` moves the served bundle along registry deltas (the online
learner's, every few seconds) in milliseconds to a second: the new bundle shares everything the
deltas do not touch with the old one and copies what they do (see :mod:`recloop.serve.delta`),
reuses the ONNX graph with the new weights, updates the index copy-on-write and extends the
vocabulary. :meth:`ModelHolder.load` takes that path whenever the target descends from the
served version through deltas, and falls back to a full load (logging why) otherwise. Nothing
the old bundle uses is ever written, so requests still running on it are unaffected.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from recloop.data.history import UserHistory
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
from recloop.registry.sidefiles import ITEM_COUNTS_FILE, read_item_counts, vocabulary_path
from recloop.serve.delta import (
    NotApplicable,
    PatchedState,
    check_model_change,
    delta_chain,
    patch_state,
    patched_model,
)
from recloop.serve.engine import (
    TABLE_KEY,
    InferenceEngine,
    build_engine,
    engine_with_weights,
    item_table,
    item_vectors,
    reference_queries,
    warmup,
)
from recloop.serve.index import ItemIndex, build_index

log = logging.getLogger("recloop.serve")

EngineKind = Literal["onnx", "torch", "torch-compiled"]
IndexKind = Literal["exact", "exact-int8", "ivf"]


@dataclass(frozen=True)
class LoadOptions:
    """How the service turns a registry version into a bundle (the `recloop serve` flags)."""

    engine: EngineKind = "onnx"
    index: IndexKind = "exact"
    shards: int = 1
    remote_shards: bool = False
    max_batch: int = 64
    threads: int = 1
    device: str = "cpu"
    min_recall: float = 0.95  # ANN indexes are tuned at load until recall@10 vs exact reaches it
    # IVF: rebuild (re-train the centroids) in the background once this fraction of the items
    # were added or moved by deltas since the last training: they were assigned to centroids
    # that never saw them, and recall drifts down as their share grows.
    rebuild_drift: float = 0.1
    data: Path | None = None  # prepared dataset for known users' history; None = the version's
    cache_dir: Path | None = None  # exported ONNX files, keyed by weights and config

    def __post_init__(self) -> None:
        from recloop.errors import ConfigError

        # The first two messages name the `recloop serve` options, as the command always did.
        if self.engine not in ("onnx", "torch", "torch-compiled"):
            raise ConfigError(
                f"--engine must be onnx, torch or torch-compiled, got {self.engine!r}"
            )
        if self.index not in ("exact", "exact-int8", "ivf"):
            raise ConfigError(f"--index must be exact, exact-int8 or ivf, got {self.index!r}")
        for name in ("shards", "max_batch", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"{name} (--{name.replace('_', '-')}) must be an integer >= 1, got {value!r}"
                )
        if not isinstance(self.remote_shards, bool):
            raise ConfigError(f"remote_shards must be true or false, got {self.remote_shards!r}")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"device (--device) must be cpu or cuda[:N], got {self.device!r}")
        recall, drift = self.min_recall, self.rebuild_drift
        if isinstance(recall, bool) or not isinstance(recall, int | float) or not 0 < recall <= 1:
            raise ConfigError(f"min_recall (--min-recall) must be in (0, 1], got {recall!r}")
        if isinstance(drift, bool) or not isinstance(drift, int | float) or not drift >= 0:
            raise ConfigError(f"rebuild_drift must be a fraction >= 0, got {drift!r}")


@dataclass
class ModelBundle:
    """Everything one model version needs to answer requests. Immutable once built: nothing
    writes to its parts, which lets the next bundle share them (see apply_deltas).

    ``model`` is the torch reference of the engine (parity checks; the engine itself for torch
    engines), ``state`` its weights as CPU tensors: the starting point for deltas.
    """

    version: str
    manifest: Manifest
    engine: InferenceEngine
    index: ItemIndex
    catalog: Vocabulary  # the version's items: raw ids <-> dense ids 1..num_items
    history: UserHistory | None
    popular: npt.NDArray[np.int64]  # dense ids, most popular first (fallback for unknown users)
    max_length: int
    load_seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    model: SequentialEncoder | None = field(default=None, repr=False)
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model_type": self.manifest.model_type,
            "num_items": self.catalog.num_items,
            "max_length": self.max_length,
            "engine": self.engine.name,
            "index": self.index.kind,
            "created_at": self.manifest.created_at,
            "method": self.manifest.method,
            "parent": self.manifest.parent,
            "metrics": {
                k: v
                for k, v in self.manifest.metrics.items()
                if k.startswith("test/") and ("@10" in k or k.endswith("mrr"))
            },
            "loaded_in_seconds": round(self.load_seconds, 3),
            "history": self.history is not None,
            **self.details,
        }

    @property
    def needs_close(self) -> bool:
        """Whether :meth:`close` must run to release something (index shard processes).
        Everything else is freed with the bundle, so a replaced bundle without processes
        need not be kept alive, with all its memory, until a delayed close."""
        shards = getattr(self.index, "shards", [self.index])
        return any(shard.kind == "remote" for shard in shards)

    def close(self) -> None:
        close = getattr(self.index, "close", None)
        if callable(close):
            close()


def load_bundle(registry: Registry, ref: str, options: LoadOptions) -> ModelBundle:
    """Loads, exports, checks and warms a version. Raises RecloopError and leaves no state."""
    from recloop.registry.loading import load_model

    started = time.perf_counter()
    version = registry.resolve(ref)
    model, manifest = load_model(registry, version)
    # Taken before the engine may move the model to a GPU: CPU views of the weights, no copy.
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    if not manifest.vocabulary_file:
        raise ServingError(f"version {version} records no item vocabulary; cannot serve it")
    catalog = _read_catalog(version, vocabulary_path(registry, version, manifest))
    num_items = int(model.item_embedding.num_items)
    _check_catalog(version, catalog, num_items)
    history = _open_history(manifest, catalog, options.data)
    engine = _new_engine(model, options, version)
    index = _build_index(item_table(model), options, engine.encode, history, engine.max_length)
    popular = _popular_items(registry, version, manifest, history, num_items)
    return ModelBundle(
        version=version,
        manifest=manifest,
        engine=engine,
        index=index,
        catalog=catalog,
        history=history,
        popular=popular,
        max_length=int(model.config.max_length),
        load_seconds=time.perf_counter() - started,
        details={"shards": options.shards, **_index_details(index)},
        model=model,
        state=state,
    )


def _read_catalog(version: str, path: Path) -> Vocabulary:
    """The version's item vocabulary with its text lookups built (not in the first request)."""
    try:
        return Vocabulary.read(path, first_id=1).index_text()
    except DatasetError as exc:
        raise ServingError(f"version {version}: {exc}") from None


def _check_catalog(version: str, catalog: Vocabulary, num_items: int) -> None:
    if catalog.num_items != num_items:
        raise ServingError(
            f"version {version}: vocabulary has {catalog.num_items} items but the model has "
            f"{num_items} rows"
        )


Encode = Callable[[list[npt.NDArray[np.int64]]], npt.NDArray[np.float32]]


def _build_index(
    table: npt.NDArray[np.float32],
    options: LoadOptions,
    encode: Encode,
    history: UserHistory | None,
    max_length: int,
) -> ItemIndex:
    """The index over ``table`` for ``options``; an IVF is tuned on queries from ``encode``."""
    index_options: dict[str, Any] = {}
    if options.index == "ivf":
        index_options["min_recall"] = options.min_recall
        if not options.remote_shards:  # remote shards take JSON options only
            num_items = int(table.shape[0]) - 1
            index_options["tune_queries"] = _sample_queries(encode, history, max_length, num_items)
    return build_index(
        table,
        kind=options.index,
        shards=options.shards,
        remote=options.remote_shards,
        **index_options,
    )


def _index_details(index: ItemIndex) -> dict[str, Any]:
    details: dict[str, Any] = {}
    recall = getattr(index, "recall", None)
    if recall is not None:
        details["index_recall_at_10"] = round(float(recall), 4)
    nprobe = getattr(index, "nprobe", None)
    if nprobe is not None:
        details["index_nprobe"] = int(nprobe)
    return details


def _sample_queries(
    encode: Encode,
    history: UserHistory | None,
    max_length: int,
    num_items: int,
    count: int = 256,
) -> npt.NDArray[np.float32]:
    """Query vectors like the ones serving will see, to tune an ANN index's recall: encoded
    histories of random known users, or random item sequences when there is no history."""
    rng = np.random.default_rng(0)
    sequences: list[npt.NDArray[np.int64]] = []
    if history is not None and history.dataset.num_users:
        for user in rng.choice(history.dataset.num_users, size=count * 2).tolist():
            items = history.user_items(user)
            if len(items):
                sequences.append(items)
            if len(sequences) == count:
                break
    while len(sequences) < count:
        length = int(rng.integers(1, max_length + 1))
        sequences.append(rng.integers(1, num_items + 1, size=length, dtype=np.int64))
    # A copy of each chunk: an engine's encode returns a view of a buffer it reuses.
    return np.concatenate([np.array(encode(sequences[i : i + 64])) for i in range(0, count, 64)])


def _open_history(manifest: Manifest, catalog: Vocabulary, data: Path | None) -> UserHistory | None:
    if data is not None:
        try:
            return UserHistory.open(data, catalog)
        except DatasetError as exc:
            raise ServingError(f"user history: {exc}") from None
    recorded = (manifest.dataset or {}).get("path")
    if recorded and Path(recorded).is_dir():
        try:
            return UserHistory.open(Path(recorded), catalog)
        except DatasetError as exc:  # the recorded dataset moved or changed: serve without it
            log.warning("not using the version's dataset for user history: %s", exc)
    return None


def _popular_items(
    registry: Registry,
    version: str,
    manifest: Manifest,
    history: UserHistory | None,
    num_items: int,
    keep: int = 1000,
) -> npt.NDArray[np.int64]:
    counts: npt.NDArray[np.int64] | None = None
    loaded = read_item_counts(registry, version, manifest)
    if loaded is not None and loaded.shape == (num_items + 1,):
        counts = loaded.astype(np.int64)
    if counts is None and history is not None:
        counts = history.item_counts(num_items)
    if counts is None:  # nothing known about popularity: stable id order
        counts = np.zeros(num_items + 1, dtype=np.int64)
    counts = counts.copy()
    counts[0] = -1  # padding is never recommended
    order = _most_popular(counts, min(keep, num_items))
    return order[order > 0].astype(np.int64)


def _most_popular(counts: npt.NDArray[np.int64], keep: int) -> npt.NDArray[np.int64]:
    """The ``keep`` ids of the highest counts, ties by smaller id: the first ``keep`` of a
    stable argsort of ``-counts``, in O(n) (1M items: ~10 ms instead of ~0.2 s per delta)."""
    if keep < len(counts):
        threshold = np.partition(counts, len(counts) - keep)[len(counts) - keep]
        above = np.flatnonzero(counts > threshold)
        tied = np.flatnonzero(counts == threshold)[: keep - len(above)]
        candidates = np.concatenate([above, tied])
    else:
        candidates = np.arange(len(counts))
    order: npt.NDArray[np.int64] = candidates[np.lexsort((candidates, -counts[candidates]))]
    return order


def apply_deltas(
    registry: Registry, current: ModelBundle, target: str, options: LoadOptions
) -> ModelBundle:
    """The bundle of ``target``, a delta (or chain of deltas) on top of ``current``'s version,
    built from ``current`` without changing it (copy-on-write).

    Weights: only the tensors the deltas change are copied and patched. Engine: the same ONNX
    graph with the new weights (no export), or a torch engine on the new model; parity-checked
    against the new model like a full load (EngineParityError refuses the version). Index:
    ``current``'s updated copy-on-write with the changed and new items' vectors. Vocabulary:
    extended with the new items. Popularity: from the version's item_counts.npy, as a full
    load; the served one's when the delta has none. User history: shared (the training
    dataset does not change with deltas; items new to the catalogue are not in it).

    Raises NotApplicable (why) when the target is not such a descendant or changes more than
    weights and the number of items (then load it in full), RecloopError when it is broken.
    """
    started = time.perf_counter()
    if current.model is None or not current.state:
        raise NotApplicable(f"the served bundle of {current.version} keeps no weights")
    if options.remote_shards:
        raise NotApplicable("remote index shards are only built by a full load")
    chain = delta_chain(registry, current.version, target)
    for version, manifest in chain:
        check_model_change(current.manifest.model, manifest.model, version)
    deltas = [(version, *registry.read_delta(version)) for version, _ in chain]
    patched = patch_state(current.state, deltas)
    manifest = chain[-1][1]
    model = patched_model(manifest.model, patched.state)
    num_items = int(model.item_embedding.num_items)
    catalog = _next_catalog(registry, current, target, manifest)
    _check_catalog(target, catalog, num_items)
    engine = _next_engine(current, model, patched, target, options)
    index = _next_index(current, model, patched, engine, options)
    popular = current.popular  # a delta without counts: no news about popularity
    if ITEM_COUNTS_FILE in manifest.files:
        popular = _popular_items(registry, target, manifest, current.history, num_items)
    seconds = time.perf_counter() - started
    rows = patched.table_rows
    return ModelBundle(
        version=target,
        manifest=manifest,
        engine=engine,
        index=index,
        catalog=catalog,
        history=current.history,
        popular=popular,
        max_length=int(model.config.max_length),
        load_seconds=seconds,
        details={
            "shards": options.shards,
            **_index_details(index),
            "applied_delta": True,
            "apply_seconds": round(seconds, 4),
            "delta_from": current.version,
            "deltas_applied": len(chain),
            "changed_tensors": sorted(patched.changed),
            "changed_item_rows": None if rows is None else int(np.count_nonzero(rows)),
            "new_items": num_items - current.catalog.num_items,
            "index_drift": round(index.drift(), 4),
        },
        model=model,
        state=patched.state,
    )


def _next_catalog(
    registry: Registry, current: ModelBundle, target: str, manifest: Manifest
) -> Vocabulary:
    """``current``'s catalogue when the vocabulary file is the same, else extended by the new
    items (a renumbered vocabulary is NotApplicable: a full load builds it from scratch)."""
    name = manifest.vocabulary_file
    if not name:
        raise ServingError(f"version {target} records no item vocabulary; cannot serve it")
    ours = current.manifest.vocabulary_file
    theirs, served = manifest.files.get(name), current.manifest.files.get(ours or "")
    if theirs is not None and served is not None and theirs.sha256 == served.sha256:
        return current.catalog  # the same file: inherited by the delta (hard-linked)
    try:
        return current.catalog.extended(registry.file(target, name))
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
        return _new_engine(model, options, target)
    warmup(engine)
    return engine


def _new_engine(model: SequentialEncoder, options: LoadOptions, label: str) -> InferenceEngine:
    """An engine built (exported, parity-checked) from scratch for `model`, warmed up."""
    engine = build_engine(
        model,
        kind=options.engine,
        max_batch=options.max_batch,
        threads=options.threads,
        cache_dir=options.cache_dir,
        device=options.device,
        label=label,
    )
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
        return _build_index(
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
    the model version it was computed with (see ``recloop.serve.app``), so a swap, including
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
            index = _build_index(
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
                                **_index_details(index),
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
