"""The parity core (recloop.models.parity) on known answers."""

from __future__ import annotations

import numpy as np

from recloop.models.parity import Comparison, top_k_overlap


def test_errors_and_tolerance_have_known_values() -> None:
    reference = np.array([[1.0, -2.0, 0.0], [4.0, 0.5, 0.0]], dtype=np.float32)
    candidate = reference + np.array([[0.1, 0.0, 0.0], [0.0, 0.0, 0.001]], dtype=np.float32)
    comparison = Comparison(atol=0.01, rtol=0.2)
    comparison.add(reference, candidate)
    assert comparison.rows == 2 and comparison.passed
    assert np.isclose(comparison.max_abs_error, 0.1, atol=1e-6)
    assert np.isclose(comparison.max_rel_error, 0.1, atol=1e-6)  # 0.1 / |1.0|; 0.001 / atol
    assert np.isclose(comparison.mean_abs_error, 0.101 / 6, atol=1e-6)
    strict = Comparison(atol=0.01, rtol=0.05)
    strict.add(reference, candidate)
    assert not strict.passed and strict.finite  # 0.1 > 0.01 + 0.05 * 1.0


def test_a_non_finite_output_fails_with_infinite_errors() -> None:
    comparison = Comparison(atol=1e-3)
    comparison.add(np.ones((1, 2)), np.array([[1.0, np.nan]]))
    comparison.add(np.ones((1, 2)), np.ones((1, 2)))
    assert not comparison.passed and not comparison.finite
    assert comparison.max_abs_error == comparison.max_rel_error == np.inf


def test_top_k_agreement_counts_shared_items() -> None:
    reference = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]], dtype=np.float32)
    candidate = np.array([[5.0, 1.0, 3.0, 2.0, 4.0]], dtype=np.float32)  # top 2: {0, 4}
    assert top_k_overlap(reference, candidate, 2).tolist() == [0.5]
    assert top_k_overlap(reference, candidate, 3).tolist() == [2 / 3]
    assert top_k_overlap(reference, candidate, 9).tolist() == [5 / 9]  # k past the catalogue
    comparison = Comparison()
    comparison.add(reference, candidate, top_k=2)
    comparison.add(reference, reference, top_k=2)
    assert comparison.top_k_overlap == 0.75 and np.isnan(Comparison().top_k_overlap)
