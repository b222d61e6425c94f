"""Reference vs candidate: the one arithmetic of every parity check.

A candidate (an ONNX export, a quantized copy, a serving engine) runs the same fixed batches as
its reference (the float torch model); each batch's outputs go to :meth:`Comparison.add`, which
keeps the largest absolute and relative error, the mean absolute error, whether every element
was finite and within ``atol + rtol * |reference|``, and, for scores over a catalogue, how many
of the reference's top-k items the candidate also ranks in its top k. The callers choose the
batches and what the outputs are (query vectors, scores); this module only compares arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


@dataclass
class Comparison:
    """A running comparison, batch by batch, of a candidate's outputs with a reference's."""

    atol: float = 0.0
    rtol: float = 0.0
    rows: int = 0  # rows (sequences, users) compared
    max_abs_error: float = 0.0
    # max |candidate - reference| / max(|reference|, atol), so elements near zero do not
    # dominate it; only measured with atol > 0 (else elements at zero would divide by zero)
    max_rel_error: float = 0.0
    finite: bool = True  # every element of both sides so far
    within_tolerance: bool = True  # every element within atol + rtol * |reference| so far
    _abs_error_sum: float = 0.0
    _elements: int = 0
    _overlaps: list[float] = field(default_factory=list)

    def add(
        self, reference: npt.ArrayLike, candidate: npt.ArrayLike, *, top_k: int | None = None
    ) -> None:
        """Compares one batch: [B, ...] outputs of each side. ``top_k``: the outputs are
        [B, I] scores, and each row's top-k agreement is recorded as well."""
        expected = np.asarray(reference, dtype=np.float32)
        actual = np.asarray(candidate, dtype=np.float32)
        if expected.shape != actual.shape:
            raise ValueError(f"parity: shapes differ, {expected.shape} vs {actual.shape}")
        self.rows += len(expected)
        if top_k is not None:
            self._overlaps.extend(top_k_overlap(expected, actual, top_k).tolist())
        if not (np.isfinite(actual).all() and np.isfinite(expected).all()):
            self.finite, self.max_abs_error, self.max_rel_error = False, np.inf, np.inf
            return
        error = np.abs(actual - expected)
        if error.size:
            self.max_abs_error = max(self.max_abs_error, float(error.max()))
            if self.atol > 0:
                relative = error / np.maximum(np.abs(expected), self.atol)
                self.max_rel_error = max(self.max_rel_error, float(relative.max()))
        self._abs_error_sum += float(error.sum())
        self._elements += error.size
        # In place: scores over a whole catalogue are large, so no more temporaries than needed
        tolerance: FloatArray | float = self.atol
        if self.rtol:
            tolerance = np.abs(expected)
            tolerance *= self.rtol
            tolerance += self.atol
        self.within_tolerance = self.within_tolerance and bool((error <= tolerance).all())

    @property
    def passed(self) -> bool:
        """Every element finite and within tolerance."""
        return self.finite and self.within_tolerance

    @property
    def mean_abs_error(self) -> float:
        return self._abs_error_sum / max(self._elements, 1)

    @property
    def top_k_overlap(self) -> float:
        """Mean over rows of |top-k reference ∩ top-k candidate| / k; nan before any scores."""
        return float(np.mean(self._overlaps)) if self._overlaps else float("nan")


def top_k_overlap(reference: FloatArray, candidate: FloatArray, k: int) -> npt.NDArray[np.float64]:
    """[B] |top-k of reference ∩ top-k of candidate| / k for each row of [B, I] scores."""
    top_ref, top_new = _top_k(reference, k), _top_k(candidate, k)  # [B, k]
    same = (top_ref[:, :, None] == top_new[:, None, :]).any(axis=2).sum(axis=1)  # [B]
    overlap: npt.NDArray[np.float64] = same / k
    return overlap


def _top_k(scores: FloatArray, k: int) -> npt.NDArray[np.intp]:
    """[B, min(k, I)] column indices of each row's k highest scores, in no particular order."""
    if k >= scores.shape[1]:
        return np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    top: npt.NDArray[np.intp] = np.argpartition(-scores, k, axis=1)[:, :k]
    return top
