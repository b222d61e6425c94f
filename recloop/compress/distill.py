"""Knowledge distillation: a small student learns a large teacher's scores over the catalogue.

At every training position the loss of the student is

    (1 - alpha) * CE(student logits, true next item)
    + alpha * T^2 * KL(softmax(teacher logits / T) || softmax(student logits / T))

over the FULL catalogue (Hinton et al. 2015; T^2 keeps the soft term's gradient scale
independent of T). Both terms are computed as the trainer's full-softmax loss
(:func:`recloop.train.losses.chunked_cross_entropy`) is: in chunks of positions whose
[chunk, items] logits stay in cache, with the gradient formed in the same pass, so nothing ever
materialises a [tokens, items] matrix; one pass over the student's logits serves both terms.
The teacher is frozen (eval mode, no gradients); its item table is prepared once.

The student is any SASRec / HSTU config with the teacher's catalogue and window length; the
same student trained without the teacher is ``alpha = 0`` (:func:`distill` with ``alpha=0``
runs exactly the same loop and budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from recloop.compress.finetune import FitResult, fit
from recloop.config import TrainConfig
from recloop.data.dataset import SequenceDataset
from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder
from recloop.models.factory import build_model
from recloop.train.loop import Batch, LossFn
from recloop.train.losses import chunked_cross_entropy

INITS = ("scratch", "teacher")


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 1.0  # T: soft targets softmax(teacher logits / T)
    alpha: float = 0.5  # weight of the soft (teacher) term; 0 = the student trained alone
    chunk: int = 64  # positions per chunk of [chunk, items] logits
    # "scratch": the student starts from random weights. "teacher": it starts from the teacher's
    # item table, positions and evenly spaced blocks (DistilBERT's initialisation; needs the
    # teacher's model type and dim; block tensors of other shapes keep their own
    # initialisation), then learns the soft targets.
    init: str = "scratch"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ConfigError(f"distill.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if isinstance(self.temperature, bool) or not self.temperature > 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature!r}")
        if isinstance(self.alpha, bool) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {self.alpha!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise ConfigError(f"distill.chunk must be a positive integer, got {self.chunk!r}")


class _ChunkedDistillation(torch.autograd.Function):
    """sum_t (1 - alpha) CE(s_t, y_t) + alpha T^2 KL(softmax(u_t / T) || softmax(s_t / T)),
    with student logits s = query @ table.T and teacher logits u = teacher_query @
    teacher_table.T (no gradient), in chunks of positions.

    d loss / d s = (1 - alpha) (softmax(s) - onehot(y)) + alpha T (softmax(s / T) - p_teacher)
    is known as soon as a chunk's logits are, so the gradients of query and table are formed in
    the same pass, as in the trainer's chunked cross-entropy: the student's [chunk, items]
    logits are computed once for both terms (4 matmuls per chunk instead of 3 + 4).
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        table: torch.Tensor,
        targets: torch.Tensor,
        teacher_query: torch.Tensor,
        teacher_table: torch.Tensor,
        alpha: float,
        temperature: float,
        chunk: int,
    ) -> torch.Tensor:
        grad_query = torch.empty_like(query)  # [T, D]
        grad_table = torch.zeros_like(table)  # [I, D]
        total = torch.zeros((), dtype=query.dtype, device=query.device)
        t = temperature
        with torch.autocast(query.device.type, enabled=False):
            for start in range(0, len(query), chunk):
                q = query[start : start + chunk]  # [c, D]
                y = targets[start : start + chunk]  # [c]
                rows = torch.arange(len(y), device=y.device)
                logits = q @ table.T  # [c, I]
                log_q = torch.log_softmax(logits, dim=1)  # [c, I]
                grad_logits = log_q.exp() * (1.0 - alpha)  # [c, I]
                grad_logits[rows, y] -= 1.0 - alpha
                total += -(1.0 - alpha) * log_q[rows, y].sum()
                if alpha > 0.0:
                    teacher = teacher_query[start : start + chunk] @ teacher_table.T  # [c, I]
                    log_p = torch.log_softmax(teacher / t, dim=1)  # [c, I]
                    log_q_t = log_q if t == 1.0 else torch.log_softmax(logits / t, dim=1)
                    p = log_p.exp()
                    total += alpha * t * t * (p * (log_p - log_q_t)).sum()
                    grad_logits += (alpha * t) * (log_q_t.exp() - p)
                grad_query[start : start + chunk] = grad_logits @ table
                grad_table.addmm_(grad_logits.T, q)
        ctx.save_for_backward(grad_query, grad_table)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_query, grad_table = ctx.saved_tensors
        return grad_query * grad_output, grad_table * grad_output, *([None] * 6)


def chunked_distillation_loss(
    query: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    teacher_query: torch.Tensor,
    teacher_table: torch.Tensor,
    config: DistillConfig,
) -> torch.Tensor:
    """The summed distillation loss of positions: student query [T, D] against table [I, D]
    (targets [T] index its rows), teacher query [T, Dt] against teacher table [I, Dt]."""
    loss: torch.Tensor = _ChunkedDistillation.apply(  # type: ignore[no-untyped-call]
        query,
        table,
        targets,
        teacher_query.detach(),
        teacher_table.detach(),
        config.alpha,
        config.temperature,
        config.chunk,
    )
    return loss


def distillation_loss(teacher: SequentialEncoder, config: DistillConfig) -> LossFn:
    """The per-batch loss of :func:`fit` for a student of `teacher` (see the module docstring);
    with alpha 0 it is the trainer's full-softmax next-item loss itself."""
    teacher.eval()
    with torch.no_grad():
        teacher_table = teacher.item_embedding.output_table()[1:].float()  # [I, Dt]

    def loss(
        student: SequentialEncoder, hidden: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        targets = batch["target_ids"]  # [B, Lq]: the last Lq positions (Lq = 1: prefixes)
        mask = targets > 0  # [B, Lq]
        last_only = targets.shape[1] == 1
        if not teacher.causal and bool(mask[:, :-1].any()):
            raise ConfigError(
                f"the teacher ({type(teacher).__name__}) is not causal: its hidden state at an "
                "inner position has seen that position's target; distil with "
                "train.samples = 'prefixes'"
            )
        tokens = mask.sum()
        embedding = student.item_embedding
        query = embedding.prepare_query(hidden[mask]).float()  # [T, D]
        table = embedding.output_table()[1:].float()  # [I, D]
        if config.alpha == 0.0:
            return chunked_cross_entropy(query, table, targets[mask] - 1, config.chunk), tokens
        with torch.no_grad():
            teacher_hidden = teacher(batch["input_ids"], batch["timestamps"], last_only=last_only)[
                mask
            ]  # [T, Dt]
            teacher_query = teacher.item_embedding.prepare_query(teacher_hidden).float()
        total = chunked_distillation_loss(
            query, table, targets[mask] - 1, teacher_query, teacher_table, config
        )
        return total, tokens

    return loss


def build_student(teacher: SequentialEncoder, student_model: dict[str, Any]) -> SequentialEncoder:
    """A fresh student from a [model] table (type + config fields), with the teacher's catalogue
    and window length (which the student cannot change: it scores the same items)."""
    values = dict(student_model)
    model_type = values.pop("type", None)
    if not isinstance(model_type, str):
        raise ConfigError("the student [model] needs a type (sasrec, hstu or bsarec)")
    for fixed in ("num_items", "max_length"):
        ours = int(getattr(teacher.config, fixed))
        if fixed in values and values[fixed] != ours:
            raise ConfigError(
                f"student model.{fixed}={values[fixed]!r} differs from the teacher's {ours}: "
                "a student scores the teacher's catalogue with its window length"
            )
        values[fixed] = ours
    if "compression" in values:
        raise ConfigError("a student starts as a plain model; compress it after distilling")
    return build_model(model_type, values)


def teacher_blocks(teacher_blocks: int, student_blocks: int) -> list[int]:
    """The teacher block each student block starts from: evenly spaced, the first one first
    (its input is the embeddings, as the student's first block's is)."""
    return [index * teacher_blocks // student_blocks for index in range(student_blocks)]


def inherit_teacher_weights(teacher: SequentialEncoder, student: SequentialEncoder) -> list[str]:
    """Copies into `student` the teacher's weights: every tensor outside the blocks (item table,
    positions), which must have the teacher's shapes, and for student block j the tensors of
    teacher block ``teacher_blocks(...)[j]`` whose shapes match (a wider or narrower student
    block keeps its own initialisation where they differ). Returns the student keys copied.
    Raises ConfigError, leaving the student unchanged, when the models differ in type or outside
    the blocks."""
    if type(teacher) is not type(student):
        raise ConfigError(
            f"distill.init = 'teacher' needs a student of the teacher's type "
            f"({type(teacher).__name__}), got {type(student).__name__}"
        )
    ours = student.state_dict()
    theirs = teacher.state_dict()
    source = teacher_blocks(
        len(getattr(teacher, "blocks")),  # noqa: B009  # SASRec / HSTU both have blocks
        len(getattr(student, "blocks")),  # noqa: B009
    )
    mapping: dict[str, str] = {}
    for key, tensor in ours.items():
        parts = key.split(".")
        in_block = parts[0] == "blocks"
        if in_block:
            parts[1] = str(source[int(parts[1])])
        name = ".".join(parts)
        if name in theirs and theirs[name].shape == tensor.shape:
            mapping[key] = name
        elif not in_block:
            shape = None if name not in theirs else tuple(theirs[name].shape)
            raise ConfigError(
                f"distill.init = 'teacher': the student's {key} {tuple(tensor.shape)} has no "
                f"teacher counterpart ({name}: {shape}); give the student the teacher's dim, "
                "or use distill.init = 'scratch'"
            )
    with torch.no_grad():
        for key, name in mapping.items():
            ours[key].copy_(theirs[name])
    return list(mapping)


def distill(
    teacher: SequentialEncoder,
    student: SequentialEncoder,
    dataset: SequenceDataset,
    train: TrainConfig,
    config: DistillConfig,
    *,
    show_progress: bool = True,
) -> FitResult:
    """Trains `student` in place on the teacher's soft targets plus the true next items and
    leaves it with its best validation weights; `teacher` is not changed."""
    if int(teacher.item_embedding.num_items) != int(student.item_embedding.num_items):
        raise ConfigError(
            f"student has {student.item_embedding.num_items} items, teacher "
            f"{teacher.item_embedding.num_items}: they must share the catalogue"
        )
    return fit(
        student,
        dataset,
        train,
        loss=distillation_loss(teacher, config),
        description="distill" if config.alpha > 0 else "student alone",
        show_progress=show_progress,
    )
