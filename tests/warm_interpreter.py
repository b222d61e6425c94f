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
import json, os, runpy, signal, sys, traceback
for name in sys.argv[1:]:
    __import__(name)
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
        code = 1
        try:
            output = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(null, 0)
            os.dup2(output, 1)
            os.dup2(output, 2)
            replies.close()
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = [request["module"], *request["args"]]
            try:
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exit:  # what the interpreter does with it at exit
                if isinstance(exit.code, int) or exit.code is None:
                    code = exit.code or 0
                else:
                    print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    running.add(pid)
    print(json.dumps({"pid": pid}), file=replies, flush=True)
for pid in running:  # the test is over (or failed): no child outlives it
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
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
        self, module: str, args: Sequence[str], env: dict[str, str], output: Path
    ) -> WarmProcess:
        """A new child running ``python -m module args``, its output appended to ``output``."""
        request = {"op": "start", "module": module, "args": list(args), "env": env}
        return WarmProcess(self, self.ask({**request, "output": str(output)})["pid"])


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
