"""Item attributes (side information): the JSON file, and the dataset's attribute index.

The input is a JSON object mapping each raw item id to a list of attribute values, the layout of
S3-Rec's ``item2attributes.json`` (brands, categories, ...; values may be numbers or strings).
`recloop prepare --item-attributes FILE` turns it into two dataset files:

    item_attributes.npy  int32 [I + 1, A]  row = dense item id, the item's attribute ids
                                           (1-based, ascending), 0-padded; row 0 is padding
    attributes.parquet   (id, raw)         attribute vocabulary, ids 1..N in raw-value order

Items of the log that the file does not mention get an all-zero row; items of the file that
the log does not have are ignored (both are counted in the manifest).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from recloop.errors import ConfigError, undecodable

ITEM_ATTRIBUTES_FILE = "item_attributes.npy"
ATTRIBUTE_VOCAB_FILE = "attributes.parquet"


def read_item_attributes(path: Path) -> dict[str, frozenset[str]]:
    """Raw item id (as a string) -> its attribute values (as strings), from a JSON object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {undecodable(exc)}; item attributes are JSON text") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read item attributes ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: item attributes must be a JSON object item -> list")
    attributes: dict[str, frozenset[str]] = {}
    for raw, values in data.items():
        if not isinstance(values, list):
            raise ConfigError(f"{path}: attributes of item {raw!r} must be a list")
        for value in values:
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise ConfigError(
                    f"{path}: attribute {value!r} of item {raw!r} is not a string or an integer"
                )
        attributes[str(raw)] = frozenset(str(v) for v in values)
    return attributes


@dataclass(frozen=True)
class AttributeIndex:
    """The dense form of the attributes of a dataset's items."""

    index: npt.NDArray[np.int32]  # [num_items + 1, A], attribute ids, 0 = none
    names: list[str]  # attribute id i + 1 is names[i]
    items_with_attributes: int  # items of the dataset that have at least one
    unknown_items: int  # items of the file that the dataset does not have

    def summary(self) -> dict[str, int]:
        return {
            "attributes": len(self.names),
            "max_per_item": int(self.index.shape[1]),
            "items_with_attributes": self.items_with_attributes,
            "unknown_items": self.unknown_items,
        }


def attribute_index(
    attributes: dict[str, frozenset[str]], item_raw_ids: list[str]
) -> AttributeIndex:
    """`item_raw_ids[i]` is the raw id (as a string) of dense item id i + 1."""
    known = set(item_raw_ids)
    names = sorted(
        {value for raw, values in attributes.items() if raw in known for value in values}
    )
    attribute_id = {name: i + 1 for i, name in enumerate(names)}
    rows = [sorted(attribute_id[v] for v in attributes.get(raw, ())) for raw in item_raw_ids]
    width = max((len(row) for row in rows), default=0)
    index = np.zeros((len(item_raw_ids) + 1, max(width, 1)), dtype=np.int32)
    for dense, row in enumerate(rows, start=1):
        index[dense, : len(row)] = row
    return AttributeIndex(
        index=index,
        names=names,
        items_with_attributes=sum(1 for row in rows if row),
        unknown_items=sum(1 for raw in attributes if raw not in known),
    )
