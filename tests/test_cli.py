"""The `recloop` command as a user runs it: a real process, its output and exit status."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import polars as pl
import pytest

from recloop.data.dataset import SequenceDataset

RECLOOP = [sys.executable, "-m", "recloop.cli"]


def run(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RECLOOP, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False
    )


def run_here(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """`recloop ARGS` through the console entry point, `recloop.cli.main`, in this process: the
    same argument parsing and error reporting as a real process, without the seconds a fresh
    interpreter spends importing torch (the error-path tests run dozens of commands). The
    environment and the root logger are restored afterwards (serve sets thread-count variables
    for its libraries and configures logging)."""
    from recloop.cli import main

    environ = dict(os.environ)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    capsys.readouterr()
    code = 0
    try:
        with patch.object(sys, "argv", ["recloop", *args]):
            main()
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(environ)
        root.handlers[:] = handlers
        root.setLevel(level)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["recloop", *args], code, out, err)


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


def test_online_bad_arguments_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["--registry", str(tmp_path / "nowhere")], "not a model registry"),
        (["--registry", str(tmp_path), "online.batch_event=3"], "unknown key online.batch_event"),
        (["--registry", str(tmp_path), "train.lr=3"], "must look like online.key=value"),
        (["--registry", str(tmp_path), "--max-events", "0"], "--max-events must be >= 1"),
        (["--registry", str(tmp_path)], "has no versions yet"),
    ]
    (tmp_path / "versions").mkdir()
    for args, message in cases:
        done = run_here(capsys, "online", "--event-log", str(tmp_path / "events.db"), *args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr


def test_serve_bad_arguments_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["--registry", str(tmp_path / "nowhere")], "not a model registry"),
        (["--registry", str(tmp_path)], "has no versions yet"),
        (["--registry", str(tmp_path), "--version", "v000007"], "unknown version v000007"),
        (["--registry", str(tmp_path), "--engine", "tensorrt"], "--engine must be"),
        (["--registry", str(tmp_path), "--engine", "torch-compiled"], "torch-compiled was removed"),
        (["--registry", str(tmp_path), "--index", "hnsw"], "--index must be"),
        (["--registry", str(tmp_path), "--index-uri", "x.db"], "milvus or milvus-ivf only"),
        (
            ["--registry", str(tmp_path), "--index", "milvus", "--index-uri", "milvus.example"],
            "index_uri (--index-uri) must be a Milvus server URI",
        ),
        (["--registry", str(tmp_path), "--index-alias", "a"], "milvus or milvus-ivf only"),
        (
            ["--registry", str(tmp_path), "--index", "milvus", "--index-alias", "1-bad"],
            "index_alias (--index-alias) must be a Milvus name",
        ),
        (["--registry", str(tmp_path), "--port", "70000"], "--port must be"),
    ]
    (tmp_path / "versions").mkdir()
    for args, message in cases:
        done = run_here(capsys, "serve", *args)
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


# ------------------------------------------------------------------ bad files: one line each


def one_error_line(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The single `error: ...` line of a failed command, checked to contain every needle."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_prepare_binary_and_non_utf8_files_are_one_line(tmp_path: Path) -> None:
    import gzip
    import random

    cases = [
        ("ml100k", b"1\t10\t5\t100\n1\t11\t3\t20\n\xff\t12\t4\t160\n", "line 3 (byte offset 21)"),
        ("movielens-dat", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "this is a PNG image"),
        ("s3rec", gzip.compress(b"1 2 3\n2 3 4\n"), "this is a gzip-compressed file"),
        ("csv", b"user_id,item_id\n1,2\n1,\x003\n", "line 3 (byte offset 22): control byte"),
        ("sasrec", random.Random(3).randbytes(4000), "(byte offset "),
    ]  # fmt: skip
    for fmt, content, where in cases:
        log = tmp_path / f"log-{fmt}.txt"
        log.write_bytes(content)
        out = tmp_path / f"out-{fmt}"
        done = run("prepare", "--format", fmt, "--input", str(log), "--out", str(out))
        line = one_error_line(done, f"{log}: line ", where)
        assert "not valid UTF-8" in line or "this is" in line or "control byte" in line
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_prepare_corrupt_parquet_is_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pl.DataFrame({"user_id": [1, 1, 2], "item_id": [1, 2, 3]}).write_parquet(good)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[:-20])
    renamed = tmp_path / "renamed.parquet"
    renamed.write_text("user_id,item_id\n1,2\n")
    for path in (truncated, renamed):
        args = ["--format", "parquet", "--input", str(path), "--time-col", "none"]
        done = run("prepare", *args, "--out", str(tmp_path / "out"))
        one_error_line(done, f"{path}: not a readable Parquet file")
    assert not (tmp_path / "out").exists()


def test_prepare_and_generate_to_an_unwritable_place_are_one_line(tmp_path: Path) -> None:
    log = tmp_path / "u.data"
    log.write_text("1\t10\t5\t100\n1\t11\t3\t200\n")
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("not a directory")
    for out in (blocker / "sub", Path("/proc/recloop-test-out")):
        done = run("prepare", "--format", "ml100k", "--input", str(log), "--out", str(out))
        one_error_line(done, f"{out}: cannot create the output directory")
    done = run("generate", "--out", str(blocker / "log.parquet"), "--users", "20")
    one_error_line(done, f"{blocker / 'log.parquet'}: cannot write the log")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somefile.txt", "u.data"]


def test_non_utf8_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "generator.toml"
    config.write_bytes(b"num_users = 5\n\xff\n")
    done = run("prepare", "--format", "synthetic", "--input", str(config), "--out", "x")
    one_error_line(done, f"{config}: line 2 (byte offset 14): not valid UTF-8")


def test_stats_on_a_corrupt_dataset_is_one_line(tmp_path: Path) -> None:
    log = tmp_path / "u.data"
    log.write_text("1\t10\t5\t100\n1\t11\t3\t200\n2\t10\t4\t150\n2\t12\t4\t160\n")
    out = tmp_path / "d"
    assert (
        run("prepare", "--format", "ml100k", "--input", str(log), "--out", str(out)).returncode == 0
    )
    (out / "manifest.json").write_text('{"kind": "recloop-dataset", "counts": 3}')
    one_error_line(run("stats", str(out)), f"{out / 'manifest.json'}: the manifest has no")


def test_models_list_marks_a_broken_version_and_show_names_its_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from recloop.registry import Registry

    registry = Registry(tmp_path / "registry")
    ids = [
        registry.publish({"w": torch.ones(2)}, model={"type": "sasrec"}, metrics={"m": i})
        for i in range(3)
    ]
    manifest = registry.path(ids[1]) / "manifest.json"
    manifest.write_text("{not json")
    listed = run_here(capsys, "models", "list", "--registry", str(registry.root))
    assert listed.returncode == 0, listed.stderr
    assert all(i in listed.stdout for i in ids) and "broken" in listed.stdout
    as_json = run_here(capsys, "models", "list", "--registry", str(registry.root), "--json")
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    assert [row["status"].split(":")[0] for row in rows] == ["ok", "broken", "ok"]
    assert str(manifest) in rows[1]["status"] and "is not valid JSON" in rows[1]["status"]
    assert rows[2]["metrics"] == {"m": 2}
    shown = run_here(capsys, "models", "show", "--registry", str(registry.root), ids[1])
    one_error_line(shown, f"version {ids[1]}: {manifest} is not valid JSON")


def test_serve_refuses_a_broken_version_before_binding_its_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from recloop.serve.server import free_port
    from tests.serving import make_dataset, train_version

    data = make_dataset(tmp_path / "data")
    registry = tmp_path / "registry"
    version = train_version(data, registry, tmp_path / "run", seed=1, steps=3)
    weights = registry / "versions" / version / "weights.safetensors"
    with weights.open("r+b") as file:
        file.seek(100)
        file.write(b"garbage")
    port = free_port()
    # A real process once: the error comes before uvicorn ever runs.
    done = run("serve", "--registry", str(registry), "--port", str(port), timeout=300)
    one_error_line(done, f"version {version} is corrupt", "weights.safetensors", "sha256")
    manifest = registry / "versions" / version / "manifest.json"
    manifest.write_text("{not json")
    done = run_here(capsys, "serve", "--registry", str(registry), "--port", str(port))
    one_error_line(done, "manifest.json is not valid JSON")
    long_ref = "v" + "1" * 300  # once a 500-style OSError (file name too long)
    done = run_here(capsys, "serve", "--registry", str(registry), "--version", long_ref)
    one_error_line(done, "is not a version reference")


def test_serve_refuses_an_unreachable_redis_or_index_before_binding_its_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A replica pointed at a Redis or a Milvus server it cannot reach says which, exit 2,
    instead of coming up with empty shared state or no index behind a balancer."""
    from recloop.serve.server import free_port
    from tests.serving import make_dataset, train_version

    data = make_dataset(tmp_path / "data")
    registry = tmp_path / "registry"
    train_version(data, registry, tmp_path / "run", seed=1, steps=3)
    nobody = free_port()
    redis_url = f"redis://127.0.0.1:{nobody}/0"
    done = run_here(capsys, "serve", "--registry", str(registry), "--redis-url", redis_url)
    one_error_line(done, f"Redis at {redis_url} is unreachable")
    milvus = f"http://127.0.0.1:{nobody}"
    done = run_here(
        capsys, "serve", "--registry", str(registry), "--index", "milvus", "--index-uri", milvus
    )
    one_error_line(done, f"index_uri {milvus!r}: cannot connect to Milvus")
