"""The engine interface: users' item sequences in, query vectors for the item index out.

An engine wraps one model version as ``prepare_query(encode(ids))`` and runs it on fixed-size
input buffers. Requests vary in batch size and history length, so an engine keeps one
preallocated bucket per (batch size, window length) pair: batch sizes are powers of two up to
``max_batch`` (plus ``max_batch`` itself), window lengths powers of two from 8 up to the model's
``max_length`` (plus ``max_length`` itself). A call picks the smallest bucket that fits, writes
the sequences right-aligned (left padding, as the models expect) into that bucket's int64 input
buffer and runs the model into the bucket's float32 output buffer. Nothing is allocated per
request on the hot path, and the runtime (ONNX Runtime, or torch) sees a handful of shapes only,
so its shape-dependent caches stay warm.

Engines (one module each):

- ``onnx`` (:mod:`recloop.serve.engines.onnx`): the model exported with the torch dynamo
  exporter (dynamic batch and length) and run by ONNX Runtime on CPU, reading and writing our
  numpy buffers in place through IOBinding. The default for serving.
- ``torch`` (:mod:`recloop.serve.engines.torch`): the torch module itself, eager; also runs on
  CUDA. (A ``torch.compile`` engine was removed with ``train.compile``: compiled torch measured
  slower than eager on CPU, and ONNX Runtime is the fast CPU engine.)

:func:`recloop.serve.engines.factory.build_engine` checks every new engine against the torch
reference on random sequences (:mod:`recloop.serve.engines.parity`) and refuses one that
disagrees, so a stale ONNX cache file, a broken export or a wrong model never serves.
"""

from __future__ import annotations

import bisect
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from recloop.data.sequences import PADDING_ID
from recloop.errors import ServingError
from recloop.models.base import SequentialEncoder

ENGINE_KINDS = ("onnx", "torch")
MIN_LENGTH_BUCKET = 8  # shorter windows save little compute and would add buckets
MAX_EXPORT_BATCH = 4096  # upper bound of the exported graph's dynamic batch dimension

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]


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

    name: str  # "onnx" | "torch"

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
        windows = self._windows(sequences)
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
        runtime-side optimisation (ORT specialises on first sight of a shape)."""
        with self._lock:
            for batch in self.batch_sizes:
                for length in self.lengths:
                    bucket = self._bucket(batch, length)
                    bucket.ids[:] = PADDING_ID
                    bucket.ids[:, -1] = 1  # a real item, so the run is a realistic one
                    bucket.run()

    def _windows(self, sequences: Sequence[npt.NDArray[np.integer[Any]]]) -> list[IdArray]:
        """The last max_length ids of each sequence, validated as :meth:`_window` does but with
        one range check for the whole batch: per-row checks were a visible share of an encode,
        all of it holding the GIL that the HTTP loop waits for. A bad batch is re-checked row
        by row, so the error names the first bad row and position, as before."""
        windows = []
        for sequence in sequences:
            array = np.asarray(sequence)
            if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "iu":
                return [self._window(row, s) for row, s in enumerate(sequences)]  # raises
            windows.append(array[-self.max_length :])
        if windows:
            joined = np.concatenate(windows)
            if int(joined.min()) < 1 or int(joined.max()) > self.num_items:
                return [self._window(row, s) for row, s in enumerate(sequences)]  # raises
        return [window.astype(np.int64, copy=False) for window in windows]

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


def empty_buffers(batch: int, length: int, dim: int) -> tuple[IdArray, FloatArray]:
    return np.zeros((batch, length), dtype=np.int64), np.zeros((batch, dim), dtype=np.float32)


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def model_shape(model: SequentialEncoder) -> tuple[int, int, int]:
    """(dim of the query vectors, max_length, num_items)."""
    embedding = model.item_embedding
    return int(embedding.dim), int(model.config.max_length), int(embedding.num_items)
