"""Losses against straightforward references, with stated tolerances."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from recloop.config import TrainConfig
from recloop.errors import ConfigError
from recloop.models.factory import build_model
from recloop.train.losses import (
    Negatives,
    chunked_cross_entropy,
    distinct_negatives,
    history_exclusions,
    next_item_loss,
)
from recloop.train.sampled import accidental_hits, sampled_cross_entropy


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


def history_masking_case() -> tuple[Any, int, torch.Tensor]:
    """(toy SASRec, num_items, inputs [2, 5]): row 0 left-padded with a repeat of item 3,
    row 1 a full window."""
    torch.manual_seed(0)
    num_items = 12
    model = build_model("sasrec", {"num_items": num_items, "max_length": 5, "dim": 8})
    return model, num_items, torch.tensor([[0, 3, 5, 7, 3], [2, 4, 6, 8, 10]])


def test_history_masking_leaves_each_prefix_out_of_its_softmax() -> None:
    # Row 0: left padding, then a repeat (item 3 is the target at position 3 and was seen at
    # position 1), which must stay in the softmax. Row 1: a full window.
    model, num_items, inputs = history_masking_case()
    targets = torch.tensor([[0, 5, 7, 3, 9], [4, 6, 8, 10, 1]])
    config = TrainConfig(mask_history=True)
    hidden = model(inputs)
    loss, tokens = next_item_loss(model, hidden, targets, config, num_items, inputs)

    logits = model.score(hidden).float()  # [B, L, 1 + I], column 0 = padding
    expected = torch.zeros(())
    for b in range(2):
        for t in range(5):
            if targets[b, t] == 0:
                continue
            row = logits[b, t, 1:].clone()
            for item in inputs[b, : t + 1].tolist():
                if item and item != targets[b, t]:
                    row[item - 1] = float("-inf")
            expected = expected + torch.logsumexp(row, 0) - row[targets[b, t] - 1]
    assert int(tokens) == 9
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    unmasked, _ = next_item_loss(model, hidden, targets, TrainConfig(), num_items, inputs)
    assert loss < unmasked  # fewer competitors in every row that had a history

    # The fused gradients (computed inside the loss) match autograd through the reference.
    table = model.item_embedding.weight
    got = torch.autograd.grad(loss, [hidden, table], retain_graph=True)
    want = torch.autograd.grad(expected, [hidden, table])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_history_masking_of_last_position_targets_is_the_last_row_of_the_full_one() -> None:
    # Prefix training passes targets [B, 1] (the last position's) with the whole inputs [B, L]:
    # the exclusions must be the last row of the full window's, and so must the loss.
    model, num_items, inputs = history_masking_case()
    targets = torch.tensor([[0, 5, 7, 3, 3], [4, 6, 8, 10, 1]])
    full = history_exclusions(inputs, targets)  # [B, L, L]
    last = history_exclusions(inputs, targets[:, -1:])  # [B, 1, L]
    torch.testing.assert_close(last, full[:, -1:])
    assert last[0, 0].tolist() == [0, 0, 5, 7, 0]  # the repeat of the target stays in
    config = TrainConfig(mask_history=True)
    with torch.no_grad():
        hidden = model(inputs)
        only_last = torch.zeros_like(targets)
        only_last[:, -1] = targets[:, -1]
        want, _ = next_item_loss(model, hidden, only_last, config, num_items, inputs)
        got, tokens = next_item_loss(
            model, hidden[:, -1:], targets[:, -1:], config, num_items, inputs
        )
    assert int(tokens) == 2
    torch.testing.assert_close(got, want)


def test_history_masking_needs_the_inputs_and_the_full_softmax() -> None:
    model = build_model("sasrec", {"num_items": 5, "max_length": 3, "dim": 8})
    inputs = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="input items"):
        next_item_loss(model, model(inputs), inputs, TrainConfig(mask_history=True), 5)
    with pytest.raises(ConfigError, match="mask_history"):
        TrainConfig(mask_history=True, loss="bce")


def test_bpr_term_adds_the_pairwise_loss_against_uniform_negatives() -> None:
    model = build_model("sasrec", {"num_items": 20, "max_length": 4, "dim": 8})
    inputs = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    targets = torch.tensor([[0, 2, 3, 4], [5, 6, 7, 8]])
    hidden = model(inputs)
    plain, _ = next_item_loss(model, hidden, targets, TrainConfig(), 20)
    config = TrainConfig(bpr_weight=0.5, num_negatives=6)
    torch.manual_seed(3)
    mixed, tokens = next_item_loss(model, hidden, targets, config, 20)
    torch.manual_seed(3)  # the same negatives, drawn the same way
    neg = torch.randint(1, 21, (6,))
    mask = targets > 0
    h, pos = hidden[mask], targets[mask]
    pairs = F.softplus(model.score(h, neg) - model.score(h, pos.unsqueeze(-1)))
    pairs = pairs.masked_fill(neg.unsqueeze(0) == pos.unsqueeze(1), 0.0)
    torch.testing.assert_close(mixed, plain + 0.5 * pairs.mean(dim=1).sum())
    assert int(tokens) == 7
    with pytest.raises(ConfigError, match="bpr_weight"):
        TrainConfig(bpr_weight=0.5, loss="sampled_softmax")
    with pytest.raises(ConfigError, match="bpr_weight"):
        TrainConfig(bpr_weight=-1.0)


def _sampled_reference(
    query: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_ids: torch.Tensor,
    pos_log_q: torch.Tensor,
    neg_log_q: torch.Tensor,
) -> torch.Tensor:
    """The sampled softmax written the plain autograd way: [T, 1 + N] logits, hits masked."""
    target = (query * positives).sum(dim=1, keepdim=True) - pos_log_q.unsqueeze(1)  # [T, 1]
    others = query @ negatives.T - neg_log_q.unsqueeze(0)  # [T, N]
    others = others.masked_fill(neg_ids.unsqueeze(0) == pos_ids.unsqueeze(1), float("-inf"))
    logits = torch.cat([target, others], dim=1)
    zeros = torch.zeros(len(query), dtype=torch.long)
    return F.cross_entropy(logits, zeros, reduction="sum")


def _sampled_case() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    query = (torch.randn(300, 32) * 0.5).requires_grad_()
    positives = (torch.randn(300, 32) * 0.5).requires_grad_()
    negatives = (torch.randn(500, 32) * 0.5).requires_grad_()
    pos_ids = torch.randint(1, 200, (300,))
    neg_ids = torch.randint(1, 200, (500,))  # many accidental hits: ids repeat
    return query, positives, negatives, pos_ids, neg_ids, torch.randn(300), torch.randn(500)


@pytest.mark.parametrize("chunk", [1, 64, 1000])
def test_fused_sampled_softmax_matches_the_autograd_reference(chunk: int) -> None:
    case = _sampled_case()
    reference = _sampled_reference(*case)
    ref_grads = torch.autograd.grad(reference * 0.5, case[:3])
    loss = sampled_cross_entropy(*case, chunk=chunk)
    grads = torch.autograd.grad(loss * 0.5, case[:3])
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_operands_keep_the_sampled_softmax_close() -> None:
    """As for the full softmax: bf16 operands for the [c, N] matmuls, fp32 for the rest."""
    case = _sampled_case()
    reference = _sampled_reference(*case)
    ref_grads = torch.autograd.grad(reference, case[:3])
    loss = sampled_cross_entropy(*case, chunk=128, matmul_dtype=torch.bfloat16)
    grads = torch.autograd.grad(loss, case[:3])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-3, atol=0.0)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32
        assert float((got - want).norm() / want.norm()) < 1e-2


def test_accidental_hits_are_every_negative_equal_to_its_rows_target() -> None:
    pos_ids = torch.tensor([5, 2, 9, 5, 7])
    neg_ids = torch.tensor([5, 1, 9, 5, 3, 2])  # 5 twice: both copies are hits
    rows, columns = accidental_hits(pos_ids, neg_ids)
    found = sorted(zip(rows.tolist(), columns.tolist(), strict=True))
    expected = [(r, c) for r in range(5) for c in range(6) if pos_ids[r] == neg_ids[c]]
    assert found == expected
    assert rows.tolist() == sorted(rows.tolist())


def test_merging_repeated_negatives_keeps_the_loss_and_gradients() -> None:
    """k copies of a negative are one column with log k added to its logit (log q - log k)."""
    query, positives, _, pos_ids, neg_ids, pos_log_q, _ = _sampled_case()
    neg_log_q = -torch.log(torch.full((len(neg_ids),), 200.0))  # q depends on the id only
    drawn = Negatives(neg_ids, neg_log_q, pos_log_q)
    table = (torch.randn(201, 32) * 0.5).requires_grad_()  # row i: item i's vector
    repeated = sampled_cross_entropy(
        query, positives, table[neg_ids], pos_ids, neg_ids, pos_log_q, neg_log_q
    )
    want = torch.autograd.grad(repeated, (query, table))
    ids, log_q = distinct_negatives(drawn)
    assert len(ids) < len(neg_ids) and torch.equal(ids, torch.unique(neg_ids))
    merged = sampled_cross_entropy(query, positives, table[ids], pos_ids, ids, pos_log_q, log_q)
    got = torch.autograd.grad(merged, (query, table))
    torch.testing.assert_close(merged, repeated, rtol=1e-5, atol=1e-4)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
