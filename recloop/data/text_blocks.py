"""Text files read in blocks cut at line boundaries, checked as they are read (UTF-8, no
control bytes, not a binary file by mistake), and the progress the readers report."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from recloop.data.textcheck import UTF8_BOM, TextCheck, check_signature, read_errors

ProgressCallback = Callable[[int], None]  # called with the number of bytes/rows just consumed


def text_blocks(
    path: Path, block_bytes: int, control: bytes = b"\0"
) -> Iterator[tuple[bytes, int]]:
    """Yields (block, bytes consumed) with every block ending at a line boundary.

    The bytes are checked as they are read (see `TextCheck`), so a binary or non-UTF-8 file
    fails at its first bad byte, naming its line and byte offset, without being read whole.
    A leading UTF-8 byte order mark is skipped (it is counted as consumed).
    """
    check = TextCheck(path, control)
    with read_errors(path), open(path, "rb") as f:
        data = f.read(block_bytes)
        check_signature(path, data)
        skipped = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
        data, rest = data[skipped:], b""
        check.offset = skipped  # offsets in messages are those of the file
        while data:
            check.feed(data)
            data = rest + data
            cut = data.rfind(b"\n")
            if cut < 0:  # a line longer than the block: keep reading
                rest = data
            else:
                yield data[: cut + 1], cut + 1 + skipped
                rest, skipped = data[cut + 1 :], 0
            data = f.read(block_bytes)
        check.feed(b"", final=True)
        if rest:
            yield rest + b"\n", len(rest) + skipped


def first_message_line(exc: BaseException) -> str:
    """The first line of a library's error message (some span several), for one-line errors."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
