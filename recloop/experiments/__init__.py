"""Online experiments: traffic split between model versions, measured from what users do next.

``config`` is the experiment file (arms, shares, salt, outcome window) and the stable
assignment of a user to an arm; ``outcomes`` attributes the user's next events to the list an
arm served; ``stats`` turns per-arm totals into rates with confidence intervals; ``report``
reads the exposure and event logs and writes the table, JSON and plot of ``recloop experiment
report``. It sits below both ``recloop.serve`` and ``recloop.online`` (which use the same
assignment) and above ``recloop.events`` (whose exposure log it reads); see docs/experiments.md.
"""

from recloop.experiments.config import Arm, Experiment, load_experiment
from recloop.experiments.outcomes import ArmTotals, Outcome, OutcomeTracker

__all__ = ["Arm", "ArmTotals", "Experiment", "Outcome", "OutcomeTracker", "load_experiment"]
