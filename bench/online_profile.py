"""Where the online learner's time goes, per part of a step, for the settings of
bench/online_replay.py (the profile behind issue 20's learner changes).

On the base model and event log that bench/online_replay.py builds (runs/bench-online-replay),
each setting's learner first replays --skip events (so sequences have the length they have
mid-stream), then --events more while the parts below are timed by wrapping the functions
that do them (wall clock, the learner's threads):

- encoder: the model's forward passes of training steps (their backward is in "backward");
- losses: both losses' fused passes, which compute their gradients as they go (the full
  softmax on new positions, the sampled softmax on the older ones);
- backward: autograd through the encoder;
- optimizers: AdamW on the dense weights and lazy Adam on the item rows;
- ranking: prequential scoring (the online model, and the frozen one where it is scored).

Settings are timed in alternation, --rounds times each, in one process, so that a machine
whose speed drifts affects all of them alike; medians are reported. Writes
bench/results/online-profile.json.

    .venv/bin/python bench/online_profile.py --settings context-2k default \\
        "default-fp32=KEY=VALUE,...,bf16=false" default-nofrozen   # NAME=...: as online_replay
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, write_result
from bench.online_replay import WORK, chosen_settings
from recloop.events import open_event_log
from recloop.models.base import SequentialEncoder
from recloop.online import learner as learner_module
from recloop.online import steps
from recloop.online.config import load_online_config
from recloop.online.learner import OnlineLearner
from recloop.online.optim import LazyAdam
from recloop.registry import Registry

PARTS = ("encoder", "losses", "backward", "optimizers", "ranking")


class PartTimer:
    """Seconds spent in each wrapped function, by part; a call inside another timed call
    counts for the outer one only (ranking's encoder passes count as ranking)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.enabled = False
        self.active = False

    def wrap(self, owner: Any, name: str, part: str) -> None:
        function: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled or self.active:
                return function(*args, **kwargs)
            self.active = True
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - started
                self.active = False

        setattr(owner, name, timed)


def instrument(timer: PartTimer) -> None:
    timer.wrap(steps, "next_item_loss", "losses")
    timer.wrap(torch.Tensor, "backward", "backward")
    timer.wrap(torch.optim.AdamW, "step", "optimizers")
    timer.wrap(LazyAdam, "step", "optimizers")
    timer.wrap(learner_module, "rank_targets", "ranking")
    # Every model class's forward: training steps call the module, ranking calls encode().
    for model_class in SequentialEncoder.__subclasses__():
        timer.wrap(model_class, "forward", "encoder")


def profile_once(
    label: str, overrides: list[str], skip: int, events: int, timer: PartTimer, threads: int
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="online-profile-") as tmp:
        work = Path(tmp)
        shutil.copytree(WORK / "registry", work / "registry")
        shutil.copy(WORK / "events.sqlite", work / "events.sqlite")
        config = load_online_config(None, overrides)
        log = open_event_log(str(work / "events.sqlite"))
        learner = OnlineLearner(Registry(work / "registry"), log, config, work / "run")
        learner.run(max_events=skip)
        timer.seconds.clear()
        timer.enabled = True
        started = time.perf_counter()
        summary = learner.run(max_events=events)
        seconds = time.perf_counter() - started
        timer.enabled = False
    parts = {part: round(timer.seconds.get(part, 0.0), 3) for part in PARTS}
    parts["other"] = round(seconds - sum(parts.values()), 3)  # publish, reads, bookkeeping
    print(f"  {label}: {events / seconds:,.0f} events/s, {parts}", flush=True)
    return {"seconds": round(seconds, 3), "events_per_second": round(events / seconds, 1),
            "parts": parts, "online_HR@10": summary.totals.get("online_HR@10")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["context-2k", "default-nofrozen"],
        help="names from bench/online_replay.py's SETTINGS, or NAME=key=value,key=value",
    )
    parser.add_argument("--skip", type=int, default=20_480, help="events replayed untimed first")
    parser.add_argument("--events", type=int, default=6_144, help="events timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="online-profile")
    parser.add_argument("--table", action="store_true", help="print the result's table, no run")
    args = parser.parse_args()
    if args.table:
        print(table(RESULTS / f"{args.name}.json"))
        return
    if not (WORK / "events.sqlite").is_file():
        raise SystemExit(f"{WORK}/events.sqlite is absent: run bench/online_replay.py first")
    started = time.perf_counter()
    timer = PartTimer()
    instrument(timer)
    settings = chosen_settings(args.settings)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in settings}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", flush=True)
        for label, overrides in settings.items():
            runs[label].append(
                profile_once(label, overrides, args.skip, args.events, timer, args.threads)
            )
    results = {}
    for label, rows in runs.items():
        median = {
            part: statistics.median(r["parts"][part] for r in rows) for part in rows[0]["parts"]
        }
        total = statistics.median(r["seconds"] for r in rows)
        results[label] = {
            "events_per_second": statistics.median(r["events_per_second"] for r in rows),
            "seconds": total,
            "parts": median,
            "shares": {part: round(value / total, 3) for part, value in median.items()},
            "runs": rows,
        }
    config = {"settings": settings,
              "skip": args.skip, "events": args.events, "rounds": args.rounds,
              "threads": args.threads}  # fmt: skip
    path = write_result(args.name, config, results, started)
    print(f"wrote {path}")


def table(path: Path) -> str:
    """The result file as a markdown table: median seconds per part (and share of the run)."""
    data = json.loads(path.read_text())
    config = data["config"]
    parts = [*PARTS, "other"]
    lines = [
        f"From `{path.relative_to(REPO)}` (commit {data['commit'][:12]}, {data['date']}; "
        f"{config['events']:,} events after the first {config['skip']:,}, median of "
        f"{config['rounds']} rounds, --threads {config['threads']}).",
        "",
        "| setting | events/s | " + " | ".join(parts) + " |",
        "|---|---|" + "---|" * len(parts),
    ]
    for label, row in data["results"].items():
        cells = [f"{row['parts'][p]:.2f} s ({row['shares'][p]:.0%})" for p in parts]
        lines.append(f"| {label} | {row['events_per_second']:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
