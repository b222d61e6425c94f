"""Training throughput: target tokens/s (forward + backward + AdamW step) for SASRec, HSTU and
BSARec (on prefix samples, as it trains), eager vs torch.compile, fp32 vs bf16 autocast,
1 process vs 2-process DDP (gloo), with model FLOPs per token and the implied fraction of this
CPU's fp32 peak.

Data: Amazon Beauty from ../shared/data when present (its real, short sequences), otherwise a
synthetic log of the same size. Batches are built exactly as `recloop train` builds them
(length buckets, padding trimmed). Compiled rows wrap the model in `torch.compile` here, with
batches padded to a few fixed widths (`pad_to_width`): `train.compile` was removed from the
config because these rows measured slower than eager on CPU, and they are how to re-check
that. Each configuration runs in a fresh process: `warmup` steps (compilation included) are
discarded, then the rate over `steps` timed steps is reported (and
`median_step_tokens_per_second`, the median of the per-step rates).

    .venv/bin/python bench/train_speed.py              # bench/results/train_speed.json + .png
    .venv/bin/python bench/train_speed.py --quick      # fewer steps and configurations
    .venv/bin/python bench/train_speed.py --table      # the README's table, from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, SHARED_DATA, machine, write_result

MODELS: dict[str, dict[str, Any]] = {
    "sasrec": {"type": "sasrec", "dim": 64, "num_blocks": 2, "num_heads": 1, "dropout": 0.5},
    "hstu": {"type": "hstu", "dim": 64, "num_blocks": 2, "num_heads": 2, "dropout": 0.5},
    "hstu-large": {"type": "hstu", "dim": 128, "num_blocks": 4, "num_heads": 4, "dropout": 0.5},
    # configs/beauty/bsarec.toml: not causal, so it trains on every prefix (one target each).
    "bsarec": {
        "type": "bsarec",
        "dim": 64,
        "num_blocks": 2,
        "num_heads": 1,
        "dropout": 0.5,
        "attention_dropout": 0.5,
        "alpha": 0.7,
        "c": 5,
    },
}


def dataset_dir(tmp: Path) -> tuple[Path, str]:
    from recloop.data.prepare import FileSource, prepare, prepare_file, with_source_order

    beauty = SHARED_DATA / "amazon-beauty-iclrec" / "Beauty.txt"
    out = tmp / "data"
    if beauty.is_file():
        prepare_file(FileSource(beauty, "s3rec"), out)
        return out, "amazon-beauty"
    from recloop.data.synthetic import SyntheticConfig, generate_events

    config = SyntheticConfig(num_users=22_363, num_items=12_101, mean_length=8.9, seed=0)
    prepare(with_source_order(generate_events(config)), {"kind": "synthetic"}, out)
    return out, "synthetic (Beauty-sized)"


def worker(args: argparse.Namespace) -> None:
    """One configuration in this process (or this torchrun rank): prints a JSON line."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from recloop.config import TrainConfig
    from recloop.data.batches import TrainingWindows, WindowConfig, make_loader, trim_left_padding
    from recloop.data.dataset import SequenceDataset
    from recloop.models.factory import build_model
    from recloop.train.distributed import all_reduce_sum, init_distributed, shutdown
    from recloop.train.losses import next_item_loss

    if args.torch_dropout:  # ablation: torch's own dropout, whose CPU mask is bernoulli_
        import importlib

        for name in ("dropout", "sasrec", "hstu"):
            importlib.import_module(f"recloop.models.{name}").dropout = F.dropout
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    dataset = SequenceDataset(Path(args.data))
    split = dataset.leave_one_out()
    cfg = TrainConfig(batch_size=args.batch_size, max_length=50, bf16=args.bf16)
    model_config = {k: v for k, v in MODELS[args.model].items() if k != "type"}
    model = build_model(
        MODELS[args.model]["type"],
        {**model_config, "num_items": dataset.num_items, "max_length": cfg.max_length},
    )
    # A non-causal model trains on every prefix, scored at its last position only (the
    # trainer's train.samples = "prefixes"); `--all-positions` is the ablation that computes
    # every position of the last block anyway.
    prefixes = not model.causal
    last_only = prefixes and not args.all_positions
    windows = TrainingWindows(split.train, WindowConfig(cfg.max_length, prefixes=prefixes))
    loader = make_loader(
        windows,
        cfg.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        drop_last=True,
        bucket_by_length=not args.no_bucketing,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward: torch.nn.Module = DistributedDataParallel(model) if ctx.distributed else model
    if args.compile:
        # One static graph per padded width (compiled during warm-up); without this, dynamo
        # switches to a dynamic-shape graph after the second width and recompiles later.
        torch._dynamo.config.automatic_dynamic_shapes = False
        forward = torch.compile(forward)  # type: ignore[assignment]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    widths = (*COMPILE_WIDTHS, cfg.max_length)
    timings: list[tuple[float, int]] = []
    positions = 0  # input positions the encoder saw (prefix training: many per target)
    batches = iter(loader)
    # A compiled model gets one warm-up step per padded width, so no compilation is timed.
    warmup = args.warmup + (len([w for w in widths if w <= cfg.max_length]) if args.compile else 0)
    for step in range(warmup + args.steps):
        batch = next(batches)
        if not args.no_bucketing:
            batch = trim_left_padding(batch)
        if args.compile:
            if step < warmup - args.warmup:  # each width in turn, exactly
                width = sorted(w for w in widths if w <= cfg.max_length)[step]
                batch = {k: v[:, -width:] if v.dim() == 2 else v for k, v in batch.items()}
                batch = pad_to_width(batch, (width,))
            else:
                batch = pad_to_width(batch, widths)
        if last_only:
            batch = {**batch, "target_ids": batch["target_ids"][:, -1:]}
        tick = time.perf_counter()
        with autocast:
            hidden = forward(batch["input_ids"], batch["timestamps"], last_only=last_only)
            if args.reference_loss:  # the textbook path the fused loss replaced
                mask = batch["target_ids"] > 0
                logits = model.score(hidden[mask]).float()
                loss_sum = F.cross_entropy(logits, batch["target_ids"][mask], reduction="sum")
                tokens = mask.sum()
            else:
                loss_sum, tokens = next_item_loss(
                    model, hidden, batch["target_ids"], cfg, dataset.num_items, batch["input_ids"]
                )
        total = all_reduce_sum(tokens.detach().clone().float(), ctx)
        loss = loss_sum * ctx.world_size / total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            timings.append((time.perf_counter() - tick, int(total.item())))
            positions += int(batch["input_ids"].numel()) * ctx.world_size
    seconds = sum(t for t, _ in timings)
    tokens_total = sum(n for _, n in timings)
    per_step = [n / t for t, n in timings]
    if ctx.is_main:
        parameters = sum(p.numel() for p in model.parameters())
        print(
            json.dumps(
                {
                    "tokens_per_second": tokens_total / seconds,
                    "median_step_tokens_per_second": statistics.median(per_step),
                    "tokens_per_step": tokens_total / len(timings),
                    "parameters": parameters,
                    "flops_per_token": flops_per_token(
                        model, dataset.num_items, positions / tokens_total if prefixes else 1.0
                    ),
                    "positions_per_target": positions / tokens_total,
                }
            )
        )
    shutdown(ctx)


# Widths a compiled model is shown (plus max_length): a handful of static shapes, one compilation
# each, instead of one per batch width. Only this benchmark compiles: `train.compile` was removed
# from the config because these rows measured slower than eager on CPU.
COMPILE_WIDTHS = (8, 16, 32, 64, 128, 256, 512)


def pad_to_width(batch: dict[str, Any], widths: Sequence[int] = COMPILE_WIDTHS) -> dict[str, Any]:
    """Left-pads a trimmed batch to the smallest of `widths` that holds it (or keeps it as is
    if none does), so a compiled model sees a handful of shapes instead of one per width."""
    import torch.nn.functional as F

    from recloop.data.sequences import PADDING_ID

    width = batch["input_ids"].shape[1]
    target = next((w for w in sorted(widths) if w >= width), width)
    if target == width:
        return batch
    return {
        k: F.pad(v, (target - width, 0), value=PADDING_ID) if v.dim() == 2 else v
        for k, v in batch.items()
    }


def flops_per_token(model: Any, num_items: int, positions: float = 1.0) -> float:
    """Training FLOPs per target token: 6 x (multiply-adds of the dense layers per position x
    `positions` per target + the full-softmax output layer, D x I). Attention score FLOPs are
    left out (they depend on each batch's width; at Beauty's short sequences they are a few
    percent). Prefix training runs the encoder over a whole prefix per target; its last block
    computes one position of it, so there the count is an upper bound."""
    import torch

    dense = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    dim = model.item_embedding.dim
    return 6.0 * (dense * positions + dim * num_items)


def run_config(
    data: Path,
    model: str,
    *,
    compiled: bool,
    bf16: bool,
    procs: int,
    steps: int,
    warmup: int,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    args = ["--worker", "--data", str(data), "--model", model, "--steps", str(steps)]
    args += ["--warmup", str(warmup), *extra]
    if compiled:
        args.append("--compile")
    if bf16:
        args.append("--bf16")
    env = {**os.environ}
    if procs == 1:
        command = [sys.executable, __file__, *args]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // procs))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={procs}",
            "--master_port",
            str(_free_port()),
            __file__,
            *args,
        ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_fp32_flops() -> float:
    """2 AVX-512 FMA units x 16 fp32 lanes x 2 FLOPs per cycle per core, at the nominal clock."""
    mhz = 0.0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            mhz = float(line.split(":")[1])
            break
    return (os.cpu_count() or 1) * 2 * 16 * 2 * mhz * 1e6


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "tokens_per_second" in r]
    labels = [r["label"] for r in ok]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(ok) + 1.2))
    ax.barh(labels, [r["tokens_per_second"] for r in ok])
    ax.set_xlabel("target tokens / s (forward + backward + AdamW)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(path: Path) -> str:
    """The README's table, from a result file this script wrote."""
    payload = json.loads(path.read_text())
    config = payload["config"]
    lines = [
        f"From `bench/results/{path.name}` (commit {payload['commit'][:12]}, {payload['date']}; "
        f"{config['data']}, batch {config['batch_size']}, {config['steps']} timed steps "
        f"after {config['warmup']} warm-up; fp32 peak {config['peak_fp32_gflops']} GFLOP/s).",
        "",
        "| configuration | target tokens/s | MFLOP / token | input positions / target "
        "| fraction of fp32 peak |",
        "|---|---|---|---|---|",
    ]
    for row in payload["results"]:
        if "tokens_per_second" not in row:
            lines.append(f"| {row['label']} | failed: {row['error']} | | | |")
            continue
        positions = row.get("positions_per_target")
        lines.append(
            f"| {row['label']} | {row['tokens_per_second']:,.0f} | "
            f"{row['flops_per_token'] / 1e6:.2f} | "
            f"{'' if positions is None else f'{positions:.1f}'} | "
            f"{row['fraction_of_fp32_peak']:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data")
    parser.add_argument("--model", default="sasrec", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--compile", action="store_true", help="wrap the model in torch.compile (bench only)"
    )
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the table from the JSON")
    parser.add_argument("--no-bucketing", action="store_true", help="full-width batches")
    parser.add_argument("--reference-loss", action="store_true", help="F.cross_entropy")
    parser.add_argument("--torch-dropout", action="store_true", help="bernoulli_ masks")
    parser.add_argument("--all-positions", action="store_true", help="prefixes: no last_only")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.table:
        print(table(RESULTS / "train_speed.json"))
        return

    started = time.perf_counter()
    steps, warmup = (10, 3) if args.quick else (args.steps, args.warmup)
    # Eager: every model, fp32/bf16, 1 process/2-process DDP. Compiled: the two base models in
    # one process (compilation takes a minute per configuration on this CPU).
    matrix: list[tuple[str, bool, bool, int, tuple[str, ...]]] = [
        (model, compiled, bf16, procs, ())
        for model in ("sasrec", "hstu", "hstu-large", "bsarec")
        for compiled in (False, True)
        for bf16 in (False, True)
        for procs in (1, 2)
        if not (compiled and (procs == 2 or model in ("hstu-large", "bsarec")))
        and not (args.quick and (compiled or procs == 2 or model == "hstu-large"))
    ]
    # Ablations of what profiling removed: full-width batches, then also the textbook loss;
    # torch's bernoulli_ dropout masks; BSARec's last block at every position of a prefix.
    matrix += [
        ("sasrec", False, False, 1, ("--no-bucketing",)),
        ("sasrec", False, False, 1, ("--no-bucketing", "--reference-loss")),
        ("sasrec", False, False, 1, ("--torch-dropout",)),
        ("bsarec", False, False, 1, ("--torch-dropout",)),
        ("bsarec", False, False, 1, ("--all-positions",)),
        ("bsarec", False, False, 1, ("--torch-dropout", "--all-positions")),
    ]
    peak = peak_fp32_flops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data, data_name = dataset_dir(Path(tmp))
        for model, compiled, bf16, procs, extra in matrix:
            label = (
                f"{model} {'compiled' if compiled else 'eager'} {'bf16' if bf16 else 'fp32'} "
                f"{procs}p {' '.join(extra)}"
            ).strip()
            result = run_config(
                data,
                model,
                compiled=compiled,
                bf16=bf16,
                procs=procs,
                steps=steps,
                warmup=warmup,
                extra=extra,
            )
            row = {"label": label, "model": model, "compiled": compiled, "bf16": bf16}
            row["ablation"] = list(extra)
            row |= {"processes": procs, **result}
            if "tokens_per_second" in result:
                row["fraction_of_fp32_peak"] = (
                    result["tokens_per_second"] * result["flops_per_token"] / peak
                )
                print(
                    f"{label:<32} {result['tokens_per_second']:>10,.0f} tokens/s  "
                    f"{result['flops_per_token'] / 1e6:6.2f} MFLOP/token  "
                    f"{row['fraction_of_fp32_peak']:6.1%} of fp32 peak",
                    flush=True,
                )
            else:
                print(f"{label:<32} failed: {result['error']}", flush=True)
            rows.append(row)
    name = "train_speed-quick" if args.quick else "train_speed"
    config = {
        "data": data_name,
        "batch_size": args.batch_size,
        "max_length": 50,
        "steps": steps,
        "warmup": warmup,
        "models": MODELS,
        "peak_fp32_gflops": round(peak / 1e9, 1),
        "cpu": machine()["cpu"],
    }
    path = write_result(name, config, rows, started)
    plot(rows, RESULTS / f"{name}.png")
    print(f"wrote {path} and {RESULTS / (name + '.png')}")


if __name__ == "__main__":
    main()
