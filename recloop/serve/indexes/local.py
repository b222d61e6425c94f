"""An in-process index of one kind: what each shard (local or in a shard process) holds."""

from __future__ import annotations

from typing import Any

import numpy.typing as npt

from recloop.serve.indexes.base import ItemIndex
from recloop.serve.indexes.exact import ExactIndex


def make_local_index(table: npt.ArrayLike, kind: str, **options: Any) -> ItemIndex:
    """One in-process index of ``kind`` (options already validated: check_build_args)."""
    if kind == "ivf":
        # Imported here: faiss (and its OpenMP runtime) loads only when an IVF index is built.
        from recloop.serve.indexes.ivf import IVFIndex

        return IVFIndex(table, **options)
    if kind in ("milvus", "milvus-ivf"):  # pymilvus and grpc load only for a Milvus index too
        from recloop.serve.indexes.milvus import MilvusIndex, milvus_ivf

        return (
            milvus_ivf(table, **options) if kind == "milvus-ivf" else MilvusIndex(table, **options)
        )
    if kind == "exact-int8":
        return ExactIndex(table, quantize="int8", **options)
    return ExactIndex(table, **options)
