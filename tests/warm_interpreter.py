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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["WarmInterpreter", "warm_interpreter"]

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
    if request["op"] == "wait":
        _, status = os.waitpid(request["pid"], 0)
        running.discard(request["pid"])
        code = os.waitstatus_to_exitcode(status)
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


class WarmInterpreter:
    """Starts children of one warm parent; see the module docstring."""

    def __init__(self, parent: subprocess.Popen[bytes]) -> None:
        self.parent = parent

    def _ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
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

    def start(self, module: str, args: Sequence[str], env: dict[str, str], output: Path) -> int:
        """The pid of a new child running ``python -m module args``, its output to ``output``."""
        request = {"op": "start", "module": module, "args": list(args), "env": env}
        pid: int = self._ask({**request, "output": str(output)}, timeout=60)["pid"]
        return pid

    def wait(self, pid: int, timeout: float) -> int:
        """The child's exit status as ``subprocess`` reports it (``-9``: killed by SIGKILL)."""
        code: int = self._ask({"op": "wait", "pid": pid}, timeout)["returncode"]
        return code

    def run(
        self, module: str, args: Sequence[str], env: dict[str, str], output: Path, timeout: float
    ) -> int:
        return self.wait(self.start(module, args, env, output), timeout)


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
