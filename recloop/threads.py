"""Intra-op threads for a long-running recloop process, shared fairly with its neighbours.

torch, OpenMP and ONNX Runtime each default to one thread per core. Two such processes on one
machine (`recloop serve` and `recloop online`, the embedded deployment) then run twice as many
busy threads as cores, and every step waits on preempted threads: a training step measured
26x slower beside two busy processes on 2 cores, where a fair third would be 3x. So each
command takes `cores given // recloop processes running here` threads (at least 1):

- cores given: this process's CPU affinity, capped by a cgroup v2 ``cpu.max`` quota if one is set
  (a container's share of the host), read defensively: anything unreadable is no cap.
- recloop processes running here: a registry of live processes, one ``<pid>.json`` per process in
  ``$RECLOOP_RUNTIME_DIR`` (default ``/tmp/recloop-<uid>/processes``, mode 0700). Its owner holds
  an exclusive ``flock`` on the file for its lifetime; the kernel drops the lock when the process
  dies, ``kill -9`` included, so an entry counts only while its lock is held, and one whose lock
  is free is stale and removed. JSON only: {pid, command, threads, started}.

An explicit ``--threads N`` always wins. :func:`claim_threads` does it all for a CLI command.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recloop.errors import ConfigError

RUNTIME_DIR_ENV = "RECLOOP_RUNTIME_DIR"
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ProcessEntry:
    """One registered recloop process, as its registry file describes it."""

    pid: int
    command: str  # "serve" | "online" | "train"
    threads: int | None  # None while it is still choosing
    started: float  # time.time() at registration


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count a process runs with, and why (for its start line)."""

    threads: int
    explicit: bool  # --threads N given
    cores: int | None = None  # cores given (automatic choice only)
    others: tuple[ProcessEntry, ...] = ()  # the other live recloop processes it shares them with
    registry_problem: str | None = None  # why no process registry could be used, if none could

    def describe(self) -> str:
        """One line: ``threads: 1 (2 cores given, shared with 1 other recloop process: serve
        pid 1234)`` or ``threads: 2 (--threads)``."""
        if self.explicit:
            return f"threads: {self.threads} (--threads)"
        cores = f"{self.cores} core{'s' if self.cores != 1 else ''} given"
        if self.registry_problem is not None:
            return f"threads: {self.threads} ({cores}; {self.registry_problem})"
        if not self.others:
            return f"threads: {self.threads} ({cores}, no other recloop process)"
        named = ", ".join(f"{entry.command} pid {entry.pid}" for entry in self.others)
        count = len(self.others)
        plural = "es" if count > 1 else ""
        shared = f"shared with {count} other recloop process{plural}: {named}"
        return f"threads: {self.threads} ({cores}, {shared})"


def check_threads(requested: int | None) -> None:
    """A ConfigError naming --threads unless ``requested`` is None (automatic) or >= 1."""
    if requested is not None and (isinstance(requested, bool) or requested < 1):
        raise ConfigError(f"--threads must be >= 1 (or left out: automatic), got {requested}")


def choose_threads(
    requested: int | None, *, cores: int, others: Sequence[ProcessEntry] = ()
) -> ThreadChoice:
    """``requested`` if given, else ``cores // (len(others) + 1)``, at least 1."""
    check_threads(requested)
    if requested is not None:
        return ThreadChoice(requested, explicit=True)
    share = max(1, cores // (len(others) + 1))
    return ThreadChoice(share, explicit=False, cores=cores, others=tuple(others))


def cores_given(
    affinity: set[int] | None = None,
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path | None = None,
) -> int:
    """The cores this process may run on: its affinity, capped by its cgroup's CPU quota."""
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    cores = len(affinity) or os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup or Path("/proc/self/cgroup"))
    return max(1, min(cores, quota)) if quota is not None else cores


def cgroup_cpu_quota(cgroup_root: Path, proc_cgroup: Path) -> int | None:
    """Whole cores of the tightest cgroup v2 ``cpu.max`` on the path from this process's cgroup
    to the root (a quota of 1.5 cores is 1), or None when none is set or none can be read."""
    own = ""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):  # the v2 hierarchy
                own = line[3:].strip().lstrip("/")
    directory = cgroup_root / own if own else cgroup_root
    limits = []
    while True:
        limit = _cpu_max_cores(directory / "cpu.max")
        if limit is not None:
            limits.append(limit)
        if directory == cgroup_root or cgroup_root not in directory.parents:
            break
        directory = directory.parent
    return min(limits) if limits else None


def _cpu_max_cores(path: Path) -> int | None:
    """``cpu.max`` reads "QUOTA PERIOD" (microseconds) or "max PERIOD" (no limit)."""
    try:
        fields = path.read_text().split()
        if len(fields) != 2 or fields[0] == "max":
            return None
        quota, period = int(fields[0]), int(fields[1])
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, quota // period)


def runtime_dir() -> Path:
    """``$RECLOOP_RUNTIME_DIR``, else ``/tmp/recloop-<uid>/processes``."""
    configured = os.environ.get(RUNTIME_DIR_ENV)
    if configured:
        return Path(configured)
    return Path("/tmp") / f"recloop-{os.getuid()}" / "processes"


def _private_dir(path: Path) -> Path:
    """``path`` created 0700 if missing; an OSError if it is not a directory of this user's that
    only they can write (another user must not plant or hide entries). Missing parents are
    made 0700 too (``mkdir(parents=True)`` would leave them to the umask)."""
    for directory in reversed([p for p in (path, *path.parents) if not p.exists()]):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise PermissionError(errno.EPERM, "not a directory only this user can write", str(path))
    return path


def live_processes(directory: Path | None = None) -> list[ProcessEntry]:
    """The registered processes whose lock is held, oldest first; stale entries are removed."""
    directory = directory or runtime_dir()
    entries = []
    for path in sorted(directory.glob("*.json")):
        entry = _read_if_live(path)
        if entry is not None:
            entries.append(entry)
    return sorted(entries, key=lambda entry: (entry.started, entry.pid))


def _read_if_live(path: Path) -> ProcessEntry | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None  # gone meanwhile, or not a plain file
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # its owner holds it: live
            return _parse_entry(path, os.read(fd, 1 << 16))
        # Lock free: its process is gone. Remove the file unless it was replaced meanwhile
        # (a new process reusing the pid renames a fresh file into place).
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        return None
    finally:
        os.close(fd)


def _parse_entry(path: Path, data: bytes) -> ProcessEntry:
    """A live entry's fields; one being rewritten (or damaged) still counts, by its name."""
    raw: Any = {}
    with contextlib.suppress(ValueError):
        raw = json.loads(data)
    if not isinstance(raw, dict):
        raw = {}
    pid = raw.get("pid") if isinstance(raw.get("pid"), int) else _pid_from_name(path)
    threads = raw.get("threads")
    started = raw.get("started")
    return ProcessEntry(
        pid=pid,
        command=str(raw.get("command", "recloop")),
        threads=threads if isinstance(threads, int) else None,
        started=float(started) if isinstance(started, int | float) else 0.0,
    )


def _pid_from_name(path: Path) -> int:
    try:
        return int(path.stem)
    except ValueError:
        return -1


class Registration:
    """This process's entry in the registry, locked until :meth:`close` (or its death).

    The file is written and locked under a temporary name, then renamed into place, so no
    reader ever finds ``<pid>.json`` unlocked while its owner lives."""

    def __init__(self, command: str, directory: Path | None = None) -> None:
        self.directory = _private_dir(directory or runtime_dir())
        self.pid = os.getpid()
        self.path = self.directory / f"{self.pid}.json"
        self.entry = ProcessEntry(self.pid, command, None, time.time())
        partial = self.directory / f".{self.pid}.json.partial"
        self._fd: int | None = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._write()
            os.replace(partial, self.path)
        except BaseException:
            self.close()
            with contextlib.suppress(OSError):
                partial.unlink()
            raise

    def others(self) -> list[ProcessEntry]:
        """The other live recloop processes (this one left out)."""
        return [entry for entry in live_processes(self.directory) if entry.pid != self.pid]

    def record_threads(self, threads: int) -> None:
        self.entry = ProcessEntry(self.pid, self.entry.command, threads, self.entry.started)
        self._write()

    def _write(self) -> None:
        if self._fd is None:
            return
        data = json.dumps(
            {
                "pid": self.entry.pid,
                "command": self.entry.command,
                "threads": self.entry.threads,
                "started": self.entry.started,
            }
        ).encode()
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, data)

    def close(self) -> None:
        """Removes the entry (while still holding its lock), then releases it."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def claim_threads(
    command: str, requested: int | None, *, directory: Path | None = None
) -> Iterator[ThreadChoice]:
    """For the block: this process registered as a running `recloop <command>`, and its thread
    choice (``requested`` if given, else its fair share). It registers before it counts, so
    of two processes starting together at least the second sees the first. Without a usable
    registry directory the command still runs, on all the cores given, and the line says why."""
    check_threads(requested)
    try:
        registration = Registration(command, directory)
    except OSError as error:
        where = error.filename or directory or runtime_dir()
        problem = f"no registry of recloop processes at {where}: {error.strerror}"
        choice = choose_threads(requested, cores=cores_given())
        if not choice.explicit:
            choice = ThreadChoice(choice.threads, False, choice.cores, (), problem)
        yield choice
        return
    with registration:
        cores = cores_given() if requested is None else 0
        choice = choose_threads(requested, cores=cores, others=registration.others())
        registration.record_threads(choice.threads)
        yield choice
