"""Optimizers for online fine-tuning, and growing the item table when new items join.

The item table is updated by :class:`LazyAdam`: Adam on the rows that received a gradient in
this step only (TensorFlow's LazyAdam, FBGEMM's row-wise embedding optimizers). Plain Adam would
keep moving every row it ever touched (its moments decay slowly), so a delta would soon hold the
whole table; with lazy updates a published delta holds exactly the rows the interval's events
and negatives touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class LazyAdam(torch.optim.Optimizer):
    """Adam (no weight decay) applied only to the rows (dim 0) with a non-zero gradient."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.reshape(param.shape[0], -1)  # [R, D]
                rows = torch.nonzero(grad.abs().sum(dim=1) > 0).squeeze(1)  # [N]
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                if len(rows) == 0:
                    continue
                step = float(state["step"])
                g = param.grad[rows]  # [N, D]
                m = state["exp_avg"][rows].mul_(beta1).add_(g, alpha=1 - beta1)
                v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"][rows] = m
                state["exp_avg_sq"][rows] = v
                # Bias correction uses the global step, as LazyAdam does.
                m_hat = m / (1 - beta1**step)
                v_hat = v / (1 - beta2**step)
                param[rows] -= group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])


def grow_rows(
    param: torch.nn.Parameter, new_rows: torch.Tensor, optimizer: torch.optim.Optimizer
) -> torch.nn.Parameter:
    """A new parameter = `param` with `new_rows` [N, D] appended; the optimizer's state for it
    is carried over (zero moments for the new rows) and the optimizer points at the new one."""
    grown = torch.nn.Parameter(torch.cat([param.detach(), new_rows.to(param.dtype)]))
    old_state = optimizer.state.pop(param, None)
    for group in optimizer.param_groups:
        group["params"] = [grown if p is param else p for p in group["params"]]
    if old_state:
        state: dict[str, Any] = {}
        for key, value in old_state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                pad = torch.zeros((len(new_rows), *value.shape[1:]), dtype=value.dtype)
                state[key] = torch.cat([value, pad])
            else:
                state[key] = value
        optimizer.state[grown] = state
    return grown
