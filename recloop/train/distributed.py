"""Data-parallel context from torchrun's environment: gloo on CPU, NCCL on CUDA.

Without torchrun (no WORLD_SIZE in the environment) everything runs as one process and the
collective helpers below are no-ops, so the training loop has a single code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and joins the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def all_reduce_sum(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Sum over processes, in place; returns the tensor."""
    if context.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agree(flag: bool, context: DistContext) -> bool:
    """Rank 0's decision, on every rank (stopping must be collective or DDP deadlocks)."""
    if not context.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if context.device.type == "cuda":
        value = value.to(context.device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def shutdown(context: DistContext) -> None:
    """Leaves the default group together: a process that destroys it (and exits) while another
    still tears down a subgroup over it can make gloo abort that one ("terminate called
    without an active exception", seen in tests/test_sharded.py), so all wait first."""
    if context.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
