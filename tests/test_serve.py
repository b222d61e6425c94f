"""The HTTP service as a client uses it: a real uvicorn server on 127.0.0.1, real models."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from pymilvus import MilvusClient

from recloop.data.dataset import SequenceDataset
from recloop.registry import Registry
from recloop.registry.loading import load_model
from recloop.serve.bundle import LoadOptions
from recloop.serve.indexes import milvus
from recloop.serve.schemas import Recommendations
from recloop.serve.validation import fast_arguments
from tests.serving import (
    API_KEY,
    TINY_MODEL,
    config_for,
    known_user,
    make_dataset,
    running_service,
    train_version,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("serve")
    data = make_dataset(root / "data")
    registry = root / "registry"
    first = train_version(data, registry, root / "run1", seed=1)
    second = train_version(data, registry, root / "run2", seed=2, steps=30)
    return {"data": data, "registry": registry, "v1": first, "v2": second, "root": root}


@pytest.fixture(scope="module")
def service(trained: dict[str, Any]) -> Iterator[str]:
    with running_service(config_for(trained)) as url:
        yield url


@pytest.fixture
def client(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, timeout=30) as http:
        yield http


def reference_top_k(trained: dict[str, Any], history: list[int], k: int) -> list[int]:
    """Top-k dense ids from the torch model directly, seen items excluded."""
    model, _ = load_model(Registry(trained["registry"]), trained["v1"])
    length = int(model.config.max_length)
    window = history[-length:]
    ids = torch.zeros(1, length, dtype=torch.int64)
    ids[0, length - len(window) :] = torch.tensor(window)
    with torch.no_grad():
        scores = model.score(model.encode(ids))[0]
    scores[torch.tensor(sorted(set(history)))] = float("-inf")
    return [int(i) for i in torch.topk(scores, k).indices]


# ---------------------------------------------------------------------------- contract


def test_user_recommendations_match_the_reference_model(
    trained: dict[str, Any], client: httpx.Client
) -> None:
    user, dense, _ = known_user(trained)
    response = client.get(f"/v1/users/{user}/recommendations", params={"k": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == trained["v1"] and body["fallback"] is None
    dataset = SequenceDataset(trained["data"])
    expected = [str(x) for x in dataset.items.to_raw(reference_top_k(trained, dense, 7))]
    assert [item["item_id"] for item in body["items"]] == expected
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_cache_hit_then_invalidated_by_events(
    trained: dict[str, Any], client: httpx.Client
) -> None:
    user, _, _ = known_user(trained)
    first = client.get(f"/v1/users/{user}/recommendations", params={"k": 5}).json()
    second = client.get(f"/v1/users/{user}/recommendations", params={"k": 5}).json()
    assert second["cached"] is True and second["items"] == first["items"]
    top = first["items"][0]["item_id"]
    posted = client.post(
        "/v1/events",
        json={"events": [{"user_id": user, "item_id": top}]},
        headers={"X-API-Key": API_KEY},
    )
    assert posted.status_code == 200, posted.text
    assert posted.json() == {
        "accepted": 1,
        "users": 1,
        "durable": False,  # no event log: in-process state only
        "event_ids": [],
        "unknown_items": [],
    }
    third = client.get(f"/v1/users/{user}/recommendations", params={"k": 5}).json()
    # The event reached the user's state at once: not cached, and the item is now "seen".
    assert third["cached"] is False
    assert top not in [item["item_id"] for item in third["items"]]


def test_unknown_user_gets_flagged_popularity_fallback(client: httpx.Client) -> None:
    body = client.get("/v1/users/nobody-knows-me/recommendations", params={"k": 4}).json()
    assert body["fallback"] == "popularity" and len(body["items"]) == 4


def test_adhoc_sequence_reports_unknown_items(
    trained: dict[str, Any], client: httpx.Client
) -> None:
    _, dense, raw_items = known_user(trained)
    response = client.post(
        "/v1/recommendations", json={"items": [*raw_items, "no-such-item", 10**9], "k": 7}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["unknown_items"] == ["no-such-item", str(10**9)]
    dataset = SequenceDataset(trained["data"])
    expected = [str(x) for x in dataset.items.to_raw(reference_top_k(trained, dense, 7))]
    assert [item["item_id"] for item in body["items"]] == expected
    only_unknown = client.post("/v1/recommendations", json={"items": ["zzz"], "k": 3}).json()
    assert only_unknown["fallback"] == "popularity" and only_unknown["unknown_items"] == ["zzz"]


def test_similar_items_exclude_the_item_itself(
    trained: dict[str, Any], client: httpx.Client
) -> None:
    _, _, raw_items = known_user(trained)
    body = client.get(f"/v1/items/{raw_items[0]}/similar", params={"k": 5}).json()
    ids = [item["item_id"] for item in body["items"]]
    assert len(ids) == 5 and raw_items[0] not in ids
    assert client.get("/v1/items/not-an-item/similar").status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "needle"),
    [
        ("get", "/v1/users/u/recommendations", {"params": {"k": 0}}, 422, "query.k"),
        ("get", "/v1/users/u/recommendations", {"params": {"k": "ten"}}, 422, "query.k"),
        ("get", "/v1/users/u/recommendations", {"params": {"k": 10**6}}, 422, "query.k"),
        ("post", "/v1/recommendations", {"content": b"{not json"}, 422, "JSON"),
        ("post", "/v1/recommendations", {"json": {"items": ["1"] * 1001}}, 422, "body.items"),
        ("post", "/v1/recommendations", {"json": {"items": [], "color": 1}}, 422, "color"),
        ("post", "/v1/recommendations", {"content": b"x" * 70_000}, 413, "bytes"),
        ("post", "/v1/events", {"json": {"events": [{"user_id": 1, "item_id": 2}]}}, 401, "Key"),
        ("post", "/v1/admin/reload", {"json": {}}, 401, "Key"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(
    client: httpx.Client,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    needle: str,
) -> None:
    headers = {"content-type": "application/json"}
    response = getattr(client, method)(path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"]


def test_reload_unknown_version_is_404_and_keeps_serving(client: httpx.Client) -> None:
    response = client.post(
        "/v1/admin/reload", json={"version": "v000099"}, headers={"X-API-Key": API_KEY}
    )
    assert response.status_code == 404 and "v000099" in response.json()["detail"]
    assert client.get("/v1/model").json()["version"] == "v000001"


def test_ops_endpoints(trained: dict[str, Any], client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["state"]["backend"] == "memory"
    model = client.get("/v1/model").json()
    assert model["version"] == trained["v1"] and model["engine"] == "onnx"
    assert model["index"] == "exact" and model["num_items"] == 120
    client.get("/v1/users/nobody/recommendations")
    metrics = client.get("/metrics").text
    assert 'recloop_request_seconds_count{route="/v1/users/{user_id}/recommendations"' in metrics
    assert "recloop_batch_size_count" in metrics and "recloop_cache_hits_total" in metrics
    assert f'recloop_model_info{{version="{trained["v1"]}"}} 1.0' in metrics
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/recommendations", "/v1/events", "/v1/admin/reload"} <= set(paths)


def test_write_endpoints_are_disabled_without_an_api_key(trained: dict[str, Any]) -> None:
    with running_service(config_for(trained, api_key=None)) as url:
        response = httpx.post(
            f"{url}/v1/events",
            json={"events": [{"user_id": 1, "item_id": 2}]},
            headers={"X-API-Key": "anything"},
        )
        assert response.status_code == 403 and "--api-key" in response.json()["detail"]


# ---------------------------------------------------------------------------- hot swap


def test_hot_swap_under_load_fails_no_request(trained: dict[str, Any]) -> None:
    with running_service(config_for(trained, ref=trained["v1"])) as url:
        versions, statuses = asyncio.run(_load_while_swapping(url, trained["v2"]))
    assert set(statuses) == {200}, statuses
    assert versions[trained["v1"]] > 0 and versions[trained["v2"]] > 0


async def _load_while_swapping(url: str, target: str) -> tuple[dict[str, int], list[int]]:
    versions: dict[str, int] = {}
    statuses: list[int] = []
    swapped = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:

        async def hammer(worker: int) -> None:
            after_swap = 0
            while after_swap < 20:
                response = await http.post(
                    "/v1/recommendations", json={"items": [str(worker % 50 + 1), "3"], "k": 5}
                )
                statuses.append(response.status_code)
                if response.status_code == 200:
                    version = response.json()["model_version"]
                    versions[version] = versions.get(version, 0) + 1
                after_swap += swapped.is_set()

        async def swap() -> None:
            await asyncio.sleep(0.3)
            response = await http.post(
                "/v1/admin/reload", json={"version": target}, headers={"X-API-Key": API_KEY}
            )
            assert response.status_code == 200, response.text
            assert response.json()["swapped"] is True
            swapped.set()

        await asyncio.gather(swap(), *(hammer(w) for w in range(8)))
    return versions, statuses


def test_follow_mode_swaps_when_production_moves(trained: dict[str, Any]) -> None:
    registry = Registry(trained["registry"])
    registry.promote(trained["v1"])
    with running_service(config_for(trained, ref="production", follow_seconds=0.2)) as url:
        assert httpx.get(f"{url}/v1/model").json()["version"] == trained["v1"]
        registry.promote(trained["v2"])
        for _ in range(600):
            if httpx.get(f"{url}/v1/model").json()["version"] == trained["v2"]:
                break
            asyncio.run(asyncio.sleep(0.1))
        assert httpx.get(f"{url}/v1/model").json()["version"] == trained["v2"]


def test_torch_engine_and_ivf_index_serve_the_same_api(trained: dict[str, Any]) -> None:
    load = LoadOptions(engine="torch", index="ivf", min_recall=0.9)
    with running_service(config_for(trained, load=load, cache=False)) as url:
        model = httpx.get(f"{url}/v1/model").json()
        assert model["engine"] == "torch" and model["index"] == "ivf"
        assert model["details"]["index_recall_at_10"] >= 0.9
        body = httpx.post(f"{url}/v1/recommendations", json={"items": ["1", "2"], "k": 3}).json()
        assert len(body["items"]) == 3 and body["cached"] is False


def test_milvus_index_serves_the_same_api(trained: dict[str, Any], tmp_path: Path) -> None:
    uri = str(tmp_path / "items.db")  # --index-uri: a milvus-lite file
    load = LoadOptions(engine="torch", index="milvus", index_uri=uri, index_alias="replica_1")
    exact = LoadOptions(engine="torch")
    body = {"items": ["1", "2"], "k": 5}
    with running_service(config_for(trained, load=exact, cache=False)) as url:
        expected = httpx.post(f"{url}/v1/recommendations", json=body).json()["items"]
    with running_service(config_for(trained, load=load, cache=False)) as url:
        model = httpx.get(f"{url}/v1/model").json()
        assert model["index"] == "milvus" and model["details"]["index_recall_at_10"] >= 0.99
        found = httpx.post(f"{url}/v1/recommendations", json=body).json()["items"]
        assert [item["item_id"] for item in found] == [item["item_id"] for item in expected]

        # A second replica on the same Milvus with its own alias comes and goes: this one's
        # collection is untouched (one alias per replica, as deploy/README.md says).
        second = LoadOptions(engine="torch", index="milvus", index_uri=uri, index_alias="replica_2")
        with running_service(config_for(trained, load=second, cache=False)) as other_url:
            assert httpx.post(f"{other_url}/v1/recommendations", json=body).status_code == 200
        again = httpx.post(f"{url}/v1/recommendations", json=body).json()["items"]
        assert [item["item_id"] for item in again] == [item["item_id"] for item in expected]

        # Milvus loses the collection (as when its server goes away): 503 naming the index, not
        # ready (so a balancer moves traffic), and ready again once Milvus answers.
        user, _, _ = known_user(trained)
        other = MilvusClient(uri=uri)
        other.drop_collection(other.describe_alias("replica_1")["collection_name"])
        failed = httpx.get(f"{url}/v1/users/{user}/recommendations")
        assert failed.status_code == 503 and "milvus search" in failed.json()["detail"]
        assert httpx.post(f"{url}/v1/recommendations", json=body).status_code == 503
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503
        assert "item index is unavailable" in ready.json()["reason"]
        dim = TINY_MODEL["dim"]  # the trained fixture's model
        table = np.zeros((model["num_items"] + 1, dim), dtype=np.float32)
        restored = milvus.MilvusIndex(table, uri=uri, alias="replica_1")  # Milvus answers again
        try:
            deadline = time.monotonic() + 10
            while httpx.get(f"{url}/readyz").status_code != 200:
                assert time.monotonic() < deadline, "not ready again after Milvus came back"
                time.sleep(0.1)
            assert httpx.get(f"{url}/v1/users/{user}/recommendations").status_code == 200
        finally:
            other.close()
            restored.close()


def test_a_bad_event_batch_stores_nothing(client: httpx.Client) -> None:
    # The first event is valid, the second lacks item_id: 422 naming the field, and the valid
    # one is not stored either (the user stays unknown).
    events = [{"user_id": "fresh-user", "item_id": "1"}, {"user_id": "fresh-user"}]
    response = client.post(
        "/v1/events",
        content=json.dumps({"events": events}),
        headers={"X-API-Key": API_KEY, "content-type": "application/json"},
    )
    assert response.status_code == 422 and "item_id" in response.json()["detail"]
    body = client.get("/v1/users/fresh-user/recommendations").json()
    assert body["fallback"] == "popularity"


# ---------------------------------------------------------------------------- fast path


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", (10, True)),
        (b"k=7", (7, True)),
        (b"k=1000&exclude_seen=false", (1000, False)),
        (b"exclude_seen=No&other=1", (10, False)),
        (b"k=0", None),  # every invalid or unusual form goes to FastAPI, which explains it
        (b"k=1001", None),
        (b"k=-3", None),
        (b"k=ten", None),
        (b"k=5&k=6", None),
        (b"exclude_seen=maybe", None),
        ("k=²".encode(), None),  # a digit to str.isdigit, not to int(): once a 500
        ("k=٣".encode(), None),
        (b"k=%D9%A3", None),
        (b"k=%FF", None),
    ],
)
def test_fast_path_accepts_only_plainly_valid_queries(
    query: bytes, expected: tuple[int, bool] | None
) -> None:
    assert fast_arguments(query) == expected


def test_fast_path_and_fastapi_answer_alike(trained: dict[str, Any], client: httpx.Client) -> None:
    user, _, _ = known_user(trained)
    fast = client.get(f"/v1/users/{user}/recommendations?k=6&exclude_seen=false")
    # A repeated parameter is not plainly valid: FastAPI's route answers (last value wins).
    slow = client.get(f"/v1/users/{user}/recommendations?k=6&k=6&exclude_seen=false")
    assert fast.status_code == slow.status_code == 200
    assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
    assert Recommendations.model_validate_json(fast.content).items == (
        Recommendations.model_validate_json(slow.content).items
    )
    metrics = client.get("/metrics").text
    assert 'route="/v1/users/{user_id}/recommendations",status="200"' in metrics


# ---------------------------------------------------------------------------- event log


def test_events_are_durable_in_the_event_log_before_they_are_acknowledged(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    from recloop.events import open_event_log

    path = tmp_path / "events.sqlite"
    headers = {"X-API-Key": API_KEY}
    with running_service(config_for(trained, event_log=str(path))) as url:
        events = [
            {"user_id": "u1", "item_id": "3", "timestamp": 1_700_000_000.5},
            {"user_id": 7, "item_id": 4, "event_type": "purchase", "value": 2.0},
        ]
        body = httpx.post(f"{url}/v1/events", json={"events": events}, headers=headers).json()
        assert body["accepted"] == 2 and body["event_ids"] == ["1", "2"]
        bad = [{"user_id": "", "item_id": "3"}]  # an empty id: refused, nothing stored
        refused = httpx.post(f"{url}/v1/events", json={"events": bad}, headers=headers)
        assert refused.status_code == 422 and "user_id" in refused.json()["detail"]
    with open_event_log(path) as log:
        logged = log.read(after=0, limit=10)
    assert [(e.event.user_id, e.event.item_id, e.event.event_type) for e in logged] == [
        ("u1", "3", "interaction"),
        ("7", "4", "purchase"),
    ]
    assert logged[0].event.timestamp == 1_700_000_000.5 and logged[1].event.value == 2.0


def test_a_delta_version_hot_swaps_in_and_changes_the_answers(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    import shutil

    from recloop.registry import RowUpdate

    # A private copy of the registry: the delta must not leak into the other tests' registry.
    registry_dir = tmp_path / "registry"
    shutil.copytree(trained["registry"], registry_dir)
    registry = Registry(registry_dir)
    user, dense, _ = known_user(trained)
    with running_service(config_for(trained, registry=registry_dir, cache=False)) as url:
        before = httpx.get(f"{url}/v1/users/{user}/recommendations", params={"k": 3}).json()
        # The delta moves item 7's embedding onto the user's query direction: it must rank 1st.
        model, _ = load_model(registry, trained["v1"])
        length = int(model.config.max_length)
        window = torch.zeros(1, length, dtype=torch.int64)
        window[0, length - len(dense[-length:]) :] = torch.tensor(dense[-length:])
        with torch.no_grad():
            query = model.encode(window)[0]
        table = model.item_embedding.weight.detach()
        shown = {item["item_id"] for item in before["items"]}
        raw = SequenceDataset(trained["data"]).items
        target = next(
            i for i in range(1, 120) if i not in set(dense) and str(raw.to_raw([i])[0]) not in shown
        )
        row = (query / query.norm() * table.norm(dim=1).max() * 3).unsqueeze(0)
        delta = registry.publish_delta(
            trained["v1"],
            {"item_embedding.weight": RowUpdate(torch.tensor([target]), row.to(table.dtype))},
        )
        swapped = httpx.post(
            f"{url}/v1/admin/reload", json={"version": delta}, headers={"X-API-Key": API_KEY}
        ).json()
        assert swapped["version"] == delta and swapped["swapped"] is True
        after = httpx.get(f"{url}/v1/users/{user}/recommendations", params={"k": 3}).json()
    assert after["model_version"] == delta
    assert after["items"][0]["item_id"] == str(raw.to_raw([target])[0])  # was not in the top 3


def test_ids_holding_a_slash_are_addressable(trained: dict[str, Any], client: httpx.Client) -> None:
    user = "https://shop.example/users/42"  # ids may be URLs: a path parameter takes them whole
    posted = client.post(
        "/v1/events",
        json={"events": [{"user_id": user, "item_id": known_user(trained)[2][0]}]},
        headers={"X-API-Key": API_KEY},
    )
    assert posted.status_code == 200, posted.text
    quoted = httpx.URL(f"/v1/users/{user.replace('/', '%2F')}/recommendations")
    fast = client.get(quoted, params={"k": 3})
    slow = client.get(quoted, params=[("k", "3"), ("k", "3")])  # not plainly valid: FastAPI
    assert fast.status_code == slow.status_code == 200, fast.text
    assert fast.json()["user_id"] == user and fast.json()["fallback"] is None
    events = client.get(
        f"/v1/users/{user.replace('/', '%2F')}/events", headers={"X-API-Key": API_KEY}
    )
    assert events.status_code == 200 and events.json()["items"] == [known_user(trained)[2][0]]
    metrics = client.get("/metrics").text
    assert "{user_id:path}" not in metrics
