"""A loaded model version (engine + index + vocabulary + fallback) and how to load one.

:class:`ModelBundle` is what a request uses from start to end: the methods below are its whole
surface for the request path (id translation, the user's training history, popular items, the
batched top-k and similar items), so no caller reaches into the engine or the index.
:func:`load_bundle` loads a version in full (ONNX export, index build: seconds); moving a
served bundle along registry deltas is :mod:`recloop.serve.holder`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from recloop.data.history import UserHistory
from recloop.data.vocabulary import Vocabulary
from recloop.errors import DatasetError, ServingError
from recloop.models.base import SequentialEncoder
from recloop.registry import Manifest, Registry
from recloop.registry.sidefiles import read_item_counts, vocabulary_path
from recloop.serve.engines.base import InferenceEngine
from recloop.serve.engines.export import item_table
from recloop.serve.engines.factory import build_engine, warmup
from recloop.serve.incremental import IncrementalEncoding, check_options, incremental_for
from recloop.serve.indexes.base import MILVUS_NAME, ItemIndex, check_index_uri
from recloop.serve.indexes.factory import build_index
from recloop.serve.state.kv import DEFAULT_KV_BYTES

log = logging.getLogger("recloop.serve")

EngineKind = Literal["onnx", "torch"]
IndexKind = Literal["exact", "exact-int8", "ivf", "milvus", "milvus-ivf"]
MILVUS_KINDS = ("milvus", "milvus-ivf")


@dataclass(frozen=True)
class LoadOptions:
    """How the service turns a registry version into a bundle (the `recloop serve` flags)."""

    engine: EngineKind = "onnx"
    index: IndexKind = "exact"
    shards: int = 1
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
    # milvus: a server URI or a milvus-lite .db file; None = a milvus-lite file the index owns.
    index_uri: str | None = None
    # milvus: the alias searches go through; a full load replaces the collection behind it.
    # Replicas sharing one Milvus server need one alias each (see deploy/README.md).
    index_alias: str | None = None  # None: recloop_items
    # HSTU (position_embedding "none"): encode users from cached keys and values plus their new
    # events (recloop.serve.incremental); "recompute" re-encodes a window that slid (exact),
    # "drop-oldest" keeps the cached positions that stay (approximate). Cache bounded in bytes.
    incremental_encoding: bool = False
    incremental_window: str = "recompute"
    kv_cache_bytes: int = DEFAULT_KV_BYTES
    kv_url: str | None = None  # where the states live: None in-process, redis://... shared

    def __post_init__(self) -> None:
        from recloop.errors import ConfigError

        # The first two messages name the `recloop serve` options, as the command always did.
        if str(self.engine) == "torch-compiled":  # a str from the CLI, whatever the Literal says
            raise ConfigError(
                "--engine torch-compiled was removed: torch.compile measured slower than eager "
                "on CPU (bench/results/train_speed.json) and ONNX Runtime is the fast CPU "
                "engine; choose --engine onnx or --engine torch (eager)"
            )
        if self.engine not in ("onnx", "torch"):
            raise ConfigError(f"--engine must be onnx or torch, got {self.engine!r}")
        if self.index not in ("exact", "exact-int8", "ivf", *MILVUS_KINDS):
            raise ConfigError(
                f"--index must be exact, exact-int8, ivf, milvus or milvus-ivf, got {self.index!r}"
            )
        if self.index_uri is not None:
            if self.index not in MILVUS_KINDS:
                raise ConfigError(
                    f"index_uri (--index-uri) applies to --index milvus or milvus-ivf only, "
                    f"not {self.index!r}"
                )
            try:
                check_index_uri(self.index_uri)
            except ServingError as exc:
                raise ConfigError(str(exc)) from None
        if self.index_alias is not None:
            if self.index not in MILVUS_KINDS:
                raise ConfigError(
                    f"index_alias (--index-alias) applies to --index milvus or milvus-ivf only, "
                    f"not {self.index!r}"
                )
            if not isinstance(self.index_alias, str) or not MILVUS_NAME.fullmatch(self.index_alias):
                raise ConfigError(
                    f"index_alias (--index-alias) must be a Milvus name "
                    f"([A-Za-z_][A-Za-z0-9_]*), got {self.index_alias!r}"
                )
        for name in ("shards", "max_batch", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"{name} (--{name.replace('_', '-')}) must be an integer >= 1, got {value!r}"
                )
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"device (--device) must be cpu or cuda[:N], got {self.device!r}")
        recall, drift = self.min_recall, self.rebuild_drift
        if isinstance(recall, bool) or not isinstance(recall, int | float) or not 0 < recall <= 1:
            raise ConfigError(f"min_recall (--min-recall) must be in (0, 1], got {recall!r}")
        if isinstance(drift, bool) or not isinstance(drift, int | float) or not drift >= 0:
            raise ConfigError(f"rebuild_drift must be a fraction >= 0, got {drift!r}")
        check_options(
            self.incremental_encoding, self.incremental_window, self.kv_cache_bytes, self.kv_url
        )


IdArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]
_NO_ITEMS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class TopK:
    """One recommendation as the batched compute takes it: the user's whole sequence of dense
    ids, most recent last (the engine windows it to its last max_length), k, and the ids never
    to return (None: none)."""

    sequence: IdArray
    k: int
    exclude: IdArray | None
    user: str | None = None  # whose sequence it is (the incremental encoder's cache key)


# eq=False: a bundle is equal to itself only (its bound methods are batch keys, see
# recloop.serve.batcher); comparing two by their arrays would be meaningless anyway.
@dataclass(eq=False)
class ModelBundle:
    """Everything one model version needs to answer requests. Immutable once built: nothing
    writes to its parts, which lets the next bundle share them (see holder.apply_deltas).

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
    # --incremental-encoding: encodes users from their cached keys and values (the one part
    # that changes after build: its store of per-user states, bounded, keyed by version).
    incremental: IncrementalEncoding | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ the request path

    def to_dense(self, raw_ids: Sequence[str]) -> tuple[IdArray, list[str]]:
        """(dense ids of the known raw ids, in order; the unknown raw ids, in order)."""
        return self.catalog.lookup(raw_ids)

    def to_raw(self, ids: IdArray) -> list[str]:
        return self.catalog.raw_strings(ids)

    def user_history(self, user_id: str) -> IdArray:
        """The user's training sequence in dense ids ([] without a dataset or for a new user)."""
        return self.history.items(user_id) if self.history is not None else _NO_ITEMS

    def popular_items(self, k: int) -> IdArray:
        """The k most popular items (dense ids): the answer for a user with no history."""
        return self.popular[:k]

    def top_items(self, requests: Sequence[TopK]) -> list[tuple[IdArray, FloatArray]]:
        """Worker thread: one encode and one search for the whole batch; per request its top-k
        (ids, scores), padded with id 0 when fewer items are eligible."""
        return self.search_batch(requests, self.encode_batch(requests))

    def encode_batch(self, requests: Sequence[TopK]) -> FloatArray:
        """The first half of :meth:`top_items`: the requests' query vectors [B, D], a copy (the
        engine's result is a buffer it reuses), so the search may run on another thread."""
        if self.incremental is not None:
            users = [request.user for request in requests]
            sequences = [request.sequence for request in requests]
            return self.incremental.encode(users, sequences, self.engine.encode)
        return np.array(self.engine.encode([request.sequence for request in requests]))

    def search_batch(
        self, requests: Sequence[TopK], queries: FloatArray
    ) -> list[tuple[IdArray, FloatArray]]:
        """The second half of :meth:`top_items`: each request's top-k from its query vector."""
        k_max = max(request.k for request in requests)
        exclude = [request.exclude for request in requests]
        ids, scores = self.index.search(queries, k_max, exclude)
        return [
            (ids[row, : r.k].copy(), scores[row, : r.k].copy()) for row, r in enumerate(requests)
        ]

    def similar_items(self, item: int, k: int) -> tuple[IdArray, FloatArray]:
        """Worker thread: the k items nearest to dense id ``item`` (itself excluded)."""
        dense = np.array([item], dtype=np.int64)
        ids, scores = self.index.search(self.index.vectors(dense), k, [dense])
        return ids[0], scores[0]

    # ------------------------------------------------------------------ operations

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
        """Whether :meth:`close` must run to release something (a Milvus collection and
        client).
        Everything else is freed with the bundle, so a replaced bundle without processes
        need not be kept alive, with all its memory, until a delayed close."""
        shards = getattr(self.index, "shards", [self.index])
        return any(shard.kind == "milvus" for shard in shards)

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
    incremental = incremental_for(
        model,
        version,
        options.incremental_encoding,
        options.incremental_window,
        options.kv_cache_bytes,
        options.kv_url,
    )  # before the export: a model that cannot is refused at once
    # Taken before the engine may move the model to a GPU: CPU views of the weights, no copy.
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    if not manifest.vocabulary_file:
        raise ServingError(f"version {version} records no item vocabulary; cannot serve it")
    catalog = _read_catalog(version, vocabulary_path(registry, version, manifest))
    num_items = int(model.item_embedding.num_items)
    check_catalog(version, catalog, num_items)
    history = _open_history(manifest, catalog, options.data)
    engine = new_engine(model, options, version)
    index = index_for(item_table(model), options, engine.encode, history, engine.max_length)
    popular = popular_items(registry, version, manifest, history, num_items)
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
        details={"shards": options.shards, **index_details(index)},
        model=model,
        state=state,
        incremental=incremental,
    )


def _read_catalog(version: str, path: Path) -> Vocabulary:
    """The version's item vocabulary with its text lookups built (not in the first request)."""
    try:
        return Vocabulary.read(path, first_id=1).index_text()
    except DatasetError as exc:
        raise ServingError(f"version {version}: {exc}") from None


def check_catalog(version: str, catalog: Vocabulary, num_items: int) -> None:
    if catalog.num_items != num_items:
        raise ServingError(
            f"version {version}: vocabulary has {catalog.num_items} items but the model has "
            f"{num_items} rows"
        )


Encode = Callable[[list[npt.NDArray[np.int64]]], npt.NDArray[np.float32]]


def index_for(
    table: npt.NDArray[np.float32],
    options: LoadOptions,
    encode: Encode,
    history: UserHistory | None,
    max_length: int,
) -> ItemIndex:
    """The index over ``table`` for ``options``; an IVF is tuned on queries from ``encode``."""
    index_options: dict[str, Any] = {}
    num_items = int(table.shape[0]) - 1
    if options.index in MILVUS_KINDS:
        index_options["uri"] = options.index_uri
        if options.index_alias is not None:
            index_options["alias"] = options.index_alias
    if options.index in ("ivf", "milvus-ivf"):
        index_options["min_recall"] = options.min_recall
    if options.index in ("ivf", *MILVUS_KINDS):  # recall tuned (IVF) or measured (FLAT) on them
        index_options["tune_queries"] = _sample_queries(encode, history, max_length, num_items)
    return build_index(
        table,
        kind=options.index,
        shards=options.shards,
        **index_options,
    )


def index_details(index: ItemIndex) -> dict[str, Any]:
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


def popular_items(
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


def new_engine(model: SequentialEncoder, options: LoadOptions, label: str) -> InferenceEngine:
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
