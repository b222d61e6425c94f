"""A loaded model version (engine + index + vocabulary + fallback) and its atomic hot swap.

A request takes a reference to the current :class:`ModelBundle` when it starts and uses only
that bundle until it ends, so swapping ``ModelHolder.current`` (one attribute assignment, atomic
for Python readers) never changes a model under a request: in-flight requests finish on the old
version, new ones start on the new version, and the old one is freed when the last reference
goes.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from recloop.errors import RecloopError, RegistryError, ServingError
from recloop.registry import Registry
from recloop.serve.catalog import ItemCatalog, UserHistory
from recloop.serve.engine import InferenceEngine, build_engine, item_table, warmup
from recloop.serve.index import ItemIndex, build_index

log = logging.getLogger("recloop.serve")

ITEM_COUNTS_FILE = "item_counts.npy"  # written by the trainer's publish
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
    data: Path | None = None  # prepared dataset for known users' history; None = the version's
    cache_dir: Path | None = None  # exported ONNX files, keyed by weights and config


@dataclass
class ModelBundle:
    """Everything one model version needs to answer requests. Immutable once built."""

    version: str
    manifest: dict[str, Any]
    engine: InferenceEngine
    index: ItemIndex
    catalog: ItemCatalog
    history: UserHistory | None
    popular: npt.NDArray[np.int64]  # dense ids, most popular first (fallback for unknown users)
    max_length: int
    load_seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        model = self.manifest.get("model", {})
        return {
            "version": self.version,
            "model_type": model.get("type"),
            "num_items": self.catalog.num_items,
            "max_length": self.max_length,
            "engine": self.engine.name,
            "index": self.index.kind,
            "created_at": self.manifest.get("created_at"),
            "method": self.manifest.get("method"),
            "parent": self.manifest.get("parent"),
            "metrics": {
                k: v
                for k, v in (self.manifest.get("metrics") or {}).items()
                if k.startswith("test/") and ("@10" in k or k.endswith("mrr"))
            },
            "loaded_in_seconds": round(self.load_seconds, 3),
            "history": self.history is not None,
            **self.details,
        }

    def close(self) -> None:
        close = getattr(self.index, "close", None)
        if callable(close):
            close()


def load_bundle(registry: Registry, ref: str, options: LoadOptions) -> ModelBundle:
    """Loads, exports, checks and warms a version. Raises RecloopError and leaves no state."""
    from recloop.models.io import load_model

    started = time.perf_counter()
    version = registry.resolve(ref)
    model, manifest = load_model(registry, version)
    vocabulary = manifest.get("vocabulary") or {}
    if not vocabulary.get("file"):
        raise ServingError(f"version {version} records no item vocabulary; cannot serve it")
    catalog = ItemCatalog.from_parquet(registry.file(version, vocabulary["file"]))
    num_items = int(model.item_embedding.num_items)
    if catalog.num_items != num_items:
        raise ServingError(
            f"version {version}: vocabulary has {catalog.num_items} items but the model has "
            f"{num_items} rows"
        )
    history = _open_history(manifest, catalog, options.data)
    engine = build_engine(
        model,
        kind=options.engine,
        max_batch=options.max_batch,
        threads=options.threads,
        cache_dir=options.cache_dir,
        device=options.device,
        label=version,
    )
    warmup(engine)
    table = item_table(model)
    index_options: dict[str, Any] = {}
    if options.index == "ivf":
        index_options["min_recall"] = options.min_recall
        if not options.remote_shards:  # remote shards take JSON options only
            index_options["tune_queries"] = _sample_queries(engine, history, num_items)
    index = build_index(
        table,
        kind=options.index,
        shards=options.shards,
        remote=options.remote_shards,
        **index_options,
    )
    details: dict[str, Any] = {"shards": options.shards}
    recall = getattr(index, "recall", None)
    if recall is not None:
        details["index_recall_at_10"] = round(float(recall), 4)
    nprobe = getattr(index, "nprobe", None)
    if nprobe is not None:
        details["index_nprobe"] = int(nprobe)
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
        details=details,
    )


def _sample_queries(
    engine: InferenceEngine, history: UserHistory | None, num_items: int, count: int = 256
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
        length = int(rng.integers(1, engine.max_length + 1))
        sequences.append(rng.integers(1, num_items + 1, size=length, dtype=np.int64))
    return np.concatenate(
        [engine.encode(sequences[i : i + 64]).copy() for i in range(0, count, 64)]
    )


def _open_history(
    manifest: dict[str, Any], catalog: ItemCatalog, data: Path | None
) -> UserHistory | None:
    if data is not None:
        return UserHistory.open(data, catalog)
    recorded = (manifest.get("dataset") or {}).get("path")
    if recorded and Path(recorded).is_dir():
        try:
            return UserHistory.open(Path(recorded), catalog)
        except ServingError as exc:  # the recorded dataset moved or changed: serve without it
            log.warning("not using the version's dataset for user history: %s", exc)
    return None


def _popular_items(
    registry: Registry,
    version: str,
    manifest: dict[str, Any],
    history: UserHistory | None,
    num_items: int,
    keep: int = 1000,
) -> npt.NDArray[np.int64]:
    counts: npt.NDArray[np.int64] | None = None
    if ITEM_COUNTS_FILE in manifest.get("files", {}):
        raw = registry.file(version, ITEM_COUNTS_FILE).read_bytes()
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
        if loaded.shape == (num_items + 1,):
            counts = loaded.astype(np.int64)
    if counts is None and history is not None:
        counts = history.item_counts(num_items)
    if counts is None:  # nothing known about popularity: stable id order
        counts = np.zeros(num_items + 1, dtype=np.int64)
    counts = counts.copy()
    counts[0] = -1  # padding is never recommended
    order = np.argsort(-counts, kind="stable")[: min(keep, num_items)]
    return order[order > 0].astype(np.int64)


class ModelHolder:
    """The current bundle, and loading the next one in the background with an atomic swap."""

    def __init__(self, registry: Registry, options: LoadOptions, ref: str) -> None:
        self.registry = registry
        self.options = options
        self.ref = ref
        self.current: ModelBundle | None = None
        self.last_error: str | None = None
        self.swaps = 0
        self._load_lock = threading.Lock()  # one load at a time; a second waits its turn

    def resolve_default(self) -> str:
        return self.registry.resolve(self.ref)

    def load(self, ref: str | None = None) -> tuple[ModelBundle, str | None]:
        """Blocking: loads `ref` (default: the holder's ref), swaps it in, returns
        (new bundle, previous version). On failure the current bundle stays and the error is
        raised. Loading the version already served is a no-op."""
        with self._load_lock:
            target = self.registry.resolve(ref or self.ref)
            current = self.current
            if current is not None and current.version == target:
                return current, current.version
            try:
                bundle = load_bundle(self.registry, target, self.options)
            except RecloopError as exc:
                self.last_error = f"{target}: {exc}"
                raise
            previous = current.version if current is not None else None
            self.current = bundle  # the swap: one reference assignment
            self.swaps += 1
            self.last_error = None
            log.info(
                "serving %s (previous %s), loaded in %.1fs", target, previous, bundle.load_seconds
            )
            return bundle, previous

    def follow_target(self) -> str | None:
        """The version the holder's ref points at now, or None when it cannot be resolved."""
        try:
            return self.registry.resolve(self.ref)
        except RegistryError:
            return None
