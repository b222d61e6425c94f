"""Scale-out of the item table: peak memory per rank, tokens/s and time per epoch for synthetic
catalogues (dim 64), 1 process vs 2 processes, replicated vs sharded (TorchRec, row-wise).

Each cell (catalogue size x processes x mode) runs bench/scale_worker.py in fresh processes
(torchrun for 2): SASRec (dim 64, 2 blocks, max length 50) trained for --warmup + --steps steps
on synthetic windows (item ids Zipf-distributed over the catalogue, every window full), a
global batch of --batch windows split over the ranks, sampled softmax with --negatives uniform
negatives: the same for every cell.

  replicated: nn.Embedding + AdamW, the whole model under DDP with 2 processes;
  sharded:    train.sharding = "row_wise" with fused row-wise Adagrad, the encoder under DDP.

Before a cell is launched its peak memory per rank is estimated (`estimate_per_rank`); a cell
whose ranks together would exceed FIT_FRACTION of this machine's memory is not launched and is
recorded as "does not fit" with its estimate. The largest catalogue the sharded 2-process run
fits by that estimate is added to the sizes (--no-largest leaves it out). Time per epoch is
derived, not run: an epoch is EVENTS_PER_ITEM events per catalogue item (it grows with the
catalogue), each event one target token, at the measured steady-state tokens/s.

On one machine the processes share its memory, so what lets the sharded run hold a larger
catalogue is that no rank holds the whole table with a dense gradient and AdamW's moments
(the fused row-wise Adagrad keeps one value per row); its 1-process cells show that part alone,
and its 2-process cells what splitting the rows over ranks adds (on two machines: twice the
memory).

    .venv/bin/python bench/scale.py                  # bench/results/scale.json + .png
    .venv/bin/python bench/scale.py --quick          # 10k and 100k items, a few steps
    .venv/bin/python bench/scale.py --sizes 1M --modes sharded --procs 2
    .venv/bin/python bench/scale.py --plan           # which cells would run, by the estimate
    .venv/bin/python bench/scale.py --table          # the markdown table, from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, write_result
from bench.scale_worker import DIM, MAX_LENGTH, MODEL
from recloop.train.sharding.spec import FP32, bytes_per_row

WORKER = Path(__file__).resolve().parent / "scale_worker.py"
GIB = 2**30
MODES = ("replicated", "sharded")
# The ranks of a cell together may use this fraction of the machine's memory (the rest is
# the OS, the torchrun parent and the estimate's error).
FIT_FRACTION = 0.85
# Per-rank memory that does not grow with the catalogue (interpreter, torch, TorchRec, the
# encoder, a step's activations), until a cell of the same mode and processes has measured it.
DEFAULT_BASE = int(0.75 * GIB)
EVENTS_PER_ITEM = 20  # the synthetic epoch: 20 events per catalogue item
SHARDED_MARGIN = 16  # bytes per row over the sharded table's steady state (see peak_bytes_per_row)

ESTIMATE_METHOD = (
    "peak bytes per rank = base + rows on the rank x peak bytes per row. Rows on the rank: "
    "the whole catalogue (+1 padding row) when replicated; catalogue / processes when sharded "
    "row-wise. Peak bytes per row (fp32, dim D): replicated = 4 x D x 4 steady "
    "(recloop.train.sharding.spec.bytes_per_row: weight, dense gradient, AdamW's two moments) "
    "+ D x 4 for the second dense gradient (the table is read twice, for the inputs and for "
    "the scored items, and autograd sums two [rows, D] gradients) + D x 4 for foreach AdamW's "
    "sqrt(v) temporary + D x 4 for DDP's gradient bucket (2 processes only); sharded = D x 4 "
    "+ 4 steady (weight and row-wise Adagrad's one value per row; the fused update leaves no "
    "gradient table) + 16 bytes of margin (a 40M-item run measured 267 bytes per row in all, "
    "with 1 process and with 2). base = the "
    "largest measured (peak RSS - rows x peak bytes per row) of the cells of the same mode and "
    f"processes run so far ({DEFAULT_BASE / GIB:.2f} GiB before any). A cell runs when "
    f"processes x estimate <= {FIT_FRACTION} x the machine's memory; each cell records its "
    "measured peak beside its estimate."
)


def peak_bytes_per_row(dim: int, mode: str, procs: int) -> int:
    """Bytes per table row at a rank's peak: the steady state (spec.bytes_per_row) plus the
    transients measured to come on top of it (see ESTIMATE_METHOD)."""
    if mode == "replicated":
        return bytes_per_row(dim, sharded=False) + dim * FP32 * (3 if procs > 1 else 2)
    # A small margin over the steady 4 x D + 4: scale.json at commit f6e0c8f measured 267 bytes
    # per row at 40M items, with 1 process and with 2.
    return bytes_per_row(dim, sharded=True, sparse_optimizer="rowwise_adagrad") + SHARDED_MARGIN


def rows_per_rank(items: int, mode: str, procs: int) -> int:
    rows = items + 1
    return rows if mode == "replicated" else -(-rows // procs)


def estimate_per_rank(items: int, mode: str, procs: int, base: int, dim: int = 64) -> int:
    return base + rows_per_rank(items, mode, procs) * peak_bytes_per_row(dim, mode, procs)


def largest_fitting(mode: str, procs: int, base: int, budget: int, dim: int = 64) -> int:
    """The largest catalogue whose estimate fits `budget` (all ranks), rounded down to two
    significant figures (0 when even the base does not fit)."""
    per_rank_rows = (budget // procs - base) // peak_bytes_per_row(dim, mode, procs)
    items = per_rank_rows * (procs if mode == "sharded" else 1) - 1
    if items <= 0:
        return 0
    unit = 10 ** max(len(str(items)) - 2, 0)
    return int(items // unit * unit)


def parse_size(text: str) -> int:
    """ "10k", "1M", "2.5M" or "250000" -> items."""
    scale = {"k": 10**3, "m": 10**6}.get(text[-1].lower(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise SystemExit(f"--sizes: {text!r} is not a size (e.g. 100k, 1M, 2.5M)") from None
    if value < 1:
        raise SystemExit(f"--sizes: {text!r} must be at least one item")
    return value


def memory_bytes(field: str) -> int:
    """MemTotal or MemAvailable from /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"/proc/meminfo has no {field}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(items: int, mode: str, procs: int, args: argparse.Namespace) -> dict[str, Any]:
    """Runs one cell; its per-rank reports, or an error."""
    threads = max(1, args.threads // procs)
    out = Path(tempfile.mkdtemp(prefix="recloop-scale-"))
    worker_args = [
        str(WORKER), "--items", str(items), "--mode", mode, "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--batch", str(args.batch), "--negatives",
        str(args.negatives), "--loss", args.loss, "--threads", str(threads), "--out", str(out),
    ]  # fmt: skip
    if procs == 1:
        command = [sys.executable, *worker_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}",
                   "--master-port", str(free_port()), *worker_args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        # Output goes straight through: the worker prints its progress.
        done = subprocess.run(command, env=env, timeout=args.cell_timeout, check=False)
        if done.returncode != 0:
            return {"status": "failed", "error": f"exit status {done.returncode}"}
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]
        return {"status": "ran", "ranks": ranks}
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {args.cell_timeout} s"}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def summarise(items: int, ranks: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per-rank memory, and the cell's throughput from the slowest rank's timed steps."""
    peaks = [r["memory_bytes"]["peak_rss"] for r in ranks]
    seconds = max(sum(r["step_seconds"]) for r in ranks)
    tokens = args.batch * MAX_LENGTH * args.steps
    tokens_per_s = tokens / seconds
    epoch_events = EVENTS_PER_ITEM * items
    return {
        "peak_rss_gib_per_rank": [round(p / GIB, 3) for p in peaks],
        "peak_rss_gib_max": round(max(peaks) / GIB, 3),
        "rss_after_setup_gib_per_rank": [
            round(r["memory_bytes"]["rss_after_setup"] / GIB, 3) for r in ranks
        ],
        "table_rows_per_rank": [r["table_rows_here"] for r in ranks],
        "threads_per_rank": ranks[0]["threads"],
        "setup_seconds": max(r["setup_seconds"] for r in ranks),
        "tokens_per_s": round(tokens_per_s, 1),
        "median_step_s": round(statistics.median(ranks[0]["step_seconds"]), 4),
        "epoch_events": epoch_events,
        "epoch_seconds": round(epoch_events / tokens_per_s, 1),
        "ranks": ranks,
    }


def run_cell(
    items: int, mode: str, procs: int, bases: dict[tuple[str, int], int], budget: int,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    base = bases.get((mode, procs), DEFAULT_BASE)
    estimate = estimate_per_rank(items, mode, procs, base)
    cell: dict[str, Any] = {
        "items": items,
        "mode": mode,
        "processes": procs,
        "estimate_gib_per_rank": round(estimate / GIB, 3),
        "estimate_gib_machine": round(procs * estimate / GIB, 3),
        "base_gib_used": round(base / GIB, 3),
        "peak_bytes_per_row": peak_bytes_per_row(DIM, mode, procs),
    }
    label = f"{mode} {procs}p {items:,} items"
    if procs * estimate > budget:
        print(f"{label}: does not fit (estimate {procs * estimate / GIB:.1f} GiB)", flush=True)
        return cell | {"status": "does not fit"}
    available = memory_bytes("MemAvailable")
    if procs * estimate > available - GIB:  # fits the machine, not what others leave of it now
        print(f"{label}: skipped, {available / GIB:.1f} GiB available now", flush=True)
        return cell | {"status": "skipped", "error": f"{available / GIB:.1f} GiB available"}
    print(f"{label}: estimate {estimate / GIB:.2f} GiB per rank, running", flush=True)
    launched = launch(items, mode, procs, args)
    if launched["status"] != "ran":
        print(f"{label}: {launched['error']}", flush=True)
        return cell | launched
    cell |= {"status": "ran", **summarise(items, launched["ranks"], args)}
    rows = rows_per_rank(items, mode, procs)
    measured_base = max(cell["ranks"][r]["memory_bytes"]["peak_rss"] for r in range(procs))
    measured_base -= rows * cell["peak_bytes_per_row"]
    bases[(mode, procs)] = max(bases.get((mode, procs), 0), measured_base)
    print(
        f"{label}: peak {cell['peak_rss_gib_max']:.2f} GiB per rank (estimate "
        f"{estimate / GIB:.2f}), {cell['tokens_per_s']:,.0f} tokens/s",
        flush=True,
    )
    return cell


def limits(bases: dict[tuple[str, int], int], budget: int, dim: int) -> dict[str, Any]:
    """Per mode and processes: bytes per row, the base used and the largest catalogue that
    fits this machine by the estimate."""
    found = {}
    for mode in MODES:
        for procs in (1, 2):
            base = bases.get((mode, procs), DEFAULT_BASE)
            found[f"{mode} {procs}p"] = {
                "steady_bytes_per_row": bytes_per_row(dim, sharded=mode == "sharded"),
                "peak_bytes_per_row": peak_bytes_per_row(dim, mode, procs),
                "base_gib": round(base / GIB, 3),
                "measured_base": (mode, procs) in bases,
                "largest_fitting_items": largest_fitting(mode, procs, base, budget, dim),
            }
    return found


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = payload["results"]["cells"]
    memory = payload["results"]["estimate"]["machine_memory_gib"]
    fig, (mem_ax, speed_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {("replicated", 1): "C3o-", ("replicated", 2): "C1s-",
              ("sharded", 1): "C0o-", ("sharded", 2): "C2s-"}  # fmt: skip
    for (mode, procs), style in styles.items():
        mine = sorted((c for c in cells if (c["mode"], c["processes"]) == (mode, procs)),
                      key=lambda c: c["items"])  # fmt: skip
        ran = [c for c in mine if c["status"] == "ran"]
        label = f"{mode}, {procs} process{'es' if procs > 1 else ''}"
        if ran:
            xs = [c["items"] for c in ran]
            mem_ax.plot(xs, [c["peak_rss_gib_max"] for c in ran], style, label=label)
            speed_ax.plot(xs, [c["tokens_per_s"] for c in ran], style, label=label)
        unfit = [c for c in mine if c["status"] == "does not fit"]
        if unfit:
            mem_ax.plot([c["items"] for c in unfit], [c["estimate_gib_per_rank"] for c in unfit],
                        style[:3], fillstyle="none", markersize=9, linestyle="none",
                        label=f"{label}: does not fit (estimate)")  # fmt: skip
    for level, text, style in ((memory, f"machine {memory:.1f} GiB", "--"),
                               (memory / 2, "its half: per rank of 2", ":")):  # fmt: skip
        mem_ax.axhline(level, color="k", linestyle=style, linewidth=1)
        mem_ax.annotate(text, (0.02, level), xycoords=("axes fraction", "data"), va="bottom")
    mem_ax.set(xscale="log", yscale="log", xlabel="catalogue (items, dim 64)",
               ylabel="peak RSS per rank (GiB)", title="memory")  # fmt: skip
    speed_ax.set(xscale="log", xlabel="catalogue (items, dim 64)",
                 ylabel="target tokens / s (all ranks)", title="throughput")  # fmt: skip
    mem_ax.legend(fontsize=7)
    speed_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _loss(config: dict[str, Any]) -> str:
    if config.get("loss") == "full_softmax":
        return "full softmax"
    return f"{config['negatives']} uniform negatives"


def table(path: Path) -> str:
    """The markdown table, from a result file this script wrote."""
    payload = json.loads(path.read_text())
    config, estimate = payload["config"], payload["results"]["estimate"]
    lines = [
        f"From `bench/results/{path.name}` (commit {payload['commit'][:12]}, {payload['date']}; "
        f"SASRec dim {DIM}, global batch {config['batch']} x {MAX_LENGTH}, "
        f"{_loss(config)}, {config['steps']} timed steps after "
        f"{config['warmup']} warm-up; epoch = {config['events_per_item']} events per item; "
        f"machine {estimate['machine_memory_gib']:.1f} GiB).",
        "",
        "| items | mode | processes | peak RSS per rank (GiB) | estimate per rank (GiB) "
        "| tokens/s | time per epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in sorted(payload["results"]["cells"], key=lambda c: (c["items"], c["mode"])):
        head = f"| {c['items']:,} | {c['mode']} | {c['processes']} |"
        if c["status"] == "ran":
            lines.append(
                f"{head} {c['peak_rss_gib_max']:.2f} | {c['estimate_gib_per_rank']:.2f} | "
                f"{c['tokens_per_s']:,.0f} | {duration(c['epoch_seconds'])} |"
            )
        else:
            why = c["status"] + (f" ({c['error']})" if "error" in c else "")
            lines.append(f"{head} {why} | {c['estimate_gib_per_rank']:.2f} | | |")
    lines += ["", "Largest catalogue that fits, by the estimate:", ""]
    for name, row in estimate["limits"].items():
        lines.append(
            f"- {name}: {row['largest_fitting_items']:,} items ({row['peak_bytes_per_row']} "
            f"bytes per row at peak, base {row['base_gib']:.2f} GiB per rank)"
        )
    return "\n".join(lines)


def print_plan(sizes: list[int], grid: list[tuple[str, int]], budget: int, largest: bool) -> None:
    """What a run would launch, by the estimate with the default base (nothing measured)."""
    if largest:
        sizes = sorted({*sizes, largest_fitting("sharded", 2, DEFAULT_BASE, budget, DIM)})
    print(f"budget {budget / GIB:.1f} GiB ({FIT_FRACTION} of the machine), base "
          f"{DEFAULT_BASE / GIB:.2f} GiB per rank before any cell measures it")  # fmt: skip
    for items in sizes:
        for mode, procs in grid:
            machine = procs * estimate_per_rank(items, mode, procs, DEFAULT_BASE)
            verdict = "runs" if machine <= budget else "does not fit"
            print(f"{items:>12,} {mode:>10} {procs}p: {machine / GIB:6.1f} GiB, {verdict}")


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,10M", help="catalogues, e.g. 100k,1M,10M")
    parser.add_argument("--no-largest", action="store_true", help="not the largest that fits")
    parser.add_argument("--modes", default=",".join(MODES), help="replicated,sharded")
    parser.add_argument("--procs", default="1,2", help="process counts, e.g. 1,2")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per cell")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128, help="global windows per step")
    parser.add_argument("--negatives", type=int, default=512)
    parser.add_argument(
        "--loss",
        choices=("sampled_softmax", "full_softmax"),
        default="sampled_softmax",
        help="full_softmax: how the sharded full softmax's cost grows (FULL_SOFTMAX_MAX_ITEMS)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="per cell")
    parser.add_argument("--cell-timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--quick", action="store_true", help="10k and 100k items, 5 steps")
    parser.add_argument("--name", default=None, help="bench/results/NAME.json")
    parser.add_argument("--table", action="store_true", help="print the table from the JSON")
    parser.add_argument("--plan", action="store_true", help="print the estimates, run nothing")
    args = parser.parse_args()
    name = args.name or ("scale-quick" if args.quick else "scale")
    if args.table:
        print(table(RESULTS / f"{name}.json"))
        return
    if args.quick:
        args.sizes, args.steps, args.warmup, args.no_largest = "10k,100k", 5, 2, True
    modes = [m for m in args.modes.split(",") if m]
    procs_list = sorted({int(p) for p in args.procs.split(",") if p})
    if not set(modes) <= set(MODES) or not set(procs_list) <= {1, 2}:
        parser.error("--modes takes replicated,sharded and --procs takes 1,2")
    if args.batch % max(procs_list) or min(args.steps, args.batch, args.negatives) < 1:
        parser.error("--batch must divide by the processes; --steps, --negatives >= 1")
    sizes = sorted({parse_size(s) for s in args.sizes.split(",") if s})
    started = time.perf_counter()
    total = memory_bytes("MemTotal")
    budget = int(FIT_FRACTION * total)
    bases: dict[tuple[str, int], int] = {}
    cells: list[dict[str, Any]] = []
    config = {
        "model": {"type": "sasrec", **MODEL},
        "batch": args.batch,
        "negatives": args.negatives,
        "loss": args.loss,
        "negative_sampling": "uniform, shared by the rank's batch (sampled softmax, log-q)",
        "steps": args.steps,
        "warmup": args.warmup,
        "threads_per_cell": args.threads,
        "data": "synthetic: full windows of 51 ids, Zipf (exponent 1) over the catalogue, "
        "popularity ranks scattered over the ids",
        "events_per_item": EVENTS_PER_ITEM,
        "epoch": f"{EVENTS_PER_ITEM} x items events (target tokens), derived from tokens/s",
        "replicated": "nn.Embedding + foreach AdamW (lr 1e-3), DDP over the model (2 processes)",
        "sharded": "row_wise ShardedItemTable, fused row-wise Adagrad (sparse_lr 0.05), "
        "encoder AdamW under DDP (2 processes)",
        "sharding_versions": {p: _version(p) for p in ("torchrec", "fbgemm-gpu-cpu")},
    }

    def save() -> Path:
        estimate = {
            "method": ESTIMATE_METHOD,
            "machine_memory_gib": round(total / GIB, 2),
            "fit_fraction": FIT_FRACTION,
            "budget_gib": round(budget / GIB, 2),
            "limits": limits(bases, budget, DIM),
        }
        return write_result(name, config, {"estimate": estimate, "cells": cells}, started)

    grid = [(mode, procs) for mode in modes for procs in procs_list]
    if args.plan:
        print_plan(sizes, grid, budget, not args.no_largest)
        return
    for items in sizes:
        for mode, procs in grid:
            cells.append(run_cell(items, mode, procs, bases, budget, args))
            save()  # a long run keeps what it has measured if a later cell dies
    if not args.no_largest:
        base = bases.get(("sharded", 2), DEFAULT_BASE)
        largest = largest_fitting("sharded", 2, base, budget, DIM)
        print(f"largest catalogue the sharded 2-process run fits: {largest:,} items", flush=True)
        if largest > 0 and largest not in sizes:
            for mode, procs in grid:
                cells.append(run_cell(largest, mode, procs, bases, budget, args))
                save()
    path = save()
    plot(json.loads(path.read_text()), RESULTS / f"{name}.png")
    print(table(path))
    print(f"wrote {path} and {RESULTS / (name + '.png')}")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


if __name__ == "__main__":
    main()
