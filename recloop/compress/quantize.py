"""Post-training quantization: int8 / int4 row-wise item tables and int8 dense weights.

The item table is most of a sequential recommender's bytes (on Amazon Beauty, 12,102 rows of 128
floats against four HSTU blocks of 128 x 640 weights), so it is quantized row by row: each row keeps
its own scale and offset (:mod:`recloop.models.codec`), which follows popular and rare items' very
different norms. Lookups dequantize the gathered rows; scoring dequantizes the table. The Linear
layers of the blocks are stored int8 with one scale per output channel and dequantized on the fly,
so the file shrinks and every engine (torch, ONNX export) runs the same maths. For int8 *compute* in
the dense layers, :mod:`recloop.compress.export` applies ONNX Runtime's dynamic quantization to the
exported encoder (torch.ao's quantize_dynamic would break the transformer fast path).

:func:`score_parity` measures what quantization changed: top-10 overlap with the float model
and the largest score error over the whole catalogue, on real user histories.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from recloop.data.batches import last_items
from recloop.data.dataset import SequenceDataset
from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder
from recloop.models.compressed import (
    CompressedItemEmbedding,
    compression_of,
    quantize_linears,
    set_compression,
)
from recloop.models.parity import Comparison

PARITY_USERS = 1000  # histories the parity is measured on
PARITY_K = 10


def quantize_model(
    model: SequentialEncoder, *, embedding_bits: int = 8, linear_bits: int = 8
) -> SequentialEncoder:
    """A quantized copy of a float model (in eval mode, on CPU); `model` is left unchanged."""
    spec = compression_of(model)
    if spec.is_quantized:
        raise ConfigError(
            "this model is already quantized "
            f"(embedding {spec.embedding_bits} bits, dense {spec.linear_bits} bits); "
            "quantize its float parent instead"
        )
    if embedding_bits not in (8, 4):
        raise ConfigError(f"embedding_bits must be 8 or 4, got {embedding_bits!r}")
    if linear_bits not in (8, 32):
        raise ConfigError(f"linear_bits must be 8 or 32, got {linear_bits!r}")
    quantized = copy.deepcopy(model).cpu().eval()
    if linear_bits == 8:
        quantize_linears(quantized)
    table = quantized.item_embedding
    live = None
    if isinstance(table, CompressedItemEmbedding) and table.slots is not None:
        live = table.slots != 0  # keep the dead-item pruning of a structured-pruned parent
    with torch.no_grad():
        rows = table.table() if isinstance(table, CompressedItemEmbedding) else table.weight
        quantized.item_embedding = CompressedItemEmbedding.from_table(
            rows,
            normalize=table.normalize,
            temperature=table.temperature,
            bits=embedding_bits,
            live=live,
        )
    set_compression(
        quantized,
        dataclasses.replace(spec, embedding_bits=embedding_bits, linear_bits=linear_bits),
    )
    return quantized


# --------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class ScoreParity:
    """A compressed model against its reference on the same histories (full catalogue)."""

    users: int
    top10_overlap: float  # mean |top-10 reference ∩ top-10 candidate| / 10
    max_score_error: float  # max |score difference| over every user and item
    mean_score_error: float
    max_query_error: float  # max |user vector difference| (as it enters the dot product)

    def as_metrics(self, prefix: str = "parity/") -> dict[str, float]:
        return {
            f"{prefix}users": float(self.users),
            f"{prefix}top10_overlap": self.top10_overlap,
            f"{prefix}max_score_error": self.max_score_error,
            f"{prefix}mean_score_error": self.mean_score_error,
            f"{prefix}max_query_error": self.max_query_error,
        }


def sample_histories(
    dataset: SequenceDataset | None,
    *,
    num_items: int,
    max_length: int,
    count: int = PARITY_USERS,
    seed: int = 0,
) -> torch.Tensor:
    """[N, max_length] left-padded histories: the test histories of a seeded subset of the
    dataset's users, or random sequences of assorted lengths when there is no dataset."""
    rng = np.random.default_rng(seed)
    if dataset is not None:
        test = dataset.leave_one_out().test
        if len(test):
            rows = np.sort(rng.choice(len(test), size=min(count, len(test)), replace=False))
            starts = np.asarray(test.starts, dtype=np.int64)[rows]
            ends = np.asarray(test.ends, dtype=np.int64)[rows]
            ids: npt.NDArray[np.int64] = last_items(
                dataset.sequences.items, starts, ends, max_length
            ).astype(np.int64)
            return torch.from_numpy(ids)
    ids = np.zeros((count, max_length), dtype=np.int64)
    lengths = rng.integers(1, max_length + 1, size=count)
    for row, length in enumerate(lengths):
        ids[row, max_length - length :] = rng.integers(1, num_items + 1, size=length)
    return torch.from_numpy(ids)


def score_parity(
    reference: SequentialEncoder,
    candidate: SequentialEncoder,
    histories: torch.Tensor,
    *,
    k: int = PARITY_K,
    batch_size: int = 256,
) -> ScoreParity:
    """Top-k overlap and score errors of `candidate` against `reference` over the whole
    catalogue, for left-padded `histories` [N, L] (both models in eval mode, no timestamps)."""
    queries, scores = Comparison(), Comparison()
    with torch.inference_mode():
        for start in range(0, len(histories), batch_size):
            ids = histories[start : start + batch_size]  # [B, L]
            outputs = []
            for model in (reference, candidate):
                model.eval()
                user = model.encode(ids)  # [B, D]
                query = model.item_embedding.prepare_query(user)  # [B, D]
                score = model.score(user)[:, 1:]  # [B, I], padding column dropped
                outputs.append((query.float().cpu().numpy(), score.float().cpu().numpy()))
            (query_ref, score_ref), (query_new, score_new) = outputs
            queries.add(query_ref, query_new)
            scores.add(score_ref, score_new, top_k=k)
    return ScoreParity(
        users=len(histories),
        top10_overlap=scores.top_k_overlap,
        max_score_error=scores.max_abs_error,
        mean_score_error=scores.mean_abs_error,
        max_query_error=queries.max_abs_error,
    )
