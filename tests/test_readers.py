"""Each reader on tiny hand-written fixtures, and every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recloop.data.readers import ColumnMap, read_chunks
from recloop.errors import DatasetError


def read(path: Path, fmt: str, columns: ColumnMap | None = None, **kw: int) -> pl.DataFrame:
    return pl.concat(list(read_chunks(path, fmt, columns, **kw)))


def test_movielens_dat(write) -> None:
    path = write("ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1357::4::9\n")
    frame = read(path, "movielens-dat")
    assert frame["user"].to_list() == [1, 1, 2]
    assert frame["item"].to_list() == [1193, 661, 1357]
    assert frame["timestamp"].to_list() == [978300760, 978302109, 9]
    assert frame["value"].to_list() == [5.0, 3.0, 4.0]
    assert frame["line"].to_list() == [1, 2, 3]
    assert frame["order"].to_list() == [0, 1, 2]


def test_ml100k_tab_separated_with_crlf_and_blank_lines(write) -> None:
    path = write("u.data", "196\t242\t3\t881250949\r\n\n186\t302\t3\t891717742\r\n")
    frame = read(path, "ml100k")
    assert frame["user"].to_list() == [196, 186]
    assert frame["line"].to_list() == [1, 3]  # the blank line still counts


def test_movielens_csv_checks_header(write) -> None:
    path = write("ratings.csv", "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n")
    frame = read(path, "movielens-csv")
    assert frame.select("user", "item", "timestamp").row(0) == (1, 31, 1260759144)
    assert frame["line"].to_list() == [2]
    bad = write("bad.csv", "user,movie,rating,ts\n1,31,2.5,1\n")
    with pytest.raises(DatasetError, match=r"bad.csv: line 1 is .*expected the header"):
        read(bad, "movielens-csv")


def test_sasrec_pairs_keep_file_order(write) -> None:
    path = write("Video.txt", "1 10\n1 5\n2  7\n1 3\n")
    frame = read(path, "sasrec")
    assert frame.select("user", "item").rows() == [(1, 10), (1, 5), (2, 7), (1, 3)]
    assert frame["timestamp"].null_count() == 4
    assert frame["order"].to_list() == [0, 1, 2, 3]


def test_s3rec_sequences_explode_in_order(write) -> None:
    path = write("Beauty.txt", "1 4 5 6\n2 9\n")
    frame = read(path, "s3rec")
    assert frame.select("user", "item").rows() == [(1, 4), (1, 5), (1, 6), (2, 9)]
    assert frame["line"].to_list() == [1, 1, 1, 2]
    assert frame["order"].to_list() == [0, 1, 2, 3]


def test_small_blocks_give_the_same_rows_and_line_numbers(write) -> None:
    text = "".join(f"{u}::{i}::1::{100 + i}\n" for u in range(30) for i in range(1, 5))
    path = write("ratings.dat", text)
    whole = read(path, "movielens-dat")
    blocky = read(path, "movielens-dat", block_bytes=37)
    assert whole.equals(blocky)
    assert blocky["line"].to_list() == list(range(1, 121))
    assert blocky["order"].to_list() == list(range(120))


def test_generic_csv_with_string_ids_iso_times_and_events(write) -> None:
    path = write(
        "log.csv",
        'who;what;when;kind;w\n"u-a";"x";2024-01-02T03:04:05;click;1.5\nu-b;y;1700000000;buy;2\n',
    )
    columns = ColumnMap(user="who", item="what", timestamp="when", event="kind", value="w")
    frame = read(path, "csv", ColumnMap(**{**columns.__dict__, "separator": ";"}))
    assert frame["user"].to_list() == ["u-a", "u-b"]
    assert frame["item"].to_list() == ["x", "y"]
    assert frame["timestamp"].to_list() == [1704164645, 1700000000]
    assert frame["event"].to_list() == ["click", "buy"]
    assert frame["value"].to_list() == [1.5, 2.0]
    assert frame["line"].to_list() == [2, 3]


def test_parquet_with_configured_columns(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pl.DataFrame({"u": ["a", "b", "a"], "i": [3, 4, 5], "t": [30, 10, 20]}).write_parquet(path)
    frame = read(path, "parquet", ColumnMap(user="u", item="i", timestamp="t"))
    assert frame.select("user", "item", "timestamp").rows() == [
        ("a", 3, 30),
        ("b", 4, 10),
        ("a", 5, 20),
    ]
    assert frame["line"].to_list() == [1, 2, 3]  # rows, 1-based


# ------------------------------------------------------------------ bad input


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.dat: no such file"):
        read(tmp_path / "nope.dat", "movielens-dat")


def test_empty_file_is_named(write) -> None:
    with pytest.raises(DatasetError, match=r"u\.data: file is empty"):
        read(write("u.data", ""), "ml100k")


def test_wrong_separator_names_line_and_suggests_format(write) -> None:
    path = write("ratings.dat", "1\t2\t3\t4\n")
    with pytest.raises(DatasetError, match=r"line 1 has 1 fields, expected 4.*right --format"):
        read(path, "movielens-dat")


def test_wrong_column_count_names_the_line(write) -> None:
    path = write("u.data", "1\t2\t3\t4\n1\t2\t3\t4\n5\t6\t7\n")
    with pytest.raises(DatasetError, match=r"u\.data: line 3 has 3 fields, expected 4"):
        read(path, "ml100k")


def test_non_numeric_timestamp_names_line_and_field(write) -> None:
    path = write("ratings.dat", "1::2::3::4\n1::3::3::yesterday\n")
    with pytest.raises(DatasetError, match=r"line 2: Timestamp 'yesterday' is not an integer"):
        read(path, "movielens-dat")


def test_non_numeric_id_in_numeric_format(write) -> None:
    path = write("Video.txt", "1 2\nabc 3\n")
    with pytest.raises(DatasetError, match=r"line 2: user 'abc' is not an integer"):
        read(path, "sasrec")


def test_csv_missing_column_lists_available(write) -> None:
    path = write("log.csv", "user_id,item_id,time\n1,2,3\n")
    with pytest.raises(DatasetError, match=r"timestamp column 'timestamp' not found.*'time'"):
        read(path, "csv")


def test_csv_bad_timestamp_names_line(write) -> None:
    path = write("log.csv", "user_id,item_id,timestamp\n1,2,3\n1,3,soon\n")
    with pytest.raises(DatasetError, match=r"line 3: timestamp column 'timestamp' has 'soon'"):
        read(path, "csv")


def test_csv_header_only_is_empty(write) -> None:
    with pytest.raises(DatasetError, match="no rows"):
        read(write("log.csv", "user_id,item_id,timestamp\n"), "csv")


def test_not_parquet(write) -> None:
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        read(write("x.parquet", "hello"), "parquet")


def test_unknown_format(write) -> None:
    with pytest.raises(DatasetError, match="unknown input format 'xml'"):
        read(write("x", "1 2\n"), "xml")
