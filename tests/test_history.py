"""UserHistory: a dataset's sequences in a model's item ids (serving's and the learner's base)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recloop.data.history import UserHistory
from recloop.data.vocabulary import Vocabulary
from tests.test_prepare import RATINGS, prepare_text


def test_sequences_map_into_a_model_vocabulary_by_raw_id(tmp_path: Path) -> None:
    _, data = prepare_text(tmp_path, RATINGS)  # users 10, 20; items 3, 5, 7, 9 -> 1..4
    # A model vocabulary that renumbered the items, lacks item 9 and holds a text id.
    model = Vocabulary.from_strings(["7", "sku-x", "3", "5"])
    history = UserHistory(data, model)
    assert history.num_users == 2 and history.user_index("20") == 1
    assert history.user_index("nobody") is None
    assert history.items("10").tolist() == [3, 4, 1]  # items 3, 5, 7 in time order
    assert history.items("20").tolist() == [4]  # item 9 is unknown to the model: dropped
    assert history.items("nobody").tolist() == []
    assert history.item_counts(4).tolist() == [1, 1, 0, 1, 2]  # 0: item 9, unknown
    integers = UserHistory(data, Vocabulary(np.array([9, 7, 5, 3])))  # the integer path
    assert integers.items("10").tolist() == [4, 3, 2] and integers.items("20").tolist() == [3, 1]
