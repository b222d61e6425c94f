"""Next-item losses over every position of a batch of windows ("training on every prefix").

Each loss returns (sum of per-token losses, number of tokens); the trainer divides by the
token count of the whole global batch, so data-parallel training matches one process.

- full softmax: cross-entropy over the whole catalogue (BSARec / FMLP-Rec practice).
- sampled softmax: the positive against shared negatives drawn uniformly or from the batch's
  own targets (in-batch, popularity-distributed), with the log-q correction (Yi et al. 2019)
  so the sampled loss estimates the full softmax; negatives equal to the positive are masked.
- BCE: the SASRec paper's loss, one uniformly drawn negative per position.

The full softmax can leave each position's own history out of its softmax (``mask_history``)
and add a pairwise term against uniformly drawn items (``bpr_weight``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from recloop.config import TrainConfig
from recloop.models.base import SequentialEncoder
from recloop.train.sampled import sampled_cross_entropy


def next_item_loss(
    model: SequentialEncoder,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    num_items: int,
    inputs: torch.Tensor | None = None,
    negatives: Negatives | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, Lq, D], targets [B, Lq] (0 = no target) -> (loss sum, token count).

    Lq is the window's length L, or 1 for windows trained at their last position only
    (`train.samples = "prefixes"`). ``inputs`` [B, L] are the windows' input items;
    ``config.mask_history`` needs them. ``negatives``: the sampled softmax's, drawn
    beforehand (:func:`draw_negatives`); None draws them here.
    """
    mask = targets > 0  # [B, Lq]
    tokens = mask.sum()
    h = hidden[mask]  # [T, D]
    pos = targets[mask]  # [T]
    if config.loss == "full_softmax":
        embedding = model.item_embedding
        query = embedding.prepare_query(h).float()  # [T, D]
        table = embedding.output_table()[1:].float()  # [I, D], padding row excluded
        matmul_dtype = torch.bfloat16 if config.bf16 else None
        exclude = None
        if config.mask_history:
            if inputs is None:
                raise ValueError("train.mask_history needs the input items (inputs=)")
            exclude = history_exclusions(inputs, targets)[mask] - 1  # [T, L], -1 = none
        loss = chunked_cross_entropy(
            query, table, pos - 1, matmul_dtype=matmul_dtype, exclude=exclude
        )
        if config.bpr_weight:
            loss = loss + config.bpr_weight * _uniform_bpr(model, h, pos, config, num_items)
        return loss, tokens
    if config.loss == "bce":
        neg = torch.randint(1, num_items + 1, pos.shape, device=pos.device)  # [T]
        pos_logit = model.score(h, pos.unsqueeze(-1)).squeeze(-1).float()  # [T]
        neg_logit = model.score(h, neg.unsqueeze(-1)).squeeze(-1).float()  # [T]
        loss = F.softplus(-pos_logit) + F.softplus(neg_logit)
        return loss.sum(), tokens
    return _sampled_softmax(model, h, pos, config, num_items, negatives), tokens


def _uniform_bpr(
    model: SequentialEncoder,
    h: torch.Tensor,
    pos: torch.Tensor,
    config: TrainConfig,
    num_items: int,
) -> torch.Tensor:
    """Summed over positions: mean over uniform negatives of softplus(neg - pos logit)."""
    neg = torch.randint(1, num_items + 1, (config.num_negatives,), device=pos.device)  # [N]
    pos_logit, neg_logit, hit = _target_and_negative_logits(model, h, pos, neg)
    pairs = F.softplus(neg_logit - pos_logit.unsqueeze(-1)).masked_fill(hit, 0.0)
    return pairs.mean(dim=1).sum()


def _target_and_negative_logits(
    model: SequentialEncoder, h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 logits of each position's target [T] and of the shared negatives [T, N], and
    where a negative is the target itself [T, N] (an accidental hit the caller must mask)."""
    pos_logit = model.score(h, pos.unsqueeze(-1)).squeeze(-1).float()
    neg_logit = model.score(h, neg).float()
    return pos_logit, neg_logit, neg.unsqueeze(0) == pos.unsqueeze(1)


def history_exclusions(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs [B, L], targets [B, Lq] of the last Lq positions -> [B, Lq, L] item ids each
    target's position leaves out of its softmax (0 = nothing).

    Position t excludes the inputs at positions <= t, its prefix within the window, except
    an item equal to its own target (a repeat purchase is still a right answer).
    """
    width, queries = inputs.shape[1], targets.shape[1]
    seen = inputs.unsqueeze(1).expand(-1, queries, -1)  # [B, t, s] = inputs[b, s]
    causal = torch.ones(queries, width, dtype=torch.bool, device=inputs.device).tril(
        width - queries
    )  # s <= t
    keep = causal & (seen != targets.unsqueeze(-1))
    return torch.where(keep, seen, torch.zeros_like(seen))


@dataclass(frozen=True)
class Negatives:
    """A step's shared sampled-softmax negatives [N], with log q of each negative [N] and of
    each position's target [T] (the log-q correction)."""

    ids: torch.Tensor
    log_q: torch.Tensor
    pos_log_q: torch.Tensor


def draw_negatives(pos: torch.Tensor, config: TrainConfig, num_items: int) -> Negatives:
    """`config.num_negatives` negatives for the targets `pos` [T], as `config.negatives` says.

    A sharded table draws them before the forward pass (one lookup per step fetches every row
    the step reads), so drawing is separate from the loss."""
    n = config.num_negatives
    device = pos.device
    if config.negatives == "uniform":
        neg = torch.randint(1, num_items + 1, (n,), device=device)  # [N]
        log_q = torch.full((n,), -math.log(num_items), device=device)
        pos_log_q = torch.full(pos.shape, -math.log(num_items), device=device)
        return Negatives(neg, log_q, pos_log_q)
    # In-batch: negatives are other positions' targets, so each item is drawn with
    # probability proportional to its frequency among this batch's targets.
    counts = torch.bincount(pos, minlength=num_items + 1).float()
    q = counts / counts.sum()
    take = n if config.negatives == "in_batch" else n // 2
    picked = pos[torch.randint(0, pos.numel(), (take,), device=device)]  # [take]
    if config.negatives == "mixed":  # half in-batch, half uniform (Yang et al. 2020)
        uniform = torch.randint(1, num_items + 1, (n - take,), device=device)
        picked = torch.cat([picked, uniform])
        q = 0.5 * q + 0.5 / num_items
        q[0] = 0.0
    return Negatives(picked, torch.log(q[picked]), torch.log(q[pos].clamp_min(1e-12)))


def distinct_negatives(negatives: Negatives) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [M], log q [M]) of the shared negatives with repeats merged.

    k copies of an item add k equal terms to every position's softmax denominator, which is
    one term with log k added to its logit: log q - log k. Loss and gradients are the same,
    with M <= N columns to compute; in-batch and mixed draws repeat popular items often."""
    ids, inverse, counts = torch.unique(negatives.ids, return_inverse=True, return_counts=True)
    log_q = torch.empty(len(ids), dtype=negatives.log_q.dtype, device=ids.device)
    log_q.scatter_(0, inverse, negatives.log_q)  # every copy of an id has the same q
    return ids, log_q - counts.to(log_q.dtype).log()


def _sampled_softmax(
    model: SequentialEncoder,
    h: torch.Tensor,
    pos: torch.Tensor,
    config: TrainConfig,
    num_items: int,
    negatives: Negatives | None = None,
) -> torch.Tensor:
    if negatives is None:
        negatives = draw_negatives(pos, config, num_items)
    neg, neg_log_q = distinct_negatives(negatives)
    embedding = model.item_embedding
    with torch.autocast(pos.device.type, enabled=False):  # fp32, as the full softmax's loss
        return sampled_cross_entropy(
            embedding.prepare_query(h).float(),  # the dot product of model.score, fused
            embedding.output_vectors(pos).float(),
            embedding.output_vectors(neg).float(),
            pos,
            neg,
            negatives.pos_log_q.float(),
            neg_log_q.float(),
            matmul_dtype=torch.bfloat16 if config.bf16 else None,
        )


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum_t CE(query_t @ table.T, target_t) without materialising [T, I] logits.

    Rows are processed in chunks small enough for the [chunk, I] logits to stay in cache, and
    the gradients are computed in the same pass (the loss is a scalar, so d loss / d logits is
    softmax - onehot, known as soon as a chunk's logits are): 3 matmul passes and one exp over
    the catalogue, instead of a log-softmax forward and backward through memory. Measured on
    this 2-core CPU for 1,500 tokens x 12,101 items x 64 dims: 87 ms against 196 ms for
    F.cross_entropy on full logits (the profile that motivated it: bench/train_speed.py).

    The softmax is exp(logits - rowmax) / rowsum, so the exp runs once per element (a
    logsumexp followed by exp(logits - lse) would run it twice). With ``matmul_dtype``
    bfloat16 the three matmuls take bf16 operands (the CPU's avx512_bf16 dot products run them
    about twice as fast as fp32) and everything else stays fp32: logits are widened before the
    softmax, and the table gradient is accumulated in fp32.
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        table: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        matmul_dtype: torch.dtype | None,
        exclude: torch.Tensor | None,
    ) -> torch.Tensor:
        dtype = matmul_dtype or query.dtype
        grad_query = torch.empty_like(query)  # [T, D]
        grad_table = torch.zeros_like(table)  # [I, D], fp32 accumulator
        total = torch.zeros((), dtype=query.dtype, device=query.device)
        with torch.autocast(query.device.type, enabled=False):
            query_m, table_m = query.to(dtype), table.to(dtype)
            for start in range(0, len(query), chunk):
                q = query_m[start : start + chunk]  # [c, D]
                t = targets[start : start + chunk]  # [c]
                rows = torch.arange(len(t), device=t.device)
                logits = (q @ table_m.T).to(query.dtype)  # [c, I]
                if exclude is not None:
                    _mask_logits(logits, exclude[start : start + chunk])
                target_logit = logits[rows, t]  # [c]
                row_max = logits.amax(dim=1, keepdim=True)  # [c, 1]
                probs = logits.sub_(row_max).exp_()  # unnormalised, in place
                row_sum = probs.sum(dim=1, keepdim=True)  # [c, 1]
                lse = (row_max + row_sum.log()).squeeze(1)  # [c]
                total += (lse - target_logit).sum()
                probs.div_(row_sum)  # softmax
                probs[rows, t] -= 1.0  # d loss / d logits
                probs_m = probs.to(dtype)
                grad_query[start : start + chunk] = probs_m @ table_m
                if dtype == table.dtype:
                    grad_table.addmm_(probs_m.T, q)
                else:
                    grad_table += probs_m.T @ q
        ctx.save_for_backward(grad_query, grad_table)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_query, grad_table = ctx.saved_tensors
        return grad_query * grad_output, grad_table * grad_output, None, None, None, None


def _mask_logits(logits: torch.Tensor, exclude: torch.Tensor) -> None:
    """Sets logits[r, exclude[r, j]] to -inf in place, skipping entries of -1.

    A scatter with "amin" of -inf (mask) or +inf (skip, the min leaves the logit as it is)
    handles the ragged rows in one call; masked items get zero probability and gradient.
    """
    valid = exclude >= 0
    index = exclude.clamp_min(0)
    values = torch.where(valid, float("-inf"), float("inf")).to(logits.dtype)
    logits.scatter_reduce_(1, index, values, reduce="amin")


def chunked_cross_entropy(
    query: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    chunk: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed softmax cross-entropy of query [T, D] against every row of table [I, D].

    ``exclude`` [T, E] lists rows of the table to leave out of each query's softmax (-1 =
    none); a query's target must not be among them.

    ``matmul_dtype`` (e.g. torch.bfloat16) sets the matmul operands' precision only; the
    softmax, the loss and the gradients' accumulation stay in the inputs' dtype. ``chunk``
    (rows per pass) defaults to what measured fastest here: 64 in fp32, 128 with bf16 operands.
    """
    if chunk is None:
        chunk = 64 if matmul_dtype in (None, query.dtype) else 128
    loss: torch.Tensor = _ChunkedCrossEntropy.apply(  # type: ignore[no-untyped-call]
        query, table, targets, chunk, matmul_dtype, exclude
    )
    return loss
