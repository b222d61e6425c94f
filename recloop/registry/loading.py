"""Version -> module: the one place that turns registry weights into a model.

Models know nothing of files: they are built here from a manifest's ``model`` entry and given
the registry's tensors, either loaded and verified (:func:`load_model`) or an already-held
state dict used as is, without a copy (:func:`model_from_state`, for serving's delta path).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from typing import Any

import torch

from recloop.errors import ConfigError, RegistryError
from recloop.models.base import SequentialEncoder
from recloop.models.factory import build_model
from recloop.registry.manifest import Manifest
from recloop.registry.store import Registry


def load_model(
    registry: Registry, ref: str = "latest", *, device: str | torch.device = "cpu"
) -> tuple[SequentialEncoder, Manifest]:
    """(model in eval mode, manifest) for a version; checksums are verified on load."""
    version = registry.resolve(ref)
    manifest = registry.manifest(version)
    model_config = dict(manifest.model)
    try:
        model = build_model(str(model_config.pop("type")), model_config)
    except ConfigError as exc:  # a manifest written by another recloop, or edited by hand
        raise RegistryError(f"version {version}: its model config is refused: {exc}") from exc
    tensors = registry.load_tensors(version, device=str(device))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise RegistryError(
            f"version {version}: weights do not fit a {manifest.model_type} model with its "
            f"config (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model.to(device).eval(), manifest


def model_from_state(
    model_json: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> SequentialEncoder:
    """A model in eval mode built from a manifest's ``model`` that uses the tensors of `state`
    as its weights (no copy). RegistryError when the weights do not fit the config."""
    try:
        model = copy.deepcopy(_skeleton(json.dumps(model_json, sort_keys=True)))
        model.load_state_dict(state, strict=True, assign=True)
    except Exception as exc:  # shapes, names, or a module that cannot be built on "meta"
        raise RegistryError(f"the patched weights do not fit the model config: {exc}") from None
    left = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if left:
        raise RegistryError(f"the model has state the registry does not store: {left[:3]}")
    model.eval()
    return model


@functools.lru_cache(maxsize=4)
def _skeleton(model_json: str) -> SequentialEncoder:
    """The model of a config on the "meta" device: structure only, no memory, no init. Built
    once per config (~10 ms under load), then deep-copied per delta (~2 ms)."""
    config = json.loads(model_json)
    with torch.device("meta"):
        return build_model(str(config.pop("type", "")), config)


def check_vocabulary(registry: Registry, version: str, dataset_items_sha256: str) -> None:
    """Refuses to pair a model with a dataset whose item vocabulary differs from its own."""
    manifest = registry.manifest(version)
    name = manifest.vocabulary_file
    if not name:
        raise ConfigError(f"version {version} records no vocabulary file")
    if name not in manifest.files:
        raise RegistryError(f"version {version}: its vocabulary file {name} is not in its manifest")
    ours = manifest.files[name].sha256
    if ours != dataset_items_sha256:
        raise ConfigError(
            f"vocabulary mismatch: version {version} was trained on a different item vocabulary "
            f"({name} sha256 {ours[:12]}...) than this dataset's ({dataset_items_sha256[:12]}...)"
        )
