from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from recloop.data.batches import last_items
from recloop.data.sequences import Sequences
from recloop.data.splits import EvalExamples, leave_one_out
from recloop.errors import ConfigError, DatasetError
from recloop.evaluate import (
    ENCODE_GROUP,
    EvalConfig,
    evaluate,
    metrics_from_ranks,
    ranks_full,
    ranks_sampled,
    sample_negatives,
    select_examples,
)
from recloop.models.base import SequentialEncoder
from recloop.models.embeddings import ItemEmbedding
from recloop.models.factory import build_model


class TableModel(SequentialEncoder):
    """User vector = one-hot of the last input item, so score(user, i) = S[last item, i].

    `table` is S, [num_items + 1, num_items + 1] (row: last item, column: scored item).
    """

    def __init__(self, table: npt.NDArray[Any]) -> None:
        super().__init__()
        self.dim = table.shape[0]
        self.item_embedding = ItemEmbedding(table.shape[1] - 1, self.dim)
        with torch.no_grad():
            self.item_embedding.weight.copy_(torch.tensor(table.T, dtype=torch.float32))
        self.timestamps_seen: list[torch.Tensor | None] = []

    def forward(
        self,
        input_ids: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        self.timestamps_seen.append(timestamps)
        hidden = F.one_hot(input_ids, self.dim).float()  # [B, L, D]
        return hidden[:, -1:] if last_only else hidden


class SumModel(SequentialEncoder):
    """Integer item vectors; user vector = sum of the inputs' vectors: integer scores, many ties
    and exact in float32 whatever the matmul's shape."""

    def __init__(self, num_items: int, dim: int = 4, seed: int = 0) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.item_embedding = ItemEmbedding(num_items, dim)
        weight = rng.integers(-2, 3, size=(num_items + 1, dim))
        weight[0] = 0
        with torch.no_grad():
            self.item_embedding.weight.copy_(torch.tensor(weight, dtype=torch.float32))

    def forward(
        self,
        input_ids: torch.Tensor,
        timestamps: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        vectors: torch.Tensor = self.item_embedding(input_ids)  # [B, L, D]
        hidden = vectors.cumsum(dim=1)  # [B, L, D]
        return hidden[:, -1:] if last_only else hidden


class RandomModel(SumModel):
    """Gaussian item vectors (no ties)."""

    def __init__(self, num_items: int, dim: int = 8, seed: int = 0) -> None:
        super().__init__(num_items, dim, seed)
        with torch.no_grad():
            torch.manual_seed(seed)
            self.item_embedding.weight.normal_()
            self.item_embedding.weight[0] = 0.0  # padding adds nothing, as in real models


class ConstantModel(SumModel):
    """Every item scores 0 (overrides `score`, so it also exercises a custom scoring path)."""

    def score(
        self, user_vectors: torch.Tensor, item_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if item_ids is None:
            n = self.item_embedding.num_items + 1
            return user_vectors.new_zeros((*user_vectors.shape[:-1], n))
        if item_ids.dim() == 1:
            return user_vectors.new_zeros((*user_vectors.shape[:-1], len(item_ids)))
        return user_vectors.new_zeros(item_ids.shape)


def sequences_of(rows: list[list[int]]) -> Sequences:
    items = np.array([i for row in rows for i in row], dtype=np.int64)
    # timestamps: 100 * position within the user + item, so they are checkable
    times = np.array([100 * p + i for row in rows for p, i in enumerate(row)], dtype=np.int64)
    return Sequences.from_lengths(np.array([len(r) for r in rows]), items, times)


def random_sequences(num_users: int, num_items: int, seed: int) -> Sequences:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 25, size=num_users)
    items = rng.integers(1, num_items + 1, size=int(lengths.sum()))  # repeats included
    return Sequences.from_lengths(lengths, items, np.arange(len(items), dtype=np.int64))


def reference_full(
    model: SequentialEncoder, examples: EvalExamples, source: Sequences, max_length: int = 50
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Direct ranks: one all-item score matrix, history set to -inf, pessimistic ties."""
    ids = torch.from_numpy(last_items(source.items, examples.starts, examples.ends, max_length))
    with torch.no_grad():
        scores = model.score(model.encode(ids.long())).numpy().astype(np.float64)  # [N, I+1]
    masked, unmasked = [], []
    for row, (s, e, t) in enumerate(
        zip(examples.starts, examples.ends, examples.targets, strict=True)
    ):
        sc = scores[row, 1:].copy()  # items 1..I
        own = sc[t - 1]
        others = np.delete(np.arange(len(sc)), t - 1)
        unmasked.append(int((sc[others] >= own).sum()))
        history = set(source.items[s:e].tolist()) - {int(t)}
        sc[[h - 1 for h in history]] = -np.inf
        masked.append(int((sc[others] >= own).sum()))
    return np.array(masked), np.array(unmasked)


# --- metrics -------------------------------------------------------------------------------


def test_metrics_from_ranks_exact() -> None:
    ranks = np.array([0, 1, 4, 9, 10, 60])
    m = metrics_from_ranks(ranks, ks=(1, 5, 10))
    assert list(m) == ["HR@1", "NDCG@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "MRR"]
    assert m["HR@1"] == pytest.approx(1 / 6)
    assert m["NDCG@1"] == pytest.approx(1 / 6)
    assert m["HR@5"] == pytest.approx(3 / 6)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 6)
    assert m["HR@10"] == pytest.approx(4 / 6)
    assert m["NDCG@10"] == pytest.approx(
        (1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 6
    )
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 10 + 1 / 11 + 1 / 61) / 6)
    assert all(math.isnan(v) for v in metrics_from_ranks(np.array([], dtype=int), (10,)).values())


# --- full ranking --------------------------------------------------------------------------


def hand_case() -> tuple[TableModel, Sequences]:
    s = np.zeros((7, 7))  # rows: last history item; columns: items 0..6 (0 = padding)
    s[3, 1:] = [5, 4, 1, 4, 4, 7]
    s[6, 1:] = [0, 3, 3, 1, 2, 8]
    # s[1] stays all zero: every item ties
    source = sequences_of(
        [
            [1, 2, 3, 4],  # history 1 2 3 -> target 4 (score 4; item 2 ties and is masked)
            [2, 5, 2, 6, 5],  # history 2 5 2 6 -> target 5, which is in its own history
            [6, 1, 3],  # history 6 1 -> target 3: all scores tie
        ]
    )
    return TableModel(s), source


def test_full_ranks_on_a_hand_made_score_matrix() -> None:
    model, source = hand_case()
    test = leave_one_out(source).test
    ranks = ranks_full(model, test, source, EvalConfig(item_chunk_size=4))
    # user 0: unmasked: above 1 (5), 6 (7); equal 2, 5 -> 4. masked: drop 1, 2 (3 is below) -> 2.
    # user 1: unmasked: above 2, 3, 6 -> 3. masked: drop 2 and 6 but not the target 5 -> 1.
    # user 2: unmasked: the 5 other items tie -> 5. masked: drop 6 and 1 -> 3.
    assert ranks.unmasked.tolist() == [4, 3, 5]
    assert ranks.masked.tolist() == [2, 1, 3]
    masked, unmasked = reference_full(model, test, source)
    assert ranks.masked.tolist() == masked.tolist()
    assert ranks.unmasked.tolist() == unmasked.tolist()

    result = evaluate(model, test, source, EvalConfig(ks=(1, 3)))
    assert result["users"] == 3 and result["protocol"] == "full" and result["max_users"] is None
    assert result["HR@3"] == pytest.approx(2 / 3)
    assert result["HR@1"] == 0.0
    assert result["MRR"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert result["unmasked/HR@3"] == 0.0
    assert result["unmasked/MRR"] == pytest.approx((1 / 5 + 1 / 4 + 1 / 6) / 3)
    assert result["NDCG@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)


def test_full_ranks_pass_inputs_and_timestamps() -> None:
    model, source = hand_case()
    test = leave_one_out(source).test
    ranks_full(model, test, source, EvalConfig(max_length=3))
    ts = model.timestamps_seen[-1]
    assert ts is not None
    # Histories are encoded shortest first (users 2, 0, 1). User 0's (1, 2, 3): timestamps
    # 100 * position + item; user 2's is two items long, left-padded to 3.
    assert ts.dtype == torch.int64 and ts[1].tolist() == [1, 102, 203]
    assert ts[0].tolist() == [0, 6, 101]
    ranks_full(model, test, source, EvalConfig(use_timestamps=False))
    assert model.timestamps_seen[-1] is None


@pytest.mark.parametrize("model_cls", [SumModel, RandomModel])
def test_full_ranks_are_invariant_to_chunking_and_match_the_reference(
    model_cls: type[SumModel],
) -> None:
    source = random_sequences(num_users=23, num_items=40, seed=1)
    model = model_cls(num_items=40)
    valid = leave_one_out(source).valid
    results = [
        ranks_full(model, valid, source, EvalConfig(item_chunk_size=c, user_batch_size=b))
        for c, b in ((3, 1), (1_000_000, 1000), (7, 5), (40, 23))
    ]
    for r in results[1:]:
        np.testing.assert_array_equal(r.masked, results[0].masked)
        np.testing.assert_array_equal(r.unmasked, results[0].unmasked)
    masked, unmasked = reference_full(model, valid, source)
    np.testing.assert_array_equal(results[0].masked, masked)
    np.testing.assert_array_equal(results[0].unmasked, unmasked)
    assert np.all(results[0].masked <= results[0].unmasked)


def test_histories_encoded_in_length_groups_rank_as_one_full_width_batch() -> None:
    # 300 users in one batch span several ENCODE_GROUPs of different widths; a real model
    # (positions, padding masks) must rank exactly as when every history is padded to 50.
    torch.manual_seed(0)
    source = random_sequences(num_users=300, num_items=40, seed=2)
    model = build_model("sasrec", {"num_items": 40, "max_length": 50, "dim": 8}).eval()
    valid = leave_one_out(source).valid
    assert len(valid.targets) > 2 * ENCODE_GROUP
    got = ranks_full(model, valid, source, EvalConfig(user_batch_size=300))
    masked, unmasked = reference_full(model, valid, source)
    np.testing.assert_array_equal(got.masked, masked)
    np.testing.assert_array_equal(got.unmasked, unmasked)


def test_constant_model_gets_no_credit_under_full_ranking() -> None:
    num_items = 60
    source = random_sequences(num_users=12, num_items=num_items, seed=2)
    test = leave_one_out(source).test
    model = ConstantModel(num_items)
    ranks = ranks_full(model, test, source, EvalConfig(item_chunk_size=8))
    assert ranks.unmasked.tolist() == [num_items - 1] * len(test)
    for row, (s, e, t) in enumerate(zip(test.starts, test.ends, test.targets, strict=True)):
        masked_items = set(source.items[s:e].tolist()) - {int(t)}
        assert ranks.masked[row] == num_items - 1 - len(masked_items) >= 10
    result = evaluate(model, test, source, EvalConfig())
    for k in (5, 10):
        assert result[f"HR@{k}"] == 0.0 and result[f"NDCG@{k}"] == 0.0
        assert result[f"unmasked/HR@{k}"] == 0.0
    sampled = evaluate(model, test, source, EvalConfig(protocol="sampled100"))
    assert sampled["HR@50"] == 0.0 and sampled["MRR"] == pytest.approx(1 / 101)


def test_full_ranking_rejects_targets_outside_the_catalogue() -> None:
    source = sequences_of([[1, 2, 9]])
    with pytest.raises(DatasetError, match=r"1\.\.5"):
        ranks_full(SumModel(5), leave_one_out(source).test, source, EvalConfig())


# --- sampled-100 ---------------------------------------------------------------------------


def test_sampled_negatives_avoid_every_interacted_item() -> None:
    num_items = 60
    source = random_sequences(num_users=40, num_items=num_items, seed=3)
    test = leave_one_out(source).test
    neg = sample_negatives(test.users, source, num_items, 100, seed=7)
    assert neg.shape == (len(test), 100) and neg.dtype == np.int64
    assert neg.min() >= 1 and neg.max() <= num_items
    for row, user in enumerate(test.users):
        assert not set(neg[row].tolist()) & set(source.user_items(int(user)).tolist())
    np.testing.assert_array_equal(neg, sample_negatives(test.users, source, num_items, seed=7))
    assert not np.array_equal(neg, sample_negatives(test.users, source, num_items, seed=8))
    # a row's negatives depend on its example position only, not on which rows come with it
    ids = np.array([3, 17, 39, 5000])
    users = test.users[[3, 17, 39, 0]]
    part = sample_negatives(users, source, num_items, seed=7, example_ids=ids)
    np.testing.assert_array_equal(part[:3], neg[[3, 17, 39]])
    assert not set(part[3].tolist()) & set(source.user_items(int(users[3])).tolist())


def test_sampled_negatives_with_one_item_left_and_with_none() -> None:
    source = sequences_of([[*range(1, 20)], [1, 2, 3]])  # user 0 never saw item 20
    neg = sample_negatives(np.array([0, 1]), source, 20, 100, seed=0)
    assert neg[0].tolist() == [20] * 100
    assert set(neg[1].tolist()) <= set(range(4, 21))
    with pytest.raises(DatasetError, match="every item"):
        sample_negatives(np.array([0]), source, 19, 100)


def test_sampled_ranks_equal_a_direct_count() -> None:
    num_items = 50
    source = random_sequences(num_users=30, num_items=num_items, seed=4)
    test = leave_one_out(source).test
    model = SumModel(num_items)  # integer scores: ties are common
    config = EvalConfig(protocol="sampled100", seed=3, user_batch_size=7)
    ranks = ranks_sampled(model, test, source, config)
    neg = sample_negatives(test.users, source, num_items, 100, seed=3)
    ids = torch.from_numpy(last_items(source.items, test.starts, test.ends, 50)).long()
    with torch.no_grad():
        scores = model.score(model.encode(ids)).numpy()  # [N, I + 1]
    rows = np.arange(len(test))
    target_scores = scores[rows, test.targets]
    expected = (scores[rows[:, None], neg] >= target_scores[:, None]).sum(axis=1)
    np.testing.assert_array_equal(ranks, expected)
    assert np.any(ranks > 0)
    single = ranks_sampled(model, test, source, EvalConfig(protocol="sampled100", seed=3))
    np.testing.assert_array_equal(single, ranks)  # batch size does not change the draws

    result = evaluate(model, test, source, config)
    assert result["protocol"] == "sampled100" and result["users"] == len(test)
    assert result["num_negatives"] == 100 and "unmasked/HR@10" not in result
    expected_metrics = metrics_from_ranks(expected, config.ks)
    for name, value in expected_metrics.items():
        assert result[name] == pytest.approx(value)


def test_max_users_evaluates_a_seeded_subset() -> None:
    num_items = 50
    source = random_sequences(num_users=30, num_items=num_items, seed=5)
    test = leave_one_out(source).test
    model = RandomModel(num_items)
    chosen = select_examples(len(test), 8, seed=11)
    assert len(chosen) == 8 and len(set(chosen.tolist())) == 8
    assert np.all(np.diff(chosen) > 0)
    np.testing.assert_array_equal(chosen, select_examples(len(test), 8, seed=11))
    np.testing.assert_array_equal(select_examples(len(test), 100, 0), np.arange(len(test)))

    for protocol in ("full", "sampled100"):
        config = EvalConfig(protocol=protocol, max_users=8, seed=11)
        done: list[int] = []
        result = evaluate(model, test, source, config, progress=done.append)
        assert result["users"] == 8 and result["max_users"] == 8 and sum(done) == 8
        everyone = EvalConfig(protocol=protocol, seed=11)
        if protocol == "full":
            ranks = ranks_full(model, test, source, everyone).masked[chosen]
        else:  # the subset's negatives are those the same examples get in the full run
            ranks = ranks_sampled(model, test, source, everyone)[chosen]
        for name, value in metrics_from_ranks(ranks, everyone.ks).items():
            assert result[name] == pytest.approx(value)


# --- evaluate ------------------------------------------------------------------------------


def test_evaluate_restores_the_training_mode() -> None:
    model, source = hand_case()
    model.train()
    evaluate(model, leave_one_out(source).test, source, EvalConfig())
    assert model.training
    model.eval()
    evaluate(model, leave_one_out(source).test, source, EvalConfig())
    assert not model.training


@pytest.mark.parametrize("protocol", ["full", "sampled100"])
def test_sharded_evaluation_all_reduces_to_the_global_metrics(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    num_items = 40
    source = random_sequences(num_users=25, num_items=num_items, seed=6)
    test = leave_one_out(source).test
    model = RandomModel(num_items)
    config = EvalConfig(protocol=protocol, user_batch_size=4)  # type: ignore[arg-type]
    whole = evaluate(model, test, source, config)
    # Without an initialised process group each rank reports its own strided shard.
    shards = [evaluate(model, test, source, config, rank=r, world_size=2) for r in (0, 1)]
    assert [s["users"] for s in shards] == [13, 12]
    for name in ("HR@10", "NDCG@10", "MRR"):
        combined = (13 * shards[0][name] + 12 * shards[1][name]) / 25
        assert combined == pytest.approx(whole[name])
    # With one: rank 1's sums are captured, then added to rank 0's by a fake all_reduce.
    captured: list[torch.Tensor] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: captured.append(t.clone()))
    evaluate(model, test, source, config, rank=1, world_size=2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: t.add_(captured[0]))
    reduced = evaluate(model, test, source, config, rank=0, world_size=2)
    assert len(captured) == 1
    assert reduced.keys() == whole.keys()
    for name, value in whole.items():
        if isinstance(value, float):
            assert reduced[name] == pytest.approx(value)
        else:
            assert reduced[name] == value


def test_eval_config_validation() -> None:
    assert EvalConfig(ks=[10, 20]).ks == (10, 20)  # type: ignore[arg-type]
    for kwargs, field in (
        ({"max_length": 0}, "max_length"),
        ({"ks": ()}, "ks"),
        ({"ks": (10, 10)}, "ks"),
        ({"ks": (0,)}, "ks"),
        ({"protocol": "sampled"}, "protocol"),
        ({"max_users": 0}, "max_users"),
        ({"item_chunk_size": 1.5}, "item_chunk_size"),
        ({"seed": -1}, "seed"),
    ):
        with pytest.raises(ConfigError, match=f"eval.{field}"):
            EvalConfig(**kwargs)
    model, source = hand_case()
    with pytest.raises(ConfigError, match="rank"):
        evaluate(model, leave_one_out(source).test, source, EvalConfig(), rank=2, world_size=2)
