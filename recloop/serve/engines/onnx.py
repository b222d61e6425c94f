"""The ``onnx`` engine: the exported graph run by ONNX Runtime on CPU through IOBinding."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recloop.data.sequences import PADDING_ID
from recloop.errors import ServingError
from recloop.models.base import SequentialEncoder
from recloop.serve.engines.base import (
    Bucket,
    FloatArray,
    IdArray,
    InferenceEngine,
    empty_buffers,
    model_shape,
)
from recloop.serve.engines.export import (
    EXPORT_RECIPE,
    TABLE_INPUT,
    TABLE_KEY,
    WEIGHTS_METADATA,
    cached_export,
    export_onnx,
)

log = logging.getLogger("recloop.serve")


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
        return _parse_weight_names(metadata.get(WEIGHTS_METADATA), self.label)

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
        dim, max_length, num_items = model_shape(model)
        source: Path | bytes
        if cache_dir is not None:
            source = cached_export(model, cache_dir)
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
        dim, max_length, num_items = model_shape(model)
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
        ids, out = empty_buffers(batch, length, self.dim)
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
            f"onnx engine for {label}: the model has no {WEIGHTS_METADATA} metadata; it was "
            f"not exported by this recloop version (export recipe {EXPORT_RECIPE})"
        )
    names = json.loads(text)
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise ServingError(f"onnx engine for {label}: malformed {WEIGHTS_METADATA} metadata")
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
