from __future__ import annotations

import pytest
import torch
from torch import nn

from recloop.errors import ConfigError
from recloop.train.averaging import WeightAverage, averaged, weight_average


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model.register_buffer("counter", torch.zeros(2))
    return model


def test_the_average_follows_the_warmed_up_decay() -> None:
    model = small_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    average = WeightAverage(model, decay=0.9)
    expected = dict(start)
    for update in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update()
        decay = min(0.9, (1 + update) / (10 + update))
        current = dict(model.named_parameters())
        expected = {n: decay * expected[n] + (1 - decay) * current[n].detach() for n in expected}
    assert average.updates == 30
    got = average.state_dict()
    assert set(got) == set(start)
    for name in start:
        torch.testing.assert_close(got[name], expected[name])
        assert not torch.equal(got[name], dict(model.named_parameters())[name].detach())


def test_applied_swaps_the_average_in_and_restores_the_model_exactly() -> None:
    model = small_model()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    average.update()
    own = {n: p.detach().clone() for n, p in model.named_parameters()}
    tensors = [p for p in model.parameters()]
    with averaged(average):
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), average.state_dict()[name])
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), own[name]), name
    assert all(a is b for a, b in zip(tensors, model.parameters(), strict=True))  # in place
    with averaged(None):  # no average: the model as it is
        assert all(torch.equal(p.detach(), own[n]) for n, p in model.named_parameters())


def test_restoring_a_saved_average_and_refusing_one_of_another_model() -> None:
    model = small_model()
    first = WeightAverage(model, decay=0.7)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    first.update()
    second = WeightAverage(model, decay=0.7)
    second.load_state_dict(first.state_dict(), first.updates)
    assert second.updates == 1
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor)
    other = WeightAverage(nn.Linear(3, 4), decay=0.7)
    with pytest.raises(ConfigError, match="does not fit"):
        other.load_state_dict(first.state_dict(), 1)


def test_decay_out_of_range_is_a_config_error_and_none_means_no_average() -> None:
    model = small_model()
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="ema_decay"):
            WeightAverage(model, decay)
    assert weight_average(model, None) is None
    assert isinstance(weight_average(model, 0.99), WeightAverage)
