"""Export of the user encoder: ONNX (+ int8 dense layers through ONNX Runtime), TorchScript.

The ONNX file is the one serving runs: :func:`recloop.serve.engines.export.export_onnx` (dynamo
exporter, dynamic batch and sequence length, ``prepare_query(encode(ids))``) is called as is.
Each file is checked against the torch model on real or random histories of assorted lengths
and batch sizes, and the report says by how much it differs (query error, score error, top-10
overlap over the whole catalogue).

Dense int8: ONNX Runtime's dynamic quantization (``quantize_dynamic``: int8 weights per output
channel, activations quantized per batch at run time) of every MatMul / Gemm with a constant
weight, after ORT's pre-processing folds the weight transposes into constants. A model whose
Linear layers are already int8 (:class:`recloop.models.compressed.QuantizedLinear`) is exported
with those int8 weights dequantized, so the quantizer sees float MatMul weights.

TorchScript (``torch.jit.trace``, deprecated by torch but still used by some runtimes) is tried
and kept only if the traced module matches the model at other batch sizes and lengths than the
one it was traced with.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from recloop.data.sequences import PADDING_ID
from recloop.errors import ConfigError, ServingError
from recloop.models.base import SequentialEncoder
from recloop.models.compressed import QuantizedLinear
from recloop.models.embeddings import ItemEmbedding
from recloop.models.parity import Comparison
from recloop.serve.engines.export import quiet_export

ONNX_FILE = "encoder.onnx"
ONNX_INT8_FILE = "encoder.int8.onnx"
TORCHSCRIPT_FILE = "encoder.torchscript.pt"
REPORT_FILE = "export.json"
# What a runtime needs besides the graph: the graph's ``item_table`` input (the stored table rows,
# codes when quantized) and the float table the query vectors are scored against (top-K).
TABLES_FILE = "tables.safetensors"
TRACE_ATOL = 1e-4
# ONNX Runtime's quantization tools log through the root logger.
QUANTIZER_LOGGERS = ("root",)

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class OutputParity:
    """An exported encoder against the torch model on the same histories."""

    sequences: int
    max_query_error: float  # max |query vector difference|
    max_score_error: float  # max |score difference| over the whole catalogue
    top10_overlap: float  # mean |top-10 torch ∩ top-10 export| / 10


@dataclass(frozen=True)
class ExportReport:
    onnx: str
    onnx_bytes: int
    onnx_parity: OutputParity
    tables: str
    onnx_int8: str | None = None
    onnx_int8_bytes: int | None = None
    onnx_int8_parity: OutputParity | None = None
    torchscript: str | None = None
    torchscript_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- running ONNX


def onnx_session(source: Path | bytes, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session with serving's settings (intra-op threads, no spinning)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    model = str(source) if isinstance(source, Path) else source
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types
        raise ServingError(f"ONNX Runtime cannot load the exported encoder: {error}") from error


def onnx_runner(
    session: Any, model: SequentialEncoder
) -> Callable[[npt.NDArray[np.int64]], FloatArray]:
    """run(ids [B, L] int64) -> query vectors [B, D]. Inputs other than ``ids`` are weights the
    exporter left as graph inputs (serving's export feeds the item table at run time): they are
    fed from the model's state dict, in its dtypes."""
    from recloop.serve.engines.export import TABLE_INPUT, TABLE_KEY

    state = model.state_dict()
    feeds: dict[str, Any] = {}
    for value in session.get_inputs():
        if value.name == "ids":
            continue
        key = TABLE_KEY if value.name == TABLE_INPUT else value.name
        if key not in state:
            raise ServingError(f"the exported encoder has an input {value.name!r} we cannot feed")
        feeds[value.name] = state[key].detach().cpu().contiguous().numpy()
    output = session.get_outputs()[0].name

    def run(ids: npt.NDArray[np.int64]) -> FloatArray:
        result: FloatArray = session.run([output], {"ids": ids, **feeds})[0]
        return result

    return run


def _torch_queries(model: SequentialEncoder, ids: npt.NDArray[np.int64]) -> FloatArray:
    with torch.inference_mode():
        user = model.encode(torch.from_numpy(ids))
        query: FloatArray = model.item_embedding.prepare_query(user).float().numpy()
    return query


def parity_batches(histories: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
    """Batches of assorted sizes (1, 3, 32, ...) and widths (trimmed to their longest history,
    at least 2, which is the exported graph's shortest length) from left-padded `histories`."""
    batches = []
    start = 0
    sizes = (1, 3, 32, 7, 64)
    index = 0
    while start < len(histories):
        batch = histories[start : start + sizes[index % len(sizes)]]
        real = (batch != PADDING_ID).any(axis=0)
        first = int(np.argmax(real)) if real.any() else batch.shape[1] - 1
        batches.append(np.ascontiguousarray(batch[:, min(first, batch.shape[1] - 2) :]))
        start += len(batch)
        index += 1
    return batches


def output_parity(
    run: Callable[[npt.NDArray[np.int64]], FloatArray],
    model: SequentialEncoder,
    histories: npt.NDArray[np.int64],
    k: int = 10,
) -> OutputParity:
    """Exported queries against the torch model's, and the scores they give."""
    model.eval()
    with torch.inference_mode():
        table = model.item_embedding.output_table()[1:].float().numpy()  # [I, D]
    queries, scores = Comparison(), Comparison()
    for ids in parity_batches(histories):
        expected = _torch_queries(model, ids)  # [B, D]
        actual = np.asarray(run(ids), dtype=np.float32)  # [B, D]
        if not np.isfinite(actual).all():
            return OutputParity(len(histories), float("inf"), float("inf"), 0.0)
        queries.add(expected, actual)
        scores.add(expected @ table.T, actual @ table.T, top_k=k)  # [B, I]
    return OutputParity(
        queries.rows, queries.max_abs_error, scores.max_abs_error, scores.top_k_overlap
    )


class OnnxEncoder(SequentialEncoder):
    """An exported encoder run by ONNX Runtime, scoring against the model's own item table:
    :func:`recloop.evaluate.evaluate` and :func:`recloop.compress.quantize.score_parity` take it
    like the torch model, so an exported file's accuracy is measured by the same code."""

    def __init__(self, path: Path, model: SequentialEncoder, *, threads: int = 1) -> None:
        super().__init__()
        self.config = model.config
        source = model.item_embedding
        # The graph returns prepare_query(encode(ids)), so the table here is the prepared one
        # and the query is used as is (no normalisation, temperature 1).
        self.item_embedding = ItemEmbedding(int(source.num_items), int(source.dim))
        with torch.no_grad():
            self.item_embedding.weight.copy_(source.output_table().detach().float())
        self._run = onnx_runner(onnx_session(path, threads), model)

    def forward(
        self,
        input_ids: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        if last_only:
            return self.encode(input_ids, timestamps).unsqueeze(1)  # [B, 1, D]
        raise NotImplementedError("an exported encoder computes the last position only")

    def encode(
        self, input_ids: torch.Tensor, timestamps: torch.Tensor | None = None
    ) -> torch.Tensor:
        ids = input_ids.detach().cpu().numpy().astype(np.int64, copy=False)  # [B, L]
        if ids.shape[1] < 2:  # the exported graph's shortest length
            ids = np.pad(ids, ((0, 0), (2 - ids.shape[1], 0)))
        return torch.from_numpy(np.array(self._run(np.ascontiguousarray(ids))))


# --------------------------------------------------------------------------- exporting


def float_dense(model: SequentialEncoder) -> SequentialEncoder:
    """A copy of `model` with every QuantizedLinear replaced by its dequantized nn.Linear (the
    same values), or `model` itself when it has none."""
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        return model
    result = copy.deepcopy(model)
    for parent in list(result.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear):
                setattr(parent, name, child.dequantized())
    return result


def export_onnx_file(model: SequentialEncoder, path: Path) -> Path:
    """The serving export (recloop.serve.engines.export.export_onnx) of `model` to `path`."""
    from recloop.serve.engines.export import export_onnx

    return export_onnx(model.eval(), path)


def quantize_dense_onnx(source: Path, target: Path) -> Path:
    """ONNX Runtime dynamic int8 quantization of the MatMul / Gemm weights of `source`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="recloop-quant-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        with quiet_export(QUANTIZER_LOGGERS):
            # Folds constant weight transposes so the quantizer sees MatMul(x, constant W).
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_dynamic(
                str(prepared),
                str(target),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
    return target


def trace_torchscript(
    model: SequentialEncoder, path: Path, histories: npt.NDArray[np.int64]
) -> tuple[Path | None, str | None]:
    """(path, None) if a traced module matches the model on other shapes; (None, why) else."""
    from recloop.serve.engines.export import QueryModule

    module = QueryModule(model.eval()).eval()
    example = torch.ones((2, max(2, int(model.config.max_length) // 2)), dtype=torch.int64)
    try:
        with quiet_export(QUANTIZER_LOGGERS), torch.inference_mode():
            traced = torch.jit.trace(module, (example,), check_trace=False)  # type: ignore[no-untyped-call]
    except Exception as error:  # tracing raises many types
        return None, f"torch.jit.trace failed: {type(error).__name__}: {error}"

    def run(ids: npt.NDArray[np.int64]) -> FloatArray:
        with torch.inference_mode():
            result: FloatArray = traced(torch.from_numpy(ids)).float().numpy()
        return result

    try:
        parity = output_parity(run, model, histories)
    except Exception as error:  # a trace that specialised a shape fails on another one
        return None, f"the traced module fails on other shapes: {type(error).__name__}: {error}"
    if parity.max_query_error > TRACE_ATOL:
        return None, (
            f"the traced module differs from the model on other shapes (max query error "
            f"{parity.max_query_error:.3g}): tracing fixed a shape-dependent branch"
        )
    with quiet_export(QUANTIZER_LOGGERS):
        traced.save(str(path))
    return path, None


def write_tables(model: SequentialEncoder, path: Path) -> Path:
    """`path` (safetensors): ``item_table``, fed to the exported graph's input of that name, and
    ``scoring_table`` [num_items + 1, D] float32, which the graph's query vectors are scored
    against (row 0, padding, is zeros)."""
    from safetensors.numpy import save_file

    from recloop.serve.engines.export import TABLE_KEY, item_table

    stored = model.state_dict()[TABLE_KEY].detach().cpu().contiguous().numpy()
    save_file({"item_table": stored, "scoring_table": item_table(model)}, str(path))
    return path


def export_encoder(
    model: SequentialEncoder,
    out: Path,
    histories: npt.NDArray[np.int64],
    *,
    quantize_dense: bool = True,
    torchscript: bool = True,
) -> ExportReport:
    """Writes encoder.onnx and tables.safetensors (+ encoder.int8.onnx, encoder.torchscript.pt)
    and export.json into the new directory `out`; each encoder is checked against `model` on
    `histories` [N, L]."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    onnx_path = export_onnx_file(model, out / ONNX_FILE)
    parity = output_parity(onnx_runner(onnx_session(onnx_path), model), model, histories)
    int8_path = int8_parity = None
    if quantize_dense:
        plain = float_dense(model)
        source = onnx_path
        scratch = None
        if plain is not model:
            scratch = tempfile.TemporaryDirectory(prefix="recloop-export-")
            source = export_onnx_file(plain, Path(scratch.name) / ONNX_FILE)
        try:
            int8_path = quantize_dense_onnx(source, out / ONNX_INT8_FILE)
        finally:
            if scratch is not None:
                scratch.cleanup()
        int8_parity = output_parity(onnx_runner(onnx_session(int8_path), model), model, histories)
    script_path = script_error = None
    if torchscript:
        script_path, script_error = trace_torchscript(model, out / TORCHSCRIPT_FILE, histories)
    tables_path = out / TABLES_FILE
    write_tables(model, tables_path)
    report = ExportReport(
        onnx=str(onnx_path),
        onnx_bytes=onnx_path.stat().st_size,
        onnx_parity=parity,
        tables=str(tables_path),
        onnx_int8=None if int8_path is None else str(int8_path),
        onnx_int8_bytes=None if int8_path is None else int8_path.stat().st_size,
        onnx_int8_parity=int8_parity,
        torchscript=None if script_path is None else str(script_path),
        torchscript_error=script_error,
    )
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


# --------------------------------------------------------------------------- latency


def latency_ms(
    run: Callable[[npt.NDArray[np.int64]], Any],
    ids: npt.NDArray[np.int64],
    *,
    seconds: float = 2.0,
    min_runs: int = 50,
    warmup: int = 10,
) -> dict[str, float]:
    """p50 / p99 / mean milliseconds of run(ids), over at least `min_runs` calls and about
    `seconds` of calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        run(ids)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_runs or time.perf_counter() < deadline:
        tick = time.perf_counter()
        run(ids)
        times.append(time.perf_counter() - tick)
    ms = np.array(times) * 1000.0
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "runs": float(len(ms)),
    }
