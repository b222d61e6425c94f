"""Serving past one machine, end to end, as processes on 127.0.0.1: redis-server, two stateless
`recloop serve` replicas (user state, result cache and events in Redis, both following the
registry's `latest`), nginx with deploy/nginx/recloop.conf in front, and `recloop online`
learning from the shared stream. bench/cluster.py starts them as a user would.

Checked: recommendations and events through nginx; an event accepted by one replica changes the
other's next answer; the learner's delta is followed by both replicas; one replica killed with
SIGKILL under load costs no request (nginx retries on the other), and once restarted it takes
traffic again; with Redis gone no replica is ready, and nginx still gets answers from them.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.cluster import Cluster, Process, Traffic, render_nginx_config, tail
from recloop.data.dataset import SequenceDataset
from recloop.registry import Registry
from tests.redis_server import running_redis
from tests.serving import API_KEY, make_dataset, train_version
from tests.warm_interpreter import WarmInterpreter, warm_interpreter

HEADERS = {"X-API-Key": API_KEY}
ROUTE = "/v1/users/{user_id}/recommendations"
K5 = {"k": 5}


def test_nginx_config_renders_every_replica_into_both_upstreams() -> None:
    template = Path("deploy/nginx/recloop.conf").read_text()
    rendered = render_nginx_config(template, 9100, [9101, 9102, 9103])
    servers = re.findall(r"server 127\.0\.0\.1:(\d+)(.*);", rendered)
    assert [port for port, _ in servers] == ["9101", "9102", "9103"] * 2
    assert {rest for _, rest in servers[:3]} == {" max_fails=1 fail_timeout=2s"}
    assert {rest for _, rest in servers[3:]} == {" max_fails=0"}
    assert "listen 127.0.0.1:9100 " in rendered and "8080" not in rendered
    assert "proxy_set_header X-Recloop-Require-Ready 1;" in rendered


@pytest.fixture(scope="module")
def warm() -> Iterator[WarmInterpreter]:
    env = {"RECLOOP_API_KEY": API_KEY, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with warm_interpreter(
        ["torch", "onnxruntime", "fastapi", "uvicorn", "redis"], {**os.environ, **env}
    ) as interpreter:
        yield interpreter


def users_of(data: Path, count: int) -> list[str]:
    dataset = SequenceDataset(data)
    return [str(raw) for raw in dataset.users.to_raw(list(range(1, count + 1)))]


def recommend(client: httpx.Client, base: str, user: str) -> dict[str, Any]:
    answer = client.get(f"{base}/v1/users/{user}/recommendations", params={"k": 5})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def served_requests(url: str) -> int:
    """GET recommendations this replica answered 200 to (its /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    pattern = rf'^recloop_request_seconds_count{{route="{re.escape(ROUTE)}",status="200"}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def wait_until(condition: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.slow
def test_two_replicas_behind_nginx_with_redis_and_the_learner(
    tmp_path: Path, warm: WarmInterpreter
) -> None:
    data = make_dataset(tmp_path / "data")
    registry = tmp_path / "registry"
    v1 = train_version(data, registry, tmp_path / "run", seed=1, steps=20)
    users = users_of(data, 40)
    items = [str(raw) for raw in SequenceDataset(data).items.to_raw(list(range(1, 41)))]

    def launch(args: list[str], env: dict[str, str], log: Path) -> Process:
        return warm.start("recloop.cli", args, env, log)

    with running_redis(tmp_path / "redis") as redis:
        cluster = Cluster(registry, redis.url, tmp_path / "cluster", API_KEY, launch=launch)
        try:
            a, b = cluster.start_replica("a"), cluster.start_replica("b")
            nginx = cluster.start_nginx()
            with httpx.Client(timeout=10) as client:
                # Recommendations and events through nginx.
                assert recommend(client, nginx.url, users[0])["model_version"] == v1
                event = {"events": [{"user_id": users[0], "item_id": items[0]}]}
                posted = client.post(f"{nginx.url}/v1/events", json=event, headers=HEADERS)
                assert posted.status_code == 200 and posted.json()["durable"] is True

                # Accepted by one replica, reflected by the other's next answer (shared state,
                # no stale cached result: the cache field holds a digest of the user's events).
                user = users[1]
                before = recommend(client, b.url, user)
                recommend(client, b.url, user)  # now cached at b
                top = before["items"][0]["item_id"]
                event = {"events": [{"user_id": user, "item_id": top}]}
                assert client.post(f"{a.url}/v1/events", json=event, headers=HEADERS).is_success
                after = recommend(client, b.url, user)
                assert after["cached"] is False
                assert top not in [entry["item_id"] for entry in after["items"]]
                events_at_b = client.get(f"{b.url}/v1/users/{user}/events", headers=HEADERS)
                assert events_at_b.json()["items"][-1] == top

                # The learner's delta reaches both replicas.
                cluster.start_learner(
                    ["online.publish_every_seconds=0.5", "online.poll_seconds=0.05",
                     "online.batch_events=8", "online.publish_every_events=8"]
                )  # fmt: skip
                batch = [
                    {"user_id": users[n % len(users)], "item_id": items[(3 * n) % len(items)]}
                    for n in range(64)
                ]
                sent = client.post(
                    f"{nginx.url}/v1/events", json={"events": batch}, headers=HEADERS
                )
                assert sent.status_code == 200
                reg = Registry(registry, create=False)
                # Recommendations go on while the replicas move along the deltas: none fails.
                with Traffic(nginx.url, users, threads=3, params=K5) as moving:
                    wait_until(
                        lambda: reg.resolve("latest") != v1,
                        120,
                        f"learner publish\n{learner_log(cluster)}",
                    )

                    # Both replicas end up on what the learner published last.
                    def both_on_latest() -> bool:
                        latest = reg.resolve("latest")
                        served = {client.get(f"{r.url}/v1/model").json()["version"] for r in (a, b)}
                        return served == {latest}

                    wait_until(both_on_latest, 60, "both replicas following the learner's deltas")
                assert set(moving.statuses) == {200}, moving.statuses
                version = reg.resolve("latest")
                while version != v1:  # every step a delta of the one before, back to v1
                    manifest = reg.manifest(version)
                    assert manifest.delta is not None and manifest.parent is not None
                    version = manifest.parent

            # SIGKILL one replica under load: nginx retries on the other, no request fails.
            with Traffic(
                nginx.url, users, items=items, api_key=API_KEY, threads=3, params=K5
            ) as load:
                time.sleep(1.0)
                served_by_a = served_requests(a.url)
                cluster.kill_replica("a")
                time.sleep(2.0)
                cluster.start_replica("a")  # same port: nginx takes it back after fail_timeout
                wait_until(
                    lambda: served_requests(a.url) > 0, 30, "restarted replica a taking traffic"
                )
                time.sleep(0.5)
            assert served_by_a > 0  # a took its share before the kill
            assert set(load.statuses) == {200}, load.statuses
            assert sum(load.statuses.values()) > 50

            # Redis goes away: no replica is ready, so nginx's @degraded route asks them without
            # the readiness header and they answer from what they have (last known state).
            redis.stop()
            with httpx.Client(timeout=10) as client:
                for user in users[:10]:  # the first calls find Redis gone: each answers anyway
                    assert recommend(client, nginx.url, user)["items"]
                unready = [r for r in (a, b) if client.get(f"{r.url}/readyz").status_code == 503]
                assert unready, "no replica noticed that Redis is gone"
                gated = client.get(
                    f"{unready[0].url}/v1/users/{users[0]}/recommendations",
                    headers={"X-Recloop-Require-Ready": "1"},
                )
                assert gated.status_code == 503  # what nginx sees first, before @degraded
        except BaseException:
            for replica in cluster.replicas.values():
                print(f"--- {replica.name}\n{tail(replica.log)}")
            print(f"--- learner\n{learner_log(cluster)}")
            raise
        finally:
            cluster.stop()


def learner_log(cluster: Cluster) -> str:
    return tail(cluster.workdir / "learner.log")
