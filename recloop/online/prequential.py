"""Test-then-train metrics: every event is scored by the models before anything learns from it.

For each event with a non-empty history, the user's sequence before the event is encoded and
the event's item ranked over the whole catalogue (history items masked, as in the offline
full-ranking protocol). Both the online model and the frozen starting model are scored on the
same events, so the two HR@10 curves are directly comparable. An event whose item a model does
not know (a new item, before admission or for the frozen model at all) is a miss for it: that
is what a user of the product would see.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from recloop.data.sequences import PADDING_ID
from recloop.models.base import SequentialEncoder

K = 10
CSV_NAME = "prequential.csv"
PLOT_NAME = "prequential.png"


@dataclass
class PrequentialTotals:
    """Running sums since the learner's origin version (stored in every published manifest)."""

    events: int = 0  # events applied (read from the log and learned from)
    scored: int = 0  # events with a history, scored by the online model
    scored_frozen: int = 0  # of those, scored by the frozen model too (online.score_frozen)
    hits_online: int = 0
    hits_frozen: int = 0
    ndcg_online: float = 0.0
    ndcg_frozen: float = 0.0

    def add(self, other: PrequentialTotals) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self) -> dict[str, float | int]:
        """HR@10 / NDCG@10 of each model over the events it scored (no frozen figures when
        the frozen model scored nothing)."""
        scored = max(self.scored, 1)
        out: dict[str, float | int] = {
            "events": self.events,
            "scored": self.scored,
            f"online_HR@{K}": self.hits_online / scored,
            f"online_NDCG@{K}": self.ndcg_online / scored,
        }
        if self.scored_frozen:
            out[f"frozen_HR@{K}"] = self.hits_frozen / self.scored_frozen
            out[f"frozen_NDCG@{K}"] = self.ndcg_frozen / self.scored_frozen
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> PrequentialTotals:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in (data or {}).items() if k in known}
        if "scored_frozen" not in values:  # written before scoring the frozen model was optional
            values["scored_frozen"] = values.get("scored", 0)
        return cls(**values)


@torch.no_grad()
def rank_targets(
    model: SequentialEncoder,
    prefixes: Sequence[Sequence[int]],
    targets: Sequence[int],
    *,
    exclude_seen: bool = True,
    max_logits: int = 1 << 24,
) -> npt.NDArray[np.int64]:
    """0-based rank of each target among all items (a huge rank for items the model lacks).
    Users go in chunks of at most `max_logits` scores (64 MiB), whatever the catalogue size."""
    num_items = int(model.item_embedding.num_items)
    length = int(model.config.max_length)
    # Chunks of users with similar history lengths, so each pads only to its own longest.
    chunk = max(1, min(256, max_logits // (num_items + 1)))
    kept = [[i for i in prefix if i <= num_items][-length:] for prefix in prefixes]
    order = sorted(range(len(kept)), key=lambda index: len(kept[index]))  # similar lengths
    ranks = np.full(len(targets), np.iinfo(np.int64).max, dtype=np.int64)
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        width = max(1, len(kept[rows[-1]]))  # the longest of the chunk: no wider padding
        padded = np.zeros((len(rows), width), dtype=np.int64)  # [B, W], left-padded
        for row, index in enumerate(rows):
            if kept[index]:
                padded[row, width - len(kept[index]) :] = kept[index]
        ids = torch.from_numpy(padded)
        logits = model.score(model.encode(ids))  # [B, I + 1]
        if exclude_seen:
            logits.scatter_(1, ids, float("-inf"))  # history items (and padding) masked
        logits[:, PADDING_ID] = float("-inf")
        wanted = torch.tensor([targets[index] for index in rows], dtype=torch.long)  # [B]
        valid = (wanted > 0) & (wanted <= num_items) & (ids[:, -1] != PADDING_ID)
        score = logits.gather(1, wanted.clamp(0, num_items).unsqueeze(1))  # [B, 1]
        # Counted in float32 (exact below 2^24 items): a third faster than a bool sum here.
        above = (logits > score).to(torch.float32).sum(dim=1).to(torch.long)  # [B]
        valid &= torch.isfinite(score.squeeze(1))
        picked = np.asarray(rows)[valid.numpy()]
        ranks[picked] = above[valid].numpy()
    return ranks


def describe(totals: dict[str, float | int]) -> str:
    """'online 0.0962 vs frozen 0.0741' (or without the frozen model when it did not score)."""
    text = f"online {totals[f'online_HR@{K}']:.4f}"
    frozen = totals.get(f"frozen_HR@{K}")
    return f"{text} vs frozen {frozen:.4f}" if frozen is not None else f"{text} (frozen not scored)"


def totals_from_ranks(
    online: npt.NDArray[np.int64], frozen: npt.NDArray[np.int64] | None, events: int
) -> PrequentialTotals:
    """The counts of one micro-batch (`frozen` None: the frozen model did not score it)."""

    def ndcg(ranks: npt.NDArray[np.int64]) -> float:
        hit = ranks[ranks < K]
        return float(sum(1.0 / math.log2(r + 2) for r in hit.tolist()))

    if frozen is None:
        frozen = np.zeros(0, dtype=np.int64)
    return PrequentialTotals(
        events=events,
        scored=len(online),
        scored_frozen=len(frozen),
        hits_online=int((online < K).sum()),
        hits_frozen=int((frozen < K).sum()),
        ndcg_online=ndcg(online),
        ndcg_frozen=ndcg(frozen),
    )


class PrequentialLog:
    """One CSV row per micro-batch (offset, counts, cumulative HR@10), in the run directory.

    After a restart the rows past the resumed offset are dropped: those events are learned again
    from the published version, and each must be counted once.
    """

    columns = ("offset", "events", "scored", "hits_online", "hits_frozen", "cum_online_hr",
               "cum_frozen_hr", "scored_frozen")  # fmt: skip

    def __init__(self, run_dir: Path, resume_offset: int) -> None:
        self.path = run_dir / CSV_NAME
        rows = self.read()
        kept = [row for row in rows if int(row["offset"]) <= resume_offset]
        if len(kept) != len(rows) or not self.path.exists():
            self._rewrite(kept)

    def read(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)

    def append(self, offset: int, batch: PrequentialTotals, total: PrequentialTotals) -> None:
        scored, scored_frozen = max(total.scored, 1), max(total.scored_frozen, 1)
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow(
                [offset, batch.events, batch.scored, batch.hits_online, batch.hits_frozen,
                 f"{total.hits_online / scored:.6f}", f"{total.hits_frozen / scored_frozen:.6f}",
                 batch.scored_frozen]
            )  # fmt: skip

    def plot(self, window: int = 2000) -> Path | None:
        """HR@10 over the stream (sliding window of scored events, and cumulative)."""
        rows = self.read()
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        scored = {
            "online": np.array([int(r["scored"]) for r in rows], dtype=np.float64),
            # Rows written before scoring the frozen model was optional lack the column.
            "frozen": np.array(
                [int(r.get("scored_frozen") or r["scored"]) for r in rows], dtype=np.float64
            ),
        }
        events = np.cumsum([int(r["events"]) for r in rows])
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, color in (("online", "tab:blue"), ("frozen", "tab:gray")):
            if name == "frozen" and not scored[name].any():
                continue  # online.score_frozen = false
            hits = np.array([int(r[f"hits_{name}"]) for r in rows], dtype=np.float64)
            ax.plot(events, _sliding(hits, scored[name], window), color=color,
                    label=f"{name}, last {window} scored events")  # fmt: skip
            ax.plot(events, np.cumsum(hits) / np.maximum(np.cumsum(scored[name]), 1),
                    color=color, linestyle="--", label=f"{name}, cumulative")  # fmt: skip
        ax.set_xlabel("events streamed")
        ax.set_ylabel(f"prequential HR@{K}")
        ax.set_title("Online learner vs frozen starting model (test-then-train)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.path.with_name(PLOT_NAME)
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out


def _sliding(
    hits: npt.NDArray[np.float64], scored: npt.NDArray[np.float64], window: int
) -> npt.NDArray[np.float64]:
    """Hit rate over roughly the last `window` scored events at each row."""
    cum_hits, cum_scored = np.cumsum(hits), np.cumsum(scored)
    start = np.searchsorted(cum_scored, cum_scored - window, side="right")
    base_hits = np.where(start > 0, cum_hits[np.maximum(start - 1, 0)], 0.0)
    base_scored = np.where(start > 0, cum_scored[np.maximum(start - 1, 0)], 0.0)
    return (cum_hits - base_hits) / np.maximum(cum_scored - base_scored, 1)
