"""Compression on Amazon Beauty: the table of ../shared/BENCHMARKS.md section 5.

Trains the fp32 teacher (configs/beauty/hstu-large.toml: 30 minutes, then resumed for up to 15
more, since on a busy machine 30 minutes end before early stopping) and makes every variant
with the `recloop` command exactly as a user runs it (`recloop train`, `recloop compress`),
one thread each (on this shared 2-core machine one torch thread trains 3-4x faster than two),
then measures each registry version:

- file size: the version's weights.safetensors, against the teacher's;
- encoder latency: the serving export (recloop.serve.engines.export.export_onnx) run by ONNX Runtime
  with serving's settings (1 intra-op thread), p50 / p99 over >= 3 s of calls on full
  [batch, 50] windows of Beauty test histories, batch 1 and 32;
- NDCG@10 and HR@10: full ranking on the leave-one-out test split, history masked (as in
  bench/quality.py), from the version's manifest (recorded by `recloop compress`); for the
  "ORT int8 dense" rows, the exported int8 encoder itself is evaluated by the same code.

Stages are cached under runs/compress (gitignored): a stage whose registry version exists is
not run again (`--fresh` starts over). Writes bench/results/compress.json and compress.png.

    .venv/bin/python bench/compress.py            # ~1 hour on a busy 2-core machine
    .venv/bin/python bench/compress.py --table    # the table, from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, SHARED_DATA, write_result

RECLOOP = [sys.executable, "-m", "recloop.cli"]
WORK = REPO / "runs" / "compress"
DATA = WORK / "data"
REGISTRY = WORK / "registry"
STAGES = WORK / "stages.json"
LOG = RESULTS / "compress.log"
TEACHER_CONFIG = "configs/beauty/hstu-large.toml"
STUDENT_CONFIG = "configs/beauty/student.toml"
TEACHER_MINUTES = 30.0
TEACHER_MORE_MINUTES = 15.0
STUDENT_MINUTES = 25.0
FINETUNE_MINUTES = 4.0
# Chosen on validation NDCG@10 among lr 1e-3 / 3e-4, (alpha, T) = (0.7, 1) / (0.9, 2) and student
# dropout 0.5 / 0.3 / 0.2 (the soft targets regularise, so the distilled student wants less
# dropout). The student trained alone keeps the config's 0.5, as the teacher does.
DISTILL = (
    "distill.alpha=0.7",
    "distill.temperature=1.0",
    "distill.init=teacher",
    "train.lr=3e-4",
    "model.dropout=0.2",
)
BATCHES = (1, 32)
LENGTH = 50
LATENCY_SECONDS = 3.0
ONLY: set[str] = set()  # --only: build just these stages (the others must be cached or skipped)


def run(command: list[str]) -> str:
    with open(LOG, "a") as f:
        f.write(f"$ {' '.join(command)}\n")
        f.flush()
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(done.stdout)
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}), see {LOG}: {' '.join(command)}")
    return done.stdout.strip().splitlines()[-1]


def load_stages() -> dict[str, str]:
    return json.loads(STAGES.read_text()) if STAGES.is_file() else {}


def stage(name: str, command: list[str]) -> str:
    """The version of a stage: cached if its version is still in the registry, else run.

    runs/compress/stages.json is re-read before and after each stage, so a stage may also be
    run by hand (the same command, e.g. in parallel on a machine with spare cores) and recorded
    there while this script works on others."""
    cached = load_stages().get(name)
    if cached and (REGISTRY / "versions" / cached).is_dir():
        print(f"{name}: {cached} (cached)", flush=True)
        return cached
    if ONLY and name not in ONLY:
        return ""  # --only: another process builds this stage
    started = time.perf_counter()
    version = run(command)
    stages = load_stages()
    stages[name] = version
    STAGES.write_text(json.dumps(stages, indent=2) + "\n")
    print(f"{name}: {version} ({time.perf_counter() - started:.0f} s)", flush=True)
    return version


def build() -> dict[str, str]:
    source = SHARED_DATA / "amazon-beauty-iclrec" / "Beauty.txt"
    if not source.is_file():
        raise SystemExit(f"{source} is absent; cannot run this benchmark")
    if not (DATA / "manifest.json").is_file():
        run([*RECLOOP, "prepare", "--format", "s3rec", "--input", str(source), "--out", str(DATA)])
    common = ["--registry", str(REGISTRY), "--threads", "1"]
    teach = [*RECLOOP, "train", "--config", TEACHER_CONFIG, "--data", str(DATA), *common,
             "--run-dir", str(WORK / "teacher-run")]  # fmt: skip
    stage("teacher-first", [*teach, "--max-minutes", str(TEACHER_MINUTES)])
    # Continued exactly from its last checkpoint (the trainer's --resume) until early stopping
    # or the second budget: on a busy machine the first budget ends before convergence.
    teacher = stage("teacher", [*teach, "--resume", "--max-minutes", str(TEACHER_MORE_MINUTES)])
    compress = [*RECLOOP, "compress", *common, "--data", str(DATA)]
    versions = {"teacher": teacher}
    versions["int8"] = stage("int8", [*compress, "--version", teacher, "--method", "int8"])
    versions["int4"] = stage("int4", [*compress, "--version", teacher, "--method", "int4"])
    for method in ("prune-magnitude", "prune-structured"):
        for sparsity in ("0.5", "0.8"):
            name = f"{method}-{sparsity}"
            versions[name] = stage(
                name,
                [*compress, "--version", teacher, "--method", method, "--sparsity", sparsity,
                 "--max-minutes", str(FINETUNE_MINUTES)],
            )  # fmt: skip
    versions["student-alone"] = stage(
        "student-alone",
        [*RECLOOP, "train", "--config", STUDENT_CONFIG, "--data", str(DATA), *common,
         "--run-dir", str(WORK / "student-run"), "--max-minutes", str(STUDENT_MINUTES)],
    )  # fmt: skip
    versions["student"] = stage(
        "student",
        [*compress, "--version", teacher, "--method", "distill", "--config", STUDENT_CONFIG,
         "--max-minutes", str(STUDENT_MINUTES), *DISTILL],
    )  # fmt: skip
    versions["student-int8"] = stage(
        "student-int8", [*compress, "--version", versions["student"], "--method", "int8"]
    )
    return versions


# --------------------------------------------------------------------------- measuring

ROWS: list[tuple[str, str, str, bool]] = [
    # (row label, stage, what it is, ONNX Runtime int8 dense layers on top)
    ("fp32 teacher", "teacher", "HSTU 4 blocks, dim 128, 4 heads", False),
    ("int8", "int8", "int8 rows + int8 Linear weights", False),
    ("int8 + ORT int8 dense", "int8", "int8 rows; ORT dynamic int8 MatMuls", True),
    ("int4", "int4", "int4 rows + int8 Linear weights", False),
    ("pruned 50% (magnitude)", "prune-magnitude-0.5", "unstructured, fine-tuned", False),
    ("pruned 80% (magnitude)", "prune-magnitude-0.8", "unstructured, fine-tuned", False),
    ("pruned 50% (structured)", "prune-structured-0.5", "heads/channels, fine-tuned", False),
    ("pruned 80% (structured)", "prune-structured-0.8", "heads/channels, fine-tuned", False),
    ("student alone", "student-alone", "HSTU 1 block, dim 128, no teacher", False),
    ("distilled student", "student", "the same student, from the teacher", False),
    ("distilled student + int8", "student-int8", "int8 rows + int8 Linear weights", False),
    (
        "distilled student + int8 + ORT int8 dense",
        "student-int8",
        "int8 rows; ORT dynamic int8 MatMuls",
        True,
    ),
]


def measure(versions: dict[str, str]) -> list[dict[str, Any]]:
    import numpy as np
    import torch

    from recloop.compress.export import (
        OnnxEncoder,
        export_onnx_file,
        float_dense,
        latency_ms,
        onnx_runner,
        onnx_session,
        quantize_dense_onnx,
    )
    from recloop.compress.quantize import sample_histories
    from recloop.data.dataset import SequenceDataset
    from recloop.evaluate import EvalConfig, evaluate
    from recloop.registry import WEIGHTS, Registry
    from recloop.registry.loading import load_model

    torch.set_num_threads(1)
    registry = Registry(REGISTRY, create=False)
    dataset = SequenceDataset(DATA)
    test = dataset.leave_one_out().test
    exports = WORK / "onnx"
    exports.mkdir(parents=True, exist_ok=True)
    teacher_bytes = registry.manifest(versions["teacher"]).to_json()["files"][WEIGHTS]["bytes"]
    rows: list[dict[str, Any]] = []
    for label, name, what, ort_int8 in ROWS:
        version = versions[name]
        model, typed = load_model(registry, version)
        manifest = typed.to_json()
        path = exports / f"{version}.onnx"
        if not path.is_file():
            export_onnx_file(model, path)
        if ort_int8:
            plain = exports / f"{version}.float-dense.onnx"
            if not plain.is_file():
                export_onnx_file(float_dense(model), plain)
            path = exports / f"{version}.int8-dense.onnx"
            if not path.is_file():
                quantize_dense_onnx(plain, path)
        runner = onnx_runner(onnx_session(path, threads=1), model)
        latency = {}
        for batch in BATCHES:
            ids = sample_histories(
                dataset, num_items=dataset.num_items, max_length=LENGTH, count=batch, seed=batch
            ).numpy()
            latency[f"batch{batch}"] = latency_ms(runner, ids, seconds=LATENCY_SECONDS)
        metrics = manifest["metrics"]
        if ort_int8:
            evaluated = evaluate(OnnxEncoder(path, model), test, dataset.sequences, EvalConfig())
            quality = {"NDCG@10": evaluated["NDCG@10"], "HR@10": evaluated["HR@10"]}
        else:
            quality = {"NDCG@10": metrics["test/NDCG@10"], "HR@10": metrics["test/HR@10"]}
        weights = int(manifest["files"][WEIGHTS]["bytes"])
        row = {
            "variant": label,
            "what": what,
            "version": version,
            "method": manifest["method"],
            "parent": manifest["parent"],
            "weights_bytes": weights,
            "size_vs_teacher": weights / teacher_bytes,
            "onnx_file": path.name,
            "onnx_bytes": path.stat().st_size,
            "latency": latency,
            "test": quality,
            "parameters": int(sum(np.prod(t["shape"]) for t in manifest["tensors"].values())),
            "metrics": {
                k: v
                for k, v in metrics.items()
                if k.startswith(("compression/", "parity/")) or k in ("valid/NDCG@10",)
            },
            "training": {
                k: manifest["training"].get(k)
                for k in ("steps", "best_step", "epochs", "train_seconds", "stopped_by")
                if k in manifest["training"]
            },
        }
        rows.append(row)
        print(
            f"{label}: {weights:,} bytes, b1 p50 {latency['batch1']['p50_ms']:.3f} ms, "
            f"b32 p50 {latency['batch32']['p50_ms']:.3f} ms, NDCG@10 {quality['NDCG@10']:.4f}",
            flush=True,
        )
    teacher = rows[0]
    for row in rows:
        row["relative"] = {
            "NDCG@10": row["test"]["NDCG@10"] / teacher["test"]["NDCG@10"],
            "HR@10": row["test"]["HR@10"] / teacher["test"]["HR@10"],
            **{
                f"speedup_batch{b}": teacher["latency"][f"batch{b}"]["p50_ms"]
                / row["latency"][f"batch{b}"]["p50_ms"]
                for b in BATCHES
            },
        }
    return rows


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {row["variant"]: row for row in rows}
    int8, student, alone = by["int8"], by["distilled student"], by["student alone"]
    return {
        "int8_size_at_most_30pct": {
            "value": int8["size_vs_teacher"],
            "met": int8["size_vs_teacher"] <= 0.30,
        },
        "int8_ndcg_within_1pct": {
            "value": int8["relative"]["NDCG@10"],
            "met": int8["relative"]["NDCG@10"] >= 0.99,
        },
        "student_4x_faster_batch1": {
            "value": student["relative"]["speedup_batch1"],
            "met": student["relative"]["speedup_batch1"] >= 4.0,
        },
        "student_4x_faster_batch32": {
            "value": student["relative"]["speedup_batch32"],
            "met": student["relative"]["speedup_batch32"] >= 4.0,
        },
        "student_ndcg_at_least_97pct": {
            "value": student["relative"]["NDCG@10"],
            "met": student["relative"]["NDCG@10"] >= 0.97,
        },
        "distillation_beats_student_alone": {
            "value": student["test"]["NDCG@10"] - alone["test"]["NDCG@10"],
            "met": student["test"]["NDCG@10"] > alone["test"]["NDCG@10"],
        },
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["variant"] for row in rows]
    y = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(rows) + 1.5), sharey=True)
    axes[0].barh(y, [row["size_vs_teacher"] for row in rows], color="tab:blue")
    axes[0].axvline(0.30, color="gray", linestyle="--", linewidth=1)
    axes[0].set_xlabel("weights file / fp32 teacher (target int8 <= 0.30)")
    for offset, batch in ((-0.2, 1), (0.2, 32)):
        axes[1].barh(
            [i + offset for i in y],
            [row["latency"][f"batch{batch}"]["p50_ms"] for row in rows],
            height=0.4,
            label=f"batch {batch}",
        )
    axes[1].set_xscale("log")
    axes[1].set_xlabel("encoder p50 ms, ONNX Runtime, 1 thread, L=50 (log)")
    axes[1].legend()
    axes[2].barh(y, [row["relative"]["NDCG@10"] for row in rows], color="tab:green")
    axes[2].axvline(0.97, color="gray", linestyle="--", linewidth=1)
    axes[2].axvline(0.99, color="gray", linestyle=":", linewidth=1)
    axes[2].set_xlim(0.5, 1.1)
    axes[2].set_xlabel("test NDCG@10 / fp32 teacher")
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    fig.suptitle("Compression on Amazon Beauty (full ranking, leave-one-out test)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(path: Path) -> str:
    payload = json.loads(path.read_text())
    rows = payload["results"]["rows"]
    lines = [
        f"From `{path.relative_to(REPO)}` (commit {payload['commit'][:12]}, {payload['date']}; "
        "ONNX Runtime 1 thread, [batch, 50] windows; full-ranking test split).",
        "",
        "| variant | file MB | vs fp32 | b1 p50 ms | b1 p99 ms | b32 p50 ms | b32 p99 ms "
        "| NDCG@10 | HR@10 | NDCG vs fp32 | HR vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        b1, b32 = row["latency"]["batch1"], row["latency"]["batch32"]
        lines.append(
            f"| {row['variant']} | {row['weights_bytes'] / 1e6:.2f} | "
            f"{row['size_vs_teacher']:.3f} | {b1['p50_ms']:.3f} | {b1['p99_ms']:.3f} | "
            f"{b32['p50_ms']:.2f} | {b32['p99_ms']:.2f} | {row['test']['NDCG@10']:.4f} | "
            f"{row['test']['HR@10']:.4f} | {row['relative']['NDCG@10']:.3f} | "
            f"{row['relative']['HR@10']:.3f} |"
        )
    lines.append("")
    for name, target in payload["results"]["targets"].items():
        lines.append(f"- {name}: {target['value']:.4g} ({'met' if target['met'] else 'missed'})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true", help="print the table from the JSON")
    parser.add_argument("--fresh", action="store_true", help="rebuild every cached stage")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="STAGE",
        help="build only these stages and stop (to run independent stages in parallel)",
    )
    args = parser.parse_args()
    result_path = RESULTS / "compress.json"
    if args.table:
        print(table(result_path))
        return
    started = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        shutil.rmtree(WORK, ignore_errors=True)
        LOG.unlink(missing_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    ONLY.update(args.only or [])
    versions = build()
    if ONLY:
        return
    rows = measure(versions)
    config = {
        "dataset": "amazon-beauty (S3-Rec Beauty.txt), leave-one-out, full ranking, masked",
        "teacher_config": TEACHER_CONFIG,
        "student_config": STUDENT_CONFIG,
        "teacher_minutes": [TEACHER_MINUTES, TEACHER_MORE_MINUTES],
        "student_minutes": STUDENT_MINUTES,
        "finetune_minutes": FINETUNE_MINUTES,
        "distill_overrides": list(DISTILL),
        "torch_threads": 1,
        "latency": {
            "engine": "ONNX Runtime CPU, serving export, intra-op threads 1",
            "batches": list(BATCHES),
            "length": LENGTH,
            "seconds_per_point": LATENCY_SECONDS,
        },
        "load_average_at_end": list(os.getloadavg()),
        "stages": versions,
    }
    results = {"rows": rows, "targets": targets(rows)}
    path = write_result("compress", config, results, started)
    plot(rows, RESULTS / "compress.png")
    print(table(path))


if __name__ == "__main__":
    main()
