"""Low-level file I/O of a version directory: checksums, durable writes, the weights file.

Everything here names the version (or file) in its errors; nothing here knows what a manifest
means. The registry's modules share these so a file is written, hashed and read one way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recloop.errors import RegistryError

WEIGHTS = "weights.safetensors"
_BLOCK = 1 << 20

# Reads one tensor of a version's weights file (a fresh copy: patching it in place is safe).
TensorReader = Callable[[str], torch.Tensor]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_json(path: Path, data: Any, *, durable: bool) -> None:
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def check_tensors(tensors: Mapping[str, torch.Tensor], *, allow_empty: bool = False) -> None:
    """RegistryError unless `tensors` can be written as a weights file, named."""
    if not tensors and not allow_empty:
        raise RegistryError("publish needs at least one tensor")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise RegistryError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise RegistryError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.layout != torch.strided:
            raise RegistryError(f"tensor {name!r} is {tensor.layout}; only dense tensors are saved")


def write_weights(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    try:
        save_file(cpu, path, metadata={"format": "pt"})
    except (RuntimeError, ValueError) as exc:
        # Typically tied weights sharing storage; the publisher must pass each tensor once.
        raise RegistryError(f"cannot write {WEIGHTS}: {exc}") from exc
    fsync_file(path)


@contextlib.contextmanager
def open_weights(directory: Path, version_id: str) -> Iterator[TensorReader]:
    """A reader of single tensors from a version's weights file (errors name the version)."""
    path = directory / WEIGHTS
    if not path.is_file():
        raise RegistryError(f"version {version_id} is partial: {WEIGHTS} is missing")
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise RegistryError(f"version {version_id}: cannot read {WEIGHTS}: {exc}") from exc

    def read(name: str) -> torch.Tensor:
        try:
            tensor: torch.Tensor = handle.get_tensor(name)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise RegistryError(
                f"version {version_id}: cannot read tensor {name!r} from {WEIGHTS}: {exc}"
            ) from exc
        return tensor

    with handle:
        yield read


def write_file(name: str, source: Path | bytes, target: Path) -> None:
    """Writes an extra file of a version being built (bytes, or a copy of a file)."""
    if isinstance(source, bytes):
        target.write_bytes(source)
    else:
        source = Path(source)
        if not source.is_file():
            raise RegistryError(f"extra file {name!r}: {source} does not exist or is not a file")
        shutil.copyfile(source, target)
    fsync_file(target)


def link_or_copy(source: Path, target: Path) -> None:
    """Shares an immutable file with a new version: a hard link costs nothing however big the
    file (deltas come every few seconds); a copy where the filesystem has no hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        fsync_file(target)


def verify_file(directory: Path, version_id: str, name: str, size: int, digest: str) -> None:
    """RegistryError unless file `name` of a version has `size` bytes and sha256 `digest`."""
    path = directory / name
    if not path.is_file():
        raise RegistryError(f"version {version_id} is partial: file {name} is missing")
    try:
        actual = path.stat().st_size
        # Size first: a truncated file is reported as such, and without reading it.
        actual_digest = sha256(path) if actual == size else None
    except OSError as exc:
        raise RegistryError(f"version {version_id}: cannot read {path} ({exc})") from exc
    if actual != size:
        raise RegistryError(
            f"version {version_id} is corrupt: file {name} has {actual} bytes, manifest says {size}"
        )
    if actual_digest != digest:
        raise RegistryError(
            f"version {version_id} is corrupt: file {name} does not match its sha256 "
            "in the manifest"
        )


def remove_stale_temps(root: Path, prefix: str, max_age_seconds: float) -> int:
    """Removes the entries of `root` named `prefix`* (publishes that crashed) last modified
    over `max_age_seconds` ago; returns how many were removed.

    Age is the newest mtime of the entry and its direct children, so a publish still writing
    a large file is not mistaken for a crashed one.
    """
    cutoff = time.time() - max_age_seconds
    removed = 0
    for entry in root.iterdir():
        if not entry.name.startswith(prefix):
            continue
        try:
            newest = entry.stat().st_mtime
            if entry.is_dir():
                newest = max([newest, *(c.stat().st_mtime for c in entry.iterdir())])
        except FileNotFoundError:
            continue  # its publish just finished (renamed) or another gc removed it
        if newest >= cutoff:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed
