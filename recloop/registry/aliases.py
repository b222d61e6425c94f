"""``aliases.json``: which version is in production, and the promotions that led there.

    {"production": id | null, "history": [{"version", "at"}, ...], "log": [{"action", ...}]}

``history`` is the stack :func:`rollback` pops; ``log`` records every promote and rollback.
Read-modify-write happens under an flock (threads and processes), and the file is replaced
atomically, so readers see the old or the new file, never a torn one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from recloop.errors import RegistryError, undecodable
from recloop.fsutil import fsync_dir
from recloop.registry.files import write_json
from recloop.registry.manifest import now

ALIASES = "aliases.json"
ALIASES_LOCK = ".aliases.lock"
TMP_PREFIX = ".tmp-"


class Aliases:
    """The alias file of the registry at `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def production(self) -> str | None:
        """The production version id, or None if nothing was ever promoted."""
        production = self._read().get("production")
        return production if isinstance(production, str) else None

    def promote(self, version_id: str) -> str:
        """Points production at `version_id` (already verified by the caller)."""
        with self._lock():
            aliases = self._read()
            if aliases.get("production") == version_id:
                return version_id  # no-op, so a rollback does not land on the same version
            at = now()
            aliases["production"] = version_id
            aliases["history"].append({"version": version_id, "at": at})
            aliases["log"].append({"action": "promote", "version": version_id, "at": at})
            self._write(aliases)
        return version_id

    def rollback(self, verify: Callable[[str], None]) -> str:
        """Returns production to the previously promoted version, after `verify`-ing it."""
        with self._lock():
            aliases = self._read()
            history = aliases["history"]
            if len(history) < 2:
                raise RegistryError(
                    f"{self.root}: nothing to roll back to "
                    f"({'no version was ever promoted' if not history else 'only one promotion'})"
                )
            current, previous = history[-1]["version"], history[-2]["version"]
            verify(previous)
            history.pop()
            aliases["production"] = previous
            aliases["log"].append(
                {"action": "rollback", "from": current, "version": previous, "at": now()}
            )
            self._write(aliases)
        return str(previous)

    def _read(self) -> dict[str, Any]:
        path = self.root / ALIASES
        try:
            aliases = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"production": None, "history": [], "log": []}
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{path}: not valid JSON ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise RegistryError(f"{path}: {undecodable(exc)}") from None
        except OSError as exc:
            raise RegistryError(f"{path}: cannot read the aliases file ({exc})") from exc
        if not isinstance(aliases, dict) or not isinstance(aliases.get("history"), list):
            raise RegistryError(f"{path}: not a recloop aliases file")
        aliases.setdefault("log", [])
        return aliases

    def _write(self, aliases: dict[str, Any]) -> None:
        # Temp file + os.replace: readers see the old or the new file, never a torn one.
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + "aliases-", suffix=".json", dir=self.root)
        os.close(fd)
        tmp = Path(name)
        try:
            write_json(tmp, aliases, durable=True)
            os.replace(tmp, self.root / ALIASES)
            fsync_dir(self.root)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        # Serialises read-modify-write of aliases.json across threads and processes.
        fd = os.open(self.root / ALIASES_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock
