"""Quality is not lost by sharding: Beauty's SASRec config with its item table sharded
row-wise, 1 process against 2 (torchrun, gloo), the same config and global batch.

Both runs use `configs/beauty/sasrec.toml` unchanged except `train.sharding = "row_wise"`
and a step budget (`--steps`, the same for both, so the comparison does not depend on the
machine's speed); `--unsharded` adds the plain (replicated, AdamW-trained table) 1-process run
of the same budget for reference. Writes bench/results/sharded-quality-beauty.json.

    .venv/bin/python bench/sharded_quality.py --steps 1000
    .venv/bin/python bench/sharded_quality.py --table
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, SHARED_DATA, write_result

NAME = "sharded-quality-beauty"
CONFIG = REPO / "configs" / "beauty" / "sasrec.toml"
RECLOOP = ["-m", "recloop.cli"]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(command: list[str], log: Path) -> None:
    print("$", " ".join(command), flush=True)
    with open(log, "a") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}); see {log}")


def train_once(
    data: Path, work: Path, processes: int, overrides: list[str], log: Path
) -> dict[str, Any]:
    """One `recloop train` under torchrun; its published manifest's metrics and training."""
    tag = f"{processes}p-" + ("sharded" if "train.sharding='row_wise'" in overrides else "plain")
    registry = work / f"registry-{tag}"
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                "--master_port", str(_port())]  # fmt: skip
    command = [
        *launcher, *RECLOOP, "train", "--config", str(CONFIG), "--data", str(data),
        "--registry", str(registry), "--run-dir", str(work / f"run-{tag}"),
        "--threads", str(2 // processes), *overrides,
    ]  # fmt: skip
    started = time.perf_counter()
    _run(command, log)
    manifest = json.loads(
        next((registry / "versions").glob("v*/manifest.json")).read_text(encoding="utf-8")
    )
    training = manifest["training"]
    return {
        "run": tag,
        "processes": processes,
        "overrides": overrides,
        "seconds": round(time.perf_counter() - started, 1),
        "steps": training["steps"],
        "best_step": training["best_step"],
        "tokens_per_second": training["tokens_per_second"],
        "valid": {k[6:]: v for k, v in manifest["metrics"].items() if k.startswith("valid/")},
        "test": {k[5:]: v for k, v in manifest["metrics"].items() if k.startswith("test/")},
        "sharding": training.get("sharding"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--unsharded", action="store_true", help="also the plain 1-process run")
    parser.add_argument("--table", action="store_true", help="print the last result")
    args = parser.parse_args()
    if args.table:
        print_table()
        return
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="sharded-quality-"))
    log = RESULTS / f"{NAME}.log"
    log.write_text("")
    data = work / "beauty"
    source = SHARED_DATA / "amazon-beauty-iclrec" / "Beauty.txt"
    _run([sys.executable, *RECLOOP, "prepare", "--format", "s3rec", "--input", str(source),
          "--out", str(data)], log)  # fmt: skip
    budget = [f"train.max_steps={args.steps}", f"train.eval_every_steps={args.eval_every}"]
    sharded = [*budget, "train.sharding='row_wise'"]
    runs = [train_once(data, work, 1, sharded, log), train_once(data, work, 2, sharded, log)]
    if args.unsharded:
        runs.append(train_once(data, work, 1, budget, log))
    one, two = runs[0]["valid"]["NDCG@10"], runs[1]["valid"]["NDCG@10"]
    results = {
        "runs": runs,
        "valid_ndcg10_relative_difference": round((two - one) / one, 4),
        "within_2_percent": abs(two - one) / one <= 0.02,
    }
    config = {"config": str(CONFIG.relative_to(REPO)), "steps": args.steps,
              "eval_every_steps": args.eval_every, "work": str(work)}  # fmt: skip
    print(f"wrote {write_result(NAME, config, results, started)}")
    print_table()


def print_table() -> None:
    payload = json.loads((RESULTS / f"{NAME}.json").read_text(encoding="utf-8"))
    print(f"From bench/results/{NAME}.json (commit {payload['commit'][:12]}, {payload['date']}).")
    print()
    print("| run | processes | steps | valid NDCG@10 | valid HR@10 | test NDCG@10 | test HR@10 "
          "| tokens/s | minutes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for run in payload["results"]["runs"]:
        valid, test = run["valid"], run["test"]
        print(
            f"| {run['run']} | {run['processes']} | {run['steps']} | {valid['NDCG@10']:.4f} "
            f"| {valid['HR@10']:.4f} | {test['NDCG@10']:.4f} | {test['HR@10']:.4f} "
            f"| {run['tokens_per_second']:,} | {run['seconds'] / 60:.1f} |"
        )
    difference = payload["results"]["valid_ndcg10_relative_difference"]
    print(f"\n2 processes vs 1, validation NDCG@10: {difference:+.2%} relative.")


if __name__ == "__main__":
    main()
