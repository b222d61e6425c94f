"""Experiments without a server: the config, the stable assignment, outcome attribution, the
statistics, the exposure log (SQLite and Redis) and the arm's view of the event log."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from recloop.errors import ConfigError
from recloop.events import Event, LoggedEvent, SqliteEventLog, open_event_log
from recloop.events.exposures import Exposure, exposure_path, open_exposure_log
from recloop.experiments import ArmTotals, Experiment, OutcomeTracker, load_experiment
from recloop.experiments.config import Arm, experiment_from_dict, unit_hash
from recloop.experiments.learning import ArmEvents, learner_events
from recloop.experiments.outcomes import Outcome, attribute
from recloop.experiments.stats import difference, hit_interval, summarize, wilson
from tests.redis_server import RedisServer, running_redis

TOML = """
name = "retrain"
salt = "s1"
k = 3
window_events = 2
window_seconds = 100

[[arms]]
name = "control"
ref = "v000001"
share = 0.3

[[arms]]
name = "treatment"
ref = "v000002"
share = 0.7
"""


def experiment(**overrides: object) -> Experiment:
    values: dict[str, object] = {
        "name": "exp",
        "salt": "s1",
        "arms": (Arm("control", "v000001", 0.5), Arm("treatment", "v000002", 0.5)),
        "k": 3,
        "window_events": 2,
        "window_seconds": 100.0,
    }
    values.update(overrides)
    return Experiment(**values)  # type: ignore[arg-type]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


# ------------------------------------------------------------------------------ config


def test_the_file_loads_with_its_defaults(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(TOML)
    loaded = load_experiment(path)
    assert loaded.arm_names == ("control", "treatment") and loaded.control == "control"
    assert (loaded.k, loaded.window_events, loaded.window_seconds) == (3, 2, 100)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("share = 0.7", "share = 0.6"), "shares must sum to 1, got 0.3 + 0.6 = 0.9"),
        (('name = "treatment"', 'name = "control"'), "duplicate arm name(s) control"),
        (("k = 3", "k = 0"), "k must be an integer in 1..1000"),
        (("window_events = 2", "window_events = -1"), "window_events must be an integer >= 1"),
        (('salt = "s1"', 'salt = "s1"\ncolour = 1'), "unknown key(s) colour"),
        (('ref = "v000002"', 'ref = "v000002"\nweight = 1'), "arms[1]: unknown key(s) weight"),
        (('ref = "v000002"\n', ""), "arms[1]: missing ref"),
        (("share = 0.3", "share = -0.3"), "arms.share of arm 'control' must be in (0, 1]"),
        (('salt = "s1"', 'salt = "s1"\ncontrol = "nobody"'), "control: 'nobody' is not an arm"),
    ],
)
def test_bad_configs_are_one_error_naming_the_file_and_key(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(TOML.replace(*edit, 1))
    with pytest.raises(ConfigError) as caught:
        load_experiment(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_a_missing_file_and_one_arm_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_experiment(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match="at least two"):
        experiment_from_dict({"name": "x", "salt": "s", "arms": [
            {"name": "a", "ref": "latest", "share": 1.0}
        ]})  # fmt: skip


# ------------------------------------------------------------------------------ assignment


def test_assignment_is_balanced_to_the_shares() -> None:
    split = experiment(
        arms=(Arm("a", "latest", 0.2), Arm("b", "latest", 0.3), Arm("c", "latest", 0.5))
    )
    counts = {"a": 0, "b": 0, "c": 0}
    n = 100_000
    for user in range(n):
        counts[split.assign(f"user-{user}").name] += 1
    # Binomial standard deviation at n = 100k is <= 0.0016: 0.01 is over 6 of them.
    for arm in split.arms:
        assert abs(counts[arm.name] / n - arm.share) < 0.01, counts


def test_assignment_is_the_same_in_another_process_and_changes_with_the_salt() -> None:
    users = [f"u{i}" for i in range(200)] + ["", "ünï", "a/b"]
    here = [experiment().assign(u).name for u in users]
    code = (
        "import json, sys\n"
        "from recloop.experiments.config import Arm, Experiment\n"
        "e = Experiment('exp', 's1', (Arm('control', 'v000001', 0.5), "
        "Arm('treatment', 'v000002', 0.5)), 3, 2, 100.0)\n"
        "print(json.dumps([e.assign(u).name for u in json.load(sys.stdin)]))\n"
    )
    import json

    # A fresh interpreter has another PYTHONHASHSEED: hash() would disagree, blake2b does not.
    there = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(users),
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert json.loads(there.stdout) == here
    resalted = [experiment(salt="s2").assign(u).name for u in users]
    assert resalted != here
    assert all(0 <= unit_hash("s", u) < 1 for u in users)


# ------------------------------------------------------------------------------ outcomes


def logged(offset: int, user: str, item: str, ts: float) -> LoggedEvent:
    return LoggedEvent(offset, Event(user, item, ts), str(offset))


def exposure(user: str, arm: str, items: tuple[str, ...], ts: float) -> Exposure:
    return Exposure("exp", arm, f"v-{arm}", user, items, ts)


def test_outcomes_are_hit_at_k_and_ndcg_of_the_first_hit_within_the_window() -> None:
    exp = experiment()
    exposures = [
        exposure("u1", "control", ("a", "b", "c", "d"), 10.0),  # 2nd event hits rank 2
        exposure("u2", "treatment", ("a", "b", "c"), 10.0),  # hits only after 2 events: miss
        exposure("u3", "treatment", ("a", "b", "c"), 10.0),  # hit, but after 100 s: miss
        exposure("u4", "treatment", ("a", "b", "c", "d"), 10.0),  # rank 4 > k: miss
        exposure("u5", "control", ("x",), 10.0),  # no events yet, window open: pending
        exposure("u6", "control", ("a",), 10.0),  # an event before the list does not count
    ]
    events = [
        logged(1, "u1", "z", 11.0),
        logged(2, "u1", "b", 12.0),
        logged(3, "u2", "z", 11.0),
        logged(4, "u2", "y", 12.0),
        logged(5, "u2", "a", 13.0),
        logged(6, "u3", "a", 200.0),
        logged(7, "u4", "d", 11.0),
        logged(9, "u4", "q", 12.0),
        logged(8, "u6", "a", 9.0),
    ]
    totals = attribute(exp, exposures, events, now=50.0)
    control, treatment = totals["control"], totals["treatment"]
    assert (control.exposures, control.hits, control.pending) == (1, 1, 2)
    assert math.isclose(control.ndcg_sum, 1 / math.log2(3))
    assert (treatment.exposures, treatment.hits, treatment.pending) == (3, 0, 0)
    # Later, the open windows have closed: misses.
    later = attribute(exp, exposures, events, now=1000.0)
    assert (later["control"].exposures, later["control"].pending) == (3, 0)


def test_outcomes_go_to_the_arm_that_served_not_the_arm_assigned_now() -> None:
    exp = experiment()
    user = next(f"u{i}" for i in range(100) if exp.assign(f"u{i}").name == "control")
    served = [exposure(user, "treatment", ("a",), 1.0)]  # served before a re-salt, say
    totals = attribute(exp, served, [logged(1, user, "a", 2.0)], now=5.0)
    assert totals["treatment"].hits == 1 and totals["control"].exposures == 0


def test_the_tracker_settles_as_attribute_does() -> None:
    exp = experiment()
    settled: list[Outcome] = []
    tracker = OutcomeTracker(exp, settled.append, max_pending=3)
    tracker.served(exposure("u1", "control", ("a", "b"), 10.0))
    tracker.served(exposure("u2", "treatment", ("a",), 10.0))
    tracker.observe([Event("u1", "b", 11.0), Event("u2", "z", 11.0), Event("u9", "a", 11.0)])
    assert settled == [Outcome("control", "v-control", 2)] and tracker.pending == 1
    tracker.expire(200.0)
    assert settled[-1] == Outcome("treatment", "v-treatment", None) and tracker.pending == 0
    for user in ("a", "b", "c", "d"):  # over max_pending: the oldest user's window goes
        tracker.served(exposure(user, "control", ("x",), 300.0))
    assert tracker.pending == 3 and tracker.dropped == 1 and "a" not in tracker.windows


# ------------------------------------------------------------------------------ statistics


def test_wilson_interval_and_differences() -> None:
    estimate = wilson(50, 100)
    assert estimate.value == 0.5 and math.isclose(estimate.low, 0.4038, abs_tol=1e-3)
    assert wilson(0, 0).value == 0.0 and wilson(0, 10).low == 0.0
    better, worse = ArmTotals(), ArmTotals()
    for i in range(2000):
        better.add(Outcome("b", "v", 1 if i % 2 else None))  # hit rate 0.5
        worse.add(Outcome("w", "v", 3 if i % 5 == 0 else None))  # hit rate 0.2
    diff = difference(better, worse)
    assert math.isclose(diff["hit"].value, 0.3) and diff["hit"].excludes_zero
    assert diff["ndcg"].low > 0
    same = difference(worse, worse)
    assert not same["hit"].excludes_zero and not same["ndcg"].excludes_zero
    report = summarize(experiment(), {"control": worse, "treatment": better})
    assert report["arms"]["treatment"]["vs_control"]["hit"]["significant"] is True
    assert "vs_control" not in report["arms"]["control"]


def _clustered(users: int, lists: int, hitting: int) -> ArmTotals:
    """``users`` users served ``lists`` lists each; the first ``hitting`` users hit every list
    (NDCG 1), the others none: all of the variation is between users."""
    totals = ArmTotals()
    for user in range(users):
        rank = 1 if user < hitting else None
        for _ in range(lists):
            totals.add(Outcome("a", "v", rank))
        hit = lists if rank else 0
        totals.add_user(lists, hit, float(hit))
    return totals


def test_intervals_count_users_as_clusters_when_the_report_knows_them() -> None:
    """Lists of one user are not independent: 100 users x 20 lists each, every user all hit or
    all miss, has the information of about 100 observations, not 2,000."""
    clustered = _clustered(users=100, lists=20, hitting=50)
    independent = ArmTotals(**{**vars(clustered), "users": 0})  # the same sums, no users
    width = hit_interval(clustered).high - hit_interval(clustered).low
    naive = hit_interval(independent).high - hit_interval(independent).low
    assert math.isclose(width / naive, math.sqrt(20), rel_tol=0.1)
    one_each = _clustered(users=2000, lists=1, hitting=1000)  # one list per user: as before
    single = hit_interval(one_each)
    assert math.isclose(single.high - single.low, naive, rel_tol=0.01)
    # 0.55 vs 0.45 from 100 users each: significant if lists were independent, not as clusters.
    better, worse = _clustered(100, 20, 55), _clustered(100, 20, 45)
    assert not difference(better, worse)["hit"].excludes_zero
    assert not difference(better, worse)["ndcg"].excludes_zero
    strip = {"users": 0}
    naive_diff = difference(
        ArmTotals(**{**vars(better), **strip}), ArmTotals(**{**vars(worse), **strip})
    )
    assert naive_diff["hit"].excludes_zero


# ------------------------------------------------------------------------------ logs


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_exposure_log_beside_the_event_log(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        target = str(tmp_path / "events.sqlite")
    else:
        target = request.getfixturevalue("redis_server").url
    served = [exposure(f"u{i}", "control", ("a", "ü"), float(i)) for i in range(25)]
    with open_event_log(target) as log, open_exposure_log(log) as writer:
        writer.append(served[:10])
        writer.append(served[10:])
        writer.append([])
    # Another process (another replica) reads them back, in order.
    with open_event_log(target) as log, open_exposure_log(log) as reader:
        assert reader.read_all(batch=7) == served
    if backend == "sqlite":
        assert exposure_path(Path(target)) == tmp_path / "events.exposures.sqlite"


def test_an_arms_learner_reads_its_own_users_or_everyone(tmp_path: Path) -> None:
    exp = experiment()
    events = [Event(f"u{i % 40}", str(i), float(i)) for i in range(400)]
    with SqliteEventLog(tmp_path / "events.sqlite") as log:
        log.append(events)
        assert learner_events(log, exp, "control", "all") is log
        own = learner_events(log, exp, "treatment", "own")
        assert isinstance(own, ArmEvents)
        read: list[LoggedEvent] = []
        after = 0
        while batch := own.read(after, 16):
            read += batch
            after = batch[-1].offset
        expected = [e for e in events if exp.assign(e.user_id).name == "treatment"]
        assert [r.event for r in read] == expected and 0 < len(expected) < 400
        with pytest.raises(ConfigError, match="no arm 'nobody'"):
            learner_events(log, exp, "nobody", "own")
        with pytest.raises(ConfigError, match="--learn-from must be one of all, own"):
            learner_events(log, exp, "control", "some")
