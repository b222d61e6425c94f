"""Engine vs the torch reference: a new engine serves only when it agrees with its model."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recloop.data.sequences import PADDING_ID
from recloop.errors import EngineParityError
from recloop.models.base import SequentialEncoder
from recloop.models.parity import Comparison
from recloop.serve.engines.base import FloatArray, IdArray, InferenceEngine, model_device
from recloop.serve.engines.export import QueryModule

log = logging.getLogger("recloop.serve")

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
    ids = torch.from_numpy(padded).to(model_device(model))
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
    comparison = Comparison(atol=atol, rtol=rtol)
    try:
        for batch in _parity_batches(engine, num_samples, seed, edge_cases, focus):
            actual = np.array(engine.encode(batch), dtype=np.float32)  # copy: encode reuses it
            comparison.add(reference_queries(model, batch), actual)
    finally:
        model.train(was_training)
    return ParityReport(
        comparison.max_abs_error,
        comparison.max_rel_error,
        comparison.rows,
        comparison.passed,
        atol,
        rtol,
    )


def require_parity(engine: InferenceEngine, model: SequentialEncoder, label: str) -> None:
    """Raises EngineParityError unless ``engine`` agrees with ``model`` (see check_parity)."""
    raise_unless_passed(check_parity(engine, model), engine, label)


def raise_unless_passed(report: ParityReport, engine: InferenceEngine, label: str) -> None:
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
