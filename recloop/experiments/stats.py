"""Per-arm rates with 95% confidence intervals, and each arm against the control.

* hit@k: the share of settled exposures that were hits, with the Wilson score interval (good
  at small counts and near 0 or 1, where the normal interval is not);
* NDCG@k: the mean over settled exposures, with the normal interval of a mean;
* differences arm - control: the normal interval of a difference of independent arms (users
  are in one arm only). "Significant" means the 95% interval excludes 0.

One user's lists are not independent (a user who never clicks misses every list), so where the
totals know their users (the report: :func:`recloop.experiments.outcomes.attribute`) each rate
is a ratio of per-user sums and its variance is the delta method's over users as clusters
(Deng, Knoblich, Lu, "Applying the Delta Method in Metric Analytics", KDD 2018), never below
the variance the exposures would have if they were independent. For hit@k the Wilson interval
is then taken at the effective sample size (n times the independent variance over the
clustered one). Totals without users (the live counters) use the independent formulas.
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


def wilson(successes: float, n: float, z: float = Z95) -> Estimate:
    """The Wilson score interval of a proportion (0/0: an empty estimate at 0); ``n`` may be
    an effective sample size (not a whole number)."""
    if n <= 0:
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


def ratio_variance(
    y: float, y_sq: float, y_n: float, n: float, n_sq: float, clusters: int
) -> float:
    """Delta-method variance of R = sum(y_u) / sum(n_u) over ``clusters`` users, from the
    sums of y_u, y_u^2, y_u n_u, n_u and n_u^2 (needs at least two clusters)."""
    k = clusters
    y_bar, n_bar, ratio = y / k, n / k, y / n
    var_y = (y_sq - k * y_bar * y_bar) / (k - 1)
    var_n = (n_sq - k * n_bar * n_bar) / (k - 1)
    cov = (y_n - k * y_bar * n_bar) / (k - 1)
    return max(var_y - 2 * ratio * cov + ratio * ratio * var_n, 0.0) / (k * n_bar * n_bar)


def hit_variance(t: ArmTotals) -> float:
    """The variance of hit@k: clustered by user where ``t`` knows its users."""
    n = t.exposures
    if n == 0:
        return 0.0
    p = t.hits / n
    independent = p * (1 - p) / n
    if t.users < 2:
        return independent
    clustered = ratio_variance(t.hits, t.user_hit_sq, t.user_hit_n, n, t.user_n_sq, t.users)
    return max(independent, clustered)


def ndcg_variance(t: ArmTotals) -> float:
    """The variance of mean NDCG@k: clustered by user where ``t`` knows its users."""
    _, independent = _mean_and_variance(t.ndcg_sum, t.ndcg_sq_sum, t.exposures)
    if t.users < 2:
        return independent
    clustered = ratio_variance(
        t.ndcg_sum, t.user_ndcg_sq, t.user_ndcg_n, t.exposures, t.user_n_sq, t.users
    )
    return max(independent, clustered)


def hit_interval(t: ArmTotals, z: float = Z95) -> Estimate:
    """Wilson at the effective sample size: p(1 - p) / variance, n when the exposures are
    independent (or when p is 0 or 1, where both variances are 0)."""
    n = t.exposures
    p = t.hits / n if n else 0.0
    variance = hit_variance(t)
    effective = p * (1 - p) / variance if variance > 0 else float(n)
    interval = wilson(p * effective, effective, z)
    return Estimate(p, interval.low, interval.high)


def ndcg_interval(t: ArmTotals, z: float = Z95) -> Estimate:
    mean = t.ndcg_sum / t.exposures if t.exposures else 0.0
    half = z * math.sqrt(ndcg_variance(t))
    return Estimate(mean, mean - half, mean + half)


def difference(a: ArmTotals, control: ArmTotals, z: float = Z95) -> dict[str, Estimate]:
    """hit@k and NDCG@k of ``a`` minus those of ``control``, with 95% intervals."""
    out: dict[str, Estimate] = {}
    na, nc = a.exposures, control.exposures
    pa = a.hits / na if na else 0.0
    pc = control.hits / nc if nc else 0.0
    se = math.sqrt(hit_variance(a) + hit_variance(control))
    out["hit"] = Estimate(pa - pc, pa - pc - z * se, pa - pc + z * se)
    ma = a.ndcg_sum / na if na else 0.0
    mc = control.ndcg_sum / nc if nc else 0.0
    se = math.sqrt(ndcg_variance(a) + ndcg_variance(control))
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
            "hit": hit_interval(t).to_json(),
            "ndcg": ndcg_interval(t).to_json(),
        }
        if arm.name != experiment.control:
            diff = difference(t, control)
            entry["vs_control"] = {
                name: {**estimate.to_json(), "significant": estimate.excludes_zero}
                for name, estimate in diff.items()
            }
        arms[arm.name] = entry
    return {"experiment": experiment.to_json(), "k": experiment.k, "arms": arms}
