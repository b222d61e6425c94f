"""Preprocessing throughput: rows/s and peak memory of `recloop prepare`, 1 and 2 threads.

Inputs: the 1,000,209-row ml-1m pairs Parquet from ../shared/data (skipped if absent) and a
synthetic log of about 10M events written once by the generator. Each (input, threads) pair
runs `--repeats` times in a fresh process (polars fixes its thread pool at import), and the
median wall time is reported with the peak RSS of that process.

    .venv/bin/python bench/prepare.py            # writes bench/results/prepare.json + .png
    .venv/bin/python bench/prepare.py --quick    # a small synthetic log, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, SHARED_DATA, write_result


def worker(args: argparse.Namespace) -> None:
    """One measured run, in its own process: prints a JSON line."""
    from recloop.data.threads import configure_threads

    threads = configure_threads(args.threads)
    from recloop.data.prepare import FileSource, prepare_file
    from recloop.data.table_formats import ColumnMap

    columns = ColumnMap(user=args.user_col, item=args.item_col, timestamp=args.time_col)
    source = FileSource(Path(args.input), "parquet", columns)
    started = time.perf_counter()
    manifest = prepare_file(source, Path(args.out), overwrite=True)
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "threads": threads,
                "rows": manifest["counts"]["raw_rows"],
                "events": manifest["counts"]["events"],
                "seconds": seconds,
                "peak_rss_mib": round(peak_mib, 1),
            }
        )
    )


def generate_worker(args: argparse.Namespace) -> None:
    """Times the synthetic generator alone (no output kept) in its own process."""
    from recloop.data.synthetic import SyntheticConfig, generate_events

    config = SyntheticConfig(num_users=args.gen_users, num_items=args.gen_items, seed=0)
    started = time.perf_counter()
    events = sum(chunk.height for chunk in generate_events(config))
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"events": events, "seconds": seconds, "peak_rss_mib": round(peak_mib, 1)}))


def measure_generator(users: int, items: int) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--worker-generate",
        "--gen-users",
        str(users),
        "--gen-items",
        str(items),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    run = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "users": users,
        "items": items,
        "events": run["events"],
        "seconds": round(run["seconds"], 3),
        "events_per_second": round(run["events"] / run["seconds"]),
        "peak_rss_mib": run["peak_rss_mib"],
    }


def measure(
    input_path: Path, columns: tuple[str, str, str | None], threads: int, repeats: int
) -> dict[str, Any]:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            command = [
                sys.executable,
                __file__,
                "--worker",
                "--input",
                str(input_path),
                "--out",
                f"{tmp}/out",
                "--threads",
                str(threads),
                "--user-col",
                columns[0],
                "--item-col",
                columns[1],
            ]
            if columns[2]:
                command += ["--time-col", columns[2]]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    seconds = statistics.median(r["seconds"] for r in runs)
    rows = runs[0]["rows"]
    return {
        "threads": threads,
        "rows": rows,
        "events_kept": runs[0]["events"],
        "seconds_median": round(seconds, 3),
        "seconds_all": [round(r["seconds"], 3) for r in runs],
        "rows_per_second": round(rows / seconds),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["input"] for r in results})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for offset, threads in enumerate((1, 2)):
        values = [
            next(
                r["rows_per_second"] for r in results if r["input"] == n and r["threads"] == threads
            )
            / 1e6
            for n in names
        ]
        ax.bar(
            [i + offset * width for i in range(len(names))],
            values,
            width,
            label=f"{threads} thread(s)",
        )
    ax.set_xticks([i + width / 2 for i in range(len(names))], names)
    ax.set_ylabel("million rows / s")
    ax.set_title("recloop prepare throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input")
    parser.add_argument("--out")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--user-col", default="user")
    parser.add_argument("--item-col", default="item")
    parser.add_argument("--time-col", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic-users", type=int, default=500_000)
    parser.add_argument("--quick", action="store_true", help="small synthetic log only")
    parser.add_argument("--worker-generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gen-users", type=int, default=1_000_000)
    parser.add_argument("--gen-items", type=int, default=1_000_000)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.worker_generate:
        generate_worker(args)
        return

    started = time.perf_counter()
    from recloop.data.synthetic import SyntheticConfig, generate_log

    users = 20_000 if args.quick else args.synthetic_users
    inputs: list[tuple[str, Path, tuple[str, str, str | None]]] = []
    ml1m = SHARED_DATA / "ml-1m-pairs-parquet" / "ratings.parquet"
    if ml1m.is_file() and not args.quick:
        inputs.append(("ml-1m pairs", ml1m, ("userID", "movieID", None)))
    else:
        print(f"skipping ml-1m: {ml1m} absent or --quick", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="recloop-bench-"))
    log = tmp / "synthetic.parquet"
    config = SyntheticConfig(num_users=users, seed=0)
    rows = generate_log(config, log)
    inputs.append((f"synthetic {rows / 1e6:.1f}M", log, ("user", "item", "timestamp")))

    results = []
    for name, path, columns in inputs:
        for threads in (1, 2):
            row = {"input": name, **measure(path, columns, threads, args.repeats)}
            results.append(row)
            print(
                f"{name:>18} threads={threads} rows={row['rows']:>10,} "
                f"median {row['seconds_median']:7.2f} s  {row['rows_per_second']:>12,} rows/s  "
                f"peak {row['peak_rss_mib']:8.0f} MiB",
                flush=True,
            )
    log.unlink()
    tmp.rmdir()
    gen_users = 20_000 if args.quick else args.gen_users
    generator = measure_generator(gen_users, 20_000 if args.quick else args.gen_items)
    print(
        f"generator: {generator['users']:,} users x {generator['items']:,} items -> "
        f"{generator['events']:,} events in {generator['seconds']:.2f} s, "
        f"peak {generator['peak_rss_mib']:.0f} MiB",
        flush=True,
    )
    name = "prepare-quick" if args.quick else "prepare"
    config_out = {"repeats": args.repeats, "synthetic": {"num_users": users, "seed": 0}}
    path = write_result(name, config_out, {"prepare": results, "generator": generator}, started)
    plot(results, RESULTS / f"{name}.png")
    print(f"wrote {path} and {RESULTS / (name + '.png')}")


if __name__ == "__main__":
    main()
