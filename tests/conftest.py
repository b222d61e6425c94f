from __future__ import annotations

from pathlib import Path

import pytest

# CI and developers have the shared datasets at this path, relative to the repository.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or a visible skip saying what is missing."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"shared dataset not available: {path} is absent")
    return path


@pytest.fixture
def write(tmp_path: Path):  # type: ignore[no-untyped-def]
    """write(name, text) -> path of a new file under tmp_path."""

    def _write(name: str, text: str | bytes) -> Path:
        path = tmp_path / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    return _write


@pytest.fixture(autouse=True)
def private_process_registry(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Each test its own registry of running recloop processes (recloop.threads), inherited by
    the commands it starts: the thread choice of a test's command never depends on whatever
    else runs on the machine."""
    directory = tmp_path_factory.mktemp("processes")
    monkeypatch.setenv("RECLOOP_RUNTIME_DIR", str(directory))
    return directory
