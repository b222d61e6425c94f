"""Building engines: the one entry point that picks the kind and checks parity."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from recloop.errors import EngineParityError, ServingError
from recloop.models.base import SequentialEncoder
from recloop.serve.engines.base import ENGINE_KINDS, IdArray, InferenceEngine
from recloop.serve.engines.onnx import OnnxEngine
from recloop.serve.engines.parity import (
    REWEIGHT_PARITY_SAMPLES,
    check_parity,
    raise_unless_passed,
    require_parity,
)
from recloop.serve.engines.torch import TorchEngine


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
        raise_unless_passed(report, new, label)
    return new


def warmup(engine: InferenceEngine) -> None:
    """Runs every bucket of ``engine`` once (see :meth:`InferenceEngine.warmup`)."""
    engine.warmup()
