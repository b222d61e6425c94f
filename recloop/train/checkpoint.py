"""Training checkpoints for exact resume: safetensors for tensors, JSON for the rest.

A checkpoint is a directory `RUN/checkpoints/step-000123/` holding model.safetensors,
optimizer.safetensors (AdamW moments, flattened), rng.safetensors, average.safetensors (the
weight average, when `train.ema_decay` keeps one) and state.json (step, epoch, batch position,
early-stopping state, param-group hyper-parameters, config). `RUN/LATEST`
names the newest complete one and is replaced atomically, so a crash while saving leaves the
previous checkpoint in force. No pickle: nothing here can execute code when loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recloop.errors import ConfigError

LATEST = "LATEST"
# What a resume reads from state.json (besides the optimizer's param_groups).
_STATE_KEYS = (
    "step",
    "epoch",
    "batch_in_epoch",
    "best_value",
    "best_step",
    "evals_since_best",
    "best_metrics",
    "history",
    "param_groups",
)
AVERAGE = "average.safetensors"  # the weight average (train.ema_decay), when the run keeps one


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    average: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Writes a checkpoint (and `average`, the weight average's tensors, when given)."""
    step = int(state["step"])
    root = run_dir / "checkpoints"
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(model.state_dict()), str(tmp / "model.safetensors"))
    tensors, groups = flatten_optimizer(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    save_file(rng_state(), str(tmp / "rng.safetensors"))
    if average is not None:
        save_file(_contiguous(average), str(tmp / AVERAGE))
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    pointer = run_dir / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, run_dir / LATEST)
    for old in sorted(root.glob("step-*"))[:-keep]:  # zero-padded names sort by step
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{pointer}: cannot read the checkpoint pointer ({exc})") from exc
    path = run_dir / "checkpoints" / name
    return path if name and path.is_dir() else None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restores model, optimizer and RNG in place; returns state.json. A checkpoint that is
    missing a file, truncated or corrupt is a ConfigError naming it (and nothing is restored
    from a state.json without the keys a resume reads)."""
    try:
        state: dict[str, Any] = json.loads((path / "state.json").read_text(encoding="utf-8"))
        missing_keys = [key for key in _STATE_KEYS if key not in state]
        if missing_keys:
            raise ConfigError(f"{path / 'state.json'}: no {', '.join(missing_keys)}")
        weights = load_file(str(path / "model.safetensors"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{path}: checkpoint does not fit this model "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), state)
        restore_rng(load_file(str(path / "rng.safetensors")))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        # ValueError includes bad JSON and bytes that are not UTF-8.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: cannot resume from this checkpoint ({reason})") from exc
    return state


def load_average(path: Path) -> dict[str, torch.Tensor]:
    """The weight average a checkpoint holds; a ConfigError when it has none (a run resumed
    with train.ema_decay that was started without it)."""
    file = path / AVERAGE
    if not file.is_file():
        raise ConfigError(
            f"{path}: checkpoint has no weight average; resume with the train.ema_decay the "
            "run started with"
        )
    try:
        return load_file(str(file))
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{file}: cannot read the weight average ({exc})") from exc


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def flatten_optimizer(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    packed = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, entry in packed["state"].items():
        for key, value in entry.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{index}.{key}"] = tensor.detach().contiguous().cpu()
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
        for group in packed["param_groups"]
    ]
    return tensors, groups


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = tensor
    groups = []
    for group in state["param_groups"]:
        groups.append({k: (tuple(v) if k == "betas" else v) for k, v in group.items()})
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def rng_state() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
