"""Counts of the real public datasets in ../shared/data (skipped, with the reason, if absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recloop.data.dataset import SequenceDataset
from recloop.data.prepare import FileSource, PrepareOptions, prepare_file
from recloop.data.splits import leave_one_out
from tests.conftest import shared_file


def test_ml100k_counts(tmp_path: Path) -> None:
    path = shared_file("ml-100k/u.data")
    prepare_file(FileSource(path, "ml100k"), tmp_path / "ml100k")
    data = SequenceDataset(tmp_path / "ml100k", verify=True)
    assert (data.num_users, data.num_items, data.num_events) == (943, 1682, 100_000)
    assert data.has_timestamps
    seqs = data.sequences
    assert bool(np.all(np.diff(seqs.timestamps)[np.diff(seqs.user_of_event()) == 0] >= 0))


def test_beauty_counts_and_identity_ids(tmp_path: Path) -> None:
    path = shared_file("amazon-beauty-iclrec/Beauty.txt")
    prepare_file(FileSource(path, "s3rec"), tmp_path / "beauty")
    data = SequenceDataset(tmp_path / "beauty")
    assert (data.num_users, data.num_items, data.num_events) == (22_363, 12_101, 198_502)
    # Beauty's item ids are 1..12101 already, so the ascending dense mapping is the identity,
    # and line 1 (user 1) is the first sequence, in file order.
    assert data.items.to_raw([1, 12_101]).tolist() == [1, 12_101]
    first_line = path.read_text().split("\n", 1)[0].split()
    assert data.sequences.user_items(0).tolist() == [int(x) for x in first_line[1:]]
    split = leave_one_out(data.sequences)
    assert len(split.test) == 22_363  # every Beauty user has >= 5 events


def test_video_games_keeps_all_users_when_asked(tmp_path: Path) -> None:
    path = shared_file("amazon-video-sasrec/Video.txt")
    prepare_file(FileSource(path, "sasrec"), tmp_path / "video", PrepareOptions(min_user_events=1))
    data = SequenceDataset(tmp_path / "video")
    assert (data.num_users, data.num_items, data.num_events) == (31_013, 23_715, 287_107)
