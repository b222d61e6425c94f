"""Bounded item tables (`online.max_items`): admission and eviction policies, the remap a reused
row publishes, and serving, the registry and the learner's own histories following it.

One id stream with ten times more distinct ids than rows (a tiny SASRec of 120 items in a
table of 130 rows) runs through the learner once per module; the tests read what it left.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recloop.config import TrainConfig, config_from_dict
from recloop.data.vocabulary import Vocabulary
from recloop.errors import ConfigError, DatasetError, RegistryError
from recloop.events import Event
from recloop.online.bounded import table_bound
from recloop.online.config import OnlineConfig
from recloop.online.items import PendingItems
from recloop.online.learner import OnlineLearner
from recloop.online.slots import ItemSlots
from recloop.registry import Registry
from recloop.registry.sidefiles import REMAPPED_FILE, read_remapped
from recloop.serve.bundle import LoadOptions, TopK, load_bundle
from recloop.serve.engines.export import item_table
from recloop.serve.holder import ModelHolder
from recloop.serve.indexes.base import exact_search, recall_at_k
from recloop.serve.remap import chain_remapped
from recloop.train.trainer import train
from tests.online_helpers import NUM_ITEMS, event_log, state_of
from tests.test_cli import one_error_line, run_here

MAX_ITEMS = 130  # the base model's 120 items and 10 rows of headroom
DISTINCT = 10 * MAX_ITEMS  # new ids in the stream: ten times the table
BOUNDED = OnlineConfig(
    batch_events=64, publish_every_events=256, publish_every_seconds=0, admit_after=1,
    max_items=MAX_ITEMS, max_pending=200, context_negatives=0, replay_windows=8,
    score_frozen=False, steps_per_batch=1, compact_every=0,
)  # fmt: skip


def drifting_stream(events: int, seed: int = 0) -> list[Event]:
    """Users "u-0".."u-39" (not in the training data) and base users "0".."9"; each event is
    a base item or one of the new ids, whose popular window drifts over the stream, so every
    new id is seen a few times and then never again."""
    rng = random.Random(seed)
    stream = []
    for i in range(events):
        user = f"u-{rng.randrange(40)}" if rng.random() < 0.8 else str(rng.randrange(10))
        if rng.random() < 0.3:
            item = str(rng.randrange(1, NUM_ITEMS + 1))
        else:
            center = i * DISTINCT // events
            item = f"n-{min(DISTINCT - 1, center + rng.randrange(6))}"
        stream.append(Event(user, item, 1e9 + i))
    return stream


STREAM = drifting_stream(2400)


@pytest.fixture(scope="module")
def bounded_run(base: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The learner after the whole stream, run in chunks: sizes recorded after each."""
    root = tmp_path_factory.mktemp("eviction")
    shutil.copytree(base[1], root / "registry")
    registry = Registry(root / "registry")
    log = event_log(root / "events.db", STREAM)
    learner = OnlineLearner(registry, log, BOUNDED, root / "run")
    sizes = []
    while learner.offset < len(STREAM):
        learner.run(max_events=400)
        sizes.append(
            (
                int(learner.model.item_embedding.weight.shape[0]),
                learner.vocabulary.num_items,
                len(learner.pending),
                len(learner.state.admitted),
                len(learner.item_counts),
            )
        )
    return {"registry": registry, "learner": learner, "sizes": sizes, "root": root}


# ----------------------------------------------------------------------------- the stream


def test_the_table_never_grows_past_max_items(bounded_run: Any) -> None:
    learner, registry = bounded_run["learner"], bounded_run["registry"]
    assert learner.item_table.evictions > 5 * MAX_ITEMS  # the stream really churned the table
    for rows, items, pending, admitted, counts in bounded_run["sizes"]:
        assert rows == MAX_ITEMS + 1 and items == MAX_ITEMS and counts == MAX_ITEMS + 1
        assert pending <= 200 and admitted <= MAX_ITEMS
    for info in registry.list():
        manifest = registry.manifest(info.id)
        assert manifest.model["num_items"] <= MAX_ITEMS
        assert manifest.tensors["item_embedding.weight"].shape[0] <= MAX_ITEMS + 1


def raw_reference(learner: OnlineLearner, user: str) -> list[str]:
    """The user's events (raw ids) whose item is in the table now and was admitted (into its
    current row) no later than the event: what an exact history remap leaves."""
    admitted = learner.state.admitted
    return [
        e.item_id
        for offset, e in enumerate(STREAM, start=1)
        if e.user_id == user
        and learner.vocabulary.dense(e.item_id)
        and admitted.get(e.item_id, 0) <= offset
    ]


def test_user_histories_follow_every_remap_exactly(bounded_run: Any) -> None:
    learner = bounded_run["learner"]
    checked = 0
    for user in sorted({e.user_id for e in STREAM if e.user_id.startswith("u-")}):
        sequence = learner.sequence(user)
        raw = learner.vocabulary.raw_strings(sequence)
        reference = raw_reference(learner, user)
        assert raw == reference[len(reference) - len(raw) :], user
        assert len(raw) >= min(len(reference), 5)
        checked += 1
    assert checked == 40


def test_delta_apply_equals_a_full_load_after_evictions(bounded_run: Any) -> None:
    registry, learner = bounded_run["registry"], bounded_run["learner"]
    versions = [info.id for info in registry.list()]
    remapping = [v for v in versions if REMAPPED_FILE in registry.manifest(v).files]
    assert len(remapping) >= 3
    options = LoadOptions(engine="torch")
    holder = ModelHolder(registry, options, versions[1])
    holder.load()
    bundle, _ = holder.load(versions[-1])  # every delta since, with their remaps, at once
    assert bundle.details["applied_delta"] and bundle.details["remapped_items"] > MAX_ITEMS // 2
    full = load_bundle(registry, versions[-1], options)
    assert bundle.catalog.strings().tolist() == full.catalog.strings().tolist()
    assert bundle.catalog.strings().tolist() == learner.vocabulary.strings().tolist()
    for raw in learner.vocabulary.strings().tolist()[::7]:
        assert bundle.catalog.dense(raw) == full.catalog.dense(raw) == learner.vocabulary.dense(raw)
    for user in [str(u) for u in range(10)]:  # training histories: dense ids, remapped
        assert bundle.user_history(user).tolist() == full.user_history(user).tolist()
    for name, tensor in full.state.items():
        assert torch.equal(bundle.state[name], tensor), name
    requests = [TopK(np.array(learner.sequence(f"u-{u}")), 10, None) for u in range(40)]
    requests = [r for r in requests if len(r.sequence)]
    got, expected = bundle.top_items(requests), full.top_items(requests)
    evicted = {e.item_id for e in STREAM} - set(learner.vocabulary.strings().tolist())
    for (ids, _), (full_ids, _) in zip(got, expected, strict=True):
        assert ids.tolist() == full_ids.tolist()
        served = bundle.to_raw(ids)
        assert not set(served) & evicted  # every served id is admitted now
        assert [learner.vocabulary.dense(r) for r in served] == ids.tolist()


@pytest.mark.parametrize(
    ("index", "shards"), [("exact", 2), ("exact-int8", 1), ("ivf", 1), ("milvus", 1)]
)
def test_every_index_takes_the_new_items_vectors_in_reused_rows(
    bounded_run: Any, index: Any, shards: int
) -> None:
    registry, learner = bounded_run["registry"], bounded_run["learner"]
    versions = [info.id for info in registry.list()]
    options = LoadOptions(engine="torch", index=index, shards=shards, rebuild_drift=100.0)
    holder = ModelHolder(registry, options, versions[1])
    served, _ = holder.load()
    applied, _ = holder.load(versions[-1])
    try:
        remapped = np.array(sorted(chain_remapped(registry, registry.deltas_after(
            versions[1], versions[-1], 64))))  # fmt: skip
        assert applied.details["applied_delta"] and len(remapped) > MAX_ITEMS // 2
        rows = item_table(applied.model)[remapped]  # the new items' vectors
        tolerance = 0.05 * float(np.abs(rows).max()) if index == "exact-int8" else 1e-5
        np.testing.assert_allclose(applied.index.vectors(remapped), rows, atol=tolerance)
        requests = [np.array(learner.sequence(f"u-{u}")) for u in range(40)]
        queries = applied.encode_batch([TopK(r, 10, None) for r in requests if len(r)])
        found, _ = applied.index.search(queries, 10)
        truth, _ = exact_search(item_table(applied.model), queries, 10)
        assert recall_at_k(found, truth) >= 0.9
    finally:
        served.close()
        applied.close()


def test_a_reused_row_is_a_remap_in_the_delta(bounded_run: Any) -> None:
    registry = bounded_run["registry"]
    version = [i.id for i in registry.list() if REMAPPED_FILE in registry.manifest(i.id).files][-1]
    manifest = registry.manifest(version)
    remapped = read_remapped(registry, version, manifest)
    vocabulary = Vocabulary.read(registry.file(version, "items.parquet"))
    parent = Vocabulary.read(registry.file(str(manifest.parent), "items.parquet"))
    for dense, raw in remapped.items():
        assert vocabulary.raw(dense) == raw != parent.raw(dense)
    changes, _ = registry.read_delta(version)
    rows = set(changes["item_embedding.weight"].rows.tolist())  # type: ignore[union-attr]
    assert set(remapped) <= rows  # the new item's vector replaces the evicted one's
    assert state_of(registry, version).admitted.keys() >= set(remapped.values())


def test_an_evicted_item_that_comes_back_is_admitted_as_new(
    base: tuple[Path, Path, str], tmp_path: Path
) -> None:
    shutil.copytree(base[1], tmp_path / "registry")
    registry = Registry(tmp_path / "registry")
    # 12 new ids through 10 free rows: the last two evict the base items seen least recently
    # (never: rows 1 and 2, the lowest ids first).
    log = event_log(tmp_path / "e.db", [Event("u", f"n-{i}", 1e9 + i) for i in range(12)])
    config = OnlineConfig(**{**BOUNDED.__dict__, "batch_events": 4, "replay_windows": 0})
    learner = OnlineLearner(registry, log, config, tmp_path / "r")
    first = learner.vocabulary.raw(1)
    holders = [u for u in learner._base.users.strings().tolist() if 1 in learner._base.items(u)]
    assert learner.run().admitted == 12  # 10 appended, 2 into reused rows
    assert learner.vocabulary.dense(first) == 0  # evicted
    assert learner.vocabulary.raw_strings([1, 2]) == ["n-10", "n-11"]
    assert holders and all(1 not in learner._base.items(u) for u in holders)  # its history
    log.append([Event("v", first, 2e9)])
    learner.run()
    assert learner.vocabulary.dense(first) == 3  # a new item, in the next least recent row
    assert learner.state.admitted[first] == 13  # admitted again, at its new occurrence
    assert learner.item_table.evictions == 3


# ----------------------------------------------------------------------------- crash safety


CRASH_SCRIPT = """
import sys
from pathlib import Path
from recloop.events import SqliteEventLog
from recloop.config import TrainConfig, config_from_dict
from recloop.online.bounded import table_bound
from recloop.online.config import OnlineConfig
from recloop.online.learner import OnlineLearner
from recloop.registry import Registry
root = Path(sys.argv[1])
config = OnlineConfig(**__import__("json").loads(sys.argv[2]))
log = SqliteEventLog(root / "events.db")
OnlineLearner(Registry(root / "registry"), log, config, root / "run").run()
"""


def run_to_end(root: Path) -> OnlineLearner:
    learner = OnlineLearner(
        Registry(root / "registry"), event_log(root / "events.db", []), BOUNDED, root / "run"
    )
    learner.run()
    return learner


@pytest.mark.parametrize("point", ["state-saved:3", "published:3"])
def test_kill_9_during_an_eviction_publish_loses_nothing(
    base: tuple[Path, Path, str], tmp_path: Path, point: str
) -> None:
    stream = STREAM[:1200]
    for name in ("killed", "clean"):
        shutil.copytree(base[1], tmp_path / name / "registry")
        event_log(tmp_path / name / "events.db", stream)
    env = {**os.environ, "RECLOOP_ONLINE_CRASH_AT": point}
    settings = json.dumps({k: v for k, v in BOUNDED.__dict__.items()})
    code = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path / "killed"), settings],
        env=env,
        capture_output=True,
        timeout=120,
    ).returncode
    assert code == -9
    registry = Registry(tmp_path / "killed" / "registry")
    crashed_at = state_of(registry, "latest").offset
    assert 0 < crashed_at < len(stream)
    resumed, clean = run_to_end(tmp_path / "killed"), run_to_end(tmp_path / "clean")
    assert resumed.offset == clean.offset == len(stream)
    final = state_of(registry, resumed.version)
    assert final.totals.events == len(stream)  # every event scored once, none twice
    # The same admissions and evictions as a run never killed: the pending items and row
    # statistics were restored exactly.
    assert final.admitted == state_of(Registry(tmp_path / "clean" / "registry"), "latest").admitted
    assert resumed.vocabulary.strings().tolist() == clean.vocabulary.strings().tolist()
    for info in registry.list():
        registry.verify(info.id)  # no half-published version
    full = load_bundle(registry, resumed.version, LoadOptions(engine="torch"))
    assert full.catalog.strings().tolist() == resumed.vocabulary.strings().tolist()


# ----------------------------------------------------------------------------- bad input


def test_max_items_below_the_live_set_is_one_clear_error(
    registry: Registry, tmp_path: Path
) -> None:
    log = event_log(tmp_path / "events.db", STREAM[:10])
    config = OnlineConfig(max_items=NUM_ITEMS - 1)
    with pytest.raises(ConfigError, match=r"max_items = 119 is smaller than the 120 items"):
        OnlineLearner(registry, log, config, tmp_path / "run")
    assert [i.id for i in registry.list()] == ["v000001"]  # nothing published
    with pytest.raises(ConfigError, match="single-process only"):
        OnlineConfig(max_items=200, sharding="row_wise")
    for bad, match in [
        ({"max_items": 0}, "online.max_items must be >= 1"),
        ({"evict": "fifo"}, "online.evict must be"),
        ({"admit": "often"}, "online.admit must be"),
        ({"evict_ttl": -1}, "online.evict_ttl"),
        ({"decay_half_life": 0}, "online.decay_half_life"),
    ]:
        with pytest.raises(ConfigError, match=match):
            OnlineConfig(**bad)


def test_the_cli_reports_a_too_small_table_in_one_line(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    event_log(tmp_path / "events.db", STREAM[:10])
    done = run_here(
        capsys, "online", "--registry", str(registry.root), "--event-log",
        str(tmp_path / "events.db"), "--run-dir", str(tmp_path / "run"), "online.max_items=50",
    )  # fmt: skip
    one_error_line(done, "online.max_items = 50 is smaller than the 120 items")


def test_train_max_items_bounds_training_and_the_learner(
    base: tuple[Path, Path, str], registry: Registry, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"train\.max_items must be >= 1"):
        TrainConfig(max_items=0)
    config = config_from_dict(
        {"model": {"type": "sasrec", "dim": 8}, "train": {"max_items": 100, "batch_size": 8}}
    )
    with pytest.raises(ConfigError, match=r"train\.max_items = 100 but the dataset has 120 items"):
        train(config, base[0], tmp_path / "run", show_progress=False)
    trained = registry.manifest("latest")
    inherited = trained.replace(training={"config": {"train": {"max_items": 150}}})
    assert table_bound(OnlineConfig(), inherited) == 150
    assert table_bound(OnlineConfig(max_items=140), inherited) == 140
    assert table_bound(OnlineConfig(), trained) is None


def test_a_remap_needs_a_delta_and_its_vocabulary(registry: Registry) -> None:
    version = registry.resolve("latest")
    remap = {REMAPPED_FILE: json.dumps({"ids": [1], "raw": ["x"]}).encode()}
    table = registry.load_tensors(version)
    with pytest.raises(RegistryError, match="belongs to deltas"):
        registry.publish(table, model={"type": "sasrec"}, extra_files=remap)
    row = {"item_embedding.weight": table["item_embedding.weight"][:1]}
    with pytest.raises(RegistryError, match="must carry its own vocabulary"):
        registry.publish_delta(version, row, extra_files=remap)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- building blocks


def test_lru_evicts_the_least_recently_seen_row_outside_the_ttl_and_batch() -> None:
    slots = ItemSlots(4, "lru", ttl=0, half_life=10.0)
    for slot, offset in [(1, 5), (2, 1), (3, 9), (4, 3)]:
        slots.assign(slot, offset)
        slots.touch(slot, offset)
    assert slots.victim(4, now=10, protect_from=10) == 2
    assert slots.victim(4, now=10, protect_from=1) is None  # all seen in the batch
    slots.touch(2, 10)
    assert slots.victim(4, now=11, protect_from=11) == 4
    ttl = ItemSlots(4, "lru", ttl=8, half_life=10.0)
    for slot, offset in [(1, 5), (2, 1), (3, 9), (4, 3)]:
        ttl.touch(slot, offset)
    assert ttl.victim(4, now=10, protect_from=10) == 2  # only rows idle for 8+ events
    assert ttl.victim(4, now=8, protect_from=10) is None


def test_decayed_frequency_evicts_the_rarest_recent_row() -> None:
    slots = ItemSlots(3, "decayed", ttl=0, half_life=10.0)
    for slot in (1, 2, 3):
        slots.touch(slot, 0)
    for offset in range(1, 6):
        slots.touch(1, offset)  # popular, then quiet
    slots.touch(3, 40)  # seen once, recently
    # Row 1: 6 occurrences, last at 5 -> 6 * 2^-3.5 = 0.53; row 2: 1 at 0 -> 2^-4 = 0.06;
    # row 3: 1 + 2^-4 = 1.06. LRU would pick row 2 as well, then row 1 over row 3.
    assert slots.victim(3, now=40, protect_from=41) == 2
    slots.touch(2, 40)
    assert slots.victim(3, now=40, protect_from=41) == 1


def test_clean_drops_only_entries_of_rows_reused_since() -> None:
    slots = ItemSlots(5, "lru", ttl=0, half_life=10.0)
    sequence = [1, 2, 3, 2]
    slots.assign(2, 7)  # row 2 reused at offset 7
    slots.clean(sequence, checked=5)
    assert sequence == [1, 3]
    sequence.append(2)  # appended after the reuse: the new item
    slots.clean(sequence, checked=7)
    assert sequence == [1, 3, 2]


def test_pending_items_are_bounded_and_decayed_admission_needs_a_burst() -> None:
    pending = PendingItems(admit_after=2, limit=3)
    for raw in ("a", "b", "c", "a", "d"):  # "b" is the least recently seen when "d" comes
        pending.observe(raw, [1])
    assert list(pending.counts) == ["c", "a", "d"] and "b" not in pending.contexts
    decayed = PendingItems(admit_after=2, half_life=10.0)
    assert not decayed.observe("x", [], offset=0)
    assert not decayed.observe("x", [], offset=100)  # 1 + 2^-10: a trickle
    assert not decayed.observe("x", [], offset=101)  # 1 + 0.93 * 1.001 = 1.93
    assert decayed.observe("x", [], offset=102)  # 1 + 0.93 * 1.93 = 2.8: a burst admits
    copy = PendingItems(admit_after=2, limit=3)
    copy.restore(json.loads(json.dumps(pending.to_json())))
    assert copy.counts == pending.counts and list(copy.counts) == list(pending.counts)


def test_a_catalogue_follows_remapped_ids(tmp_path: Path) -> None:
    served = Vocabulary.from_strings(["a", "b", "c"]).index_text()
    # The learner's side: "d" takes row 1, then "a" comes back into row 3 ("c" evicted).
    learner = Vocabulary.from_strings(["a", "b", "c"])
    assert learner.replace(1, "d") == "a" and learner.replace(3, "a") == "c"
    learner.add("e")
    learner.write(tmp_path / "v.parquet")
    moved = served.extended(tmp_path / "v.parquet", {3: "a", 1: "d"})
    assert moved.strings().tolist() == ["d", "b", "a", "e"]
    assert [moved.dense(r) for r in ("a", "b", "c", "d", "e")] == [3, 2, 0, 1, 4]
    assert served.strings().tolist() == ["a", "b", "c"]  # untouched
    with pytest.raises(DatasetError, match="renumbered"):
        served.extended(tmp_path / "v.parquet", {1: "d"})  # row 3 changed unannounced
