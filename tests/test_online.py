"""The online learner: test-then-train, new-item admission, deltas, restarts and compaction.
The learner under kill -9 at every publish step: tests/test_faults.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from safetensors import safe_open

from recloop.data.vocabulary import Vocabulary
from recloop.errors import ConfigError, DatasetError
from recloop.events import Event, SqliteEventLog
from recloop.events.redis_streams import RedisStreamEventLog
from recloop.online.config import OnlineConfig, load_online_config
from recloop.online.items import ItemAttributes, PendingItems, initial_row
from recloop.online.learner import OnlineLearner
from recloop.online.optim import LazyAdam, grow_rows
from recloop.online.prequential import CSV_NAME, PLOT_NAME
from recloop.online.resume import OnlineState
from recloop.registry import WEIGHTS, Manifest, Registry
from recloop.registry.loading import load_model
from tests.online_helpers import NUM_ITEMS, event_log, pattern_events, state_of
from tests.redis_server import running_redis
from tests.serving import make_dataset, train_version

FAST = OnlineConfig(batch_events=64, publish_every_events=256, publish_every_seconds=0)


def published_offset(registry: Registry) -> int:
    """The event offset covered by the newest version (0 before the learner published)."""
    state = OnlineState.from_manifest(registry.manifest("latest"))
    return state.offset if state is not None else 0


# ----------------------------------------------------------------------------- building blocks


def test_lazy_adam_moves_only_rows_with_gradients() -> None:
    table = torch.nn.Parameter(torch.randn(10, 4))
    before = table.detach().clone()
    optimizer = LazyAdam([table], lr=0.1)
    for _ in range(3):  # later steps: only row 2 has a gradient, rows 5 and 7 must not drift
        optimizer.zero_grad()
        loss = table[2].sum() + (table[[5, 7]].sum() if _ == 0 else 0)
        loss.backward()
        optimizer.step()
    moved = (table.detach() != before).any(dim=1).nonzero().squeeze(1).tolist()
    assert moved == [2, 5, 7]
    after_first = table.detach().clone()
    optimizer.zero_grad()
    table[2].sum().backward()
    optimizer.step()
    assert torch.equal(table.detach()[[5, 7]], after_first[[5, 7]])  # no momentum drift


def test_grow_rows_keeps_optimizer_state() -> None:
    table = torch.nn.Parameter(torch.randn(5, 3))
    optimizer = LazyAdam([table], lr=0.1)
    table.sum().backward()
    optimizer.step()
    grown = grow_rows(table, torch.ones(2, 3), optimizer)
    assert grown.shape == (7, 3) and torch.equal(grown.detach()[5:], torch.ones(2, 3))
    state = optimizer.state[grown]
    assert state["exp_avg"].shape == (7, 3) and torch.all(state["exp_avg"][5:] == 0)
    assert optimizer.param_groups[0]["params"][0] is grown


def test_vocabulary_grows_and_keeps_integer_raw_ids(tmp_path: Path) -> None:
    pl.DataFrame({"id": [1, 2], "raw": [10, 20]}).write_parquet(tmp_path / "items.parquet")
    vocabulary = Vocabulary.read(tmp_path / "items.parquet")
    assert vocabulary.dense("20") == 2 and vocabulary.dense("30") == 0
    assert vocabulary.add("30") == 3
    table = pl.read_parquet(vocabulary.parquet_bytes())
    assert table["raw"].dtype == pl.Int64 and table["raw"].to_list() == [10, 20, 30]
    vocabulary.add("sku-x")  # not an integer: the column becomes text, nothing is lost
    table = pl.read_parquet(vocabulary.parquet_bytes())
    assert table["raw"].to_list() == ["10", "20", "30", "sku-x"]
    assert table["id"].to_list() == [1, 2, 3, 4]
    with pytest.raises(DatasetError, match="already in the vocabulary"):
        vocabulary.add("20")


def test_pending_items_admit_after_n_occurrences_with_context() -> None:
    pending = PendingItems(admit_after=3)
    assert not pending.observe("new", [1, 2])
    assert not pending.observe("new", [3])
    assert pending.observe("new", [4])
    assert pending.admit("new") == [1, 2, 3, 4] and len(pending) == 0


def test_initial_row_is_the_mean_of_neighbours() -> None:
    table = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    assert torch.equal(initial_row(table, [1, 3]), (table[1] + table[3]) / 2)
    assert torch.equal(initial_row(table, []), table[1:].mean(0))  # nothing known: catalogue mean


def test_attributes_rank_neighbours_by_shared_attributes(tmp_path: Path) -> None:
    path = tmp_path / "attributes.json"
    path.write_text(json.dumps({"1": [1, 2], "2": [2], "3": [9], "new": [1, 2]}))
    vocabulary = Vocabulary.from_strings(["1", "2", "3"])
    assert ItemAttributes.from_json(path).neighbours("new", vocabulary) == [1, 2]
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ItemAttributes.from_json(path)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "online.toml"
    path.write_text("[online]\nbatch_event = 3\n")
    with pytest.raises(ConfigError, match=r"online\.batch_event"):
        load_online_config(path)
    with pytest.raises(ConfigError, match=r"online\.admit_after must be >= 1"):
        load_online_config(None, ["online.admit_after=0"])
    with pytest.raises(ConfigError, match=r"online\.lr must be"):
        load_online_config(None, ["online.lr=fast"])
    assert load_online_config(None, ["online.lr=1e-3"]).lr == 1e-3


# ----------------------------------------------------------------------------- the learner


def test_online_learning_beats_the_frozen_model_on_a_new_pattern(
    registry: Registry, tmp_path: Path
) -> None:
    log = event_log(tmp_path / "events.db", pattern_events(1500))
    config = OnlineConfig(
        batch_events=64, publish_every_events=1000, publish_every_seconds=0, lr=3e-3,
        embedding_lr=1e-2, steps_per_batch=2, replay_windows=32,
    )  # fmt: skip
    learner = OnlineLearner(registry, log, config, tmp_path / "run")
    summary = learner.run()
    assert summary.events == 3000 and summary.offset == 3000
    totals = summary.totals
    assert totals["scored"] == 3000 and totals["events"] == 3000
    # The second event of each pair follows a rule the base model never saw; test-then-train
    # lets the online model learn it while the frozen model keeps missing.
    assert totals["online_HR@10"] > totals["frozen_HR@10"] + 0.05
    rows = pl.read_csv(tmp_path / "run" / CSV_NAME)
    assert rows["events"].sum() == 3000 and rows["offset"].is_unique().all()
    assert (tmp_path / "run" / PLOT_NAME).stat().st_size > 0
    # What was published is exactly the model in memory (the delta chain loads bitwise).
    model, manifest = load_model(registry, summary.version)
    for name, tensor in learner.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert manifest.kind == "delta" and manifest.method == "online"
    assert log.committed(config.consumer) == 3000


def test_a_non_causal_model_learns_online_on_prefixes(tmp_path: Path) -> None:
    # BSARec sees a whole window at once, so the learner trains it on each prefix with the
    # target at the last position, as `recloop train` does (train.samples = "prefixes").
    data = make_dataset(tmp_path / "data", num_items=NUM_ITEMS)
    bsarec = {"type": "bsarec", "dim": 16, "num_blocks": 1, "dropout": 0.0,
              "attention_dropout": 0.0}  # fmt: skip
    version = train_version(
        data, tmp_path / "registry", tmp_path / "base", seed=0, model=bsarec, samples="prefixes"
    )
    registry = Registry(tmp_path / "registry")
    log = event_log(tmp_path / "events.db", pattern_events(1500))
    config = OnlineConfig(
        batch_events=64, publish_every_events=1000, publish_every_seconds=0, lr=3e-3,
        embedding_lr=1e-2, steps_per_batch=2, replay_windows=32,
    )  # fmt: skip
    learner = OnlineLearner(registry, log, config, tmp_path / "run", start=version)
    assert not learner.model.causal
    totals = learner.run().totals
    assert totals["online_HR@10"] > totals["frozen_HR@10"] + 0.05


def test_padded_chunks_give_a_prefix_one_target_for_its_last_position() -> None:
    from recloop.online.history import padded_chunks

    windows = [[4, 5], [1, 2, 3], [7, 8, 9, 10]]
    (every,) = list(padded_chunks(windows, 100))
    (last,) = list(padded_chunks(windows, 100, last_only=True))
    torch.testing.assert_close(every[0], last[0])  # the same left-padded inputs
    assert every[0].tolist() == [[0, 0, 4], [0, 1, 2], [7, 8, 9]]
    assert every[1].tolist() == [[0, 0, 5], [0, 2, 3], [8, 9, 10]]
    assert last[1].tolist() == [[5], [3], [10]]  # [B, 1]: the last position's target


def test_deltas_hold_only_rows_that_moved(registry: Registry, tmp_path: Path) -> None:
    events = pattern_events(20)
    log = event_log(tmp_path / "events.db", events)
    config = OnlineConfig(
        batch_events=40, publish_every_events=40, publish_every_seconds=0, replay_windows=0,
        loss="sampled_softmax", num_negatives=8, train_dense=False,
        context_negatives=0,  # its 2,048 negatives would reach every row of 120 items
    )  # fmt: skip
    learner = OnlineLearner(registry, log, config, tmp_path / "run")
    base_table = learner.model.item_embedding.weight.detach().clone()
    version = learner.run().published[0]
    delta = registry.manifest(version).to_json()["delta"]
    assert set(delta) == {"item_embedding.weight"}  # dense weights frozen: not in the delta
    with safe_open(registry.path(version) / WEIGHTS, framework="pt") as stored:
        rows = len(stored.get_tensor(delta["item_embedding.weight"]["rows"]))
    table = registry.load_tensors(version)["item_embedding.weight"]
    assert rows == len(torch.nonzero((table != base_table).any(dim=1)))  # exactly what moved
    touched = {int(e.item_id) for e in events}
    # Positives (every event's item and history) plus 8 negatives: far from the whole table.
    assert len(touched) <= rows < NUM_ITEMS


def test_new_item_joins_after_admit_after_occurrences(registry: Registry, tmp_path: Path) -> None:
    base_items = Registry(registry.root).manifest("latest").to_json()["model"]["num_items"]
    events = pattern_events(50)
    # "sku-new" follows item 5 for three new users; admit_after=2: the second occurrence admits it.
    for i, user in enumerate(("new-1", "new-2", "new-3")):
        events += [Event(user, "5", 2e9 + 2 * i), Event(user, "sku-new", 2e9 + 2 * i + 1)]
    events.append(Event("4", "sku-once", 3e9))  # seen once: stays pending
    log = event_log(tmp_path / "events.db", events)
    config = OnlineConfig(
        batch_events=500, publish_every_events=500, publish_every_seconds=0, admit_after=2,
        steps_per_batch=1, embedding_lr=1e-9, lr=1e-9,
    )  # fmt: skip
    learner = OnlineLearner(registry, log, config, tmp_path / "run")
    row_of_5 = learner.model.item_embedding.weight.detach()[5].clone()
    summary = learner.run()
    assert summary.admitted == 1
    new_id = base_items + 1
    assert learner.vocabulary.dense("sku-new") == new_id
    assert learner.vocabulary.dense("sku-once") == 0 and learner.pending.counts["sku-once"] == 1
    # Initialised from its co-occurring items (only item 5 for both users before admission); the
    # tiny learning rate leaves it there, so the published row is that mean.
    model, manifest = load_model(registry, summary.version)
    assert model.item_embedding.num_items == new_id and manifest.model["num_items"] == new_id
    assert torch.allclose(model.item_embedding.weight.detach()[new_id], row_of_5, atol=1e-5)
    vocabulary = pl.read_parquet(registry.file(summary.version, "items.parquet"))
    assert vocabulary["raw"].cast(pl.Utf8).to_list()[-1] == "sku-new"
    admitted_at = len(events) - 3  # the offset of its second occurrence
    assert state_of(registry, summary.version).admitted == {"sku-new": admitted_at}
    # The first occurrence came before admission: only the second and third are in sequences.
    assert learner.sequences["new-1"] == [5] and learner.sequences["new-2"] == [5, new_id]
    counts = np.load(registry.file(summary.version, "item_counts.npy"))
    assert counts.shape == (new_id + 1,) and counts[new_id] == 2


def test_new_item_row_from_attributes(registry: Registry, tmp_path: Path) -> None:
    attributes = tmp_path / "attributes.json"
    attributes.write_text(json.dumps({"7": ["brand-a"], "9": ["brand-a", "red"], "sku": ["red"]}))
    events = [Event(f"new-{n}", "sku", 2e9 + n) for n in range(2)]
    log = event_log(tmp_path / "events.db", events)
    config = OnlineConfig(
        publish_every_seconds=0, new_item_init="attributes", lr=1e-9, embedding_lr=1e-9
    )
    learner = OnlineLearner(registry, log, config, tmp_path / "run", attributes=attributes)
    expected = learner.model.item_embedding.weight.detach()[9].clone()  # shares "red"
    summary = learner.run()
    model, _ = load_model(registry, summary.version)
    new_id = learner.vocabulary.dense("sku")
    assert torch.allclose(model.item_embedding.weight.detach()[new_id], expected, atol=1e-5)
    with pytest.raises(ConfigError, match="needs --attributes"):
        OnlineLearner(registry, log, config, tmp_path / "run")


def test_restart_replays_state_and_continues_from_the_published_offset(
    registry: Registry, tmp_path: Path
) -> None:
    events = pattern_events(200)
    events += [Event("1", "sku-new", 2e9), Event("2", "sku-new", 2e9 + 1)]
    events += pattern_events(100, seed=1)
    log = event_log(tmp_path / "events.db", events)
    first = OnlineLearner(registry, log, FAST, tmp_path / "run")
    first.run(max_events=500)
    assert first.offset == 500 and state_of(registry, first.version).offset == 500
    second = OnlineLearner(registry, log, FAST, tmp_path / "run")
    assert second.version == first.version and second.offset == 500
    # User sequences, the grown vocabulary and pending items are rebuilt from the log.
    assert second.sequences == {u: s for u, s in first.sequences.items() if u in second.sequences}
    assert second.vocabulary.dense("sku-new") == first.vocabulary.dense("sku-new") > 0
    summary = second.run()
    assert summary.offset == len(events) and summary.events == len(events) - 500
    assert state_of(registry, summary.version).totals.events == len(events)


def test_starting_from_another_version_does_not_resume_this_learner(
    registry: Registry, tmp_path: Path
) -> None:
    log = event_log(tmp_path / "events.db", pattern_events(100))
    learner = OnlineLearner(registry, log, FAST, tmp_path / "run")
    learner.run()
    other = OnlineConfig(consumer="other", publish_every_seconds=0)
    fresh = OnlineLearner(registry, log, other, tmp_path / "run-other", start="v000001")
    assert fresh.version == "v000001" and fresh.offset == 0


def test_compaction_starts_a_fresh_chain(registry: Registry, tmp_path: Path) -> None:
    log = event_log(tmp_path / "events.db", pattern_events(300))
    config = OnlineConfig(
        batch_events=50, publish_every_events=50, publish_every_seconds=0, compact_every=3
    )
    summary = OnlineLearner(registry, log, config, tmp_path / "run").run()
    kinds = [(info.kind, info.method) for info in registry.list()][1:]
    assert kinds[:4] == [("delta", "online")] * 3 + [("full", "compact")]
    assert max(info.chain_depth for info in registry.list()) == 3
    assert state_of(registry, summary.version).offset == 600  # compaction keeps the offset


def test_a_learner_restarted_after_a_compaction_waits_a_whole_chain(
    registry: Registry, tmp_path: Path
) -> None:
    log = event_log(tmp_path / "events.db", pattern_events(300))
    config = OnlineConfig(
        batch_events=50, publish_every_events=50, publish_every_seconds=0, compact_every=3
    )

    def kinds() -> list[str]:
        return [info.kind for info in registry.list()][1:]  # after the trained version

    first = OnlineLearner(registry, log, config, tmp_path / "run")
    first.run(max_events=150)  # three deltas, then the compaction
    assert kinds() == ["delta"] * 3 + ["full"]
    compacted = registry.manifest("latest").to_json()
    assert compacted["method"] == "compact" and state_of(registry, "latest").deltas == 0
    assert state_of(registry, "latest").offset == 150

    restarted = OnlineLearner(registry, log, config, tmp_path / "run")
    assert restarted.version == compacted["id"] and restarted.state.deltas == 0
    restarted.run(max_events=50)  # one delta: no compaction yet
    assert kinds() == ["delta"] * 3 + ["full", "delta"]
    again = OnlineLearner(registry, log, config, tmp_path / "run")
    assert again.state.deltas == 1
    again.run(max_events=100)  # the second and third deltas of the new chain, then compaction
    assert kinds() == ["delta"] * 3 + ["full"] + ["delta"] * 3 + ["full"]
    assert state_of(registry, "latest").offset == 300


def bare_manifest(kind: str, training: dict[str, Any]) -> Manifest:
    """A manifest with only `kind` and `training` set (what OnlineState reads)."""
    empty: dict[str, Any] = {}
    return Manifest(
        id="v000002",
        created_at="",
        kind=kind,
        method="online",
        parent=None,
        model={"type": "sasrec"},
        dataset=None,
        vocabulary=None,
        metrics=empty,
        training=training,
        tensors={},
        files={},
        recloop_version="",
    )


def test_old_compacted_manifests_with_a_delta_count_start_a_new_chain() -> None:
    online = {"consumer": "c", "origin": "v000001", "offset": 9, "deltas": 20}
    full = bare_manifest(kind="full", training={"online": online})
    delta = bare_manifest(kind="delta", training={"online": online})
    assert OnlineState.from_manifest(full) == OnlineState("c", "v000001", 9, deltas=0)
    restored = OnlineState.from_manifest(delta)
    assert restored is not None and restored.deltas == 20


def test_production_follows_the_learner_when_it_pointed_at_its_parent(
    registry: Registry, tmp_path: Path
) -> None:
    registry.promote("v000001")
    log = event_log(tmp_path / "events.db", pattern_events(100))
    summary = OnlineLearner(registry, log, FAST, tmp_path / "run").run()
    assert registry.production() == summary.version


def test_follow_mode_publishes_new_events_on_the_time_trigger(
    registry: Registry, tmp_path: Path
) -> None:
    log = event_log(tmp_path / "events.db", pattern_events(50))
    config = OnlineConfig(
        batch_events=64, publish_every_events=10_000, publish_every_seconds=0.2, poll_seconds=0.02
    )
    learner = OnlineLearner(registry, log, config, tmp_path / "run")
    stop = threading.Event()
    worker = threading.Thread(target=lambda: learner.run(follow=True, stop=stop))
    worker.start()
    try:
        writer = SqliteEventLog(tmp_path / "events.db")  # another connection, as serving has
        writer.append(pattern_events(25, seed=3))
        deadline = time.monotonic() + 60
        while published_offset(registry) < 150:
            assert time.monotonic() < deadline, "the learner did not publish the new events"
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not worker.is_alive()
    assert log.committed(config.consumer) == 150


def test_learner_consumes_a_redis_stream(registry: Registry, tmp_path: Path) -> None:
    with (
        running_redis(tmp_path / "redis") as server,
        RedisStreamEventLog(server.url, stream="online:events") as log,
    ):
        log.append(pattern_events(150))
        learner = OnlineLearner(registry, log, FAST, tmp_path / "run")
        summary = learner.run()
        assert summary.events == 300 and summary.offset == log.last_offset()
        assert log.committed(FAST.consumer) == summary.offset
        assert state_of(registry, summary.version).offset == summary.offset
        # A restart over the stream resumes at the published offset: nothing to do.
        again = OnlineLearner(registry, log, FAST, tmp_path / "run")
        assert again.offset == summary.offset and again.run().events == 0
