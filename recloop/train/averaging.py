"""An exponential moving average of a model's parameters (`train.ema_decay`).

At a constant learning rate with heavy dropout (BSARec's Beauty recipe: lr 5e-4, dropout 0.5)
the weights keep jittering around the optimum from step to step; their running average sits
closer to it. When the trainer keeps one, validation, checkpoint selection and the published
version all use the averaged weights, and the raw weights go on training.

The average starts at the initial weights with a warm-up of its decay, min(decay,
(1 + n) / (10 + n)) after n updates, so early averages are not dominated by the random
initialisation. Buffers (non-trained state) are not averaged: they stay the model's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from recloop.errors import ConfigError


class WeightAverage:
    """The average of `model`'s trained parameters, bound to that model's tensors (loading a
    checkpoint copies into them in place, so they stay the same for the model's lifetime)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.updates = 0
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self._names = [name for name, _ in named]
        self._params = [p.detach() for _, p in named]
        self._average = [p.clone() for p in self._params]

    def update(self) -> None:
        """Moves the average towards the model's current parameters (after each step)."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            torch._foreach_lerp_(self._average, self._params, 1.0 - decay)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged parameters (in place, so optimizer
        and DDP keep the same tensors); its own come back afterwards."""
        with torch.no_grad():
            own = [p.clone() for p in self._params]
            torch._foreach_copy_(self._params, self._average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._params, own)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged parameters by name, for a checkpoint (`updates` goes in its JSON)."""
        return dict(zip(self._names, self._average, strict=True))

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        if sorted(tensors) != sorted(self._names):
            missing = sorted(set(self._names) - set(tensors))[:3]
            unexpected = sorted(set(tensors) - set(self._names))[:3]
            raise ConfigError(
                f"weight average does not fit this model (missing {missing}, "
                f"unexpected {unexpected})"
            )
        with torch.no_grad():
            for name, average in zip(self._names, self._average, strict=True):
                average.copy_(tensors[name])
        self.updates = updates


def weight_average(model: nn.Module, decay: float | None) -> WeightAverage | None:
    """The average `train.ema_decay` asks for (None: the run keeps none)."""
    return WeightAverage(model, decay) if decay is not None else None


def averaged(average: WeightAverage | None) -> AbstractContextManager[None]:
    """`average.applied()`, or a no-op when there is no average."""
    return average.applied() if average is not None else nullcontext()
