"""The sampled softmax's cross-entropy in one fused pass, the way `_ChunkedCrossEntropy` does
the full softmax: logits, loss and gradients chunk by chunk, no [T, 1 + N] tensor kept for
autograd.

Per position t: CE over [q_t . p_t - log q(pos_t), q_t . n_j - log q(n_j) for every shared
negative j], target 0, with a negative equal to the position's own target masked out. The
autograd version (cat, masked_fill, F.cross_entropy, then their backward) spent most of an
online step with context positions in its backward (measured with cProfile on the Beauty
replay: `run_backward` was the largest single cost).
"""

from __future__ import annotations

from typing import Any

import torch


class _SampledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,  # [T, D]
        positives: torch.Tensor,  # [T, D]
        negatives: torch.Tensor,  # [N, D]
        pos_ids: torch.Tensor,  # [T]
        neg_ids: torch.Tensor,  # [N]
        pos_log_q: torch.Tensor,  # [T]
        neg_log_q: torch.Tensor,  # [N]
        chunk: int,
        matmul_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        grad_query = torch.empty_like(query)
        grad_positives = torch.empty_like(positives)
        grad_negatives = torch.zeros_like(negatives)  # fp32 accumulator
        total = torch.zeros((), dtype=query.dtype, device=query.device)
        dtype = matmul_dtype or query.dtype
        query_m, negatives_m = query.to(dtype), negatives.to(dtype)
        shift = neg_log_q.neg().unsqueeze(0)  # [1, N]
        hit_rows, hit_columns = accidental_hits(pos_ids, neg_ids)  # rows ascending
        bounds = torch.searchsorted(hit_rows, torch.arange(0, len(query) + chunk, chunk))
        for index, start in enumerate(range(0, len(query), chunk)):
            end = start + chunk
            q, p = query[start:end], positives[start:end]  # [c, D]
            q_m = query_m[start:end]
            logits = (q_m @ negatives_m.T).to(query.dtype).add_(shift)  # [c, N]
            first, last = int(bounds[index]), int(bounds[index + 1])
            logits[hit_rows[first:last] - start, hit_columns[first:last]] = -torch.inf
            target = (q * p).sum(dim=1) - pos_log_q[start:end]  # [c]
            top = torch.maximum(logits.amax(dim=1), target).unsqueeze(1)  # [c, 1]
            probs = logits.sub_(top).exp_()  # unnormalised, in place
            target_prob = (target.unsqueeze(1) - top).exp_()  # [c, 1]
            norm = probs.sum(dim=1, keepdim=True) + target_prob  # [c, 1]
            total += (norm.log() + top - target.unsqueeze(1)).sum()
            probs.div_(norm)  # softmax over the negatives
            pull = target_prob.div_(norm).sub_(1.0)  # d loss / d target logit: p - 1
            grad_positives[start:end] = pull * q
            if dtype == query.dtype:
                grad_query[start:end] = torch.addmm(pull * p, probs, negatives)
                grad_negatives.addmm_(probs.T, q)
                continue
            probs_m = probs.to(dtype)
            grad_query[start:end] = (probs_m @ negatives_m).to(query.dtype).add_(pull * p)
            grad_negatives += (probs_m.T @ q_m).to(query.dtype)
        ctx.save_for_backward(grad_query, grad_positives, grad_negatives)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_query, grad_positives, grad_negatives = ctx.saved_tensors
        return (
            grad_query * grad_output,
            grad_positives * grad_output,
            grad_negatives * grad_output,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def accidental_hits(pos_ids: torch.Tensor, neg_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(rows, columns) of every negative equal to its row's own target, rows ascending.

    Found by binary search in the sorted negatives: a few hundred hits among [T, N] pairs,
    instead of comparing all T x N of them (a pass over every chunk's logits)."""
    order = torch.argsort(neg_ids, stable=True)
    ordered = neg_ids[order]
    first = torch.searchsorted(ordered, pos_ids)
    counts = torch.searchsorted(ordered, pos_ids, right=True) - first  # [T] copies of each target
    rows = torch.repeat_interleave(torch.arange(len(pos_ids), device=pos_ids.device), counts)
    starts = torch.repeat_interleave(first, counts)
    within = torch.arange(len(rows), device=rows.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )  # 0, 1, .. over each row's copies
    return rows, order[starts + within]


def sampled_cross_entropy(
    query: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_ids: torch.Tensor,
    pos_log_q: torch.Tensor,
    neg_log_q: torch.Tensor,
    chunk: int = 256,
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Summed sampled-softmax cross-entropy of query [T, D] with its target vectors
    positives [T, D] against shared negatives [N, D] (ids give the accidental hits to mask;
    log-q values are subtracted from the logits: the correction for how items were drawn).

    ``matmul_dtype`` (e.g. torch.bfloat16) sets the operands of the three [c, N] matmuls
    only, as in the full softmax's ``chunked_cross_entropy``: the softmax, the loss and the
    negatives' gradient accumulate in the inputs' dtype."""
    loss: torch.Tensor = _SampledCrossEntropy.apply(  # type: ignore[no-untyped-call]
        query, positives, negatives, pos_ids, neg_ids, pos_log_q, neg_log_q, chunk, matmul_dtype
    )
    return loss
