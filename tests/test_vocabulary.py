"""The one Vocabulary type: what the dataset, serving and the online learner each rely on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recloop.data.vocabulary import Vocabulary
from recloop.errors import DatasetError


def write(path: Path, ids: list[int], raw: list[object]) -> Path:
    pl.DataFrame({"id": ids, "raw": raw}).write_parquet(path)
    return path


@pytest.mark.parametrize("raw", [[3, 5, 9], ["fig", "kiwi", "pear"]])
@pytest.mark.parametrize("first_id", [0, 1])
def test_a_file_round_trips_byte_for_byte(tmp_path: Path, raw: list[object], first_id: int) -> None:
    ids = list(range(first_id, first_id + 3))
    original = write(tmp_path / "vocab.parquet", ids, raw)
    vocabulary = Vocabulary.read(original, first_id)
    assert len(vocabulary) == 3 and vocabulary.last_id == first_id + 2
    assert vocabulary.raw_by_id.tolist() == raw
    vocabulary.write(tmp_path / "again.parquet")
    assert (tmp_path / "again.parquet").read_bytes() == original.read_bytes()
    assert vocabulary.parquet_bytes() == original.read_bytes()


def test_typed_and_text_lookups_agree_and_report_unknown_ids(tmp_path: Path) -> None:
    vocabulary = Vocabulary.read(write(tmp_path / "items.parquet", [1, 2, 3], [10, 20, 30]))
    assert vocabulary.to_dense(np.array([30, 10, 99])).tolist() == [3, 1, -1]
    assert vocabulary.to_dense([99], missing=0).tolist() == [0]
    assert vocabulary.to_raw([1, 3]).tolist() == [10, 30]
    with pytest.raises(DatasetError, match=r"out of range \[1, 3\]"):
        vocabulary.to_raw([0])
    dense, unknown = vocabulary.lookup(["30", "nope", "10", "20x"])
    assert dense.tolist() == [3, 1] and unknown == ["nope", "20x"]
    assert vocabulary.lookup(["20"])[1] == []
    assert vocabulary.dense("20") == 2 and vocabulary.dense("nope") == vocabulary.missing_id == 0
    assert vocabulary.raw_strings(np.array([2, 1])) == ["20", "10"] and vocabulary.raw(3) == "30"


def test_a_vocabulary_from_zero_answers_minus_one_for_unknown_ids() -> None:
    users = Vocabulary(np.array(["ann", "bob"], dtype=object), first_id=0)
    assert users.dense("ann") == 0 and users.dense("eve") == users.missing_id == -1
    assert users.lookup(["bob", "eve", "ann"])[0].tolist() == [1, 0]


def test_growth_appends_and_keeps_the_column_type_while_it_can(tmp_path: Path) -> None:
    vocabulary = Vocabulary.read(write(tmp_path / "items.parquet", [1, 2], [10, 20]))
    assert vocabulary.add("30") == 3 and vocabulary.num_items == 3
    assert vocabulary.dense("30") == 3 and vocabulary.to_dense([30]).tolist() == [3]
    assert vocabulary.raw_by_id.tolist() == [10, 20, 30]
    assert pl.read_parquet(vocabulary.parquet_bytes())["raw"].dtype == pl.Int64
    assert vocabulary.add("sku-x") == 4
    table = pl.read_parquet(vocabulary.parquet_bytes())
    assert table["id"].to_list() == [1, 2, 3, 4]
    assert table["raw"].to_list() == ["10", "20", "30", "sku-x"]
    assert vocabulary.to_dense(np.array(["sku-x"], dtype=object)).tolist() == [4]
    with pytest.raises(DatasetError, match="already in the vocabulary"):
        vocabulary.add("20")


def test_extended_copies_and_leaves_the_original_alone(tmp_path: Path) -> None:
    first = Vocabulary.read(write(tmp_path / "a.parquet", [1, 2], ["a", "b"])).index_text()
    grown = first.extended(write(tmp_path / "b.parquet", [1, 2, 3], ["a", "b", "c"]))
    assert grown.lookup(["c", "a"])[0].tolist() == [3, 1] and len(first) == 2
    assert first.lookup(["c"])[1] == ["c"]
    with pytest.raises(DatasetError, match=r"c\.parquet: .* renumbered"):
        first.extended(write(tmp_path / "c.parquet", [1, 2], ["b", "a"]))
    with pytest.raises(DatasetError, match=r"d\.parquet: rows 1 and 3 hold the same raw id 'a'"):
        first.extended(write(tmp_path / "d.parquet", [1, 2, 3], ["a", "b", "a"]))


@pytest.mark.parametrize(
    ("ids", "raw", "message"),
    [
        ([1, 2, 4], ["a", "b", "c"], r"row 3 has id 4, expected 3 \(ids are 1\.\.3 in order\)"),
        ([2, 1], ["a", "b"], r"row 1 has id 2, expected 1"),
        ([1, 2, 3], ["a", None, "c"], r"row 2 \(id 2\) has no raw id"),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_row(
    tmp_path: Path, ids: list[int], raw: list[object], message: str
) -> None:
    path = write(tmp_path / "items.parquet", ids, raw)
    with pytest.raises(DatasetError, match=r"items\.parquet: " + message):
        Vocabulary.read(path)


def test_a_repeated_raw_id_is_named_when_lookups_are_built(tmp_path: Path) -> None:
    path = write(tmp_path / "items.parquet", [1, 2, 3], [7, 8, 7])
    with pytest.raises(DatasetError, match=r"items\.parquet: rows 1 and 3 hold the same raw id"):
        Vocabulary.read(path).dense("7")
    with pytest.raises(DatasetError, match=r"items\.parquet: rows 1 and 3 hold the same raw id"):
        Vocabulary.read(path).to_dense([7])


def test_unreadable_files_and_missing_columns_are_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"junk\.parquet: not a readable vocabulary table"):
        Vocabulary.read(junk)
    pl.DataFrame({"raw": ["a"]}).write_parquet(tmp_path / "noid.parquet")
    with pytest.raises(DatasetError, match=r"noid\.parquet: the vocabulary table has no id"):
        Vocabulary.read(tmp_path / "noid.parquet")
    with pytest.raises(DatasetError, match=r"absent\.parquet: not a readable vocabulary"):
        Vocabulary.read(tmp_path / "absent.parquet")
