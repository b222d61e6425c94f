"""An index shard in another process, reached over an authenticated local socket.

No pickle crosses the connection (security policy): every message is one
``send_bytes`` frame made of a 4-byte big-endian header length, a JSON header and the raw bytes
of the arrays the header lists (``{"name", "dtype", "shape"}``, dtypes float32/int64 only).
Requests carry ``op`` (``info``, ``search``, ``vectors``, ``add``, ``close``); replies carry
``ok`` and either results or ``error``. A bad request gets an error reply, never a crash.

:func:`start_shard_process` saves the shard's table as ``.npy`` in a temporary directory, starts
:func:`serve_shard` with the ``spawn`` context (only strings, bytes and JSON go to the child),
waits for the child to report its port through a small JSON file, and connects a
:class:`RemoteShard`. The child exits on a ``close`` request, when the connection drops, or
when its parent process dies.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import secrets
import struct
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recloop.errors import ServingError
from recloop.serve.indexes.base import (
    KIND_OPTIONS,
    FloatArray,
    IdArray,
    ItemIndex,
    check_build_args,
    check_table,
)
from recloop.serve.indexes.local import make_local_index

HOST = "127.0.0.1"
_LENGTH = struct.Struct("!I")
_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype(np.float32), "int64": np.dtype(np.int64)}
_MAX_HEADER = 1 << 16
Arrays = dict[str, npt.NDArray[Any]]


class ProtocolError(ValueError):
    """A frame that does not follow the wire format."""


# --------------------------------------------------------------------------- wire format


def encode(header: dict[str, Any], arrays: Arrays | None = None) -> bytes:
    """One frame: length-prefixed JSON header (with array descriptions) + raw array bytes."""
    arrays = arrays or {}
    specs = []
    for name, array in arrays.items():
        dtype = array.dtype.name
        if dtype not in _DTYPES:
            raise ProtocolError(f"array {name!r} has unsupported dtype {dtype}")
        specs.append({"name": name, "dtype": dtype, "shape": list(array.shape)})
    text = json.dumps({**header, "arrays": specs}).encode()
    parts = [_LENGTH.pack(len(text)), text]
    parts += [
        np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes() for a in arrays.values()
    ]
    return b"".join(parts)


def decode(frame: bytes) -> tuple[dict[str, Any], Arrays]:
    """Parses a frame strictly; anything malformed raises :class:`ProtocolError`."""
    if len(frame) < _LENGTH.size:
        raise ProtocolError("frame shorter than its length prefix")
    (length,) = _LENGTH.unpack_from(frame)
    if length > min(_MAX_HEADER, len(frame) - _LENGTH.size):
        raise ProtocolError(f"header length {length} exceeds the frame")
    try:
        header = json.loads(frame[_LENGTH.size : _LENGTH.size + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays", []), list):
        raise ProtocolError("header must be a JSON object with an 'arrays' list")
    arrays: Arrays = {}
    offset = _LENGTH.size + length
    for spec in header.pop("arrays", []):
        name, dtype, shape = _array_spec(spec)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + size > len(frame):
            raise ProtocolError(f"array {name!r} needs {size} bytes beyond the frame's end")
        count = size // dtype.itemsize
        arrays[name] = np.frombuffer(frame, dtype, count, offset).reshape(shape)
        offset += size
    if offset != len(frame):
        raise ProtocolError(f"{len(frame) - offset} trailing bytes after the arrays")
    return header, arrays


def _array_spec(spec: Any) -> tuple[str, np.dtype[Any], tuple[int, ...]]:
    if not isinstance(spec, dict):
        raise ProtocolError("array description must be an object")
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if not isinstance(name, str) or dtype not in _DTYPES:
        raise ProtocolError(f"array needs a name and a dtype in {sorted(_DTYPES)}, got {spec}")
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ProtocolError(f"array {name!r} shape must be a list of non-negative ints")
    return name, _DTYPES[dtype].newbyteorder("<"), tuple(shape)


def _pack_exclude(exclude: Sequence[IdArray]) -> Arrays:
    """Ragged exclusion lists as one flat id array plus row offsets [B + 1]."""
    lengths = [len(e) for e in exclude]
    if not any(lengths):
        return {}
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return {"exclude_ids": np.concatenate(exclude).astype(np.int64), "exclude_offsets": offsets}


def _unpack_exclude(arrays: Arrays, batch: int) -> list[IdArray] | None:
    if "exclude_ids" not in arrays:
        return None
    flat, offsets = arrays["exclude_ids"], arrays.get("exclude_offsets")
    valid = (
        offsets is not None
        and offsets.shape == (batch + 1,)
        and offsets[0] == 0
        and offsets[-1] == len(flat)
        and bool(np.all(np.diff(offsets) >= 0))
    )
    if not valid or offsets is None:
        raise ProtocolError("exclude_offsets must be [batch + 1] non-decreasing from 0 to len")
    return [flat[offsets[b] : offsets[b + 1]] for b in range(batch)]


# --------------------------------------------------------------------------- server


def serve_shard(
    table_path: str, kind: str, options_json: str, authkey: bytes, ready_path: str
) -> None:
    """Child process entry: build the index, report the port, serve one client until done."""
    _exit_with_parent()
    try:
        table = np.load(table_path, allow_pickle=False)
        index = make_local_index(table, kind, **json.loads(options_json))
    except Exception as exc:  # report any build failure to the parent instead of dying mutely
        _write_json(ready_path, {"error": f"{type(exc).__name__}: {exc}"})
        return
    try:
        conn = _accept_one(authkey, ready_path)
        with conn:
            _serve(conn, index)
    finally:
        index.close()


def _accept_one(authkey: bytes, ready_path: str) -> Connection:
    """Listens on an ephemeral local port until one client passes the authkey challenge."""
    with Listener((HOST, 0), authkey=authkey) as listener:
        _write_json(ready_path, {"port": listener.address[1]})
        while True:
            try:
                return listener.accept()
            except (multiprocessing.AuthenticationError, OSError, EOFError):
                continue  # a stray or unauthenticated connection: keep waiting for the owner


def _serve(conn: Connection, index: ItemIndex) -> None:
    while True:
        try:
            frame = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the client (normally our parent) went away
        reply, stop = handle(index, frame)
        try:
            conn.send_bytes(reply)
        except OSError:
            return
        if stop:
            return


def handle(index: ItemIndex, frame: bytes) -> tuple[bytes, bool]:
    """One request -> (reply frame, whether to stop serving). Never raises."""
    try:
        header, arrays = decode(frame)
        op = header.get("op")
        if op == "close":
            return encode({"ok": True}), True
        if op == "info":
            return encode({"ok": True, **_info(index)}), False
        if op == "search":
            queries = _required(arrays, "queries")
            exclude = _unpack_exclude(arrays, len(queries))
            ids, scores = index.search(queries, header.get("k"), exclude)  # type: ignore[arg-type]
            return encode({"ok": True}, {"ids": ids, "scores": scores}), False
        if op == "vectors":
            return encode({"ok": True}, {"vectors": index.vectors(_required(arrays, "ids"))}), False
        if op == "add":
            index.add(_required(arrays, "ids"), _required(arrays, "vectors"))
            return encode({"ok": True, "num_items": index.num_items}), False
        raise ProtocolError(f"unknown op {op!r}")
    except Exception as exc:  # a bad request must get an answer, not kill the shard
        return encode({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), False


def _required(arrays: Arrays, name: str) -> npt.NDArray[Any]:
    if name not in arrays:
        raise ProtocolError(f"request lacks array {name!r}")
    return arrays[name]


def _info(index: ItemIndex) -> dict[str, Any]:
    return {
        "num_items": index.num_items,
        "dim": index.dim,
        "kind": index.kind,
        "memory_bytes": index.memory_bytes(),
        "recall": index.recall,
    }


def _exit_with_parent() -> None:
    """Ends this process as soon as the parent dies (its sentinel becomes readable)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)  # the parent is gone: nobody is left to ask for a clean shutdown

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _write_json(path: str, payload: dict[str, Any]) -> None:
    """Atomic write, so the parent never reads half a file."""
    partial = f"{path}.partial"
    Path(partial).write_text(json.dumps(payload))
    os.replace(partial, path)


# --------------------------------------------------------------------------- client


class RemoteShard(ItemIndex):
    """An :class:`ItemIndex` served by another process. Safe to call from several threads.

    ``kind`` is ``"remote"``; ``shard_kind`` is the kind of the index behind it. ``timeout``
    bounds each request (a late reply would desynchronise the connection, so it is closed).
    """

    kind = "remote"

    def __init__(
        self,
        address: tuple[str, int],
        authkey: bytes,
        *,
        process: multiprocessing.process.BaseProcess | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._process = process
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        try:
            self._conn = Client(address, authkey=authkey)
        except (OSError, EOFError, multiprocessing.AuthenticationError) as exc:
            raise ServingError(
                f"cannot connect to remote shard at {self._where()}: {exc}"
            ) from None
        try:
            info, _ = self._call({"op": "info"})
        except ServingError:
            self.close()
            raise
        self.num_items = int(info["num_items"])
        self.dim = int(info["dim"])
        self.shard_kind = str(info["kind"])
        self.recall = None if info["recall"] is None else float(info["recall"])

    def _where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def _call(
        self, header: dict[str, Any], arrays: Arrays | None = None
    ) -> tuple[dict[str, Any], Arrays]:
        frame = encode(header, arrays)
        with self._lock:
            if self._conn is None:
                raise ServingError(f"remote shard at {self._where()} is closed")
            try:
                self._conn.send_bytes(frame)
                if not self._conn.poll(self.timeout):
                    raise TimeoutError(f"no reply within {self.timeout} s")
                reply, result = decode(self._conn.recv_bytes())
            except (OSError, EOFError, ProtocolError) as exc:
                self._conn.close()  # the stream is out of sync or gone: do not reuse it
                self._conn = None
                raise ServingError(
                    f"remote shard at {self._where()} failed on {header['op']!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
        if not reply.get("ok"):
            raise ServingError(f"remote shard at {self._where()}: {reply.get('error')}")
        return reply, result

    def _search(
        self, queries: FloatArray, k: int, exclude: list[IdArray]
    ) -> tuple[IdArray, FloatArray]:
        arrays = {"queries": queries, **_pack_exclude(exclude)}
        _, result = self._call({"op": "search", "k": k}, arrays)
        return result["ids"].copy(), result["scores"].copy()  # frombuffer views are read-only

    def _vectors(self, ids: IdArray) -> FloatArray:
        _, result = self._call({"op": "vectors"}, {"ids": ids})
        vectors: FloatArray = result["vectors"].copy()
        return vectors

    def _add(self, ids: IdArray, vectors: FloatArray) -> None:
        reply, _ = self._call({"op": "add"}, {"ids": ids, "vectors": vectors})
        self.num_items = int(reply["num_items"])

    def memory_bytes(self) -> int:
        """The index in the shard process (asked each time; the client holds no items)."""
        info, _ = self._call({"op": "info"})
        return int(info["memory_bytes"])

    def close(self) -> None:
        """Asks the shard process to stop, then waits for it (terminating it if it hangs)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.send_bytes(encode({"op": "close"}))
                if conn.poll(5.0):
                    conn.recv_bytes()
            except (OSError, EOFError):
                pass  # already gone: stopping it is what we wanted
            finally:
                conn.close()
        process, self._process = self._process, None
        if process is not None:
            _stop(process)


def _stop(process: multiprocessing.process.BaseProcess, grace: float = 5.0) -> None:
    """Joins the process, terminating (then killing) it if it does not exit in time."""
    process.join(grace)
    if process.is_alive():
        process.terminate()
        process.join(grace)
    if process.is_alive():
        process.kill()
        process.join()
    process.close()


def start_shard_process(
    table: npt.ArrayLike,
    kind: str = "exact",
    *,
    startup_timeout: float = 600.0,
    request_timeout: float = 60.0,
    **options: Any,
) -> RemoteShard:
    """Starts a shard process serving an index of ``kind`` over ``table`` and connects to it.

    ``options`` are the index options of ``kind`` (see
    :func:`recloop.serve.indexes.factory.build_index`); they travel as JSON.
    ``startup_timeout`` covers the child's import and index build.
    """
    check_build_args(kind, 1, options)
    checked = check_table(table)
    try:
        options_json = json.dumps(options)
    except TypeError as exc:
        allowed = ", ".join(sorted(KIND_OPTIONS[kind]))
        raise ServingError(f"remote shard options must be JSON values ({allowed}): {exc}") from None
    authkey = secrets.token_bytes(32)
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="recloop-shard-") as tmp:
        table_path, ready_path = Path(tmp) / "table.npy", Path(tmp) / "ready.json"
        np.save(table_path, checked, allow_pickle=False)
        process = context.Process(
            target=serve_shard,
            args=(str(table_path), kind, options_json, authkey, str(ready_path)),
            name="recloop-index-shard",
            daemon=True,  # never outlive the service, even if close() is never called
        )
        process.start()
        try:
            port = _wait_ready(process, ready_path, startup_timeout)
            return RemoteShard((HOST, port), authkey, process=process, timeout=request_timeout)
        except BaseException:
            _stop(process, grace=1.0)
            raise


def _wait_ready(
    process: multiprocessing.process.BaseProcess, ready_path: Path, timeout: float
) -> int:
    """The port the child reports, or a ServingError with its failure, exit or a timeout."""
    deadline = time.monotonic() + timeout
    while not ready_path.exists():
        if not process.is_alive():
            raise ServingError(
                f"remote shard process exited with code {process.exitcode} before it was ready"
            )
        if time.monotonic() > deadline:
            raise ServingError(
                f"remote shard process not ready after {timeout} s (startup_timeout)"
            )
        process.join(0.02)  # a sleep that ends early if the child dies
    report = json.loads(ready_path.read_text())
    if "error" in report:
        raise ServingError(f"remote shard failed to build its index: {report['error']}")
    return int(report["port"])
