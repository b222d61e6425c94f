"""Experiments end to end: `recloop serve --experiment` over HTTP, two replicas on one event
log, outcomes attributed to the arm that served, /metrics per arm, `recloop experiment report`
detecting the better arm, and bad experiments refused before anything is served."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from recloop.data.dataset import SequenceDataset
from recloop.data.synthetic import SyntheticConfig, successor_table
from recloop.errors import RegistryError
from recloop.events import open_event_log
from recloop.events.exposures import open_exposure_log
from recloop.experiments import Experiment, load_experiment
from recloop.serve.service import Service
from tests.redis_server import RedisServer, running_redis
from tests.serving import API_KEY, config_for, make_dataset, running_service, train_version
from tests.test_cli import run_here

KEYED = {"X-API-Key": API_KEY}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free port."""
    with running_redis(tmp_path / "redis") as server:
        yield server


def experiment_file(path: Path, control: str, treatment: str, **extra: Any) -> Path:
    lines = [
        'name = "retrain"',
        'salt = "2026-12-08"',
        "k = 10",
        "window_events = 1",
        "window_seconds = 3600",
        *(f"{key} = {json.dumps(value)}" for key, value in extra.items()),
    ]
    for name, ref in (("control", control), ("treatment", treatment)):
        lines += ["[[arms]]", f'name = "{name}"', f'ref = "{ref}"', "share = 0.5"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trained SASRec ("good") and one after a single step ("random"), on synthetic data
    whose items follow successors in their topic."""
    root = tmp_path_factory.mktemp("experiment")
    data = make_dataset(root / "data")
    registry = root / "registry"
    good = train_version(data, registry, root / "run-good", seed=1, steps=120)
    bad = train_version(data, registry, root / "run-bad", seed=2, steps=1)
    return {"data": data, "registry": registry, "v1": good, "good": good, "bad": bad, "root": root}


@pytest.fixture
def replicas(trained: dict[str, Any], tmp_path: Path) -> Iterator[tuple[str, str, Path, Path]]:
    """Two replicas of one experiment (random control, trained treatment) on one event log:
    (url A, url B, experiment file, event log)."""
    exp = experiment_file(tmp_path / "exp.toml", trained["bad"], trained["good"])
    events = tmp_path / "events.sqlite"
    config = config_for(
        trained, experiment=load_experiment(exp), event_log=str(events), tail_seconds=0.1
    )
    with running_service(config) as a, running_service(config) as b:
        yield a, b, exp, events


def ground_truth(trained: dict[str, Any]) -> tuple[list[str], dict[str, str], list[int]]:
    """(users, user -> last item, successor table): each user's next event is the successor
    of their last item, the synthetic data's own rule."""
    dataset = SequenceDataset(trained["data"])
    offsets, items = dataset.sequences.offsets, dataset.sequences.items
    users = [str(u) for u in dataset.users.to_raw(list(range(len(offsets) - 1)))]
    last = {
        user: str(dataset.items.to_raw([int(items[offsets[i + 1] - 1])])[0])
        for i, user in enumerate(users)
    }
    config = SyntheticConfig(
        num_users=300, num_items=120, num_topics=8, mean_length=12.0, max_length=40, seed=1
    )
    return users, last, [int(x) for x in successor_table(config)]


def test_arms_answer_and_a_better_arm_is_detected(
    trained: dict[str, Any],
    replicas: tuple[str, str, Path, Path],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    url_a, url_b, exp_file, events = replicas
    experiment = load_experiment(exp_file)
    versions = {"control": trained["bad"], "treatment": trained["good"]}
    users, last, successor = ground_truth(trained)
    with (
        httpx.Client(base_url=url_a, timeout=60) as a,
        httpx.Client(base_url=url_b, timeout=60) as b,
    ):
        model = a.get("/v1/model").json()
        assert model["version"] == trained["bad"]  # the control's
        arms = {arm["name"]: arm["model_version"] for arm in model["experiment"]["arms"]}
        assert arms == versions
        for _ in range(2):
            serve_then_act(a, b, experiment, versions, users, last, successor)
        again = a.get(
            f"/v1/users/{users[0]}/recommendations", params={"exclude_seen": False}
        ).json()
        assert again["arm"] == experiment.assign(users[0]).name
        # A's counters: the lists A served, settled by the events B logged (the shared log).
        deadline = time.monotonic() + 30
        while True:
            text = a.get("/metrics").text
            settled = _metric(text, "recloop_experiment_settled_total")
            if sum(settled.values()) >= 2 * len(users) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        exposures = _metric(text, "recloop_experiment_exposures_total")
        assert sum(exposures.values()) == 2 * len(users) + 1
        assert sum(settled.values()) == 2 * len(users)
        hits = _metric(text, "recloop_experiment_hits_total")
        assert hits.get("treatment", 0) > hits.get("control", 0)
        assert (
            sum(_metric(b.get("/metrics").text, "recloop_experiment_settled_total").values()) == 0
        )
    time.sleep(1.5)  # the last exposures reach their log (flushed every second)
    report_json, plot = tmp_path / "report.json", tmp_path / "report.png"
    done = run_here(
        capsys, "experiment", "report", "--experiment", str(exp_file), "--event-log", str(events),
        "--json", str(report_json), "--plot", str(plot),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "excludes 0" in done.stdout and plot.stat().st_size > 0
    report = json.loads(report_json.read_text())
    control, treatment = report["arms"]["control"], report["arms"]["treatment"]
    assert control["exposures"] + treatment["exposures"] == 2 * len(users)
    assert control["pending"] + treatment["pending"] == 1  # the last list: no next event yet
    # The same numbers as replica A's counters: both attribute to the arm that served.
    assert treatment["hits"] == hits["treatment"] and control["hits"] == hits.get("control", 0)
    better = treatment["vs_control"]
    assert better["hit"]["significant"] and better["hit"]["low"] > 0, better
    assert better["ndcg"]["low"] > 0, better


def serve_then_act(
    a: httpx.Client,
    b: httpx.Client,
    experiment: Experiment,
    versions: dict[str, str],
    users: list[str],
    last: dict[str, str],
    successor: list[int],
) -> None:
    """Each user gets a list from replica A, which names the user's arm and its version, and
    then does the ground truth's next thing (the successor of their last item) at replica B."""
    for user in users:
        body = a.get(f"/v1/users/{user}/recommendations", params={"exclude_seen": False})
        assert body.status_code == 200, body.text
        served = body.json()
        arm = experiment.assign(user).name
        assert (served["arm"], served["model_version"]) == (arm, versions[arm])
        nxt = str(successor[int(last[user])])
        posted = b.post(
            "/v1/events", json={"events": [{"user_id": user, "item_id": nxt}]}, headers=KEYED
        )
        assert posted.status_code == 200, posted.text
        last[user] = nxt


def _metric(text: str, name: str) -> dict[str, float]:
    """arm -> value of a labelled counter in Prometheus text."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].split("} ")
            arm = dict(part.split("=") for part in labels.split(","))["arm"].strip('"')
            values[arm] = float(value)
    return values


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_cached_lists_keep_their_arm_and_are_logged_exposures(
    trained: dict[str, Any], tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """A/A (one version in both arms): the cache key names the arm, a cached answer is an
    exposure too, and exposures land beside the event log, in SQLite or in Redis."""
    if backend == "sqlite":
        target = str(tmp_path / "events.sqlite")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        target = server.url
    exp = load_experiment(experiment_file(tmp_path / "aa.toml", trained["good"], trained["good"]))
    config = config_for(trained, experiment=exp, event_log=target)
    users, _, _ = ground_truth(trained)
    with running_service(config) as url, httpx.Client(base_url=url, timeout=60) as client:
        for user in users[:40]:
            first = client.get(f"/v1/users/{user}/recommendations").json()
            cached = client.get(f"/v1/users/{user}/recommendations").json()
            assert cached["cached"] and cached["arm"] == first["arm"] == exp.assign(user).name
            assert cached["items"] == first["items"]
        adhoc = client.post("/v1/recommendations", json={"items": ["1", "2"]}).json()
        assert "arm" not in adhoc and adhoc["model_version"] == trained["good"]  # the control
    # Stopping the service flushed its exposures.
    with open_event_log(target) as log, open_exposure_log(log) as exposures:
        served = exposures.read_all()
    assert len(served) == 80  # cache hits are exposures too; ad-hoc lists are not
    assert {(e.user_id, e.arm) for e in served} == {(u, exp.assign(u).name) for u in users[:40]}
    assert all(e.version == trained["good"] and len(e.items) == 10 for e in served)


def test_a_missing_ref_is_one_error_before_anything_is_served(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = experiment_file(tmp_path / "bad.toml", trained["good"], "v000099")
    with pytest.raises(RegistryError, match="arm 'treatment': ref 'v000099': unknown version"):
        Service(config_for(trained, experiment=load_experiment(bad), event_log=str(tmp_path / "e")))
    done = run_here(
        capsys, "serve", "--registry", str(trained["registry"]), "--experiment", str(bad),
        "--event-log", str(tmp_path / "events.sqlite"), "--port", "1",
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and done.stderr.count("\n") == 1
    assert "arm 'treatment'" in done.stderr and not (tmp_path / "events.exposures.sqlite").exists()
    uneven = tmp_path / "uneven.toml"
    uneven.write_text(
        experiment_file(tmp_path / "x.toml", trained["good"], trained["bad"])
        .read_text()
        .replace("share = 0.5", "share = 0.6", 1)
    )
    done = run_here(
        capsys, "serve", "--registry", str(trained["registry"]), "--experiment", str(uneven)
    )
    assert done.returncode == 2 and "shares must sum to 1" in done.stderr
    done = run_here(
        capsys, "serve", "--registry", str(trained["registry"]), "--experiment", str(bad)
    )
    assert done.returncode == 2 and "needs --event-log" in done.stderr
    done = run_here(
        capsys, "experiment", "report", "--experiment", str(bad), "--event-log",
        str(tmp_path / "none.sqlite"),
    )  # fmt: skip
    assert done.returncode == 2 and "none.sqlite: no such event log" in done.stderr
    done = run_here(capsys, "experiment", "report", "--experiment", str(uneven))
    assert done.returncode == 2 and f"{uneven}: arms.share: the shares must sum" in done.stderr


def test_a_learner_per_arm_learns_from_all_or_its_own_users(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from recloop.events import Event, SqliteEventLog
    from recloop.registry import Registry

    registry = tmp_path / "registry"
    shutil.copytree(trained["registry"], registry)
    exp_file = experiment_file(tmp_path / "exp.toml", trained["good"], trained["good"])
    exp: Experiment = load_experiment(exp_file)
    events = [Event(str(i % 60), str(1 + (i * 7) % 120), 1e9 + i) for i in range(240)]
    own_count = sum(exp.assign(e.user_id).name == "treatment" for e in events)
    with SqliteEventLog(tmp_path / "events.sqlite") as log:
        log.append(events)
    runs = {}
    for mode in ("own", "all"):
        done = run_here(
            capsys, "online", "--registry", str(registry), "--event-log",
            str(tmp_path / "events.sqlite"), "--experiment", str(exp_file), "--arm", "treatment",
            "--learn-from", mode, "--run-dir", str(tmp_path / f"run-{mode}"),
            "online.consumer=" + f"learner-{mode}",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        runs[mode] = done.stdout
    assert runs["own"].startswith(f"{own_count:,} events") and 0 < own_count < 240
    assert runs["all"].startswith("240 events")
    # Each learner published on the arm's lineage under its own consumer name, which an arm's
    # `learner` key follows when serving.
    from recloop.experiments.config import Arm, arm_version

    store = Registry(registry)
    own_head = arm_version(store, Arm("t", trained["good"], 1.0, learner="learner-own-treatment"))
    all_head = arm_version(store, Arm("t", trained["good"], 1.0, learner="learner-all-treatment"))
    assert len({own_head, all_head, trained["good"]}) == 3
    # A serving arm with `learner` follows that lineage's head.
    from recloop.serve.bundle import LoadOptions
    from recloop.serve.experiment import ArmHolder

    arm = Arm("treatment", trained["good"], 0.5, learner="learner-own-treatment")
    assert ArmHolder(store, LoadOptions(), arm).follow_target() == own_head
    assert store.manifest(own_head).training["online"]["offset"] <= 240
