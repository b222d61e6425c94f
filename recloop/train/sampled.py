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
    ) -> torch.Tensor:
        grad_query = torch.empty_like(query)
        grad_positives = torch.empty_like(positives)
        grad_negatives = torch.zeros_like(negatives)
        total = torch.zeros((), dtype=query.dtype, device=query.device)
        for start in range(0, len(query), chunk):
            end = start + chunk
            q, p = query[start:end], positives[start:end]  # [c, D]
            logits = torch.addmm(neg_log_q.neg().unsqueeze(0), q, negatives.T)  # [c, N]
            logits.masked_fill_(neg_ids.unsqueeze(0) == pos_ids[start:end].unsqueeze(1), -torch.inf)
            target = (q * p).sum(dim=1) - pos_log_q[start:end]  # [c]
            top = torch.maximum(logits.amax(dim=1), target).unsqueeze(1)  # [c, 1]
            probs = logits.sub_(top).exp_()  # unnormalised, in place
            target_prob = (target.unsqueeze(1) - top).exp_()  # [c, 1]
            norm = probs.sum(dim=1, keepdim=True) + target_prob  # [c, 1]
            total += (norm.log() + top - target.unsqueeze(1)).sum()
            probs.div_(norm)  # softmax over the negatives
            pull = target_prob.div_(norm).sub_(1.0)  # d loss / d target logit: p - 1
            grad_query[start:end] = torch.addmm(pull * p, probs, negatives)
            grad_positives[start:end] = pull * q
            grad_negatives.addmm_(probs.T, q)
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
        )


def sampled_cross_entropy(
    query: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_ids: torch.Tensor,
    pos_log_q: torch.Tensor,
    neg_log_q: torch.Tensor,
    chunk: int = 256,
) -> torch.Tensor:
    """Summed sampled-softmax cross-entropy of query [T, D] with its target vectors
    positives [T, D] against shared negatives [N, D] (ids give the accidental hits to mask;
    log-q values are subtracted from the logits: the correction for how items were drawn)."""
    loss: torch.Tensor = _SampledCrossEntropy.apply(  # type: ignore[no-untyped-call]
        query, positives, negatives, pos_ids, neg_ids, pos_log_q, neg_log_q, chunk
    )
    return loss
