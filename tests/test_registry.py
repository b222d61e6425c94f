from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

import recloop.registry.files as registry_files
from recloop.cli.versions_table import format_versions_table
from recloop.data.reference import dataset_reference
from recloop.errors import RecloopError, RegistryError
from recloop.registry import MANIFEST, WEIGHTS, Registry

MODEL = {"type": "sasrec", "config": {"dim": 8, "layers": 2}}


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "item_embedding.weight": torch.randn(11, 8, generator=g),
        "block.0.bias": torch.randn(8, generator=g).to(torch.bfloat16),
        "positions": torch.arange(5, dtype=torch.int64),
    }


def vocab_parquet(path: Path, items: int) -> Path:
    pq.write_table(pa.table({"id": list(range(1, items + 1)), "raw": list(range(items))}), path)
    return path


def publish(reg: Registry, seed: int = 0, **kwargs: Any) -> str:
    return reg.publish(tensors(seed), model=MODEL, **kwargs)


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def visible_state(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != ".aliases.lock")


# ---------------------------------------------------------------- publish / load


def test_round_trip_tensors_manifest_and_checksums(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    source = tmp_path / "metrics.csv"
    source.write_text("step,loss\n1,0.5\n")
    vocab = vocab_parquet(tmp_path / "items.parquet", 10)
    dataset = {"path": "/data/ml", "manifest_sha256": "ab" * 32, "counts": {"items": 10}}
    version = reg.publish(
        tensors(),
        model=MODEL,
        dataset=dataset,
        metrics={"ndcg@10": np.float32(0.25), "hr@10": 0.5, "epochs": np.int64(3)},
        training={"step": 100, "wall_seconds": 1.5, "command": ["recloop", "train"]},
        extra_files={"metrics.csv": source, "items.parquet": vocab, "notes.txt": b"hello"},
        vocabulary_file="items.parquet",
    )
    assert version == "v000001"

    loaded = reg.load_tensors(version)
    expected = tensors()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)

    m = reg.manifest(version).to_json()
    assert m["id"] == version and m["kind"] == "full" and m["method"] == "train"
    assert m["parent"] is None
    assert m["model"] == MODEL
    assert m["dataset"] == dataset
    assert m["vocabulary"] == {"file": "items.parquet", "items": 10}
    assert m["metrics"] == {"ndcg@10": 0.25, "hr@10": 0.5, "epochs": 3}
    assert m["training"]["command"] == ["recloop", "train"]
    assert m["tensors"]["block.0.bias"] == {"dtype": "bfloat16", "shape": [8]}
    assert m["created_at"].endswith("+00:00")
    directory = reg.path(version)
    assert directory == tmp_path / "reg" / "versions" / version
    on_disk = {p.name for p in directory.iterdir()} - {MANIFEST}
    assert set(m["files"]) == on_disk == {WEIGHTS, "metrics.csv", "items.parquet", "notes.txt"}
    for name, meta in m["files"].items():
        assert meta["bytes"] == (directory / name).stat().st_size
        assert len(meta["sha256"]) == 64
    assert (directory / "notes.txt").read_bytes() == b"hello"
    assert reg.file(version, "metrics.csv").read_text() == source.read_text()
    # The manifest on disk is strict JSON.
    json.loads((directory / MANIFEST).read_text(), parse_constant=pytest.fail)
    reg.verify(version)


def test_ids_increase_and_parent_is_resolved(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    first = publish(reg)
    second = publish(reg, 1, parent="latest", method="int8")
    third = publish(reg, 2, parent=first, method="distill")
    assert [first, second, third] == ["v000001", "v000002", "v000003"]
    assert reg.manifest(second).to_json()["parent"] == first
    assert reg.manifest(third).to_json()["parent"] == first
    assert reg.resolve("latest") == third
    with pytest.raises(RegistryError, match="unknown version v000009"):
        publish(reg, parent="v000009")


def test_concurrent_thread_publishers_get_distinct_ids(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    start = threading.Barrier(6)
    ids: list[str] = []
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            start.wait()
            ids.append(Registry(tmp_path).publish(tensors(seed), model=MODEL))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(ids) == [f"v{n:06d}" for n in range(1, 7)]
    for version in ids:
        reg.verify(version)
    assert not list(tmp_path.glob(".tmp-*"))


def _publish_in_process(root: str, seed: int, out: Any) -> None:
    out.put(Registry(root).publish(tensors(seed), model=MODEL, metrics={"seed": seed}))


def test_concurrent_process_publishers_get_distinct_ids(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")  # fork: no re-import of torch per child
    out = context.Queue()
    procs = [
        context.Process(target=_publish_in_process, args=(str(tmp_path), i, out)) for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    ids = sorted(out.get(timeout=5) for _ in procs)
    assert ids == ["v000001", "v000002", "v000003", "v000004"]
    reg = Registry(tmp_path)
    seeds = []
    for version in ids:
        seed = reg.manifest(version).to_json()["metrics"]["seed"]
        loaded = reg.load_tensors(version)  # verifies every file
        assert torch.equal(loaded["item_embedding.weight"], tensors(seed)["item_embedding.weight"])
        seeds.append(seed)
    assert sorted(seeds) == [0, 1, 2, 3]


def test_lost_rename_race_retries_with_next_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(tmp_path)
    publish(reg)
    publish(reg)
    # A stale view of the directory: the publisher first tries v000001, which is taken.
    monkeypatch.setattr(Registry, "_max_number", lambda self: 0)
    version = publish(reg, 3)
    assert version == "v000003"
    assert reg.manifest(version).to_json()["id"] == version
    reg.verify(version)


# ---------------------------------------------------------------- crashes and gc


def test_failed_publish_leaves_nothing(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    before = visible_state(tmp_path)
    with pytest.raises(RegistryError, match=r"extra file 'vocab.parquet'.*does not exist"):
        publish(reg, extra_files={"vocab.parquet": tmp_path / "missing.parquet"})
    assert visible_state(tmp_path) == before
    assert reg.list() == []


def test_crash_while_writing_weights_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(tmp_path)
    publish(reg)
    before = visible_state(tmp_path)

    def half_write(tensors: Any, path: Path, metadata: Any = None) -> None:
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt  # not an Exception: cleanup must still happen

    monkeypatch.setattr(registry_files, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        publish(reg, 1)
    assert visible_state(tmp_path) == before
    assert [v.id for v in reg.list()] == ["v000001"]


def test_crash_at_rename_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry(tmp_path)

    def broken_rename(src: Any, dst: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(RegistryError, match="cannot install version v000001"):
        publish(reg)
    monkeypatch.undo()
    assert visible_state(tmp_path) == ["versions"]
    assert publish(reg) == "v000001"


def test_hard_crash_temp_dirs_are_ignored_and_gc_removes_stale_ones(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    publish(reg)
    stale = tmp_path / ".tmp-crashed"
    stale.mkdir()
    (stale / WEIGHTS).write_bytes(b"half")
    stale_file = tmp_path / ".tmp-aliases-x.json"
    stale_file.write_text("{")
    fresh = tmp_path / ".tmp-running"
    fresh.mkdir()
    (fresh / WEIGHTS).write_bytes(b"in progress")
    old = time.time() - 7200
    for path in (stale / WEIGHTS, stale, stale_file):
        os.utime(path, (old, old))

    assert [v.id for v in reg.list()] == ["v000001"]
    assert reg.resolve("latest") == "v000001"
    assert reg.gc() == 2
    assert not stale.exists() and not stale_file.exists()
    assert fresh.is_dir()
    assert reg.gc(max_age_seconds=0) == 1
    assert not fresh.exists()
    assert reg.gc() == 0
    reg.verify("v000001")


def test_gc_keeps_old_dir_with_recently_written_file(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    busy = tmp_path / ".tmp-busy"
    busy.mkdir()
    (busy / WEIGHTS).write_bytes(b"still being written")
    old = time.time() - 7200
    os.utime(busy, (old, old))
    assert reg.gc() == 0
    assert busy.exists()


# ---------------------------------------------------------------- refusing bad versions


def test_corrupt_file_is_refused_naming_version_and_file(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = publish(reg, extra_files={"metrics.csv": b"a,b\n1,2\n"})
    flip_byte(reg.path(version) / WEIGHTS)
    with pytest.raises(RegistryError, match=rf"version {version} is corrupt: file {WEIGHTS}"):
        reg.load_tensors(version)
    with pytest.raises(RegistryError, match=WEIGHTS):
        reg.verify(version)


def test_corrupt_extra_file_and_truncation(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = publish(reg, extra_files={"metrics.csv": b"a,b\n1,2\n"})
    flip_byte(reg.path(version) / "metrics.csv", 0)
    with pytest.raises(RegistryError, match=r"v000001 is corrupt: file metrics.csv does not match"):
        reg.load_tensors(version)
    with pytest.raises(RegistryError, match=r"metrics\.csv"):
        reg.file(version, "metrics.csv")
    (reg.path(version) / "metrics.csv").write_bytes(b"a,b\n")
    with pytest.raises(RegistryError, match=r"file metrics.csv has 4 bytes, manifest says 8"):
        reg.verify(version)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = publish(reg, extra_files={"items.parquet": b"x"})
    (reg.path(version) / "items.parquet").unlink()
    with pytest.raises(
        RegistryError, match=rf"{version} is partial: file items.parquet is missing"
    ):
        reg.load_tensors(version)
    (reg.path(version) / WEIGHTS).unlink()
    with pytest.raises(RegistryError, match=WEIGHTS):
        reg.load_tensors(version, verify=False)


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = publish(reg)
    path = reg.path(version) / MANIFEST
    path.unlink()
    for call in (reg.load_tensors, reg.verify, reg.manifest, reg.promote):
        with pytest.raises(RegistryError) as caught:
            call(version)
        assert str(caught.value) == f"version {version} is partial: {path} is missing"
    # Listing does not fail: the version is listed as broken, with the reason.
    (info,) = reg.list()
    assert info.id == version and info.status == f"broken: {caught.value}"


def test_copied_version_directory_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = publish(reg)
    os.rename(reg.path(version), tmp_path / "versions" / "v000005")
    with pytest.raises(RegistryError, match=r"v000005: .*v000005/manifest.json says id 'v000001'"):
        reg.load_tensors("v000005")


def edit_manifest(reg: Registry, version: str, edit: Any) -> Path:
    """Rewrites a version's manifest.json with `edit(manifest)` (which returns the new one)."""
    path = reg.path(version) / MANIFEST
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return path


def without(key: str) -> Any:
    return lambda manifest: {k: v for k, v in manifest.items() if k != key}


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        (lambda path: path.write_text('{"format": "recloop-model", '), "is not valid JSON"),
        (lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n"), r"line 1 \(byte offset 0\): not"),
        (lambda path: path.write_text("[1, 2]"), "is not a recloop manifest"),
        (lambda path: path.unlink() or path.mkdir(), "cannot read"),  # EISDIR: unreadable
    ],
)
def test_unreadable_manifest_is_one_error_naming_the_file(
    tmp_path: Path, break_it: Any, reason: str
) -> None:
    reg = Registry(tmp_path)
    version = publish(reg)
    path = reg.path(version) / MANIFEST
    break_it(path)
    for call in (reg.manifest, reg.verify, reg.load_tensors):
        with pytest.raises(RegistryError, match=rf"version {version}: .*{reason}") as caught:
            call(version)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (without("files"), "has no 'files' table"),
        (without("model"), r"has no model type \('model.type'\)"),
        (without("tensors"), r"has no 'tensors' \(dict\)"),
        (without("kind"), r"has no 'kind' \(str\)"),
        (lambda m: {**m, "files": {WEIGHTS: 3}}, "bad 'files' entry for 'weights.safetensors'"),
        (lambda m: {**m, "kind": "delta", "parent": "v000001"}, r"has no 'base' \(str\)"),
    ],
)
def test_manifest_missing_keys_is_one_error_naming_the_file(
    tmp_path: Path, edit: Any, reason: str
) -> None:
    reg = Registry(tmp_path)
    version = publish(reg)
    path = edit_manifest(reg, version, edit)
    with pytest.raises(RegistryError, match=rf"version {version}: .*{reason}") as caught:
        reg.verify(version)
    assert str(path) in str(caught.value)


def test_list_keeps_healthy_versions_and_marks_broken_ones(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    ids = [publish(reg, i, metrics={"test/HR@10": i / 10}) for i in range(4)]
    reg.promote(ids[1])
    (reg.path(ids[1]) / MANIFEST).write_text("{not json")
    edit_manifest(reg, ids[2], without("files"))
    infos = reg.list()
    assert [i.id for i in infos] == ids
    assert [i.status.split(":")[0] for i in infos] == ["ok", "broken", "broken", "ok"]
    assert infos[1].is_production and "is not valid JSON" in infos[1].status
    assert infos[2].problem is not None and "has no 'files' table" in infos[2].problem
    assert infos[3].metrics == {"test/HR@10": 0.3} and infos[3].problem is None
    assert infos[1].to_json()["status"] == infos[1].status
    console = Console(record=True, width=300)
    console.print(format_versions_table(infos))
    text = console.export_text()
    row = next(line for line in text.splitlines() if ids[1] in line)
    assert "production, broken" in row and "is not valid JSON" in row
    assert "2 broken version(s)" in text and "test/HR@10=0.3" in text


def test_unknown_version_and_bad_refs(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError, match="no versions yet"):
        reg.resolve("latest")
    with pytest.raises(RegistryError, match="unknown version v000042"):
        reg.load_tensors("v000042")
    with pytest.raises(RegistryError, match="not a version reference"):
        reg.path("../etc")
    with pytest.raises(RegistryError, match="not a version reference"):
        reg.manifest("v1").to_json()
    assert issubclass(RegistryError, RecloopError)
    with pytest.raises(RegistryError, match="not a model registry"):
        Registry(tmp_path / "nowhere", create=False)
    assert not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------- aliases


def test_promote_rollback_resolve(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v1, v2, v3 = (publish(reg, i) for i in range(3))
    assert reg.production() is None
    with pytest.raises(RegistryError, match="no version has been promoted"):
        reg.resolve("production")
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback()

    assert reg.promote(v1) == v1
    with pytest.raises(RegistryError, match="only one promotion"):
        reg.rollback()
    assert reg.promote("latest") == v3
    assert reg.promote(v3) == v3  # no-op: must not create a second history entry
    assert reg.promote(v2) == v2
    assert reg.resolve("production") == v2
    assert reg.load_tensors("production")["positions"].tolist() == [0, 1, 2, 3, 4]

    assert reg.rollback() == v3
    assert reg.production() == v3
    assert reg.rollback() == v1
    assert Registry(tmp_path).production() == v1  # persisted, not cached
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback()

    aliases = json.loads((tmp_path / "aliases.json").read_text())
    assert aliases["production"] == v1
    assert [h["version"] for h in aliases["history"]] == [v1]
    assert [(e["action"], e["version"]) for e in aliases["log"]] == [
        ("promote", v1),
        ("promote", v3),
        ("promote", v2),
        ("rollback", v3),
        ("rollback", v1),
    ]
    assert not list(tmp_path.glob(".tmp-*"))


def test_promote_and_rollback_refuse_corrupt_versions(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    v1, v2 = publish(reg), publish(reg, 1)
    reg.promote(v1)
    flip_byte(reg.path(v2) / WEIGHTS)
    with pytest.raises(RegistryError, match=rf"{v2} is corrupt"):
        reg.promote(v2)
    assert reg.production() == v1
    v3 = publish(reg, 2)
    reg.promote(v3)
    flip_byte(reg.path(v1) / WEIGHTS)
    with pytest.raises(RegistryError, match=rf"{v1} is corrupt"):
        reg.rollback()
    assert reg.production() == v3


def test_list_ordering_and_is_production(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    assert reg.list() == []
    ids = [publish(reg, i, metrics={"ndcg": i / 10}) for i in range(3)]
    (tmp_path / "versions" / "README").write_text("not a version")
    (tmp_path / "versions" / "scratch").mkdir()
    reg.promote(ids[1])
    infos = reg.list()
    assert [i.id for i in infos] == ids
    assert [i.is_production for i in infos] == [False, True, False]
    assert infos[0].model_type == "sasrec" and infos[0].kind == "full"
    assert infos[0].method == "train" and infos[0].parent is None
    assert infos[2].metrics == {"ndcg": 0.2}

    console = Console(record=True, width=200)
    console.print(format_versions_table(infos))
    text = console.export_text()
    assert all(i in text for i in ids)
    assert "production" in text and "ndcg=0.1" in text


# ---------------------------------------------------------------- argument checks


def test_manifest_values_must_be_strict_json(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError, match=r"metrics.loss is nan.*strict JSON"):
        publish(reg, metrics={"loss": float("nan")})
    with pytest.raises(RegistryError, match=r"training.curve\[1\] is inf"):
        publish(reg, training={"curve": [1.0, float("inf")]})
    with pytest.raises(RegistryError, match=r"model.config.ids is a set, which is not JSON"):
        reg.publish(tensors(), model={"type": "x", "config": {"ids": {1, 2}}})
    with pytest.raises(RegistryError, match="non-empty string 'type'"):
        reg.publish(tensors(), model={"config": {}})
    assert reg.list() == [] and not list(tmp_path.glob(".tmp-*"))
    version = publish(reg, metrics={"loss": None, "t": torch.tensor(0.5)})
    assert reg.manifest(version).to_json()["metrics"] == {"loss": None, "t": 0.5}


def test_publish_argument_checks(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    with pytest.raises(RegistryError, match="reserved"):
        publish(reg, extra_files={MANIFEST: b"{}"})
    with pytest.raises(RegistryError, match="plain file name"):
        publish(reg, extra_files={"../x": b""})
    with pytest.raises(RegistryError, match="not one of the extra files"):
        publish(reg, vocabulary_file="items.parquet")
    with pytest.raises(RegistryError, match="at least one tensor"):
        reg.publish({}, model=MODEL)
    with pytest.raises(RegistryError, match=r"not a torch\.Tensor"):
        reg.publish({"w": np.zeros(3)}, model=MODEL)  # type: ignore[dict-item]
    vocab = vocab_parquet(tmp_path / "items.parquet", 5)
    with pytest.raises(RegistryError, match="has 5 items but dataset counts say 7"):
        publish(
            reg,
            extra_files={"items.parquet": vocab},
            vocabulary_file="items.parquet",
            dataset={"counts": {"items": 7}},
        )
    assert reg.list() == [] and not list(tmp_path.glob(".tmp-*"))


def test_dataset_reference(tmp_path: Path) -> None:
    data = tmp_path / "ds"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"counts": {"users": 3, "items": 4}}))
    ref = dataset_reference(data)
    assert ref["counts"] == {"users": 3, "items": 4}
    assert ref["path"] == str(data.resolve()) and len(ref["manifest_sha256"]) == 64
    with pytest.raises(RegistryError, match=r"no dataset manifest\.json"):
        dataset_reference(tmp_path)


def test_loading_a_version_with_a_bad_model_config_or_vocabulary_names_it(
    tmp_path: Path,
) -> None:
    from recloop.registry.loading import check_vocabulary, load_model

    reg = Registry(tmp_path)
    vocab = vocab_parquet(tmp_path / "items.parquet", 5)
    version = reg.publish(
        tensors(),
        model={"type": "transformer-xl"},
        extra_files={"items.parquet": vocab},
        vocabulary_file="items.parquet",
    )
    with pytest.raises(RegistryError, match=rf"version {version}: its model config is refused"):
        load_model(reg, version)
    edit_manifest(reg, version, lambda m: {**m, "files": {WEIGHTS: m["files"][WEIGHTS]}})
    with pytest.raises(
        RegistryError, match=r"vocabulary file items.parquet is not in its manifest"
    ):
        check_vocabulary(reg, version, "0" * 64)
