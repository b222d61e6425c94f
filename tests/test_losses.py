"""Losses against straightforward references, with stated tolerances."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recloop.config import TrainConfig
from recloop.models.factory import build_model
from recloop.train.losses import chunked_cross_entropy, next_item_loss


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_matches_full_logits(chunk: int) -> None:
    torch.manual_seed(0)
    query = torch.randn(50, 8, requires_grad=True)
    table = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (50,))
    reference = F.cross_entropy(query @ table.T, targets, reduction="sum")
    ref_grads = torch.autograd.grad(reference * 0.5, (query, table))
    loss = chunked_cross_entropy(query, table, targets, chunk)
    grads = torch.autograd.grad(loss * 0.5, (query, table))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_matmuls_keep_the_loss_and_gradients_close() -> None:
    """bf16 operands round each to 8 mantissa bits; the softmax and sums stay fp32, so the
    loss and gradients stay within a fraction of a percent of the fp32 ones."""
    torch.manual_seed(0)
    query = (torch.randn(300, 32) * 0.5).requires_grad_()
    table = (torch.randn(2000, 32) * 0.5).requires_grad_()
    targets = torch.randint(0, 2000, (300,))
    reference = F.cross_entropy(query @ table.T, targets, reduction="sum")
    ref_grads = torch.autograd.grad(reference, (query, table))
    loss = chunked_cross_entropy(query, table, targets, 128, torch.bfloat16)
    grads = torch.autograd.grad(loss, (query, table))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-3, atol=0.0)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32
        assert float((got - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("model_type", ["sasrec", "hstu"])
def test_full_softmax_equals_cross_entropy_over_model_scores(model_type: str) -> None:
    torch.manual_seed(0)
    model = build_model(model_type, {"num_items": 40, "max_length": 6, "dim": 8}).eval()
    inputs = torch.randint(1, 41, (4, 6))
    targets = torch.randint(0, 41, (4, 6))  # zeros are "no target"
    hidden = model(inputs)
    loss, tokens = next_item_loss(model, hidden, targets, TrainConfig(), 40)
    mask = targets > 0
    reference = F.cross_entropy(model.score(hidden[mask]), targets[mask], reduction="sum")
    assert int(tokens) == int(mask.sum())
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-4)


def test_sampled_softmax_masks_accidental_hits_and_bce_is_finite() -> None:
    torch.manual_seed(0)
    model = build_model("sasrec", {"num_items": 3, "max_length": 4, "dim": 8})
    inputs = torch.randint(1, 4, (2, 4))
    targets = torch.randint(1, 4, (2, 4))
    for negatives in ("uniform", "in_batch", "mixed"):
        config = TrainConfig(loss="sampled_softmax", num_negatives=16, negatives=negatives)
        loss, tokens = next_item_loss(model, model(inputs), targets, config, 3)
        assert torch.isfinite(loss) and int(tokens) == 8
        loss.backward()
    loss, _ = next_item_loss(model, model(inputs), targets, TrainConfig(loss="bce"), 3)
    assert torch.isfinite(loss) and loss > 0
