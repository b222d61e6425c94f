"""Sequence lengths for the synthetic generator: a rounded lognormal clipped to
``[low, high]`` (a heavy tail), with its location solved so the expected length is a given mean.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt


def _normal_sf(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """P(Z > x) for standard normal Z (Abramowitz-Stegun 7.1.26, abs. error < 1.5e-7)."""
    y = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * y)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    half_erfc = 0.5 * poly * np.exp(-y * y)  # P(Z > |x|)
    return np.where(x >= 0, half_erfc, 1.0 - half_erfc)


def lognormal_location(low: int, high: int, sigma: float, mean: float) -> float:
    """Lognormal location mu with E[clip(rint(exp(mu + sigma Z)), low, high)] == mean."""
    a, b = low, high
    # E[L] = a + sum_{k=a}^{b-1} P(L > k), and L > k <=> exp(mu + sigma Z) >= k + 1/2.
    log_cuts = np.log(np.arange(a, b, dtype=np.float64) + 0.5)  # [b - a]

    def expected(mu: float) -> float:
        return a + float(_normal_sf((log_cuts - mu) / sigma).sum())

    # The expectation is increasing in mu; at lo every length is ~low, at hi every one ~high.
    lo, hi = math.log(0.5) - 12.0 * sigma, math.log(b + 0.5) + 12.0 * sigma
    for _ in range(64):  # bracket < ~300 wide: 64 halvings reach float precision
        mid = 0.5 * (lo + hi)
        if expected(mid) < mean:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def draw_lengths(
    rng: np.random.Generator, count: int, mu: float, sigma: float, low: int, high: int
) -> npt.NDArray[np.int64]:
    """`count` lengths [count]: rint(exp(mu + sigma Z)) clipped to [low, high]."""
    z = rng.standard_normal(count)  # [count]
    log_len = np.minimum(mu + sigma * z, 700.0)  # 700: exp stays finite
    raw = np.rint(np.exp(log_len))
    return np.clip(raw, low, high).astype(np.int64)  # [count]
