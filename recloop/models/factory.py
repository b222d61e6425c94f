"""Build a model from its type name and a plain config dict, and back.

A checkpoint stores `config_to_dict(model)` as JSON; `build_model(d["type"], d)` rebuilds the
same architecture, ready for `load_state_dict`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder
from recloop.models.bsarec import BSARec, BSARecConfig
from recloop.models.hstu import HSTU, HSTUConfig
from recloop.models.sasrec import SASRec, SASRecConfig

MODEL_TYPES: dict[str, tuple[type[Any], type[SequentialEncoder]]] = {
    "sasrec": (SASRecConfig, SASRec),
    "hstu": (HSTUConfig, HSTU),
    "bsarec": (BSARecConfig, BSARec),
}


def build_model(model_type: str, config: dict[str, Any]) -> SequentialEncoder:
    """A new model of `model_type` from config keys (a "type" key, if present, must agree)."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}"
        )
    config_cls, model_cls = MODEL_TYPES[model_type]
    values = dict(config)
    # Compressed versions (recloop.compress) add the modules they swapped as "compression".
    compression = values.pop("compression", None)
    stated = values.pop("type", model_type)
    if stated != model_type:
        raise ConfigError(f"model config says type={stated!r} but {model_type!r} was requested")
    known = {field.name for field in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown {model_type} config key(s): {', '.join(unknown)}; "
            f"expected some of {', '.join(sorted(known))}"
        )
    try:
        model_config = config_cls(**values)
    except TypeError as error:  # a required field (num_items) is missing
        raise ConfigError(f"{model_type} config: {error}") from None
    model: SequentialEncoder = model_cls(model_config)
    if compression is not None:
        from recloop.models.compressed import apply_compression

        apply_compression(model, compression)
    return model


def config_to_dict(model: SequentialEncoder) -> dict[str, Any]:
    """{"type": ..., **config fields}: JSON-serialisable, the input of `build_model`."""
    for name, (_, model_cls) in MODEL_TYPES.items():
        if type(model) is model_cls:
            result = {"type": name, **dataclasses.asdict(model.config)}
            compression = getattr(model, "compression", None)
            if compression is not None and not compression.is_identity:
                result["compression"] = compression.to_dict()
            return result
    raise ConfigError(f"model class {type(model).__name__} is not in MODEL_TYPES")
