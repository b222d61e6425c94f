"""The `recloop` command as a user runs it: a real process, its output and exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl

from recloop.data.dataset import SequenceDataset

RECLOOP = [sys.executable, "-m", "recloop.cli"]


def run(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RECLOOP, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False
    )


def test_prepare_then_stats_json(tmp_path: Path) -> None:
    log = tmp_path / "u.data"
    log.write_text("1\t10\t5\t100\n1\t11\t3\t200\n2\t10\t4\t150\n2\t12\t4\t160\n")
    done = run("prepare", "--format", "ml100k", "--input", str(log), "--out", str(tmp_path / "d"))
    assert done.returncode == 0, done.stderr
    assert "2 users, 3 items, 4 events" in done.stdout
    stats = run("stats", str(tmp_path / "d"), "--json")
    assert stats.returncode == 0, stats.stderr
    summary = json.loads(stats.stdout)
    assert (summary["users"], summary["items"], summary["events"]) == (2, 3, 4)
    assert summary["sequence_length"]["max"] == 2
    table = run("stats", str(tmp_path / "d"))
    assert "events" in table.stdout and "4" in table.stdout


def test_bad_input_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    log = tmp_path / "u.data"
    log.write_text("1\t10\t5\t100\n1\t11\t3\n")
    done = run("prepare", "--format", "ml100k", "--input", str(log), "--out", str(tmp_path / "d"))
    assert done.returncode == 2
    assert "error:" in done.stderr and "line 2 has 3 fields, expected 4" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "d").exists()
    missing = run(
        "prepare", "--format", "sasrec", "--input", "nope.txt", "--out", "x", cwd=tmp_path
    )
    assert missing.returncode == 2 and "nope.txt: no such file" in missing.stderr
    fmt = run("prepare", "--format", "xml", "--input", str(log), "--out", str(tmp_path / "e"))
    assert fmt.returncode == 2 and "--format 'xml' is not one of" in fmt.stderr
    not_data = run("stats", str(tmp_path))
    assert not_data.returncode == 2 and "is not a recloop dataset" in not_data.stderr


def test_existing_output_directory(tmp_path: Path) -> None:
    log = tmp_path / "Video.txt"
    log.write_text("1 1\n1 2\n2 2\n2 3\n")
    args = ["prepare", "--format", "sasrec", "--input", str(log), "--out", str(tmp_path / "d")]
    assert run(*args).returncode == 0
    again = run(*args)
    assert again.returncode == 2 and "already exists (pass --overwrite)" in again.stderr
    assert run(*args, "--overwrite").returncode == 0


def test_synthetic_with_threads_is_deterministic(tmp_path: Path) -> None:
    common = ["prepare", "--format", "synthetic", "--users", "300", "--items", "100"]
    one = run(*common, "--threads", "1", "--out", str(tmp_path / "a"))
    two = run(*common, "--threads", "2", "--out", str(tmp_path / "b"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert "(1 threads)" in one.stdout and "(2 threads)" in two.stdout
    a, b = SequenceDataset(tmp_path / "a"), SequenceDataset(tmp_path / "b")
    assert a.num_users == 300 and a.num_items <= 100
    for name in ("offsets", "items", "timestamps"):
        assert np.array_equal(getattr(a.sequences, name), getattr(b.sequences, name))


def test_generate_then_prepare_parquet(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    done = run("generate", "--out", str(log), "--users", "200", "--items", "50", "--seed", "3")
    assert done.returncode == 0, done.stderr
    rows = pl.read_parquet(log).height
    out = tmp_path / "d"
    args = ["--user-col", "user", "--item-col", "item", "--time-col", "timestamp"]
    prepared = run("prepare", "--format", "parquet", "--input", str(log), "--out", str(out), *args)
    assert prepared.returncode == 0, prepared.stderr
    assert SequenceDataset(out).num_events == rows


def test_demo_runs_the_loop(tmp_path: Path) -> None:
    done = run(
        "demo", "--workdir", str(tmp_path / "demo"), "--users", "400", "--items", "150",
        "--epochs", "2", timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "popularity baseline on validation: HR@10" in done.stdout
    assert "published v000001" in done.stdout
    assert SequenceDataset(tmp_path / "demo" / "data").num_users == 400
    assert (tmp_path / "demo" / "registry" / "versions" / "v000001" / "manifest.json").is_file()
    # Step 5: events through the API, the learner publishes deltas, the service follows them.
    assert "1 new item admitted" in done.stdout
    published = sorted(p.name for p in (tmp_path / "demo" / "registry" / "versions").iterdir())
    online_newest, int8 = published[-2:]
    assert online_newest != "v000001" and f"now serves {online_newest}" in done.stdout
    assert "(the new item is served)" in done.stdout
    # Step 6: an int8 version of v000001 that serving loads.
    assert f"int8 of v000001 published as {int8}" in done.stdout
    assert f"{int8} loads for serving: onnx engine, parity checked" in done.stdout
    manifest = json.loads(
        (tmp_path / "demo" / "registry" / "versions" / int8 / "manifest.json").read_text()
    )
    assert manifest["parent"] == "v000001" and manifest["method"] == "int8"


def test_online_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    cases = [
        (["--registry", str(tmp_path / "nowhere")], "not a model registry"),
        (["--registry", str(tmp_path), "online.batch_event=3"], "unknown key online.batch_event"),
        (["--registry", str(tmp_path), "train.lr=3"], "must look like online.key=value"),
        (["--registry", str(tmp_path), "--max-events", "0"], "--max-events must be >= 1"),
        (["--registry", str(tmp_path)], "has no versions yet"),
    ]
    (tmp_path / "versions").mkdir()
    for args, message in cases:
        done = run("online", "--event-log", str(tmp_path / "events.db"), *args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr


def test_serve_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    cases = [
        (["--registry", str(tmp_path / "nowhere")], "not a model registry"),
        (["--registry", str(tmp_path)], "has no versions yet"),
        (["--registry", str(tmp_path), "--version", "v000007"], "unknown version v000007"),
        (["--registry", str(tmp_path), "--engine", "tensorrt"], "--engine must be"),
        (["--registry", str(tmp_path), "--index", "hnsw"], "--index must be"),
        (["--registry", str(tmp_path), "--port", "70000"], "--port must be"),
    ]
    (tmp_path / "versions").mkdir()
    for args, message in cases:
        done = run("serve", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr


def test_ingest_appends_a_file_and_names_a_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "events.jsonl"
    good.write_text(
        '{"user_id": "a", "item_id": "1", "timestamp": 1700000000}\n'
        '{"user_id": "b", "item_id": "2"}\n'
    )
    log = tmp_path / "events.sqlite"
    done = run("ingest", str(good), "--event-log", str(log))
    assert done.returncode == 0, done.stderr
    assert "2 events" in done.stdout and "the log holds 2" in done.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id\nc,3\nd\n")
    done = run("ingest", str(bad), "--event-log", str(log))
    assert done.returncode == 2 and "bad.csv:3" in done.stderr


def test_prepare_with_item_attributes(tmp_path: Path) -> None:
    log = tmp_path / "u.data"
    log.write_text("1\t10\t5\t100\n1\t11\t3\t200\n2\t10\t4\t150\n2\t12\t4\t160\n")
    attributes = tmp_path / "item2attributes.json"
    attributes.write_text(json.dumps({"10": [1, 2], "12": [2], "99": [7]}))
    out = tmp_path / "d"
    done = run(
        "prepare", "--format", "ml100k", "--input", str(log), "--out", str(out),
        "--item-attributes", str(attributes),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "item attributes: 2 values, 2 of 3 items have some, 1 items of the file" in done.stdout
    index = SequenceDataset(out).item_attributes
    assert index is not None and index.tolist() == [[0, 0], [1, 2], [0, 0], [2, 0]]
    synthetic = run(
        "prepare", "--format", "synthetic", "--out", str(tmp_path / "s"),
        "--item-attributes", str(attributes),
    )  # fmt: skip
    assert synthetic.returncode == 2 and "not --format synthetic" in synthetic.stderr
