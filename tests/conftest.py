from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from recloop.data.prepare import prepare, with_source_order
from recloop.data.synthetic import SyntheticConfig, generate_events
from recloop.registry import Registry

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


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset with learnable successor structure (one per test module)."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    config = SyntheticConfig(
        num_users=400, num_items=120, num_topics=8, mean_length=12.0, max_length=40, seed=1
    )
    prepare(with_source_order(generate_events(config)), {"kind": "synthetic"}, out)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(dataset dir, registry dir, version): a tiny SASRec trained on synthetic data."""
    from tests.online_helpers import train_base

    return train_base(tmp_path_factory.mktemp("online-base"))


@pytest.fixture
def registry(base: tuple[Path, Path, str], tmp_path: Path) -> Registry:
    """A private copy of the base registry, so each test publishes on its own."""
    shutil.copytree(base[1], tmp_path / "registry")
    return Registry(tmp_path / "registry")
