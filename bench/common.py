"""What every benchmark result records: commit, machine, library versions; and where it goes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PACKAGES = ("recloop", "torch", "numpy", "polars", "pyarrow")


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    sha = git("rev-parse", "HEAD") or "uncommitted"
    # Results are what a run writes (a re-run rewrites its own tracked PNG before its JSON),
    # not the code it ran: they do not make the tree dirty.
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    return sha + ("-dirty" if changed else "")


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        # Set when a run was limited to fewer threads than cores (e.g. two runs sharing the
        # machine with OMP_NUM_THREADS=1 each); None means the default, one per core.
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "memory_gib": round(memory_gib, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def write_result(name: str, config: dict[str, Any], results: Any, started: float) -> Path:
    """Writes bench/results/<name>.json and returns its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit(),
        "machine": machine(),
        "versions": versions(),
        "config": config,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "results": results,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
