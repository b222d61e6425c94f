"""Inference engines: users' item sequences in, query vectors for the item index out.

An engine wraps one model version as ``prepare_query(encode(ids))`` and runs it on fixed-size
input buffers. Requests vary in batch size and history length, so an engine keeps one
preallocated bucket per (batch size, window length) pair: batch sizes are powers of two up to
``max_batch`` (plus ``max_batch`` itself), window lengths powers of two from 8 up to the model's
``max_length`` (plus ``max_length`` itself). A call picks the smallest bucket that fits, writes
the sequences right-aligned (left padding, as the models expect) into that bucket's int64 input
buffer and runs the model into the bucket's float32 output buffer. Nothing is allocated per
request on the hot path, and the runtime (ONNX Runtime, or torch) sees a handful of shapes only,
so its shape-dependent caches stay warm.

Engines:

- ``onnx`` (:class:`OnnxEngine`): the model exported with the torch dynamo exporter (dynamic
  batch and length) and run by ONNX Runtime on CPU, reading and writing our numpy buffers in
  place through IOBinding. The default for serving.
- ``torch`` / ``torch-compiled`` (:class:`TorchEngine`): the torch module itself, eager or
  through ``torch.compile``; also runs on CUDA.

:func:`build_engine` checks every new engine against the torch reference on random sequences
(:func:`check_parity`) and refuses one that disagrees, so a stale ONNX cache file, a broken
export or a wrong model never serves.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import itertools
import json
import logging
import os
import sys
import tempfile
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from recloop.data.sequences import PADDING_ID
from recloop.errors import EngineParityError, ServingError
from recloop.models.base import SequentialEncoder

log = logging.getLogger("recloop.serve")

ENGINE_KINDS = ("onnx", "torch", "torch-compiled")
MIN_LENGTH_BUCKET = 8  # shorter windows save little compute and would add buckets
MAX_EXPORT_BATCH = 4096  # upper bound of the exported graph's dynamic batch dimension
# Bump when the exported graph changes for the same weights (wrapper, export options), so that
# cached files from an older recipe are not reused.
# 2: weights keep their state-dict names (substitutable), the item table is an input.
EXPORT_RECIPE = 2
TABLE_KEY = "item_embedding.weight"  # the item table's state-dict key, in every model
TABLE_INPUT = "item_table"  # the exported graph's input that takes the item table
_WEIGHT_PREFIX = "model."  # QueryModule holds the model as `model`: its weights' names in a graph
_WEIGHTS_METADATA = "recloop.weights"  # ONNX metadata: JSON {state-dict key: initializer name}
# A correct engine agrees with torch to ~1e-6 (observed); a wrong model is off by >1e-2.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-3
PARITY_SAMPLES = 96  # random sequences on top of the fixed edge cases
# An engine that reuses a checked graph with new weights (engine_with_weights) only needs to
# show that the weights reached it: one batch of random sequences (a wrong or stale dense
# tensor is off everywhere), plus sequences of the changed item rows (a stale table is off
# there only). The edge cases test the graph and the engine code, checked at the full load.
REWEIGHT_PARITY_SAMPLES = 32
FOCUS_SAMPLES = 8
# Loggers that print noise during export (e.g. "torchvision is not installed").
_EXPORT_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._dynamo",
    "torch.fx",
    "onnxscript",
    "onnx_ir",
)

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]


# --------------------------------------------------------------------------------------------
# Buckets and the engine base class


@dataclass(eq=False)
class Bucket:
    """Preallocated input and output buffers for one (batch, length) shape and how to run them.

    ``run`` computes ``out`` from ``ids`` in place. ``direct_output`` says whether the runtime
    writes into ``out`` itself (ONNX Runtime with IOBinding) or its result is copied there.
    """

    batch: int
    length: int
    ids: IdArray  # [batch, length], left-padded with PADDING_ID
    out: FloatArray  # [batch, dim]
    run: Callable[[], None]
    direct_output: bool = False


def power_of_two_buckets(start: int, limit: int) -> tuple[int, ...]:
    """start, 2*start, 4*start, ... below ``limit``, then ``limit`` itself (sorted, unique).

    ``limit < start`` gives ``(limit,)``: the whole range is one bucket.
    """
    sizes = []
    size = start
    while size < limit:
        sizes.append(size)
        size *= 2
    sizes.append(limit)
    return tuple(sizes)


class InferenceEngine(ABC):
    """Turns item sequences into query vectors on preallocated per-bucket buffers.

    Thread safety: an engine is meant to be used by ONE worker thread at a time (the serving
    batcher has one compute thread). A lock serialises calls anyway so that two threads can
    never interleave writes into the same buffer, but the array that :meth:`encode` returns is
    a view of a bucket buffer and is only valid until the next call: copy it to keep it.
    """

    name: str  # "onnx" | "torch" | "torch-compiled"

    def __init__(
        self, *, dim: int, max_length: int, num_items: int, max_batch: int, label: str
    ) -> None:
        if not 1 <= max_batch <= MAX_EXPORT_BATCH:
            raise ServingError(
                f"{self.name} engine for {label}: max_batch={max_batch} must be in "
                f"1..{MAX_EXPORT_BATCH}"
            )
        self.dim = dim
        self.max_length = max_length
        self.num_items = num_items
        self.max_batch = max_batch
        self.label = label
        self.batch_sizes = power_of_two_buckets(1, max_batch)
        self.lengths = power_of_two_buckets(MIN_LENGTH_BUCKET, max_length)
        # Created lazily on first use (or all at once by warmup), then reused forever.
        self.buckets: dict[tuple[int, int], Bucket] = {}
        # Preallocated output for batches split across length buckets (_encode_by_length).
        self._result = np.zeros((max_batch, dim), dtype=np.float32)
        self._lock = threading.Lock()

    @abstractmethod
    def _new_bucket(self, batch: int, length: int) -> Bucket:
        """Allocates the buffers of one bucket and binds them to the runtime."""

    def with_weights(
        self, model: SequentialEncoder, changed: Collection[str], *, label: str
    ) -> InferenceEngine:
        """A new engine of this kind and settings for ``model``: the same architecture as this
        engine's model, with the state-dict entries ``changed`` different (the item table may
        have grown). This engine is left as it is. Not parity-checked: see
        :func:`engine_with_weights`. ServingError when the engine cannot (build a new one)."""
        raise ServingError(f"{self.name} engine for {label}: cannot take new weights")

    def encode(self, sequences: Sequence[npt.NDArray[np.integer[Any]]]) -> FloatArray:
        """[len(sequences), dim] float32 query vectors, one per sequence.

        Each sequence is a 1-D array of dense item ids in 1..num_items, most recent last; only
        the last ``max_length`` items are used. Up to ``max_batch`` sequences, the result is a
        view of a bucket's output buffer, valid until the next call; more are encoded in chunks
        into a new array. Raises ServingError for an empty sequence or an id out of range.
        """
        windows = [self._window(row, sequence) for row, sequence in enumerate(sequences)]
        if not windows:
            return np.empty((0, self.dim), dtype=np.float32)
        with self._lock:
            if len(windows) <= self.max_batch:
                return self._encode_by_length(windows)
            result = np.empty((len(windows), self.dim), dtype=np.float32)
            for start in range(0, len(windows), self.max_batch):
                chunk = windows[start : start + self.max_batch]
                result[start : start + len(chunk)] = self._encode_by_length(chunk)
            return result

    def _encode_by_length(self, windows: list[IdArray]) -> FloatArray:
        """One run per length bucket present. Cost grows with batch x length, and real
        histories are mostly short with a long tail: one long sequence would otherwise make
        the whole batch pay for max_length (e.g. 15 x 8 + 1 x 50 instead of 16 x 50)."""
        groups: dict[int, list[int]] = {}
        for row, window in enumerate(windows):
            length = self.lengths[bisect.bisect_left(self.lengths, window.size)]
            groups.setdefault(length, []).append(row)
        if len(groups) == 1:
            return self._encode_chunk(windows)
        result = self._result[: len(windows)]
        for rows in groups.values():
            result[rows] = self._encode_chunk([windows[row] for row in rows])
        return result

    def warmup(self) -> None:
        """Creates and runs every bucket once, so first requests pay no allocation or
        runtime-side optimisation (ORT and torch.compile specialise on first sight of a shape)."""
        with self._lock:
            for batch in self.batch_sizes:
                for length in self.lengths:
                    bucket = self._bucket(batch, length)
                    bucket.ids[:] = PADDING_ID
                    bucket.ids[:, -1] = 1  # a real item, so the run is a realistic one
                    bucket.run()

    def _window(self, row: int, sequence: npt.NDArray[np.integer[Any]]) -> IdArray:
        """The last max_length ids of one sequence, validated (cheap numpy checks only)."""
        array = np.asarray(sequence)
        if array.size == 0:  # before the dtype check: np.asarray([]) is float64
            raise ServingError(f"{self.name} engine: sequence {row} is empty")
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ServingError(
                f"{self.name} engine: sequence {row} must be a 1-D integer array, got "
                f"shape {array.shape} dtype {array.dtype}"
            )
        offset = max(0, array.size - self.max_length)
        window = array[offset:]
        bad = (window < 1) | (window > self.num_items)
        if bad.any():
            position = int(np.flatnonzero(bad)[0])
            raise ServingError(
                f"{self.name} engine: sequence {row}, position {offset + position}: item id "
                f"{int(window[position])} is outside 1..{self.num_items}"
            )
        return window.astype(np.int64, copy=False)

    def _bucket(self, batch: int, length: int) -> Bucket:
        bucket = self.buckets.get((batch, length))
        if bucket is None:
            bucket = self._new_bucket(batch, length)
            self.buckets[(batch, length)] = bucket
        return bucket

    def _encode_chunk(self, windows: list[IdArray]) -> FloatArray:
        rows = len(windows)
        longest = max(window.size for window in windows)
        batch = self.batch_sizes[bisect.bisect_left(self.batch_sizes, rows)]
        length = self.lengths[bisect.bisect_left(self.lengths, longest)]
        bucket = self._bucket(batch, length)
        ids = bucket.ids
        # Rows past `rows` keep stale (valid) ids from earlier calls: they are computed and
        # dropped, which is cheaper than clearing them. Models encode rows independently.
        ids[:rows] = PADDING_ID
        for row, window in enumerate(windows):
            ids[row, length - window.size :] = window
        bucket.run()
        return bucket.out[:rows]


def _empty_buffers(batch: int, length: int, dim: int) -> tuple[IdArray, FloatArray]:
    return np.zeros((batch, length), dtype=np.int64), np.zeros((batch, dim), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# The module that engines run


class QueryModule(nn.Module):
    """ids [B, L] -> query vectors [B, D]: the model's user vector as it enters the dot product
    with the item table (normalised / temperature-scaled when the model is configured so)."""

    def __init__(self, model: SequentialEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        query: torch.Tensor = self.model.item_embedding.prepare_query(self.model.encode(ids))
        return query


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _model_shape(model: SequentialEncoder) -> tuple[int, int, int]:
    """(dim of the query vectors, max_length, num_items)."""
    embedding = model.item_embedding
    return int(embedding.dim), int(model.config.max_length), int(embedding.num_items)


# --------------------------------------------------------------------------------------------
# ONNX export and its cache


@contextlib.contextmanager
def quiet_export(extra_loggers: tuple[str, ...] = ()) -> Iterator[None]:
    """Silences torch's warnings and log lines during an ONNX export or ``torch.compile``.

    Both are process-global settings, restored on exit; this runs at model load, and hiding
    another thread's warnings for those seconds is harmless.
    """
    loggers = [logging.getLogger(name) for name in (*_EXPORT_LOGGERS, *extra_loggers)]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def export_onnx(model: SequentialEncoder, path: Path) -> Path:
    """Exports ``prepare_query(encode(ids))`` to an ONNX file at ``path`` and returns it.

    Dynamo exporter; dynamic batch (1..MAX_EXPORT_BATCH) and length (2..max_length; length 1
    would be specialised by the exporter, so engines never feed less than 2). The item table is
    not stored: it is the graph input ``item_table`` [rows, D] with a dynamic row count, so a
    catalogue that grows (online deltas) runs on the same graph and the file stays small. The
    other weights are stored inside the file (no external data, so at most 2 GB) under their
    state-dict names (see :func:`_keep_weight_names`), listed in the ``recloop.weights``
    metadata, so that an engine for new weights substitutes them instead of exporting again.
    """
    _, max_length, _ = _model_shape(model)
    if _model_device(model).type != "cpu":
        model = copy.deepcopy(model).cpu()  # export traces on CPU; leave the caller's model
    module = QueryModule(model).eval()
    # Batch 2, not 1: the exporter specialises dimensions whose example size is 0 or 1.
    example = torch.ones((2, max(2, min(MIN_LENGTH_BUCKET, max_length))), dtype=torch.int64)
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)}
    if max_length >= 2:
        dims[1] = torch.export.Dim("length", min=2, max=max_length)
    else:  # a one-item window: the length is static
        example = torch.ones((2, 1), dtype=torch.int64)
    try:
        with quiet_export():
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                dynamic_shapes={"ids": dims},
                input_names=["ids"],
                output_names=["query"],
                verbose=False,
                optimize=False,  # _keep_weight_names optimises, without folding the weights
            )
            if program is None:  # only the legacy exporter returns None
                raise ServingError("torch.onnx.export returned no program")
            _keep_weight_names(program, list(model.state_dict()))
            program.save(path, external_data=False)
    except ServingError:
        raise
    except Exception as error:  # the exporter raises many types; report them as one
        raise ServingError(f"ONNX export of {type(model).__name__} failed: {error}") from error
    return Path(path)


def _keep_weight_names(program: Any, keys: list[str]) -> None:
    """Optimises the exported graph with every weight left as a named initializer, and turns
    the item table into the dynamic graph input ``item_table``.

    The exporter's optimiser would fold weights into new anonymous constants (a Linear's
    ``W`` becomes ``val_24 = W^T``) and merge equal ones, after which no initializer can be
    swapped for a new version's tensor. Listing the weights as graph inputs during the pass
    makes them non-constant to it; ONNX Runtime folds the same transposes itself when it
    loads the file, so the served graph runs as fast (measured: the same per-batch time).
    """
    import onnx_ir as ir  # the exporter's IR library; needed only here

    graph = program.model.graph
    names = {_WEIGHT_PREFIX + key: key for key in keys}
    weights = [value for name, value in graph.initializers.items() if name in names]
    graph.inputs.extend(weights)
    program.optimize()
    graph = program.model.graph
    for value in weights:
        graph.inputs.remove(value)
    table = graph.initializers.get(_WEIGHT_PREFIX + TABLE_KEY)
    if table is None:
        raise ServingError(f"the exported graph has no {TABLE_KEY} initializer to feed")
    graph.initializers.pop(table.name)
    table.const_value = None
    table.name = TABLE_INPUT
    table.shape = ir.Shape(["rows", int(table.shape[1])])  # [num_items + 1, D], rows dynamic
    graph.inputs.append(table)
    kept = {names[name]: name for name in graph.initializers if name in names}
    program.model.metadata_props[_WEIGHTS_METADATA] = json.dumps(kept, sort_keys=True)


def model_fingerprint(model: SequentialEncoder) -> str:
    """sha256 of the weights, the model config, the model's source code, the torch version and
    the export recipe: a cached export is reused only for exactly the same computation."""
    digest = hashlib.sha256()
    config = model.config
    is_instance = dataclasses.is_dataclass(config) and not isinstance(config, type)
    described = dataclasses.asdict(config) if is_instance else repr(config)
    header = {
        "class": type(model).__name__,
        "config": described,
        "torch": torch.__version__,
        "recipe": EXPORT_RECIPE,
        # The graph is traced from the code: a changed forward/encode must not reuse a file.
        "source": hashlib.sha256(
            inspect.getsource(sys.modules[type(model).__module__]).encode()
        ).hexdigest(),
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def onnx_cache_path(model: SequentialEncoder, cache_dir: Path) -> Path:
    """Where the exported file of this exact model lives in ``cache_dir``."""
    return Path(cache_dir) / f"{type(model).__name__.lower()}-{model_fingerprint(model)[:32]}.onnx"


def _cached_export(model: SequentialEncoder, cache_dir: Path) -> Path:
    """The cached ONNX file for ``model``, exporting it first when absent (atomic write)."""
    target = onnx_cache_path(model, cache_dir)
    if target.is_file():
        log.info("onnx engine: reusing cached export %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same directory + rename: a reader (another worker loading the same
    # version) sees either no file or a complete one, never a half-written one.
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".export-", suffix=".onnx")
    os.close(handle)
    try:
        export_onnx(model, Path(temporary))
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return target


# --------------------------------------------------------------------------------------------
# ONNX Runtime engine


class OnnxEngine(InferenceEngine):
    """ONNX Runtime on CPU, reading and writing the bucket buffers in place through IOBinding.

    The item table is fed to the graph as an input (bound once per bucket, zero-copy from the
    model's own tensor); the other weights live in the graph under their state-dict names, so
    :meth:`with_weights` makes an engine for a version that differs only in weights, or in the
    number of items, without a new export.
    """

    name = "onnx"

    def __init__(
        self,
        source: Path | bytes,
        *,
        table: npt.NDArray[Any],
        dim: int,
        max_length: int,
        num_items: int,
        max_batch: int = 64,
        threads: int = 1,
        label: str = "model",
        session: Any = None,
    ) -> None:
        """``table``: the model's ``item_embedding.weight`` (kept, not copied): float32
        [num_items + 1, dim], or the codes of a compressed table (recloop.compress).
        ``session``: an ONNX Runtime session of ``source`` to share instead of creating one
        (ORT sessions run concurrently; the engines' bindings are their own).
        """
        super().__init__(
            dim=dim, max_length=max_length, num_items=num_items, max_batch=max_batch, label=label
        )
        import onnxruntime as ort

        self._ort = ort
        self.threads = threads
        self.source = source.read_bytes() if isinstance(source, Path) else source
        if table.ndim != 2:
            raise ServingError(
                f"onnx engine for {label}: the item table must be 2-D, got {list(table.shape)}"
            )
        self.table = np.ascontiguousarray(table)
        self.session = session if session is not None else self._new_session(label)
        # A shared session has run every bucket shape already: warmup only binds buckets, and
        # whether ORT writes a shape's output in place is known (see with_weights).
        self._warm_session = session is not None
        self._known_direct: dict[tuple[int, int], bool] = {}
        self.weight_names = self._weight_names()
        self._table_value = ort.OrtValue.ortvalue_from_numpy(self.table)

    def _new_session(self, label: str) -> Any:
        ort = self._ort
        options = ort.SessionOptions()
        # Serving shares 2 cores with the HTTP loop: one intra-op thread by default, no
        # inter-op parallelism (the graph is a chain), and no spinning threads that would
        # burn the event loop's core while waiting for work.
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        try:
            return ort.InferenceSession(self.source, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # ORT raises its own exception types
            raise ServingError(
                f"onnx engine for {label}: cannot load the model: {error}"
            ) from error

    def _weight_names(self) -> dict[str, str]:
        metadata = self.session.get_modelmeta().custom_metadata_map
        return _parse_weight_names(metadata.get(_WEIGHTS_METADATA), self.label)

    @classmethod
    def from_model(
        cls,
        model: SequentialEncoder,
        *,
        max_batch: int = 64,
        threads: int = 1,
        cache_dir: Path | None = None,
        label: str = "model",
    ) -> OnnxEngine:
        """Exports ``model`` (or reuses the export cached in ``cache_dir``) and loads it."""
        dim, max_length, num_items = _model_shape(model)
        source: Path | bytes
        if cache_dir is not None:
            source = _cached_export(model, cache_dir)
        else:  # export to a scratch directory and keep only the bytes
            with tempfile.TemporaryDirectory(prefix="recloop-onnx-") as scratch:
                source = export_onnx(model, Path(scratch) / "model.onnx").read_bytes()
        return cls(
            source,
            table=_table_array(model, label),
            dim=dim,
            max_length=max_length,
            num_items=num_items,
            max_batch=max_batch,
            threads=threads,
            label=label,
        )

    def with_weights(
        self, model: SequentialEncoder, changed: Collection[str], *, label: str
    ) -> OnnxEngine:
        """An engine on the same graph for ``model``, whose state dict differs from this
        engine's model in the entries ``changed`` only (the item table may have more rows).

        Only the item table changed: the session is shared (nothing to load). Otherwise a new
        session on this graph with the stored weights rewritten by name (not ORT's
        ``add_initializer``: ORT folds a Linear's transposed weight before applying those, so
        the old one would stay). Raises ServingError when a changed weight is not stored
        under its name (then a new export is the only way).
        """
        dense = sorted(set(changed) - {TABLE_KEY})
        missing = [key for key in dense if key not in self.weight_names]
        if missing:
            raise ServingError(
                f"onnx engine for {label}: weights {missing[:3]} are not stored under their "
                "names in the exported graph; they cannot be substituted"
            )
        dim, max_length, num_items = _model_shape(model)
        engine = OnnxEngine(
            _with_initializers(self.source, model, self.weight_names, label)
            if dense
            else self.source,
            table=_table_array(model, label),
            dim=dim,
            max_length=max_length,
            num_items=num_items,
            max_batch=self.max_batch,
            threads=self.threads,
            label=label,
            session=None if dense else self.session,
        )
        if not dense:
            engine._known_direct = {key: b.direct_output for key, b in self.buckets.items()}
        return engine

    def warmup(self) -> None:
        """As :meth:`InferenceEngine.warmup`; on a shared, warm session it only creates the
        buckets (bindings; no runs): 28 runs of a 12k-item SASRec took ~0.1 s per delta."""
        if not self._warm_session:
            super().warmup()
            return
        with self._lock:
            for batch in self.batch_sizes:
                for length in self.lengths:
                    self._bucket(batch, length)

    def _new_bucket(self, batch: int, length: int) -> Bucket:
        ort = self._ort
        ids, out = _empty_buffers(batch, length, self.dim)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("ids", ort.OrtValue.ortvalue_from_numpy(ids))
        binding.bind_ortvalue_input(TABLE_INPUT, self._table_value)
        binding.bind_ortvalue_output("query", ort.OrtValue.ortvalue_from_numpy(out))
        direct = self._known_direct.get((batch, length))
        if direct is None:
            direct = self._writes_in_place(binding, ids, out)
        if not direct:
            # ORT is free to ignore a bound output buffer (e.g. when an output aliases another
            # tensor); then its result lives in ORT memory and we copy it into ours.
            log.warning(
                "onnx engine for %s: ORT does not write into the bound output of bucket "
                "(%d, %d); copying its results",
                self.label,
                batch,
                length,
            )

        session = self.session  # not `self`: a bucket that refers back to its engine would be
        # a reference cycle, which only the cyclic GC frees (never, once gc.freeze()-d)

        def run() -> None:
            session.run_with_iobinding(binding)
            if not direct:
                out[...] = binding.get_outputs()[0].numpy()

        return Bucket(batch, length, ids, out, run, direct_output=direct)

    def _writes_in_place(self, binding: Any, ids: IdArray, out: FloatArray) -> bool:
        """Runs the bucket once with NaN in ``out``: did ORT fill our buffer itself?"""
        ids[:, -1] = 1
        out.fill(np.nan)
        self.session.run_with_iobinding(binding)
        result = binding.get_outputs()[0]
        same_memory = bool(result.data_ptr() == out.ctypes.data)
        ids[:] = PADDING_ID
        return same_memory and bool(np.isfinite(out).all())


def _parse_weight_names(text: str | None, label: str) -> dict[str, str]:
    if text is None:
        raise ServingError(
            f"onnx engine for {label}: the model has no {_WEIGHTS_METADATA} metadata; it was "
            f"not exported by this recloop version (export recipe {EXPORT_RECIPE})"
        )
    names = json.loads(text)
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise ServingError(f"onnx engine for {label}: malformed {_WEIGHTS_METADATA} metadata")
    return {str(key): value for key, value in names.items()}


def _with_initializers(
    source: bytes, model: SequentialEncoder, names: Mapping[str, str], label: str
) -> bytes:
    """``source`` (an ONNX file) with every stored weight replaced by ``model``'s: the file an
    export of ``model`` would give, in milliseconds (the item table is not in the file)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(source)
    keys = {name: key for key, name in names.items()}
    state = model.state_dict()
    for initializer in proto.graph.initializer:
        key = keys.get(initializer.name)
        if key is None:
            continue
        try:
            array = state[key].detach().cpu().numpy()
        except TypeError as error:  # e.g. bfloat16, which numpy has no type for
            raise ServingError(
                f"onnx engine for {label}: weight {key} ({state[key].dtype}) cannot be "
                f"stored: {error}"
            ) from None
        initializer.CopyFrom(numpy_helper.from_array(array, initializer.name))
    data: bytes = proto.SerializeToString()
    return data


def _table_array(model: SequentialEncoder, label: str) -> npt.NDArray[Any]:
    """The model's item table as fed to the graph: its own memory, not a copy (CPU models)."""
    weight = model.item_embedding.weight.detach().cpu()
    try:
        return np.ascontiguousarray(weight.numpy())
    except TypeError as error:  # e.g. bfloat16, which numpy has no type for
        raise ServingError(
            f"onnx engine for {label}: the item table ({weight.dtype}) cannot be fed: {error}"
        ) from None


# --------------------------------------------------------------------------------------------
# torch engine


class TorchEngine(InferenceEngine):
    """The torch module itself (eager, or ``torch.compile``d), on CPU or CUDA.

    On CPU the module reads the numpy input buffer through a tensor that shares its memory; on
    CUDA each bucket also has a device input tensor, and host buffers are pinned for the copies.
    """

    def __init__(
        self,
        model: SequentialEncoder,
        *,
        max_batch: int = 64,
        threads: int | None = None,
        device: str = "cpu",
        compile: bool = False,
        label: str = "model",
    ) -> None:
        self.name = "torch-compiled" if compile else "torch"
        dim, max_length, num_items = _model_shape(model)
        super().__init__(
            dim=dim, max_length=max_length, num_items=num_items, max_batch=max_batch, label=label
        )
        self.device = _torch_device(device, label)
        if threads is not None:
            # Process-global: only when asked, since the same process may also train.
            torch.set_num_threads(threads)
        module = QueryModule(model).to(self.device).eval()
        self.module: Callable[[torch.Tensor], torch.Tensor] = module
        if compile:
            # dynamic=True: one graph for all buckets instead of one compilation per shape.
            # Quiet: importing inductor warns about deprecated torch internals.
            with quiet_export():
                self.module = torch.compile(module, dynamic=True)

    def _new_bucket(self, batch: int, length: int) -> Bucket:
        on_cuda = self.device.type == "cuda"
        # Host buffers are torch tensors viewed as numpy (shared memory); pinned for fast
        # host <-> device copies on CUDA.
        ids_host = torch.zeros((batch, length), dtype=torch.int64, pin_memory=on_cuda)
        out_host = torch.zeros((batch, self.dim), dtype=torch.float32, pin_memory=on_cuda)
        ids_device = torch.zeros((batch, length), dtype=torch.int64, device=self.device)
        ids_input = ids_device if on_cuda else ids_host
        module = self.module

        def run() -> None:
            with torch.inference_mode():
                if on_cuda:
                    ids_device.copy_(ids_host, non_blocking=True)
                out_host.copy_(module(ids_input))  # synchronises with the device on CUDA

        return Bucket(batch, length, ids_host.numpy(), out_host.numpy(), run)

    def with_weights(
        self, model: SequentialEncoder, changed: Collection[str], *, label: str
    ) -> TorchEngine:
        """The new model in a new engine (the torch module is the model: nothing to reuse)."""
        return TorchEngine(
            model,
            max_batch=self.max_batch,
            device=str(self.device),
            compile=self.name == "torch-compiled",
            label=label,
        )


def _torch_device(device: str, label: str) -> torch.device:
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ServingError(f"torch engine for {label}: bad device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ServingError(f"torch engine for {label}: device {device!r} but CUDA is unavailable")
    if resolved.type not in ("cpu", "cuda"):
        raise ServingError(f"torch engine for {label}: device {device!r}; use cpu or cuda")
    return resolved


# --------------------------------------------------------------------------------------------
# Parity check, construction, item table, warmup


@dataclass(frozen=True)
class ParityReport:
    """Engine vs torch reference on random sequences.

    max_rel_error is max |engine - reference| / max(|reference|, atol), so elements near zero
    do not dominate it. passed: every element within atol + rtol * |reference|, all finite.
    """

    max_abs_error: float
    max_rel_error: float
    samples: int
    passed: bool
    atol: float = PARITY_ATOL
    rtol: float = PARITY_RTOL


def _parity_batches(
    engine: InferenceEngine,
    num_samples: int,
    seed: int,
    edge_cases: bool = True,
    focus: IdArray | None = None,
) -> list[list[IdArray]]:
    """Random batches covering length 1, short, exactly max_length and longer (truncated),
    and batch sizes 1, odd, and past max_batch (chunked): the edge cases one by one, then
    ``num_samples`` sequences of random lengths in batches of assorted sizes. Without
    ``edge_cases``: the random sequences only, in one batch, plus (``focus``) sequences of
    the given items only."""
    rng = np.random.default_rng(seed)
    max_length = engine.max_length
    lengths = [1, 2, min(3, max_length), max_length, max_length + 5]

    def sequence(length: int | None = None, items: IdArray | None = None) -> IdArray:
        size = length if length is not None else int(rng.integers(1, max_length + 6))
        if items is not None:
            return rng.choice(items, size=size).astype(np.int64)
        return rng.integers(1, engine.num_items + 1, size=size, dtype=np.int64)

    if not edge_cases:
        batch = [sequence() for _ in range(num_samples)]
        if focus is not None and len(focus):
            batch += [sequence(items=focus) for _ in range(FOCUS_SAMPLES)]
        return [batch]
    batches = [[sequence(length)] for length in lengths]  # batch 1, each length alone
    batches.append([sequence(length) for length in lengths])  # odd, mixed lengths
    sizes = itertools.cycle((3, engine.max_batch + 3, 1, 7))
    remaining = num_samples
    while remaining > 0:
        size = min(next(sizes), remaining)
        batches.append([sequence() for _ in range(size)])
        remaining -= size
    return batches


def reference_queries(model: SequentialEncoder, batch: Sequence[IdArray]) -> FloatArray:
    """prepare_query(encode(ids)) in torch fp32, each window left-padded to max_length."""
    max_length = int(model.config.max_length)
    padded = np.full((len(batch), max_length), PADDING_ID, dtype=np.int64)
    for row, sequence in enumerate(batch):
        window = sequence[-max_length:]
        padded[row, max_length - window.size :] = window
    ids = torch.from_numpy(padded).to(_model_device(model))
    with torch.inference_mode(), _one_torch_thread():
        query = QueryModule(model)(ids).float().cpu().numpy()
    result: FloatArray = query
    return result


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread while inside. The reference runs beside serving (parity check
    of a new version, on the loader thread): on 2 shared cores, a second OpenMP thread made a
    64 x 50 batch 20x slower (0.23 s vs 0.011 s), and stole the serving thread's core. With
    OpenMP the setting is per thread once a thread has run torch, so serving threads keep theirs.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_parity(
    engine: InferenceEngine,
    model: SequentialEncoder,
    *,
    num_samples: int = PARITY_SAMPLES,
    seed: int = 0,
    atol: float = PARITY_ATOL,
    rtol: float = PARITY_RTOL,
    edge_cases: bool = True,
    focus: IdArray | None = None,
) -> ParityReport:
    """Compares ``engine`` with the torch reference ``model`` (in eval mode) on random
    sequences of assorted lengths and batch sizes: a fixed set of edge cases plus
    ``num_samples`` random ones. Deterministic for a given ``seed``. ``edge_cases=False``:
    the random ones only, in one batch, plus sequences of the ``focus`` items (those whose
    rows changed) — for an engine whose graph and code passed the full check already."""
    was_training = model.training
    model.eval()
    try:
        max_abs = max_rel = 0.0
        passed = True
        samples = 0
        for batch in _parity_batches(engine, num_samples, seed, edge_cases, focus):
            expected = reference_queries(model, batch)
            actual = np.array(engine.encode(batch), dtype=np.float32)  # copy: encode reuses it
            error = np.abs(actual - expected)
            scale = np.abs(expected)
            if not (np.isfinite(actual).all() and np.isfinite(expected).all()):
                passed, max_abs, max_rel = False, float("inf"), float("inf")
            else:
                max_abs = max(max_abs, float(error.max()))
                max_rel = max(max_rel, float((error / np.maximum(scale, atol)).max()))
                passed = passed and bool((error <= atol + rtol * scale).all())
            samples += len(batch)
    finally:
        model.train(was_training)
    return ParityReport(max_abs, max_rel, samples, passed, atol, rtol)


def build_engine(
    model: SequentialEncoder,
    kind: str = "onnx",
    *,
    max_batch: int = 64,
    threads: int = 1,
    cache_dir: Path | None = None,
    device: str = "cpu",
    check: bool = True,
    label: str = "model",
) -> InferenceEngine:
    """An engine of ``kind`` for ``model``, checked against it unless ``check=False``.

    threads: ONNX Runtime intra-op threads of this engine's session; for torch engines the
    process-wide ``torch.set_num_threads`` (torch has no per-module setting), so build torch
    engines only in a serving process. cache_dir: where ONNX exports are cached, keyed by
    weights and config (None: export every time). device: "cpu", or "cuda" for torch engines.
    The model is put in eval mode. Raises ServingError for a bad kind/device and
    EngineParityError when the engine disagrees with the model.
    """
    if kind not in ENGINE_KINDS:
        raise ServingError(
            f"unknown engine kind {kind!r} for {label}; expected one of {', '.join(ENGINE_KINDS)}"
        )
    if threads < 1:
        raise ServingError(f"{kind} engine for {label}: threads={threads} must be at least 1")
    model.eval()
    engine: InferenceEngine
    if kind == "onnx":
        if device != "cpu":
            raise ServingError(
                f"onnx engine for {label}: runs on CPU only (device {device!r}); "
                "use kind='torch' for cuda"
            )
        engine = OnnxEngine.from_model(
            model,
            max_batch=max_batch,
            threads=threads,
            cache_dir=cache_dir,
            label=label,
        )
    else:
        engine = TorchEngine(
            model,
            max_batch=max_batch,
            threads=threads,
            device=device,
            compile=kind == "torch-compiled",
            label=label,
        )
    if check:
        require_parity(engine, model, label)
    return engine


def engine_with_weights(
    engine: InferenceEngine,
    model: SequentialEncoder,
    changed: Collection[str],
    *,
    rows: IdArray | None = None,
    check: bool = True,
    label: str = "model",
) -> InferenceEngine:
    """An engine like ``engine`` for ``model``, a model of the same architecture whose state
    dict differs in the entries ``changed`` (the item table may have grown): no ONNX export,
    the ONNX graph is reused with the new weights. Checked against ``model`` like
    :func:`build_engine` unless ``check=False``, on sequences that include the item ``rows``
    that changed, if given. Raises ServingError when the engine cannot take the new weights
    (then build a new one) and EngineParityError when it disagrees.
    """
    model.eval()
    new = engine.with_weights(model, changed, label=label)
    if check:
        try:
            report = check_parity(
                new, model, num_samples=REWEIGHT_PARITY_SAMPLES, edge_cases=False, focus=rows
            )
        except ServingError as error:  # it took the weights but cannot run: as bad as wrong
            raise EngineParityError(
                f"{new.name} engine for {label} fails on the parity check: {error}"
            ) from None
        _raise_unless_passed(report, new, label)
    return new


def require_parity(engine: InferenceEngine, model: SequentialEncoder, label: str) -> None:
    """Raises EngineParityError unless ``engine`` agrees with ``model`` (see check_parity)."""
    _raise_unless_passed(check_parity(engine, model), engine, label)


def _raise_unless_passed(report: ParityReport, engine: InferenceEngine, label: str) -> None:
    if not report.passed:
        raise EngineParityError(
            f"{engine.name} engine for {label} disagrees with the torch model: max abs "
            f"error {report.max_abs_error:.3g}, max rel error {report.max_rel_error:.3g} "
            f"over {report.samples} sequences (tolerance atol {report.atol:g} + rtol "
            f"{report.rtol:g})"
        )
    log.info(
        "%s engine for %s: parity max abs error %.2g", engine.name, label, report.max_abs_error
    )


def item_table(model: SequentialEncoder) -> FloatArray:
    """The scoring table [num_items + 1, D] as a new float32 C-contiguous array; row 0 is 0."""
    with torch.no_grad():
        table = model.item_embedding.output_table().detach().float().cpu()
    # A copy: without normalisation output_table() is the weight itself, and we zero row 0.
    result: FloatArray = np.array(table.numpy(), dtype=np.float32, order="C", copy=True)
    result[PADDING_ID] = 0.0
    return result


def item_vectors(model: SequentialEncoder, ids: IdArray) -> FloatArray:
    """Rows ``ids`` of :func:`item_table` [len(ids), D], computed for those rows only."""
    weight = model.item_embedding.weight
    with torch.no_grad():
        rows = model.item_embedding.output_vectors(torch.from_numpy(ids).to(weight.device))
    result: FloatArray = np.array(rows.float().cpu().numpy(), dtype=np.float32, order="C")
    return result


def warmup(engine: InferenceEngine) -> None:
    """Runs every bucket of ``engine`` once (see :meth:`InferenceEngine.warmup`)."""
    engine.warmup()
