"""Incremental HSTU encoding (cached keys and values): parity with a full re-encode, the window
policies when the window is full, the bounded store, version invalidation, serving parity and
the refusal of models that cannot be encoded incrementally.

Tolerance: incremental vs full re-encode agree to 1e-5 (max abs difference of unit user
vectors; measured ~6e-8: the same arithmetic, summed in another order over padding).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recloop.data.dataset import SequenceDataset
from recloop.errors import ConfigError
from recloop.events import Event
from recloop.models.hstu import HSTU, HSTUConfig
from recloop.models.hstu_kv import IncrementalHSTU, UserKV
from recloop.models.sasrec import SASRec, SASRecConfig
from recloop.serve.bundle import LoadOptions
from recloop.serve.incremental import IncrementalEncoding, decode_state, encode_state, plan
from recloop.serve.service import Service, ServiceConfig
from recloop.serve.state.kv import KVStore, MemoryKVStore, RedisKVStore
from tests.redis_server import free_port, running_redis
from tests.serving import make_dataset, train_version
from tests.test_cli import run_here

TOLERANCE = 1e-5
MAX_LENGTH = 12
HSTU_NONE = {
    "type": "hstu",
    "dim": 16,
    "num_blocks": 2,
    "num_heads": 2,
    "dropout": 0.0,
    "position_embedding": "none",
}


def _model(use_time_bias: bool = True, position_embedding: str = "none") -> HSTU:
    torch.manual_seed(0)
    config = HSTUConfig(
        num_items=60,
        max_length=MAX_LENGTH,
        dim=16,
        num_blocks=3,
        num_heads=2,
        use_time_bias=use_time_bias,
        position_embedding=position_embedding,
    )
    return HSTU(config).eval()


class Users:
    """Sequences (and timestamps) of a batch of users that grow by random appends."""

    def __init__(self, count: int, seed: int) -> None:
        self.rng = torch.Generator().manual_seed(seed)
        self.ids = [
            self._items(int(torch.randint(1, 6, (1,), generator=self.rng))) for _ in range(count)
        ]
        self.times = [self._clock(len(ids), 0) for ids in self.ids]

    def _items(self, count: int) -> torch.Tensor:
        return torch.randint(1, 61, (count,), generator=self.rng)

    def _clock(self, count: int, start: int) -> torch.Tensor:
        return start + torch.cumsum(torch.randint(0, 5000, (count,), generator=self.rng), 0)

    def append(self, at_least_one: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Appends 0..3 events to each user (at least one to user ``at_least_one``)."""
        new_ids, new_times = [], []
        for row in range(len(self.ids)):
            count = int(torch.randint(1 if row == at_least_one else 0, 4, (1,), generator=self.rng))
            ids, times = self._items(count), self._clock(count, int(self.times[row][-1]))
            self.ids[row] = torch.cat([self.ids[row], ids])
            self.times[row] = torch.cat([self.times[row], times])
            new_ids.append(ids)
            new_times.append(times)
        return new_ids, new_times

    @torch.no_grad()
    def full(self, model: HSTU, timed: bool) -> torch.Tensor:
        """The reference: every user's last window encoded from scratch, [B, D]."""
        rows = []
        for ids, times in zip(self.ids, self.times, strict=True):
            window, stamps = ids[-MAX_LENGTH:][None], times[-MAX_LENGTH:][None]
            rows.append(model.encode(window, stamps if timed else None)[0])
        return torch.stack(rows)


def _run(window: str, timed: bool, steps: int) -> list[float]:
    """Max |incremental - full| after each of ``steps`` rounds of appends."""
    model = _model(use_time_bias=timed)
    encoder = IncrementalHSTU(model, window)
    users = Users(6, seed=3)
    states: list[UserKV | None] = [None] * 6
    new_ids, new_times = list(users.ids), list(users.times)
    errors = []
    for _ in range(steps):
        vectors, states = encoder.encode(states, new_ids, new_times if timed else None)
        errors.append(float((vectors - users.full(model, timed)).abs().max()))
        new_ids, new_times = users.append()
    return errors


@pytest.mark.parametrize("timed", [False, True])
def test_incremental_matches_full_reencode_through_appends(timed: bool) -> None:
    """Several rounds of appends, users of different lengths (some past max_length, where the
    default "recompute" policy re-encodes the window): always within TOLERANCE."""
    errors = _run("recompute", timed, steps=10)
    assert max(errors) < TOLERANCE


def test_drop_oldest_is_exact_until_the_window_slides_then_approximate() -> None:
    model = _model(use_time_bias=False)
    encoder = IncrementalHSTU(model, "drop-oldest")
    ids = torch.arange(1, MAX_LENGTH + 1)
    (state,) = encoder.prefill([ids])
    vector, (slid,) = encoder.encode([state], [torch.tensor([40, 41])])
    window = torch.cat([ids, torch.tensor([40, 41])])[-MAX_LENGTH:]
    reference = model.encode(window[None])[0].detach()
    # The first block's keys depend on the item alone: still exact after dropping the oldest.
    (fresh,) = encoder.prefill([window])
    assert torch.allclose(slid.keys[0], fresh.keys[0], atol=TOLERANCE)
    assert torch.equal(slid.ids, window)
    # Deeper blocks carry context from the dropped items: close, not equal.
    difference = float((vector[0] - reference).abs().max())
    assert TOLERANCE < difference < 0.5
    assert float(torch.dot(vector[0], reference)) > 0.9
    # Before the window is full there is nothing to drop: exact.
    assert max(_run("drop-oldest", timed=False, steps=2)) < TOLERANCE


def test_no_new_events_returns_the_cached_vector_and_bad_rows_are_refused() -> None:
    encoder = IncrementalHSTU(_model(use_time_bias=True))
    (state,) = encoder.prefill([torch.tensor([3, 4, 5])], [torch.tensor([10, 20, 30])])
    vectors, (same,) = encoder.encode(
        [state], [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
    )
    assert same is state and torch.equal(vectors[0], state.vector)
    with pytest.raises(ConfigError, match="cached with timestamps"):
        encoder.encode([state], [torch.tensor([6])])
    with pytest.raises(ConfigError, match="no state and no events"):
        encoder.encode([None], [torch.zeros(0, dtype=torch.int64)])


def test_models_with_absolute_positions_are_refused() -> None:
    with pytest.raises(ConfigError, match='position_embedding = "none"'):
        IncrementalHSTU(_model(position_embedding="from_end"))
    sasrec = SASRec(SASRecConfig(num_items=10, max_length=8, dim=8, num_blocks=1, num_heads=1))
    with pytest.raises(ConfigError, match=r"needs an HSTU model.*SASRec"):
        IncrementalHSTU(sasrec)
    with pytest.raises(ConfigError, match="window policy 'sideways'"):
        IncrementalHSTU(_model(), "sideways")
    with pytest.raises(ConfigError, match="position_embedding='absolute'"):
        HSTUConfig(num_items=5, position_embedding="absolute")


def test_position_embedding_default_keeps_the_table_and_none_has_no_table() -> None:
    """Existing checkpoints (from_end) keep their parameter names; "none" adds nothing."""
    assert "position_embedding.weight" in _model(position_embedding="from_end").state_dict()
    assert not any("position_embedding" in name for name in _model().state_dict())
    assert HSTUConfig(num_items=5).position_embedding == "from_end"


# ------------------------------------------------------------------ the store and the codec


@pytest.fixture(params=["memory", "redis"])
def kv_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[int], KVStore]]:
    """Makes a store of each backend with a byte budget (the same contract for both)."""
    if request.param == "memory":
        yield MemoryKVStore
        return
    with running_redis(tmp_path / "redis") as server:
        yield lambda max_bytes: RedisKVStore(server.url, max_bytes)


def test_kv_store_stays_within_its_byte_budget_lru_first(
    kv_store: Callable[[int], KVStore],
) -> None:
    store = kv_store(1000)
    for user in range(8):
        store.put("v1", str(user), bytes(300))
        store.get("v1", "0")  # user 0 is read after every write: never the least recent
    status = store.status()
    assert status["bytes"] <= 1000 and status["entries"] == 3
    assert status["evictions"] == 5
    assert store.get("v1", "0") is not None and store.get("v1", "7") is not None
    assert store.get("v1", "1") is None
    store.put("v1", "huge", bytes(2000))  # larger than the whole budget: not stored
    assert store.get("v1", "huge") is None and store.status()["bytes"] <= 1000
    store.put("v1", "0", bytes(100))  # a smaller state replaces the old one's bytes
    assert store.status()["bytes"] == 700 and store.get("v1", "0") == bytes(100)
    store.put("v2", "0", bytes(50))
    assert store.retain("v2") == 3  # the other version's entries go
    assert store.status()["entries"] == 1 and store.status()["bytes"] == 50
    assert store.get("v1", "7") is None and store.get("v2", "0") == bytes(50)


def test_redis_kv_store_misses_while_redis_is_away(tmp_path: Path) -> None:
    """Reads miss (full encodes), writes are skipped: no error reaches a request."""
    store = RedisKVStore(f"redis://127.0.0.1:{free_port()}/0", 1000, retry_seconds=60)
    store.put("v1", "u", b"state")
    assert store.get("v1", "u") is None
    assert store.status()["errors"] == 1  # then not asked again for retry_seconds


def test_states_round_trip_as_bytes_and_a_new_version_drops_the_old_ones() -> None:
    model = _model(use_time_bias=True)
    encoder = IncrementalHSTU(model)
    (state,) = encoder.prefill([torch.tensor([7, 8, 9])], [torch.tensor([1, 2, 3])])
    back = decode_state(encode_state(state), torch.device("cpu"))
    for name in ("ids", "timestamps", "keys", "values", "vector"):
        assert torch.equal(getattr(back, name), getattr(state, name))
    store = MemoryKVStore()
    served = IncrementalEncoding(model, "v1", store)
    served.encode(["a", "b"], [np.array([1, 2]), np.array([3])], _no_engine)
    assert store.status()["entries"] == 2
    following = served.for_version(model, "v2")
    assert store.status()["entries"] == 0 and following.store is store
    assert store.get("v1", "a") is None


def test_a_shared_store_keeps_other_versions_for_other_replicas_and_arms(
    kv_store: Callable[[int], KVStore],
) -> None:
    """A delta clears an in-process store of the old version; a shared (Redis) store keeps it,
    since another replica mid-rollout or another experiment arm may still serve it."""
    model = _model(use_time_bias=True)
    store = kv_store(1 << 20)
    served = IncrementalEncoding(model, "v1", store)
    served.encode(["a"], [np.array([1, 2])], _no_engine)
    served.for_version(model, "v2")
    kept = store.get("v1", "a") is not None
    assert kept == store.shared and store.shared == (store.backend == "redis")


def _no_engine(sequences: list[Any]) -> Any:
    raise AssertionError("requests with a user id never reach the engine")


def test_plan_finds_the_new_items_after_the_cached_window() -> None:
    encoder = IncrementalHSTU(_model(use_time_bias=False))
    (state,) = encoder.prefill([torch.tensor([1, 2, 3])])
    for policy in ("recompute", "drop-oldest"):
        kept, new = plan(state, np.array([1, 2, 3, 4, 5]), policy)
        assert kept is state and new.tolist() == [4, 5]
        kept, new = plan(state, np.array([9, 9, 9]), policy)  # history rewritten: in full
        assert kept is None and new.tolist() == [9, 9, 9]
    full = np.arange(1, MAX_LENGTH + 1)
    (whole,) = encoder.prefill([torch.from_numpy(full)])
    slid = np.concatenate([full[2:], [50, 51]])  # the full window slid by two
    kept, new = plan(whole, slid, "drop-oldest")
    assert kept is not None and kept.ids.tolist() == full[2:].tolist() and new.tolist() == [50, 51]
    kept, new = plan(whole, slid, "recompute")
    assert kept is None and new.tolist() == slid.tolist()
    # The state store dropped the oldest event (window not full): a slide all the same.
    kept, new = plan(state, np.array([2, 3, 4]), "drop-oldest")
    assert kept is not None and kept.ids.tolist() == [2, 3] and new.tolist() == [4]


# ------------------------------------------------------------------ serving


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An HSTU with position_embedding "none" trained a few steps (training works with it)."""
    root = tmp_path_factory.mktemp("incremental")
    data = make_dataset(root / "data")
    version = train_version(
        data, root / "registry", root / "run", seed=0, steps=12, model=HSTU_NONE
    )
    return {"root": root, "data": data, "registry": root / "registry", "v1": version}


def _service(trained: dict[str, Any], **load: Any) -> Service:
    options = LoadOptions(engine="torch", **load)
    return Service(
        ServiceConfig(registry=trained["registry"], ref=trained["v1"], load=options, cache=False)
    )


async def _serve_rounds(
    trained: dict[str, Any], users: list[str], rounds: int, **load: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    import json

    plain = _service(trained)
    incremental = _service(trained, incremental_encoding=True, **load)
    answers: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
    await plain.start()
    await incremental.start()
    try:
        rng = np.random.default_rng(0)
        for step in range(rounds):
            events = [
                Event(user, str(int(rng.integers(1, 100))), float(step))
                for user in users
                for _ in range(int(rng.integers(0, 4)))
            ]
            for service, out in zip((plain, incremental), answers, strict=True):
                await service.accept_events(events)
                for user in users:
                    body = await service.user_recommendations(user, 10, exclude_seen=False)
                    out.append(json.loads(body))
        status = incremental.bundle.incremental.status() if incremental.bundle.incremental else {}
    finally:
        await plain.stop()
        await incremental.stop()
    return answers[0], answers[1], status


@pytest.mark.parametrize("kv", ["memory", "redis"])
def test_served_answers_are_the_same_with_incremental_encoding(
    trained: dict[str, Any], kv: str, tmp_path: Path
) -> None:
    """Known users (training history + new events, some past max_length 20) and a new user,
    over rounds of events: the same items, scores within the bodies' rounding; the states in
    memory or in Redis."""
    dataset = SequenceDataset(trained["data"])
    users = [str(user) for user in dataset.users.to_raw([1, 5, 9])] + ["new-user"]
    with contextlib.ExitStack() as stack:
        url = None
        if kv == "redis":
            url = stack.enter_context(running_redis(tmp_path / "redis")).url
        plain, incremental, status = asyncio.run(_serve_rounds(trained, users, 6, kv_url=url))
    for left, right in zip(plain, incremental, strict=True):
        assert [item["item_id"] for item in left["items"]] == [
            item["item_id"] for item in right["items"]
        ]
        scores = np.array(
            [[a["score"], b["score"]] for a, b in zip(left["items"], right["items"], strict=True)]
        )
        assert np.abs(scores[:, 0] - scores[:, 1]).max() <= 1e-4
    assert status["incremental"] > 0 and 0 < status["entries"] < len(users)
    assert status["engine"] > 0  # some windows were full: "recompute" sends them to the engine


def test_served_answers_with_drop_oldest_stay_close(trained: dict[str, Any]) -> None:
    """drop-oldest keeps sliding windows incremental (approximate): most top-10 items agree."""
    dataset = SequenceDataset(trained["data"])
    users = [str(user) for user in dataset.users.to_raw([1, 5, 9])]
    window = {"incremental_window": "drop-oldest"}
    plain, incremental, status = asyncio.run(_serve_rounds(trained, users, 6, **window))
    overlaps = [
        len({i["item_id"] for i in left["items"]} & {i["item_id"] for i in right["items"]}) / 10
        for left, right in zip(plain, incremental, strict=True)
    ]
    assert status["slid"] > 0 and status["engine"] == 0
    assert float(np.mean(overlaps)) >= 0.8


def test_serving_refuses_incremental_encoding_for_absolute_positions(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SASRec version: one error line at load, exit 2, nothing served."""
    registry = tmp_path / "registry"
    train_version(trained["data"], registry, tmp_path / "run", seed=0, steps=2)
    done = run_here(
        capsys, "serve", "--registry", str(registry), "--engine", "torch", "--incremental-encoding"
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "--incremental-encoding" in lines[0] and "HSTU" in lines[0]
    with pytest.raises(ConfigError, match="incremental_window"):
        LoadOptions(incremental_encoding=True, incremental_window="both")
