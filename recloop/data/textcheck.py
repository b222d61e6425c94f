"""Checks that a file passed as a text log is text: UTF-8, no control bytes, not an archive.

The readers feed every byte they read through :class:`TextCheck`, so a binary or non-UTF-8
file fails at its first bad byte with a `DatasetError` naming the line and byte offset,
without being read whole; :func:`check_signature` names the usual mistakes (a gzip, zip,
Parquet, PNG or UTF-16 file) by their first bytes.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recloop.errors import DatasetError

UTF8_BOM = b"\xef\xbb\xbf"
# Files often passed as a text log by mistake, by their first bytes: what each one is.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "a gzip-compressed file, not a text log: decompress it first"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file, not a text log: decompress it first"),
    (b"\xfd7zXZ\x00", "an xz-compressed file, not a text log: decompress it first"),
    (b"BZh", "a bzip2-compressed file, not a text log: decompress it first"),
    (b"PK\x03\x04", "a zip archive, not a text log: extract it first"),
    (b"PAR1", "a Parquet file, not a text log: use --format parquet"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image, not a text log"),
    (b"\xff\xfe", "UTF-16 text: convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)"),
    (b"\xfe\xff", "UTF-16 text: convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)"),
)


def check_signature(path: Path, head: bytes) -> None:
    for magic, what in _SIGNATURES:
        # bzip2's "BZh" could start a text line: its block magic follows the level digit.
        if head.startswith(magic) and (magic != b"BZh" or head[4:10] == b"1AY&SY"):
            raise DatasetError(f"{path}: line 1 (byte offset 0): this is {what}")


@contextmanager
def read_errors(path: Path) -> Iterator[None]:
    """OSErrors while reading `path` (permissions, I/O errors) as one DatasetError naming it."""
    try:
        yield
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc


class TextCheck:
    """Checks a text file's bytes as they are read: strict UTF-8, and none of the `control`
    bytes (NUL: binary data or UTF-16 text). An error names the file, the line and the byte
    offset of the first bad byte. ASCII reads (the usual case) skip the decoder."""

    def __init__(self, path: Path, control: bytes) -> None:
        self.path = path
        self.control = control
        self.offset = 0  # file offset of the next byte fed
        self._newlines = 0  # newlines before `offset`
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")

    def feed(self, data: bytes, *, final: bool = False) -> None:
        problems: list[tuple[int, str]] = []
        pending = self._decoder.getstate()[0]  # a multi-byte character cut by the last read
        if pending or final or not data.isascii():
            try:
                self._decoder.decode(data, final)
            except UnicodeDecodeError as exc:
                bad = " ".join(f"0x{b:02x}" for b in exc.object[exc.start : exc.end][:4])
                problems.append(
                    (
                        self.offset - len(pending) + exc.start,
                        f"not valid UTF-8 (byte {bad}: {exc.reason}): a binary file, or text "
                        "in another encoding (convert it to UTF-8, e.g. with iconv)?",
                    )
                )
        for byte in self.control:
            at = data.find(byte)
            if at >= 0:
                problems.append(
                    (
                        self.offset + at,
                        f"control byte 0x{byte:02x}, which a text log does not contain "
                        "(a binary file, or UTF-16 text?)",
                    )
                )
        if problems:
            at, what = min(problems)
            line = self._newlines + data.count(b"\n", 0, max(at - self.offset, 0)) + 1
            raise DatasetError(f"{self.path}: line {line} (byte offset {at}): {what}")
        self._newlines += data.count(b"\n")
        self.offset += len(data)
