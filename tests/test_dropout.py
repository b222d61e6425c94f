from __future__ import annotations

import pytest
import torch

from recloop.models.dropout import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_dropout_zeroes_a_fraction_p_and_keeps_the_mean(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(200_000) + 0.5  # no zeros of its own
    y = dropout(x, p, training=True)
    dropped = (y == 0).float().mean().item()
    # Binomial standard error over 200k draws is at most 0.0012; the quantization of p to
    # 1/65536 is below 8e-6.
    assert abs(dropped - p) < 0.005
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))  # survivors scaled by 1 / (1 - p)
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.02  # unbiased in expectation


def test_dropout_masks_are_independent_elements_not_a_pattern() -> None:
    # Each element's draw is its own 16-bit slice: neighbours (slices of one 64-bit word) and
    # successive calls must not be correlated.
    torch.manual_seed(0)
    x = torch.ones(100_000)
    a = (dropout(x, 0.5, training=True) > 0).float()
    b = (dropout(x, 0.5, training=True) > 0).float()
    assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1].item()) < 0.02
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.02
    assert not torch.equal(a, b)


def test_dropout_is_reproducible_from_the_seed_and_off_in_eval() -> None:
    x = torch.randn(3, 7, 5)
    torch.manual_seed(7)
    first = dropout(x, 0.3, training=True)
    torch.manual_seed(7)
    second = dropout(x, 0.3, training=True)
    torch.testing.assert_close(first, second)
    assert first.shape == x.shape
    module = Dropout(0.3).eval()
    assert module(x) is x
    assert dropout(x, 0.0, training=True) is x


def test_dropout_gradient_is_the_same_mask_scaled() -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 9, requires_grad=True)
    y = dropout(x, 0.5, training=True)
    y.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, (y != 0).float() * 2.0)


def test_dropout_module_refuses_a_bad_probability() -> None:
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)
    assert "p=0.25" in repr(Dropout(0.25))
