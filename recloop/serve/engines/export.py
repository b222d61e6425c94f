"""The ONNX export that the onnx engine runs, and its cache keyed by the exact computation.

The graph is ``prepare_query(encode(ids))`` (:class:`QueryModule`); the item table is a graph
input (``TABLE_INPUT``), so one graph serves a catalogue that grows. Also the scoring table
(:func:`item_table`, :func:`item_vectors`) that the item index holds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recloop.data.sequences import PADDING_ID
from recloop.errors import ServingError
from recloop.models.base import SequentialEncoder
from recloop.serve.engines.base import (
    MAX_EXPORT_BATCH,
    MIN_LENGTH_BUCKET,
    FloatArray,
    IdArray,
    model_device,
    model_shape,
)

log = logging.getLogger("recloop.serve")

# Bump when the exported graph changes for the same weights (wrapper, export options), so that
# cached files from an older recipe are not reused.
# 2: weights keep their state-dict names (substitutable), the item table is an input.
EXPORT_RECIPE = 2
TABLE_KEY = "item_embedding.weight"  # the item table's state-dict key, in every model
TABLE_INPUT = "item_table"  # the exported graph's input that takes the item table
_WEIGHT_PREFIX = "model."  # QueryModule holds the model as `model`: its weights' names in a graph
WEIGHTS_METADATA = "recloop.weights"  # ONNX metadata: JSON {state-dict key: initializer name}
# Loggers that print noise during export (e.g. "torchvision is not installed").
_EXPORT_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._dynamo",
    "torch.fx",
    "onnxscript",
    "onnx_ir",
)


class QueryModule(nn.Module):
    """ids [B, L] -> query vectors [B, D]: the model's user vector as it enters the dot product
    with the item table (normalised / temperature-scaled when the model is configured so)."""

    def __init__(self, model: SequentialEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        query: torch.Tensor = self.model.item_embedding.prepare_query(self.model.encode(ids))
        return query


@contextlib.contextmanager
def quiet_export(extra_loggers: tuple[str, ...] = ()) -> Iterator[None]:
    """Silences torch's warnings and log lines during an ONNX export.

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
    _, max_length, _ = model_shape(model)
    if model_device(model).type != "cpu":
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
    program.model.metadata_props[WEIGHTS_METADATA] = json.dumps(kept, sort_keys=True)


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


def cached_export(model: SequentialEncoder, cache_dir: Path) -> Path:
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
