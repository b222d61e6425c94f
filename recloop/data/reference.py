"""How a model version names the dataset it was trained on (its manifest's ``dataset``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from recloop.errors import RegistryError


def dataset_reference(directory: Path | str) -> dict[str, Any]:
    """The ``dataset`` manifest entry for a prepared dataset directory: path, checksum, counts."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise RegistryError(f"{directory}: no dataset manifest.json to reference")
    try:
        counts = json.loads(path.read_text()).get("counts", {})
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}: not valid JSON ({exc})") from exc
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"path": str(directory.resolve()), "manifest_sha256": digest, "counts": counts}
