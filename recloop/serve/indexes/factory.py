"""build_index: the index the service searches, one of a kind or sharded."""

from __future__ import annotations

from typing import Any

import numpy.typing as npt

from recloop.errors import ServingError
from recloop.serve.indexes.base import FloatArray, ItemIndex, check_build_args, check_table
from recloop.serve.indexes.local import make_local_index
from recloop.serve.indexes.sharded import ShardedIndex


def build_index(
    table: npt.ArrayLike,
    kind: str = "exact",
    *,
    shards: int = 1,
    **options: Any,
) -> ItemIndex:
    """The index the service searches: ``kind`` in ``exact``, ``exact-int8``, ``ivf``, ``milvus``.

    ``shards > 1`` splits the catalogue into contiguous ranges (:class:`ShardedIndex`), searched
    concurrently. ``options`` go to each shard's index: ``block_rows`` (exact kinds),
    ``rerank`` (exact-int8); for ivf ``nlist``, ``nprobe``, ``min_recall``, ``threads``,
    ``train_threads``, ``seed``; for milvus (one shard: Milvus shards itself) ``uri``,
    ``alias``, ``tune_queries``, ``seed``.
    """
    check_build_args(kind, shards, options)
    checked = check_table(table)
    if shards > len(checked) - 1:
        raise ServingError(
            f"shards must be <= the number of items ({len(checked) - 1}), got {shards}"
        )

    def make(part: FloatArray) -> ItemIndex:
        return make_local_index(part, kind, **options)

    if shards == 1:
        return make(checked)
    return ShardedIndex.build(checked, shards=shards, make_shard=make)
