"""One optimizer step of the online learner: windows of user sequences, each with the number of
its last positions to learn, through the model in padded chunks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial

import torch

from recloop.config import TrainConfig
from recloop.data.sequences import PADDING_ID
from recloop.models.base import SequentialEncoder
from recloop.online.history import padded_chunks
from recloop.train.loop import optimizer_step
from recloop.train.losses import next_item_loss

TOKENS_PER_CHUNK = 8192  # padded positions per forward pass of a training step

# A window to learn from and how many of its last positions are targets (None: all of them).
Sample = tuple[Sequence[int], int | None]


def train_step(
    model: SequentialEncoder,
    samples: Sequence[Sample],
    optimizers: Sequence[torch.optim.Optimizer],
    loss_config: TrainConfig,
    *,
    num_items: int,
    grad_clip: float | None,
    context_config: TrainConfig | None = None,
    context_fraction: float = 1.0,
) -> None:
    """One optimizer step on `samples`: (sequence, the number of its last positions that
    are targets, None = all of its last max_length + 1 items' positions).

    Windows are sorted by length and run in chunks, each padded only to its own longest:
    a batch of mostly short histories then costs its real tokens, not B x max_length.
    A non-causal model (BSARec) learns each target position as its own prefix window, with
    its target at the last position, as it was trained (`train.samples = "prefixes"`).

    With `context_config` (a causal model), the positions a sample leaves out are learned
    too, with that (cheaper, sampled) loss: one encoder pass serves both. `context_fraction`
    < 1 learns a random share of them each step, weighted by 1 / fraction (the same expected
    gradient): a user's older positions come back at every step that touches the user.
    """
    with_context = context_config is not None and model.causal
    singles, several, counts = _windows(model, samples, every_position=with_context)
    total_tokens = len(singles) + sum(counts)
    if with_context:
        total_tokens = sum(len(s) - 1 for s in several)
    if total_tokens == 0:
        return

    def chunk_losses() -> Iterator[torch.Tensor]:
        # Each chunk's forward runs when the step asks for its loss, after the previous
        # chunk's backward: one graph at a time.
        for inputs, targets, last_only in _chunks(singles, several, counts):
            hidden = model(inputs, last_only=last_only)  # [B, W or 1, D]
            loss_sum, _ = next_item_loss(
                model, hidden, targets, loss_config, num_items, inputs=inputs
            )
            if with_context and context_config is not None:
                loss_sum = loss_sum + _context_loss(
                    model, hidden, inputs, targets, context_config, num_items, context_fraction
                )
            yield loss_sum / total_tokens

    model.train()
    optimizer_step(
        model,
        optimizers,
        chunk_losses(),
        grad_clip=grad_clip,
        before_step=partial(_keep_padding_row_zero, model),
    )
    model.eval()


def _chunks(
    singles: Sequence[Sequence[int]], several: Sequence[Sequence[int]], counts: Sequence[int]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """(inputs, targets, last_only) of every padded chunk: the single-position windows first."""
    for inputs, targets in padded_chunks(singles, TOKENS_PER_CHUNK, last_only=True):
        yield inputs, targets, True
    for inputs, targets in padded_chunks(several, TOKENS_PER_CHUNK, False, counts):
        yield inputs, targets, False


def _context_loss(
    model: SequentialEncoder,
    hidden: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    num_items: int,
    fraction: float,
) -> torch.Tensor:
    """The sampled loss of the positions `targets` leaves out (a random `fraction` of them,
    weighted by 1 / fraction)."""
    context = _context_targets(inputs, targets)
    if fraction < 1.0:
        drop = torch.rand(context.shape, device=context.device) >= fraction
        context = context.masked_fill(drop, PADDING_ID)
    extra, _ = next_item_loss(model, hidden, context, config, num_items)
    return extra / fraction


def _keep_padding_row_zero(model: SequentialEncoder) -> None:
    table = getattr(model.item_embedding, "weight", None)  # None: a sharded table's rows
    if table is not None and table.grad is not None:
        table.grad[PADDING_ID] = 0.0


def _context_targets(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, W] the next items of the positions `targets` leaves out (0 = none): inputs shifted
    left by one; the last position's next item is only known where it is a target."""
    following = torch.zeros_like(inputs)
    following[:, :-1] = inputs[:, 1:]
    following[inputs == PADDING_ID] = 0
    return torch.where(targets > 0, torch.zeros_like(targets), following)


def _windows(
    model: SequentialEncoder, samples: Sequence[Sample], every_position: bool = False
) -> tuple[list[Sequence[int]], list[Sequence[int]], list[int]]:
    """(windows learned at their last position only, other windows, how many of each other
    window's last positions are targets), each list sorted by window length.

    A window learned at its last position alone runs the last block for that position only
    (`last_only`), which saves that block's work on every other position.
    """
    max_length = int(model.config.max_length)
    usable = [(s[-(max_length + 1) :], count) for s, count in samples if len(s) >= 2]
    if not model.causal:
        usable = [
            (s[: end + 1], 1)
            for s, count in usable
            for end in range(max(1, len(s) - (len(s) if count is None else count)), len(s))
        ]
    alone = not every_position  # every position needs the last block on all of them
    singles = sorted((s for s, count in usable if count == 1 and alone), key=len)
    several = sorted(
        ((s, count) for s, count in usable if count != 1 or not alone), key=lambda w: len(w[0])
    )
    counts = [len(s) - 1 if count is None else min(count, len(s) - 1) for s, count in several]
    return singles, [s for s, _ in several], counts
