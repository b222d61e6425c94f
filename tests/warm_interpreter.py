"""Test helper: `python -m MODULE ARGS` as a real child process, forked from an interpreter that
has already imported torch. A test that starts `recloop online` eight times (to kill it at every
point that matters) otherwise spends most of its time on eight imports of torch and of
torch._dynamo (which the first optimizer pulls in): seconds of CPU each on this machine.

The child is a real process with its own pid, environment, argv and output file, running the
module as ``python -m`` would (``runpy``, ``__main__``); a SIGKILL kills it and nothing else, and
its exit status reads as ``subprocess`` reports it (``-9`` for SIGKILL). Only what the parent
imported before the fork is shared, read-only. The hash seed is the parent's: start it with
``PYTHONHASHSEED`` in its environment when the children must agree on it."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["WarmInterpreter", "WarmProcess", "warm_interpreter"]

# The parent: imports, then forks one child per request line and answers with JSON lines.
# It never runs torch code itself, so no intra-op thread pool exists at the fork.
_SERVER = r"""
import json, os, runpy, signal, sys
for name in sys.argv[1:]:
    __import__(name)
SERVER = os.getpid()
replies = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDONLY)
running = set()
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "poll":  # never blocks: the client polls, so one child's wait
        pid, status = os.waitpid(request["pid"], os.WNOHANG)  # holds up no other request
        code = os.waitstatus_to_exitcode(status) if pid else None
        if pid:
            running.discard(pid)
        print(json.dumps({"returncode": code}), file=replies, flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
        replies.close()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [request["module"], *request["args"]]
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        # As `python -m` ends: an exception or SystemExit above leaves the same way, through
        # the interpreter's own exit (atexit handlers, threads joined, streams flushed).
        raise SystemExit(0)
    running.add(pid)
    print(json.dumps({"pid": pid}), file=replies, flush=True)
if os.getpid() == SERVER:  # the test is over (or failed): no child outlives it
    for pid in running:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    os._exit(0)  # nothing to flush or finalize here: skip the seconds torch takes to tear down
"""


class WarmProcess:
    """A child of the warm parent, with the part of ``subprocess.Popen`` the tests use."""

    def __init__(self, parent: WarmInterpreter, pid: int) -> None:
        self.parent, self.pid = parent, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.parent.ask({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float) -> int:
        """The exit status as ``subprocess`` reports it (``-9``: killed by SIGKILL)."""
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.02)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not yet reaped, so the pid is still this child's
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WarmInterpreter:
    """Starts children of one warm parent; see the module docstring."""

    def __init__(self, parent: subprocess.Popen[bytes]) -> None:
        self.parent = parent

    def ask(self, request: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        assert self.parent.stdin is not None and self.parent.stdout is not None
        self.parent.stdin.write(json.dumps(request).encode() + b"\n")
        self.parent.stdin.flush()
        ready, _, _ = select.select([self.parent.stdout], [], [], timeout)
        if not ready:
            raise subprocess.TimeoutExpired(str(request), timeout)
        line = self.parent.stdout.readline()
        if not line:
            raise AssertionError(f"the warm interpreter exited with {self.parent.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def start(
        self,
        module: str,
        args: Sequence[str],
        env: dict[str, str],
        stdout: Path,
        stderr: Path | None = None,
        cwd: Path | None = None,
    ) -> WarmProcess:
        """A new child running ``python -m module args`` in ``cwd`` (default: this process's),
        its output appended to ``stdout`` and ``stderr`` (default: the same file)."""
        request = {
            "op": "start",
            "module": module,
            "args": list(args),
            "env": env,
            "stdout": str(stdout),
            "stderr": str(stderr or stdout),
            "cwd": str(cwd or Path.cwd()),
        }
        return WarmProcess(self, self.ask(request)["pid"])

    def run(
        self, module: str, args: Sequence[str], scratch: Path, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """``subprocess.run([python, -m, module, *args], capture_output=True, text=True)``
        with this process's environment, the output by way of files under ``scratch``."""
        scratch.mkdir(parents=True, exist_ok=True)
        number = len(list(scratch.iterdir()))
        stdout, stderr = scratch / f"{number}.out", scratch / f"{number}.err"
        code = self.start(module, args, dict(os.environ), stdout, stderr).wait(timeout)
        output = [path.read_text() if path.exists() else "" for path in (stdout, stderr)]
        return subprocess.CompletedProcess([module, *args], code, *output)


@contextmanager
def warm_interpreter(preload: Sequence[str], env: dict[str, str]) -> Iterator[WarmInterpreter]:
    """A parent that has imported ``preload``, started with ``env``; stopped on exit."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _SERVER, *preload],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group, children included: see below
    )
    try:
        yield WarmInterpreter(parent)
    finally:
        assert parent.stdin is not None
        parent.stdin.close()  # ends its loop: it kills and reaps any child still running
        try:
            parent.wait(timeout=30)
        except subprocess.TimeoutExpired:  # stuck waiting on a child: the whole group goes
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait(timeout=30)
        finally:
            assert parent.stdout is not None
            parent.stdout.close()
