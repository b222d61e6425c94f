"""recloop.threads: the cores a process is given, shared among the live recloop processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import recloop.threads as threads_module
from recloop.errors import ConfigError
from recloop.threads import (
    ProcessEntry,
    Registration,
    ThreadChoice,
    choose_threads,
    claim_threads,
    cores_given,
    live_processes,
)
from tests.test_cli import run_here

# A process that registers as `recloop <command>` with <threads>, says so, and holds the entry
# until its stdin closes (or it is killed).
HOLDER = """
import sys
from pathlib import Path
from recloop.threads import Registration
registration = Registration(sys.argv[1], Path(sys.argv[3]))
registration.record_threads(int(sys.argv[2]))
print("ready", flush=True)
sys.stdin.read()
registration.close()
"""


@pytest.fixture
def holder(private_process_registry: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process registered as `recloop serve` with 3 threads, for the test's duration."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, "serve", "3", str(private_process_registry)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    yield process
    assert process.stdin is not None
    process.stdin.close()  # it exits (if it still runs)
    process.wait(timeout=30)
    process.stdout.close()


def entry(pid: int, command: str = "serve") -> ProcessEntry:
    return ProcessEntry(pid=pid, command=command, threads=1, started=0.0)


def test_the_cores_given_are_divided_among_the_live_processes_at_least_one_each() -> None:
    assert choose_threads(None, cores=8).threads == 8
    assert choose_threads(None, cores=8, others=[entry(11)]).threads == 4
    assert choose_threads(None, cores=8, others=[entry(11), entry(12, "online")]).threads == 2
    assert choose_threads(None, cores=2, others=[entry(11), entry(12), entry(13)]).threads == 1
    explicit = choose_threads(3, cores=2, others=[entry(11)])
    assert (explicit.threads, explicit.explicit) == (3, True)  # --threads wins


def test_the_choice_says_what_it_chose_and_why() -> None:
    assert choose_threads(2, cores=8).describe() == "threads: 2 (--threads)"
    assert choose_threads(None, cores=1).describe() == (
        "threads: 1 (1 core given, no other recloop process)"
    )
    assert choose_threads(None, cores=2, others=[entry(1234)]).describe() == (
        "threads: 1 (2 cores given, shared with 1 other recloop process: serve pid 1234)"
    )
    two = choose_threads(None, cores=6, others=[entry(7, "online"), entry(8, "train")])
    assert two.describe() == (
        "threads: 2 (6 cores given, shared with 2 other recloop processes: "
        "online pid 7, train pid 8)"
    )
    problem = ThreadChoice(2, False, 2, (), "no registry of recloop processes at /x: denied")
    assert (
        problem.describe()
        == "threads: 2 (2 cores given; no registry of recloop processes at /x: denied)"
    )


@pytest.mark.parametrize("bad", [0, -1])
def test_a_thread_count_below_one_is_refused_naming_the_option(bad: int) -> None:
    with pytest.raises(ConfigError, match=rf"--threads must be >= 1 .*got {bad}"):
        choose_threads(bad, cores=2)


def test_cores_given_are_the_affinity_capped_by_the_tightest_cgroup_quota(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "a" / "b").mkdir(parents=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("1:cpu:/\n0::/a/b\n")
    # No cpu.max anywhere: the affinity.
    assert cores_given({0, 1, 2, 3}, root, proc) == 4
    (root / "a" / "b" / "cpu.max").write_text("max 100000\n")  # no limit here
    (root / "a" / "cpu.max").write_text("250000 100000\n")  # 2.5 cores above it: 2
    assert cores_given(set(range(8)), root, proc) == 2
    assert cores_given({5}, root, proc) == 1  # the affinity is tighter
    (root / "cpu.max").write_text("50000 100000\n")  # half a core at the root: still 1 thread
    assert cores_given(set(range(8)), root, proc) == 1
    for unreadable in ("garbage\n", "100000 0\n", "-1 100000\n", ""):
        (root / "cpu.max").write_text(unreadable)  # read defensively: no cap from this file
        assert cores_given(set(range(8)), root, proc) == 2
    (root / "a" / "cpu.max").unlink()
    (root / "cpu.max").unlink()
    assert cores_given(set(range(8)), root, tmp_path / "no-such-proc-file") == 8


def test_a_live_registration_counts_and_goes_away_when_closed(tmp_path: Path) -> None:
    directory = tmp_path / "recloop-user" / "processes"
    with Registration("online", directory) as registration:
        registration.record_threads(2)
        for made in (directory, directory.parent):  # private, parents included
            assert oct(made.stat().st_mode & 0o777) == "0o700"
        listed = live_processes(directory)
        assert [(e.pid, e.command, e.threads) for e in listed] == [(os.getpid(), "online", 2)]
        assert registration.others() == []  # this process is not its own neighbour
        on_disk = json.loads((directory / f"{os.getpid()}.json").read_text())
        assert set(on_disk) == {"pid", "command", "threads", "started"}
    assert list(directory.iterdir()) == []
    assert live_processes(directory) == []


def test_a_subprocess_registration_is_seen_by_the_parent(
    holder: subprocess.Popen[str], private_process_registry: Path
) -> None:
    with Registration("online", private_process_registry) as registration:
        others = registration.others()
    assert [(e.pid, e.command, e.threads) for e in others] == [(holder.pid, "serve", 3)]


def test_a_killed_process_entry_is_stale_ignored_and_removed(
    holder: subprocess.Popen[str], private_process_registry: Path
) -> None:
    path = private_process_registry / f"{holder.pid}.json"
    assert [e.pid for e in live_processes(private_process_registry)] == [holder.pid]
    holder.kill()  # SIGKILL: no clean-up ran, the file stays; the kernel dropped its lock
    holder.wait(timeout=30)
    assert path.is_file()
    assert live_processes(private_process_registry) == []
    assert not path.exists()


def test_a_stale_file_with_any_content_is_ignored(private_process_registry: Path) -> None:
    for name, text in (("99999999.json", '{"pid": 99999999, "command": "serve"}'), ("1.json", "{")):
        (private_process_registry / name).write_text(text)
    assert live_processes(private_process_registry) == []
    assert list(private_process_registry.iterdir()) == []


def test_claim_threads_registers_for_the_block_and_takes_its_share(
    holder: subprocess.Popen[str], private_process_registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threads_module, "cores_given", lambda: 4)
    with claim_threads("train", None) as choice:
        assert (choice.threads, choice.cores, [e.pid for e in choice.others]) == (
            2,
            4,
            [holder.pid],
        )
        mine = json.loads((private_process_registry / f"{os.getpid()}.json").read_text())
        assert (mine["command"], mine["threads"]) == ("train", 2)
    assert not (private_process_registry / f"{os.getpid()}.json").exists()


def test_without_a_usable_registry_the_command_runs_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threads_module, "cores_given", lambda: 2)
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with claim_threads("serve", None, directory=not_a_directory / "processes") as choice:
        assert choice.threads == 2
        assert "no registry of recloop processes at" in choice.describe()


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dataset and a registry with one tiny trained version (a few seconds)."""
    from tests.serving import make_dataset, train_version

    root = tmp_path_factory.mktemp("threads-cli")
    data = make_dataset(root / "data")
    train_version(data, root / "registry", root / "run", seed=1, steps=3)
    return data, root / "registry"


@pytest.fixture
def torch_threads_kept() -> Iterator[None]:
    """Commands run in this process set torch's thread count: the next test gets it back."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_online_and_train_print_their_choice_at_start(
    holder: subprocess.Popen[str],
    tiny_registry: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    torch_threads_kept: None,
) -> None:
    # An explicit --threads, then the automatic share beside a running `recloop serve`.
    import torch

    monkeypatch.setattr(threads_module, "cores_given", lambda: 4)
    data, registry = tiny_registry
    online = ["online", "--registry", str(registry), "--event-log", str(tmp_path / "ev.sqlite"),
              "--run-dir", str(tmp_path / "online")]  # fmt: skip
    done = run_here(capsys, *online, "--threads", "3")
    assert done.returncode == 0, done.stderr
    assert "recloop online: threads: 3 (--threads)" in done.stderr.splitlines()
    assert torch.get_num_threads() == 3
    done = run_here(capsys, *online)
    assert done.returncode == 0, done.stderr
    assert (
        "recloop online: threads: 2 (4 cores given, shared with 1 other recloop process: "
        f"serve pid {holder.pid})"
    ) in done.stderr.splitlines()
    assert torch.get_num_threads() == 2
    tiny = ["train.max_steps=1", "train.eval_every_steps=1", "train.batch_size=32",
            "train.max_length=20"]  # fmt: skip
    done = run_here(capsys, "train", "--data", str(data), "--registry", str(tmp_path / "r"),
                    "--run-dir", str(tmp_path / "run"), "--threads", "1", *tiny)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "recloop train: threads: 1 (--threads)" in done.stderr.splitlines()


def test_serve_prints_its_choice_once_the_version_is_loaded(
    holder: subprocess.Popen[str], tiny_registry: tuple[Path, Path]
) -> None:
    # A real server process (it inherits the test's registry of processes), stopped once it
    # has said what it chose: its share beside the `recloop serve` already running.
    import re
    import signal

    from recloop.serve.server import free_port

    _, registry = tiny_registry
    command = [sys.executable, "-m", "recloop.cli", "serve", "--registry", str(registry),
               "--engine", "torch", "--port", str(free_port())]  # fmt: skip
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    try:  # its log lines (engine parity) come first
        line = server.stderr.readline()
        while line and not line.startswith("recloop serve:"):
            line = server.stderr.readline()
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=60)
    expected = (
        r"recloop serve: threads: \d+ \(\d+ cores? given, shared with 1 other recloop "
        rf"process: serve pid {holder.pid}\)"
    )
    assert re.fullmatch(expected, line.strip()), line


@pytest.mark.parametrize("command", ["serve", "online", "train"])
def test_threads_zero_is_a_one_line_error_naming_the_option(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--data", str(tmp_path)] if command == "train" else []
    done = run_here(capsys, command, "--registry", str(tmp_path), *extra, "--threads", "0")
    assert done.returncode == 2
    assert "--threads must be >= 1" in done.stderr and "Traceback" not in done.stderr
