"""Next-item losses over every position of a batch of windows ("training on every prefix").

Each loss returns (sum of per-token losses, number of tokens); the trainer divides by the
token count of the whole global batch, so data-parallel training matches one process.

- full softmax: cross-entropy over the whole catalogue (BSARec / FMLP-Rec practice).
- sampled softmax: the positive against shared negatives drawn uniformly or from the batch's
  own targets (in-batch, popularity-distributed), with the log-q correction (Yi et al. 2019)
  so the sampled loss estimates the full softmax; negatives equal to the positive are masked.
- BCE: the SASRec paper's loss, one uniformly drawn negative per position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recloop.config import TrainConfig
from recloop.models.base import SequentialEncoder


def next_item_loss(
    model: SequentialEncoder,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    num_items: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, L, D], targets [B, L] (0 = no target) -> (loss sum, token count)."""
    mask = targets > 0  # [B, L]
    tokens = mask.sum()
    h = hidden[mask]  # [T, D]
    pos = targets[mask]  # [T]
    if config.loss == "full_softmax":
        logits = model.score(h)  # [T, I + 1], padding column -inf
        return F.cross_entropy(logits.float(), pos, reduction="sum"), tokens
    if config.loss == "bce":
        neg = torch.randint(1, num_items + 1, pos.shape, device=pos.device)  # [T]
        pos_logit = model.score(h, pos.unsqueeze(-1)).squeeze(-1).float()  # [T]
        neg_logit = model.score(h, neg.unsqueeze(-1)).squeeze(-1).float()  # [T]
        loss = F.softplus(-pos_logit) + F.softplus(neg_logit)
        return loss.sum(), tokens
    return _sampled_softmax(model, h, pos, config, num_items), tokens


def _sampled_softmax(
    model: SequentialEncoder,
    h: torch.Tensor,
    pos: torch.Tensor,
    config: TrainConfig,
    num_items: int,
) -> torch.Tensor:
    n = config.num_negatives
    device = pos.device
    if config.negatives == "uniform":
        neg = torch.randint(1, num_items + 1, (n,), device=device)  # [N]
        log_q = torch.full((n,), -math.log(num_items), device=device)
        pos_log_q = torch.full(pos.shape, -math.log(num_items), device=device)
    else:
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
        neg = picked
        log_q = torch.log(q[neg])
        pos_log_q = torch.log(q[pos].clamp_min(1e-12))
    pos_logit = model.score(h, pos.unsqueeze(-1)).squeeze(-1).float() - pos_log_q  # [T]
    neg_logit = model.score(h, neg).float() - log_q  # [T, N]
    neg_logit = neg_logit.masked_fill(neg.unsqueeze(0) == pos.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit.unsqueeze(-1), neg_logit], dim=-1)  # [T, 1 + N]
    zeros = torch.zeros(pos.shape, dtype=torch.long, device=device)
    return F.cross_entropy(logits, zeros, reduction="sum")
