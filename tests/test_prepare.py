"""Preprocessing: dedup, filtering, k-core, dense ids, sort, CSR files, manifest, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recloop.data.dataset import SequenceDataset
from recloop.data.prepare import FileSource, PrepareOptions, prepare, prepare_file
from recloop.errors import ConfigError, DatasetError

# user::item::rating::timestamp. User 20 has two events at the same second (file order breaks
# the tie), user 10's lines are out of time order, line 6 is an exact duplicate of line 1.
RATINGS = """10::7::5::300
20::5::4::100
10::3::3::100
20::9::2::100
10::5::4::200
10::7::5::300
"""


def prepare_text(
    tmp_path: Path, text: str, options: PrepareOptions | None = None, **kw: object
) -> tuple[dict[str, object], SequenceDataset]:
    options = options or PrepareOptions()
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "ratings.dat"
    log.write_text(text)
    out = tmp_path / "data"
    manifest = prepare_file(FileSource(log, "movielens-dat"), out, options, **kw)  # type: ignore[arg-type]
    return manifest, SequenceDataset(out, verify=True)


def test_dense_ids_sort_and_csr(tmp_path: Path) -> None:
    manifest, data = prepare_text(tmp_path, RATINGS)
    seqs = data.sequences
    # users 10 -> 0, 20 -> 1; items 3 -> 1, 5 -> 2, 7 -> 3, 9 -> 4 (ascending raw id)
    assert seqs.offsets.tolist() == [0, 3, 5]
    assert seqs.items.tolist() == [1, 2, 3, 2, 4]
    assert seqs.timestamps.tolist() == [100, 200, 300, 100, 100]
    assert (seqs.offsets.dtype, seqs.items.dtype, seqs.timestamps.dtype) == (
        np.int64,
        np.int32,
        np.int64,
    )
    assert isinstance(seqs.items, np.memmap)  # loads with mmap
    assert data.users.to_raw([0, 1]).tolist() == [10, 20]
    assert data.items.to_raw([1, 2, 3, 4]).tolist() == [3, 5, 7, 9]
    assert data.items.to_dense([9, 3, 42]).tolist() == [4, 1, -1]
    assert manifest["counts"] == {
        "users": 2,
        "items": 4,
        "events": 5,
        "raw_rows": 6,
        "duplicates_dropped": 1,
        "short_users_dropped": 0,
        "short_user_events_dropped": 0,
        "kcore_events_dropped": 0,
    }
    assert manifest["lengths"] == {"min": 2, "max": 3, "mean": 2.5, "median": 2.5}
    assert manifest["time"] == "timestamp"
    assert manifest["source"]["format"] == "movielens-dat"
    assert len(manifest["source"]["sha256"]) == 64
    assert set(manifest["files"]) >= {"offsets.npy", "items.npy", "timestamps.npy"}
    assert json.loads((tmp_path / "data" / "manifest.json").read_text()) == manifest


def test_vocabulary_table_maps_both_ways(tmp_path: Path) -> None:
    prepare_text(tmp_path, RATINGS)
    table = pl.read_parquet(tmp_path / "data" / "items.parquet")
    assert table.rows() == [(1, 3), (2, 5), (3, 7), (4, 9)]  # id -> raw, by row
    assert table["raw"].is_sorted()  # raw -> id, by binary search
    users = pl.read_parquet(tmp_path / "data" / "users.parquet")
    assert users.rows() == [(0, 10), (1, 20)]


def test_duplicate_policies(tmp_path: Path) -> None:
    _, kept = prepare_text(tmp_path / "keep", RATINGS, PrepareOptions(duplicates="keep"))
    assert kept.num_events == 6
    with pytest.raises(DatasetError, match=r"1 exact duplicate rows; first: line 6 repeats line 1"):
        prepare_text(tmp_path / "err", RATINGS, PrepareOptions(duplicates="error"))
    assert not (tmp_path / "err" / "data").exists()
    notes: list[str] = []
    prepare_text(tmp_path / "drop", RATINGS, notice=notes.append)
    assert notes == ["dropped 1 exact duplicate rows (first: line 6 repeats line 1)"]


def test_single_event_users_dropped_with_notice_or_kept(tmp_path: Path) -> None:
    text = RATINGS + "30::9::1::50\n"
    notes: list[str] = []
    manifest, data = prepare_text(tmp_path / "a", text, notice=notes.append)
    assert data.num_users == 2 and manifest["counts"]["short_users_dropped"] == 1
    assert any("1 users with fewer than 2 events (e.g. user 30 at line 7)" in n for n in notes)
    _, kept = prepare_text(tmp_path / "b", text, PrepareOptions(min_user_events=1))
    assert kept.num_users == 3


def test_k_core_is_iterated_to_a_fixed_point(tmp_path: Path) -> None:
    # Item 8 has 1 event; without it user 3 has 1 event left, so user 3 goes, which takes
    # item 9 down to 1 event, so item 9 goes too (3 events in all).
    text = (
        "1::5::1::1\n1::6::1::2\n2::5::1::1\n2::6::1::2\n3::9::1::1\n3::8::1::2\n"
        "4::9::1::1\n4::5::1::2\n4::6::1::3\n"
    )
    _, data = prepare_text(
        tmp_path, text, PrepareOptions(min_user_events=0, user_core=2, item_core=2)
    )
    assert data.users.to_raw(range(data.num_users)).tolist() == [1, 2, 4]
    assert data.items.to_raw(range(1, data.num_items + 1)).tolist() == [5, 6]
    assert data.manifest["counts"]["kcore_events_dropped"] == 3


def test_source_order_when_no_timestamps(tmp_path: Path) -> None:
    log = tmp_path / "Beauty.txt"
    log.write_text("2 8 4\n1 4 6 5\n")
    prepare_file(FileSource(log, "s3rec"), tmp_path / "d")
    data = SequenceDataset(tmp_path / "d")
    assert data.manifest["time"] == "source_order"
    assert not data.has_timestamps
    assert data.sequences.items.tolist() == [1, 3, 2, 4, 1]  # raw 4 6 5 | 8 4
    assert data.sequences.timestamps.tolist() == [2, 3, 4, 0, 1]


def test_string_ids(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\nbob,pear,2\nann,fig,1\nbob,fig,1\nann,kiwi,5\n")
    prepare_file(FileSource(log, "csv"), tmp_path / "d")
    data = SequenceDataset(tmp_path / "d")
    assert data.users.to_raw([0, 1]).tolist() == ["ann", "bob"]
    assert data.items.to_dense(["fig", "kiwi", "pear", "plum"]).tolist() == [1, 2, 3, -1]
    assert data.sequences.items.tolist() == [1, 2, 1, 3]


def test_existing_output_is_refused_and_kept(tmp_path: Path) -> None:
    prepare_text(tmp_path, RATINGS)
    before = (tmp_path / "data" / "manifest.json").read_text()
    with pytest.raises(DatasetError, match=r"data: output directory already exists"):
        prepare_text(tmp_path, RATINGS)
    assert (tmp_path / "data" / "manifest.json").read_text() == before
    manifest, _ = prepare_text(tmp_path, RATINGS + "30::1::1::1\n30::2::1::2\n", overwrite=True)
    assert manifest["counts"]["users"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_midway_leaves_nothing(tmp_path: Path) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield pl.DataFrame(
            {"user": [1, 1], "item": [1, 2], "timestamp": [1, 2], "line": [1, 2], "order": [0, 1]}
        )
        raise DatasetError("broken input on line 3")

    with pytest.raises(DatasetError, match="line 3"):
        prepare(chunks(), {"path": "x"}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_everything_filtered_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no interactions left"):
        prepare_text(tmp_path, "1::2::3::4\n2::3::3::4\n")
    assert not (tmp_path / "data").exists()


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="duplicates must be"):
        PrepareOptions(duplicates="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="user_core must be >= 0"):
        PrepareOptions(user_core=-1)


def test_not_a_dataset_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is not a recloop dataset"):
        SequenceDataset(tmp_path)
    prepare_text(tmp_path, RATINGS)
    items = tmp_path / "data" / "items.npy"
    array = np.load(items)
    array[0] = 4
    np.save(items, array)
    with pytest.raises(DatasetError, match=r"items\.npy: checksum mismatch"):
        SequenceDataset(tmp_path / "data", verify=True)


def test_time_split_needs_real_timestamps(tmp_path: Path) -> None:
    log = tmp_path / "Beauty.txt"
    log.write_text("1 4 6 5\n2 8 4 5\n")
    prepare_file(FileSource(log, "s3rec"), tmp_path / "d")
    data = SequenceDataset(tmp_path / "d")
    with pytest.raises(DatasetError, match="has no timestamps"):
        data.time_split()
    assert len(data.leave_one_out().test) == 2
    _, timed = prepare_text(tmp_path / "t", RATINGS)
    assert len(timed.time_split(0.2, 0.2).test) >= 1


def test_unwritable_output_fails_before_reading(tmp_path: Path) -> None:
    log = tmp_path / "ratings.dat"
    log.write_text(RATINGS)
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("a file, not a directory")
    read: list[int] = []
    for out in (blocker / "sub", blocker / "a" / "b"):
        with pytest.raises(DatasetError, match=rf"{out}: cannot create the output directory: "):
            prepare_file(FileSource(log, "movielens-dat"), out, on_progress=read.append)
    assert read == []  # refused before the input was read
    with pytest.raises(DatasetError, match=r"^/proc/recloop-test: cannot create the output"):
        prepare_file(FileSource(log, "movielens-dat"), Path("/proc/recloop-test"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ratings.dat", "somefile.txt"]


def test_a_write_error_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    log = tmp_path / "ratings.dat"
    log.write_text(RATINGS)
    monkeypatch.setattr(np, "save", disk_full)
    out = tmp_path / "new" / "parents" / "data"
    with pytest.raises(DatasetError, match=rf"{out}: cannot write the dataset \(No space left"):
        prepare_file(FileSource(log, "movielens-dat"), out)
    assert [p.name for p in tmp_path.iterdir()] == ["ratings.dat"]  # no parents, no tmp dir


def test_a_failed_overwrite_keeps_the_existing_dataset(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    prepare_text(tmp_path, RATINGS)
    before = (tmp_path / "data" / "manifest.json").read_text()
    real_rename = os.rename

    def rename(source: object, target: object) -> None:
        if str(source).endswith(".tmp"):  # the new dataset's directory cannot be moved in
            raise OSError(30, "Read-only file system")
        real_rename(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(DatasetError, match=r"data: cannot write the dataset \(Read-only"):
        prepare_text(tmp_path, RATINGS + "30::1::1::1\n30::2::1::2\n", overwrite=True)
    assert (tmp_path / "data" / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("manifest.json", b"[1, 2]", "manifest.json: not a recloop dataset manifest"),
        ("manifest.json", b"\xff{", r"manifest.json: line 1 \(byte offset 0\): not valid UTF-8"),
        ("manifest.json", b'{"kind": "recloop-dataset"}', r"the manifest has no 'source'"),
        ("offsets.npy", b"junk\n", r"offsets.npy: not a \.npy file"),
        ("items.npy", None, r"items.npy: not a readable \.npy array"),  # truncated
        ("users.parquet", b"junk", r"users.parquet: not a readable vocabulary table"),
    ],
)
def test_corrupt_dataset_files_are_one_error_naming_the_file(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    prepare_text(tmp_path, RATINGS)
    path = tmp_path / "data" / name
    path.write_bytes(content if content is not None else path.read_bytes()[:130])
    with pytest.raises(DatasetError, match=message) as caught:
        SequenceDataset(tmp_path / "data").stats()
        SequenceDataset(tmp_path / "data").users  # noqa: B018  (read on first use)
    assert str(path) in str(caught.value)


def test_non_utf8_item_attributes_name_the_line_and_offset(tmp_path: Path) -> None:
    from recloop.data.attributes import read_item_attributes

    path = tmp_path / "item2attributes.json"
    path.write_bytes(b'{"1": [2],\n "3": ["\xe9"]}\n')
    with pytest.raises(ConfigError, match=r"json: line 2 \(byte offset 19\): not valid UTF-8"):
        read_item_attributes(path)
