"""Recommendation quality on the public datasets, with the protocols of ../shared/BENCHMARKS.md.

Each experiment prepares its dataset from ../shared/data, trains a frozen config from
`configs/` under a wall-clock budget with `recloop train` (exactly as a user runs it), then
evaluates the published version with `recloop eval`: full ranking (history masked and
unmasked) and, where the paper compares that way, sampled-100. Each experiment writes
`bench/results/quality-<name>.json`; `--table` prints all of them next to the published numbers.

    .venv/bin/python bench/quality.py --only beauty-sasrec beauty-hstu
    .venv/bin/python bench/quality.py --table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, SHARED_DATA, write_result

RECLOOP = [sys.executable, "-m", "recloop.cli"]


@dataclass(frozen=True)
class Experiment:
    dataset: str
    source: str  # path under ../shared/data
    format: str
    config: str  # path under configs/
    minutes: float
    protocols: tuple[str, ...] = ("full",)
    prepare_args: tuple[str, ...] = ()
    overrides: tuple[str, ...] = field(default_factory=tuple)


def beauty(config: str) -> Experiment:
    """Amazon Beauty (S3-Rec format), full ranking, 20-minute budget."""
    return Experiment("amazon-beauty", "amazon-beauty-iclrec/Beauty.txt", "s3rec", config, 20)


def beauty_with_attributes(config: str) -> Experiment:
    """Amazon Beauty prepared with its item attributes (brand, categories; S3-Rec's file)."""
    attributes = SHARED_DATA / "amazon-beauty-iclrec/Beauty_item2attributes.json"
    return replace(beauty(config), prepare_args=("--item-attributes", str(attributes)))


def video(config: str) -> Experiment:
    """Amazon Video Games (SASRec format), full ranking and the paper's sampled-100, 15 minutes."""
    return Experiment(
        "amazon-video",
        "amazon-video-sasrec/Video.txt",
        "sasrec",
        config,
        15,
        protocols=("full", "sampled100"),
        prepare_args=("--min-user-events", "1"),
    )


EXPERIMENTS: dict[str, Experiment] = {
    "beauty-sasrec": beauty("beauty/sasrec.toml"),
    "beauty-hstu": beauty("beauty/hstu.toml"),
    "beauty-hstu-large": beauty("beauty/hstu-large.toml"),
    "beauty-hstu-large-cosine": beauty("beauty/hstu-large-cosine.toml"),
    "beauty-hstu-large-attributes": beauty_with_attributes("beauty/hstu-large-attributes.toml"),
    "beauty-bsarec": beauty("beauty/bsarec.toml"),
    "beauty-bsarec-cosine": beauty("beauty/bsarec-cosine.toml"),
    "beauty-bsarec-cosine-logits": beauty("beauty/bsarec-cosine-logits.toml"),
    "beauty-bsarec-wide": beauty("beauty/bsarec-wide.toml"),
    "beauty-bsarec-ema": beauty("beauty/bsarec-ema.toml"),
    # The weight-averaged config with another seed: how far one run's test score moves.
    "beauty-bsarec-ema-seed43": replace(
        beauty("beauty/bsarec-ema.toml"), overrides=("train.seed=43",)
    ),
    "beauty-bsarec-ema-noclip": beauty("beauty/bsarec-ema-noclip.toml"),
    "beauty-bsarec-ema-slow": beauty("beauty/bsarec-ema-slow.toml"),
    "beauty-bsarec-ema-masked": beauty("beauty/bsarec-ema-masked.toml"),
    "beauty-bsarec-ema-attributes": beauty_with_attributes("beauty/bsarec-ema-attributes.toml"),
    "beauty-bsarec-ema-attributes-seed43": replace(
        beauty_with_attributes("beauty/bsarec-ema-attributes.toml"), overrides=("train.seed=43",)
    ),
    "beauty-bsarec-ema-attributes-slow": beauty_with_attributes(
        "beauty/bsarec-ema-attributes-slow.toml"
    ),
    # The best Beauty config again with another seed: how far one run's test score moves.
    "beauty-bsarec-seed43": replace(beauty("beauty/bsarec.toml"), overrides=("train.seed=43",)),
    "video-sasrec": video("video/sasrec.toml"),
    "video-sasrec-fast": video("video/sasrec-fast.toml"),
    "video-sasrec-bce": video("video/sasrec-bce.toml"),
    "video-sasrec-sampled": video("video/sasrec-sampled.toml"),
    "video-sasrec-bf16": video("video/sasrec-bf16.toml"),
    "video-sasrec-wide": video("video/sasrec-wide.toml"),
    "video-sasrec-wide-16ep": video("video/sasrec-wide-16ep.toml"),
    "video-sasrec-wide-16ep-t10": video("video/sasrec-wide-16ep-t10.toml"),
    "video-sasrec-wide192": video("video/sasrec-wide192.toml"),
    "video-sasrec-wide-bpr": video("video/sasrec-wide-bpr.toml"),
    "video-sasrec-wide-bpr-t04": video("video/sasrec-wide-bpr-t04.toml"),
    "ml100k-sasrec": Experiment("ml-100k", "ml-100k/u.data", "ml100k", "ml100k/sasrec.toml", 5),
}

# Published numbers from ../shared/BENCHMARKS.md, for the comparison table.
PUBLISHED: dict[str, list[tuple[str, str, dict[str, float]]]] = {
    "amazon-beauty": [
        ("SASRec (S3-Rec all-rank)", "full", {"HR@10": 0.0605, "NDCG@10": 0.0318}),
        ("ICLRec", "full", {"HR@10": 0.0744, "NDCG@10": 0.0403}),
        ("BSARec (target)", "full", {"HR@10": 0.1008, "NDCG@10": 0.0611}),
    ],
    "amazon-video": [
        ("SASRec paper (target)", "sampled100", {"HR@10": 0.7410, "NDCG@10": 0.5360}),
    ],
}


def run(command: list[str], log: Path) -> str:
    with open(log, "a") as f:
        f.write("$ " + " ".join(command) + "\n")
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(done.stdout)
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}), see {log}: {' '.join(command)}")
    return done.stdout


def run_experiment(name: str, experiment: Experiment, work: Path, tag: str | None = None) -> Path:
    started = time.perf_counter()
    result_name = f"quality-{name}" if tag is None else f"quality-{name}-{tag}"
    source = SHARED_DATA / experiment.source
    if not source.is_file():
        raise SystemExit(f"{name}: {source} is absent; cannot run this experiment")
    log = RESULTS / f"{result_name}.log"
    log.unlink(missing_ok=True)
    data, registry, run_dir = work / "data", work / "registry", work / "run"
    prepare_command = [
        *RECLOOP, "prepare", "--format", experiment.format, "--input", str(source),
        "--out", str(data), *experiment.prepare_args,
    ]  # fmt: skip
    run(prepare_command, log)
    train_command = [
        *RECLOOP, "train", "--config", str(REPO / "configs" / experiment.config),
        "--data", str(data), "--registry", str(registry), "--run-dir", str(run_dir),
        "--max-minutes", str(experiment.minutes), *experiment.overrides,
    ]  # fmt: skip
    tick = time.perf_counter()
    version = run(train_command, log).strip().splitlines()[-1]
    train_wall = time.perf_counter() - tick
    evaluations = {}
    for protocol in experiment.protocols:
        out = run(
            [*RECLOOP, "eval", "--registry", str(registry), "--version", version,
             "--data", str(data), "--protocol", protocol, "--json"],
            log,
        )  # fmt: skip
        evaluations[protocol] = json.loads(out)
    manifest = json.loads(run([*RECLOOP, "models", "show", "--registry", str(registry)], log))
    curves = run_dir / "curves.png"
    if curves.is_file():
        (RESULTS / f"{result_name}.png").write_bytes(curves.read_bytes())
    results = {
        "dataset": experiment.dataset,
        "model": manifest["model"],
        "training": manifest["training"],
        "train_wall_seconds_incl_eval": round(train_wall, 1),
        "valid": {k: v for k, v in manifest["metrics"].items() if k.startswith("valid/")},
        "test": evaluations,
    }
    config = {
        "experiment": name,
        "config_file": f"configs/{experiment.config}",
        "config_text": (REPO / "configs" / experiment.config).read_text(),
        "budget_minutes": experiment.minutes,
        "prepare_command": " ".join(prepare_command[2:]),
        "command": " ".join(train_command[2:]),
        "split": "leave-one-out (last = test, second-to-last = validation)",
        "sampled100_users": "all users with >= 3 interactions",
    }
    return write_result(result_name, config, results, started)


def table() -> None:
    rows = []
    for path in sorted(RESULTS.glob("quality-*.json")):
        result = json.loads(path.read_text())
        name = result["config"]["experiment"]
        for protocol, metrics in result["results"]["test"].items():
            rows.append(
                (
                    result["results"]["dataset"],
                    f"recloop {name} ({result['config']['budget_minutes']} min)",
                    protocol,
                    metrics,
                    path.name,
                )
            )
    datasets = sorted({r[0] for r in rows} | set(PUBLISHED))
    for dataset in datasets:
        print(f"\n### {dataset}\n")
        print("| model | protocol | HR@10 | NDCG@10 | HR@20 | NDCG@20 | source |")
        print("|---|---|---|---|---|---|---|")
        for label, protocol, metrics in PUBLISHED.get(dataset, []):
            print(f"| {label} | {protocol} | {_cells(metrics)} | ../shared/BENCHMARKS.md |")
        for row_dataset, label, protocol, metrics, source in rows:
            if row_dataset == dataset:
                print(f"| {label} | {protocol} | {_cells(metrics)} | bench/results/{source} |")


def _cells(metrics: dict[str, Any]) -> str:
    keys = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")
    return " | ".join(f"{metrics[k]:.4f}" if k in metrics else "" for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=sorted(EXPERIMENTS), default=None)
    parser.add_argument("--table", action="store_true", help="print the tables and exit")
    parser.add_argument(
        "--tag",
        default=None,
        help="suffix of the result names (quality-NAME-TAG.json): a re-run that must not replace "
        "the frozen config's result, e.g. a check that a refactor left quality unchanged",
    )
    args = parser.parse_args()
    if args.table:
        table()
        return
    for name in args.only or list(EXPERIMENTS):
        with tempfile.TemporaryDirectory(prefix=f"recloop-quality-{name}-") as tmp:
            path = run_experiment(name, EXPERIMENTS[name], Path(tmp), args.tag)
        print(f"{name}: wrote {path}", flush=True)
    table()


if __name__ == "__main__":
    main()
