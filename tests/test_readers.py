"""Each reader on tiny hand-written fixtures, and every kind of bad input."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import polars as pl
import pytest

from recloop.data.readers import read_chunks
from recloop.data.table_formats import ColumnMap, parquet_rows
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


# ------------------------------------------------------------------ binary and non-UTF-8 input

# Three good lines in each text format (the csv ones after a header); line 3 gets a bad byte.
TEXT_FORMATS = {
    "movielens-dat": ("", "1::10::5::100\n", "1::11::4::200\n", "2::10::3::150\n"),
    "ml100k": ("", "1\t10\t5\t100\n", "1\t11\t4\t200\n", "2\t10\t3\t150\n"),
    "movielens-csv": ("userId,movieId,rating,timestamp\n", "1,10,5,100\n", "1,11,4,2\n", ""),
    "sasrec": ("", "1 10\n", "1 11\n", "2 10\n"),
    "s3rec": ("", "1 10 11\n", "2 10 12\n", "3 4 5\n"),
    "csv": ("user_id,item_id,timestamp\n", "1,10,100\n", "1,11,200\n", ""),
}


def with_bad_line_3(fmt: str, bad: bytes) -> tuple[bytes, int]:
    """(file bytes whose line 3 starts with `bad`, the byte offset of `bad`)."""
    header, first, second, third = TEXT_FORMATS[fmt]
    lines = [header, first, second, third] if header else [first, second, third]
    before = "".join(lines[:2]).encode()
    return before + bad + "".join(lines[2:]).encode(), len(before)


@pytest.mark.parametrize("fmt", list(TEXT_FORMATS))
@pytest.mark.parametrize("block_bytes", [5, 1 << 20])
def test_non_utf8_names_the_line_and_byte_offset(write, fmt: str, block_bytes: int) -> None:
    data, offset = with_bad_line_3(fmt, b"\xff")
    path = write("log.txt", data)
    expected = rf"log\.txt: line 3 \(byte offset {offset}\): not valid UTF-8 \(byte 0xff"
    with pytest.raises(DatasetError, match=expected):
        read(path, fmt, block_bytes=block_bytes)


@pytest.mark.parametrize("fmt", list(TEXT_FORMATS))
def test_nul_bytes_name_the_line_and_byte_offset(write, fmt: str) -> None:
    data, offset = with_bad_line_3(fmt, b"\x00\x00")
    path = write("log.txt", data)
    with pytest.raises(DatasetError, match=rf"line 3 \(byte offset {offset}\): control byte 0x00"):
        read(path, fmt, block_bytes=7)


def test_unit_separator_in_a_line_format_is_named(write) -> None:
    path = write("u.data", b"1\t10\t5\t100\n1\t1\x1f1\t5\t100\n")
    with pytest.raises(
        DatasetError, match=r"u\.data: line 2 \(byte offset 14\): control byte 0x1f"
    ):
        read(path, "ml100k")


def test_a_character_cut_at_the_end_of_the_file_is_named(write) -> None:
    path = write("Video.txt", b"1 10\n1 \xc3")
    with pytest.raises(DatasetError, match=r"line 2 \(byte offset 7\): .*unexpected end of data"):
        read(path, "sasrec")


def test_multibyte_characters_across_reads_are_valid(write) -> None:
    text = "user_id,item_id,timestamp\n" + "".join(
        f"ü{u},é{i},{i}\n" for u in range(9) for i in (1, 2)
    )
    path = write("log.csv", text.encode())
    whole = read(path, "csv")
    assert whole.height == 18 and whole["user"][0] == "ü0" and whole["item"][1] == "é2"
    assert read(path, "csv", block_bytes=3).equals(whole)


def test_utf8_byte_order_mark_is_skipped(write) -> None:
    path = write("log.csv", "\ufeffuser_id,item_id,timestamp\n1,10,100\n".encode())
    assert read(path, "csv").select("user", "item", "line").row(0) == (1, 10, 2)
    path = write("u.data", "\ufeff1\t10\t5\t100\n1\t11\t4\t200\n".encode())
    assert read(path, "ml100k")["line"].to_list() == [1, 2]


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (gzip.compress(b"1\t10\t5\t100\n"), "a gzip-compressed file, not a text log"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "a PNG image, not a text log"),
        (b"PK\x03\x04\x14\x00\x00\x00", "a zip archive, not a text log"),
        ("1\t10\t5\t100\n".encode("utf-16"), "UTF-16 text: convert it to UTF-8"),
        (b"", "a Parquet file, not a text log: use --format parquet"),  # written below
    ],
)
@pytest.mark.parametrize("fmt", ["ml100k", "s3rec", "csv"])
def test_files_passed_by_mistake_are_named(
    tmp_path: Path, content: bytes, what: str, fmt: str
) -> None:
    path = tmp_path / "input.bin"
    if content:
        path.write_bytes(content)
    else:
        pl.DataFrame({"user_id": [1], "item_id": [2]}).write_parquet(path)
    with pytest.raises(
        DatasetError, match=rf"input\.bin: line 1 \(byte offset 0\): this is {what}"
    ):
        read(path, fmt)


@pytest.mark.parametrize("fmt", list(TEXT_FORMATS))
def test_random_bytes_are_one_clear_error(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(random.Random(7).randbytes(5000))
    with pytest.raises(DatasetError, match=r"noise\.bin: line \d+ \(byte offset \d+\): "):
        read(path, fmt, block_bytes=1000)


@pytest.mark.parametrize("block_bytes", [4, 1 << 20])
def test_blocks_that_look_like_zlib_are_read_as_text(write, block_bytes: int) -> None:
    # polars takes bytes starting with "x^" or "x\x01" for a zlib stream: "x^" failed, and
    # "x\x01" silently read as no rows at all.
    path = write("log.csv", b"user_id,item_id,timestamp\nx^a,1,1\nx\x01b,2,2\nx^c,3,3\n")
    frame = read(path, "csv", block_bytes=block_bytes)
    assert frame["user"].to_list() == ["x^a", "x\x01b", "x^c"]
    path = write("Video.txt", b"1 2\nx^1 3\n")
    with pytest.raises(DatasetError, match=r"line 2: user 'x\^1' is not an integer"):
        read(path, "sasrec", block_bytes=block_bytes)


def test_csv_column_named_twice(write) -> None:
    path = write("log.csv", "user_id,item_id,user_id\n1,2,3\n")
    with pytest.raises(DatasetError, match=r"user column 'user_id' appears twice in header"):
        read(path, "csv")


# ------------------------------------------------------------------ corrupt Parquet


def test_corrupt_parquet_is_one_error_naming_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    users = list(range(2000))
    pl.DataFrame({"user_id": users, "item_id": users, "timestamp": users}).write_parquet(good)
    data = good.read_bytes()
    columns = ColumnMap()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"truncated\.parquet: not a readable Parquet.*trunc"):
        read(truncated, "parquet", columns)
    with pytest.raises(DatasetError, match=r"truncated\.parquet: not a readable Parquet"):
        parquet_rows(truncated)
    text = tmp_path / "text.parquet"
    text.write_text("user_id,item_id,timestamp\n1,2,3\n")
    with pytest.raises(DatasetError, match=r"text\.parquet: .*not start with the Parquet magic"):
        read(text, "parquet", columns)
    pages = bytearray(data)
    pages[8 : len(data) // 2] = bytes(len(data) // 2 - 8)  # zero the pages, keep the footer
    zeroed = tmp_path / "zeroed.parquet"
    zeroed.write_bytes(bytes(pages))
    with pytest.raises(DatasetError, match=r"zeroed\.parquet: Parquet data after row 0 is corrupt"):
        read(zeroed, "parquet", columns)
