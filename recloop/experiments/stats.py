"""Per-arm rates with 95% confidence intervals, and each arm against the control.

* hit@k: the share of settled exposures that were hits, with the Wilson score interval (good
  at small counts and near 0 or 1, where the normal interval is not);
* NDCG@k: the mean over settled exposures, with the normal interval of a mean (the sample
  variance from the sums of squares; exposures are many and NDCG is bounded in [0, 1]);
* differences arm - control: the normal interval of a difference of independent means (for
  hit@k the unpooled Wald interval). "Significant" means the 95% interval excludes 0.

Exposures of one user are treated as independent, which understates the variance when some
users are served many lists; with many users each seen a few times the effect is small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from recloop.experiments.config import Experiment
from recloop.experiments.outcomes import ArmTotals

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def wilson(successes: int, n: int, z: float = Z95) -> Estimate:
    """The Wilson score interval of a proportion (0/0: an empty estimate at 0)."""
    if n == 0:
        return Estimate(0.0, 0.0, 0.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half))


def _mean_and_variance(total: float, squares: float, n: int) -> tuple[float, float]:
    """(mean, variance of the mean) from sums; 0 variance below two observations."""
    if n == 0:
        return 0.0, 0.0
    mean = total / n
    if n < 2:
        return mean, 0.0
    sample_variance = max(squares - n * mean * mean, 0.0) / (n - 1)
    return mean, sample_variance / n


def mean_interval(total: float, squares: float, n: int, z: float = Z95) -> Estimate:
    mean, variance = _mean_and_variance(total, squares, n)
    half = z * math.sqrt(variance)
    return Estimate(mean, mean - half, mean + half)


def difference(a: ArmTotals, control: ArmTotals, z: float = Z95) -> dict[str, Estimate]:
    """hit@k and NDCG@k of ``a`` minus those of ``control``, with 95% intervals."""
    out: dict[str, Estimate] = {}
    na, nc = a.exposures, control.exposures
    pa = a.hits / na if na else 0.0
    pc = control.hits / nc if nc else 0.0
    se = math.sqrt((pa * (1 - pa) / na if na else 0.0) + (pc * (1 - pc) / nc if nc else 0.0))
    out["hit"] = Estimate(pa - pc, pa - pc - z * se, pa - pc + z * se)
    ma, va = _mean_and_variance(a.ndcg_sum, a.ndcg_sq_sum, na)
    mc, vc = _mean_and_variance(control.ndcg_sum, control.ndcg_sq_sum, nc)
    se = math.sqrt(va + vc)
    out["ndcg"] = Estimate(ma - mc, ma - mc - z * se, ma - mc + z * se)
    return out


def summarize(experiment: Experiment, totals: dict[str, ArmTotals]) -> dict[str, Any]:
    """The report as JSON-able data: per arm its totals, rates and, for every arm but the
    control, its difference from the control."""
    control = totals[experiment.control]
    arms: dict[str, Any] = {}
    for arm in experiment.arms:
        t = totals[arm.name]
        entry: dict[str, Any] = {
            "ref": arm.ref,
            "share": arm.share,
            **t.to_json(),
            "hit": wilson(t.hits, t.exposures).to_json(),
            "ndcg": mean_interval(t.ndcg_sum, t.ndcg_sq_sum, t.exposures).to_json(),
        }
        if arm.name != experiment.control:
            diff = difference(t, control)
            entry["vs_control"] = {
                name: {**estimate.to_json(), "significant": estimate.excludes_zero}
                for name, estimate in diff.items()
            }
        arms[arm.name] = entry
    return {"experiment": experiment.to_json(), "k": experiment.k, "arms": arms}
