"""The experiment file and the stable assignment of users to arms.

A TOML file::

    name = "sasrec-retrain"          # names the experiment in reports and metrics
    salt = "2026-12-08"              # change it to re-draw every user's arm
    k = 10                           # hit@k and NDCG@k of each served list's first k items
    window_events = 5                # the user's next N events after a list is served ...
    window_seconds = 3600.0          # ... within T seconds of it (either may be left out)

    [[arms]]
    name = "control"                 # the first arm is the control unless `control` names one
    ref = "production"               # a registry reference: a version id, latest or production
    share = 0.5

    [[arms]]
    name = "treatment"
    ref = "v000007"
    share = 0.5
    learner = "online-learner-treatment"   # optional: serve what this online learner (its
                                           # consumer name) published from ref's version

Assignment: ``blake2b(salt, user id)`` read as a number in [0, 1), and the arm whose slice of
the cumulative shares holds it. It depends only on the salt, the user id and the arms' shares
in file order, so every replica, every process and every restart puts a user in the same arm
(Python's ``hash()`` is salted per process and is never used).
"""

from __future__ import annotations

import hashlib
import math
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recloop.config import read_toml
from recloop.errors import ConfigError, RegistryError

if TYPE_CHECKING:
    from recloop.registry import Registry

SHARE_TOLERANCE = 1e-6  # shares must sum to 1 within this
MAX_K = 1000
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # also a Prometheus label value and a file name
_TOP_KEYS = frozenset({"name", "salt", "k", "window_events", "window_seconds", "control", "arms"})
_ARM_KEYS = frozenset({"name", "ref", "share", "learner"})
_REQUIRED_ARM_KEYS = frozenset({"name", "ref", "share"})


@dataclass(frozen=True)
class Arm:
    """One arm: a name, the registry reference it serves and its share of the users."""

    name: str
    ref: str
    share: float
    # The consumer name of an online learner training this arm (recloop online --arm): the arm
    # then serves the newest version it published from ref's version (None: ref itself).
    learner: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(
                f"arms.name: {self.name!r} must be 1-64 letters, digits, '_', '.' or '-'"
            )
        if not isinstance(self.ref, str) or not self.ref.strip():
            raise ConfigError(f"arms.ref of arm {self.name!r} must be a version reference")
        share = self.share
        if isinstance(share, bool) or not isinstance(share, int | float):
            raise ConfigError(f"arms.share of arm {self.name!r} must be a number, got {share!r}")
        if not (math.isfinite(share) and 0 < share <= 1):
            raise ConfigError(f"arms.share of arm {self.name!r} must be in (0, 1], got {share!r}")
        if self.learner is not None and (
            not isinstance(self.learner, str) or not self.learner.strip()
        ):
            raise ConfigError(f"arms.learner of arm {self.name!r} must be a consumer name")


@dataclass(frozen=True)
class Experiment:
    """A validated experiment: arms with shares summing to 1, the salt, the outcome window."""

    name: str
    salt: str
    arms: tuple[Arm, ...]
    k: int = 10  # outcomes look at the first k items of each served list
    window_events: int | None = 5  # the user's next N events count (None: no limit) ...
    window_seconds: float | None = None  # ... within T seconds of the list (None: no limit)
    control: str = ""  # "" : the first arm
    _bounds: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("name", "salt"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
        if not _NAME.match(self.name):
            raise ConfigError(f"name: {self.name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        self._check_arms()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise ConfigError(f"k must be an integer in 1..{MAX_K}, got {self.k!r}")
        self._check_window()
        if not self.control:
            object.__setattr__(self, "control", self.arms[0].name)
        elif self.control not in self.arm_names:
            raise ConfigError(
                f"control: {self.control!r} is not an arm (arms: {', '.join(self.arm_names)})"
            )
        # Cumulative upper bounds of each arm's slice of [0, 1); the last is exactly 1.
        bounds = [sum(arm.share for arm in self.arms[: i + 1]) for i in range(len(self.arms))]
        object.__setattr__(self, "_bounds", (*bounds[:-1], 1.0))

    def _check_arms(self) -> None:
        if not isinstance(self.arms, tuple) or len(self.arms) < 2:
            raise ConfigError("arms: an experiment needs at least two [[arms]]")
        names = [arm.name for arm in self.arms]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"arms: duplicate arm name(s) {', '.join(duplicates)}")
        total = math.fsum(arm.share for arm in self.arms)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            shares = " + ".join(f"{arm.share:g}" for arm in self.arms)
            raise ConfigError(f"arms.share: the shares must sum to 1, got {shares} = {total:g}")

    def _check_window(self) -> None:
        events, seconds = self.window_events, self.window_seconds
        if events is None and seconds is None:
            raise ConfigError("window_events / window_seconds: set at least one of them")
        if events is not None and (
            isinstance(events, bool) or not isinstance(events, int) or events < 1
        ):
            raise ConfigError(f"window_events must be an integer >= 1, got {events!r}")
        if seconds is not None and (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not (math.isfinite(seconds) and seconds > 0)
        ):
            raise ConfigError(f"window_seconds must be a number of seconds > 0, got {seconds!r}")

    @property
    def arm_names(self) -> tuple[str, ...]:
        return tuple(arm.name for arm in self.arms)

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ConfigError(
            f"no arm {name!r} in experiment {self.name!r} (arms: {', '.join(self.arm_names)})"
        )

    def assign(self, user_id: str) -> Arm:
        """The user's arm: the same in every process, replica and restart (see the module doc)."""
        point = unit_hash(self.salt, user_id)
        return self.arms[min(bisect_right(self._bounds, point), len(self.arms) - 1)]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "salt": self.salt,
            "control": self.control,
            "k": self.k,
            "window_events": self.window_events,
            "window_seconds": self.window_seconds,
            "arms": [
                {"name": a.name, "ref": a.ref, "share": a.share, "learner": a.learner}
                for a in self.arms
            ],
        }


def unit_hash(salt: str, user_id: str) -> float:
    """blake2b of (salt, user id) as a number in [0, 1), uniform over users (53 bits)."""
    # Length-prefixed, so that no (salt, user) pair reads like another.
    data = f"{len(salt)}:{salt}:{user_id}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(data, digest_size=8, person=b"recloop-exp").digest()
    return (int.from_bytes(digest, "big") >> 11) / float(1 << 53)


def experiment_from_dict(raw: dict[str, Any]) -> Experiment:
    """An Experiment from the file's tables; unknown keys are errors naming them."""
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_TOP_KEYS))}"
        )
    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, list) or not all(isinstance(a, dict) for a in arms_raw):
        raise ConfigError("arms: expected [[arms]] tables with name, ref and share")
    arms = []
    for index, arm in enumerate(arms_raw):
        bad = sorted(set(arm) - _ARM_KEYS)
        if bad:
            raise ConfigError(
                f"arms[{index}]: unknown key(s) {', '.join(bad)}; "
                f"known: {', '.join(sorted(_ARM_KEYS))}"
            )
        missing = sorted(_REQUIRED_ARM_KEYS - set(arm))
        if missing:
            raise ConfigError(f"arms[{index}]: missing {', '.join(missing)}")
        arms.append(Arm(arm["name"], arm["ref"], arm["share"], arm.get("learner")))
    options = {key: raw[key] for key in ("k", "window_events", "window_seconds") if key in raw}
    return Experiment(
        name=raw.get("name", ""),
        salt=raw.get("salt", ""),
        arms=tuple(arms),
        control=raw.get("control", ""),
        **options,
    )


def load_experiment(path: Path | str) -> Experiment:
    """The experiment in a TOML file; any problem is one ConfigError naming the file and key."""
    path = Path(path)
    try:
        return experiment_from_dict(read_toml(path))
    except ConfigError as exc:
        if str(exc).startswith(f"{path}:"):
            raise
        raise ConfigError(f"{path}: {exc}") from None


def resolve_arms(registry: Registry, experiment: Experiment) -> dict[str, str]:
    """arm name -> the version it serves now (:func:`arm_version`); a ref that names nothing is
    a RegistryError naming the experiment and the arm (checked before anything is served)."""
    versions = {}
    for arm in experiment.arms:
        try:
            versions[arm.name] = arm_version(registry, arm)
        except RegistryError as exc:
            raise RegistryError(
                f"experiment {experiment.name!r}, arm {arm.name!r}: ref {arm.ref!r}: {exc}"
            ) from None
    return versions


def arm_version(registry: Registry, arm: Arm) -> str:
    """The version ``arm`` serves: its ref's version or, with a ``learner``, the newest version
    that learner published from it (the lineage ``recloop online --arm`` extends; the manifest's
    ``training.online`` as :class:`recloop.online.resume.OnlineState` writes it)."""
    base = registry.resolve(arm.ref)
    if arm.learner is None:
        return base
    for info in reversed(registry.list()):
        if info.problem is not None:
            continue
        online = registry.manifest(info.id).training.get("online")
        if (
            isinstance(online, dict)
            and online.get("consumer") == arm.learner
            and online.get("origin") == base
        ):
            return info.id
    return base
