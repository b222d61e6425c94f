"""Models in and out of the registry: the one place that turns a version into a module."""

from __future__ import annotations

from typing import Any

import torch

from recloop.errors import ConfigError, RegistryError
from recloop.models.base import SequentialEncoder
from recloop.models.factory import build_model
from recloop.registry import Registry


def load_model(
    registry: Registry, ref: str = "latest", *, device: str | torch.device = "cpu"
) -> tuple[SequentialEncoder, dict[str, Any]]:
    """(model in eval mode, manifest) for a version; checksums are verified on load."""
    version = registry.resolve(ref)
    manifest = registry.manifest(version)
    model_config = dict(manifest["model"])
    try:
        model = build_model(str(model_config.pop("type")), model_config)
    except ConfigError as exc:  # a manifest written by another recloop, or edited by hand
        raise RegistryError(f"version {version}: its model config is refused: {exc}") from exc
    tensors = registry.load_tensors(version, device=str(device))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise RegistryError(
            f"version {version}: weights do not fit a {manifest['model']['type']} model with its "
            f"config (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model.to(device).eval(), manifest


def check_vocabulary(registry: Registry, version: str, dataset_items_sha256: str) -> None:
    """Refuses to pair a model with a dataset whose item vocabulary differs from its own."""
    manifest = registry.manifest(version)
    vocabulary = manifest.get("vocabulary") or {}
    name = vocabulary.get("file")
    if not name:
        raise ConfigError(f"version {version} records no vocabulary file")
    if name not in manifest["files"]:
        raise RegistryError(f"version {version}: its vocabulary file {name} is not in its manifest")
    ours = manifest["files"][name]["sha256"]
    if ours != dataset_items_sha256:
        raise ConfigError(
            f"vocabulary mismatch: version {version} was trained on a different item vocabulary "
            f"({name} sha256 {ours[:12]}...) than this dataset's ({dataset_items_sha256[:12]}...)"
        )
