from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from recloop.errors import ConfigError
from recloop.models.base import SequentialEncoder
from recloop.models.bsarec import BSARec, BSARecConfig, low_pass_matrix
from recloop.models.factory import MODEL_TYPES, build_model, config_to_dict
from recloop.models.hstu import HSTU, HSTUConfig
from recloop.models.sasrec import SASRec, SASRecConfig

NUM_ITEMS = 30
DIM = 16

MakeModel = Callable[..., SequentialEncoder]


def make_sasrec(**overrides: Any) -> SASRec:
    values: dict[str, Any] = {"num_items": NUM_ITEMS, "max_length": 20, "dim": DIM}
    values.update(overrides)
    return SASRec(SASRecConfig(**values))


def make_hstu(**overrides: Any) -> HSTU:
    values: dict[str, Any] = {"num_items": NUM_ITEMS, "max_length": 20, "dim": DIM}
    values.update(overrides)
    return HSTU(HSTUConfig(**values))


def make_bsarec(**overrides: Any) -> BSARec:
    values: dict[str, Any] = {"num_items": NUM_ITEMS, "max_length": 20, "dim": DIM}
    values.update(overrides)
    return BSARec(BSARecConfig(**values))


MODELS = {
    "sasrec": make_sasrec,
    "sasrec_postnorm_gelu": lambda **kw: make_sasrec(
        pre_norm=False, activation="gelu", ffn_multiplier=4, num_heads=2, **kw
    ),
    "hstu": make_hstu,
    "hstu_dot_product": lambda **kw: make_hstu(
        normalize_embeddings=False, temperature=1.0, attention_dim=4, linear_dim=6, **kw
    ),
    "bsarec": make_bsarec,
    "bsarec_cosine_two_heads": lambda **kw: make_bsarec(
        normalize_embeddings=True, temperature=0.1, num_heads=2, alpha=0.3, c=9, **kw
    ),
}
CAUSAL_MODELS = [name for name in MODELS if MODELS[name]().causal]


@pytest.fixture(params=list(MODELS))
def make_model(request: pytest.FixtureRequest) -> MakeModel:
    torch.manual_seed(0)
    return MODELS[request.param]


@pytest.fixture(params=CAUSAL_MODELS)
def make_causal_model(request: pytest.FixtureRequest) -> MakeModel:
    torch.manual_seed(0)
    return MODELS[request.param]


def left_padded(lengths: list[int], length: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random ids [B, L] left-padded to `length`, and increasing timestamps, 0 at padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), length, dtype=torch.long)
    times = torch.zeros(len(lengths), length, dtype=torch.long)
    for row, n in enumerate(lengths):
        if n:
            ids[row, length - n :] = torch.randint(1, NUM_ITEMS + 1, (n,), generator=gen)
            gaps = torch.randint(1, 100_000, (n,), generator=gen)
            times[row, length - n :] = 1_700_000_000 + gaps.cumsum(0)
    return ids, times


def test_output_shapes(make_model: MakeModel) -> None:
    model = make_model().eval()
    ids, times = left_padded([10, 7, 3], 10)
    hidden = model(ids, times)
    assert hidden.shape == (3, 10, DIM)
    users = model.encode(ids, times)
    assert users.shape == (3, DIM)
    torch.testing.assert_close(users, hidden[:, -1])

    all_items = model.score(users)
    assert all_items.shape == (3, NUM_ITEMS + 1)
    assert torch.isneginf(all_items[:, 0]).all()
    assert torch.isfinite(all_items[:, 1:]).all()

    per_row = torch.randint(1, NUM_ITEMS + 1, (3, 5))
    assert model.score(users, per_row).shape == (3, 5)
    torch.testing.assert_close(model.score(users, per_row), all_items.gather(1, per_row))
    shared = torch.tensor([1, 4, 9, 2])
    assert model.score(users, shared).shape == (3, 4)
    torch.testing.assert_close(model.score(users, shared), all_items[:, shared])
    assert model.score(hidden).shape == (3, 10, NUM_ITEMS + 1)


@pytest.mark.parametrize("train", [False, True])
def test_no_nan_with_heavy_and_full_padding(make_model: MakeModel, train: bool) -> None:
    model = make_model().train(train)
    ids, times = left_padded([1, 2, 0, 20], 20)  # row 2 is all padding
    for stamps in (times, None):
        hidden = model(ids, stamps)
        assert torch.isfinite(hidden).all()
        assert (hidden[ids == 0] == 0).all()  # padding positions are zero
        logits = model.score(model.encode(ids, stamps))
        assert not torch.isnan(logits).any()
        targets = torch.tensor([3, 4, 5, 6])
        F.cross_entropy(logits, targets).backward()
        for name, param in model.named_parameters():
            if param.grad is not None:
                assert torch.isfinite(param.grad).all(), name
        model.zero_grad()


def changed_at(ids: torch.Tensor, times: torch.Tensor, t: int) -> tuple[torch.Tensor, ...]:
    """The same windows with another item at position t and later timestamps from t on."""
    changed_ids, changed_times = ids.clone(), times.clone()
    changed_ids[:, t] = changed_ids[:, t] % NUM_ITEMS + 1
    changed_times[:, t:] += 10_000_000
    return changed_ids, changed_times


def test_causal(make_causal_model: MakeModel) -> None:
    model = make_causal_model().eval()
    assert model.causal
    ids, times = left_padded([12, 9], 12)
    before = model(ids, times)
    t = 8
    after = model(*changed_at(ids, times, t))
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, t], before[:, t])


def test_bsarec_is_not_causal_and_says_so() -> None:
    # Its frequency filter mixes the whole window: an inner position sees the items after it,
    # which is why the trainer refuses to train it on whole windows (test_train).
    torch.manual_seed(0)
    model = make_bsarec().eval()
    assert not model.causal
    ids, times = left_padded([12, 9], 12)
    before = model(ids, times)
    after = model(*changed_at(ids, times, 8))
    assert not torch.allclose(after[:, :8][ids[:, :8] > 0], before[:, :8][ids[:, :8] > 0])
    filter_only = make_bsarec(alpha=1.0, c=1).eval()  # c=1 keeps the mean: still non-causal
    changed = filter_only(changed_at(ids, times, 8)[0])
    assert not torch.allclose(filter_only(ids)[:, 5], changed[:, 5])


@pytest.mark.parametrize(("length", "c"), [(50, 5), (20, 9), (7, 1), (8, 30)])
def test_bsarec_low_pass_matrix_is_the_reference_fft_filter(length: int, c: int) -> None:
    # The reference: rfft along the sequence, zero all but the c // 2 + 1 lowest frequencies,
    # irfft (orthonormal both ways).
    x = torch.randn(3, length, 5, dtype=torch.float64)
    spectrum = torch.fft.rfft(x, dim=1, norm="ortho")
    spectrum[:, c // 2 + 1 :] = 0
    expected = torch.fft.irfft(spectrum, n=length, dim=1, norm="ortho")
    matrix = low_pass_matrix(length, c).double()
    torch.testing.assert_close(matrix @ x, expected, atol=1e-6, rtol=1e-6)
    if c // 2 + 1 >= length // 2 + 1:  # every frequency kept: the identity
        identity = torch.eye(length, dtype=torch.float64)
        torch.testing.assert_close(matrix, identity, atol=1e-6, rtol=0)


def test_bsarec_trimmed_window_equals_the_full_window_filter() -> None:
    # With zero padding rows, filtering a full max_length window and filtering only its real
    # positions (the circulant block) agree, so trimmed batches train the reference's filter.
    torch.manual_seed(0)
    model = make_bsarec(alpha=1.0, dropout=0.0).eval()
    block = model.blocks[0].filter
    x = torch.randn(2, 20, DIM)
    x[:, :14] = 0  # six real positions at the end of a window of max_length = 20
    spectrum = torch.fft.rfft(x, dim=1, norm="ortho")
    spectrum[:, model.config.c // 2 + 1 :] = 0
    low = torch.fft.irfft(spectrum, n=20, dim=1, norm="ortho")
    beta2 = block.sqrt_beta.detach() ** 2
    expected = block.norm(x + low + beta2 * (x - low))
    with torch.no_grad():
        torch.testing.assert_close(block(x[:, 14:]), expected[:, 14:], atol=1e-5, rtol=1e-5)


def test_left_padding_invariance(make_model: MakeModel) -> None:
    model = make_model().eval()
    short_ids, short_times = left_padded([8, 3, 10], 10)
    long_ids = F.pad(short_ids, (10, 0))  # the same histories padded to L = 20
    long_times = F.pad(short_times, (10, 0))
    for times in ((short_times, long_times), (None, None)):
        short = model(short_ids, times[0])
        long = model(long_ids, times[1])
        torch.testing.assert_close(long[:, 10:], short, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.encode(long_ids, times[1]), model.encode(short_ids, times[0]), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("with_time", [False, True])
def test_encode_is_the_last_position_of_forward(make_model: MakeModel, with_time: bool) -> None:
    # encode computes the last block for the most recent position only; it must equal the full
    # forward pass there, with and without timestamps (HSTU's time bias).
    model = make_model(num_blocks=3).eval()
    ids, times = left_padded([20, 1, 7, 0, 13], 20, seed=3)
    stamps = times if with_time else None
    with torch.no_grad():
        full = model(ids, stamps)[:, -1]
        fast = model.encode(ids, stamps)
    assert fast.shape == full.shape == (5, DIM)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


def test_last_only_trains_like_the_full_forward_at_the_last_position(
    make_model: MakeModel,
) -> None:
    # Prefix training scores the last position only and asks for it alone (last_only): the
    # loss and every parameter's gradient must equal those of the full forward's last row.
    no_dropout = {"dropout": 0.0}
    if "attention_dropout" in {f.name for f in dataclasses.fields(make_model().config)}:
        no_dropout["attention_dropout"] = 0.0
    model = make_model(num_blocks=2, **no_dropout).train()
    ids, times = left_padded([20, 1, 7, 13], 20, seed=4)
    targets = torch.randint(1, NUM_ITEMS + 1, (4,))

    def loss_and_grads(last_only: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        hidden = model(ids, times, last_only=last_only)
        assert hidden.shape == ((4, 1, DIM) if last_only else (4, 20, DIM))
        loss = F.cross_entropy(model.score(hidden[:, -1]), targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full_loss, full_grads = loss_and_grads(last_only=False)
    last_loss, last_grads = loss_and_grads(last_only=True)
    torch.testing.assert_close(last_loss, full_loss, atol=1e-6, rtol=1e-5)
    assert len(last_grads) == len(full_grads)
    for got, want in zip(last_grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_input_longer_than_max_length_is_a_config_error(make_model: MakeModel) -> None:
    model = make_model()
    ids, _ = left_padded([21], 21)
    with pytest.raises(ConfigError, match="max_length"):
        model(ids)


def test_hstu_time_bias() -> None:
    torch.manual_seed(0)
    model = make_hstu().eval()
    ids, times = left_padded([10, 6], 10)
    stretched = times.clone()
    stretched[ids > 0] = times[ids > 0] * 3 - 2_000_000_000  # same order, larger gaps
    with_time = model(ids, times)
    assert not torch.allclose(model(ids, stretched), with_time)
    assert not torch.allclose(model(ids, None), with_time)

    with torch.no_grad():  # with the time weights zeroed, timestamps must not matter
        for block in model.blocks:
            block.time_bias.zero_()
    torch.testing.assert_close(model(ids, times), model(ids, None))

    no_time = make_hstu(use_time_bias=False).eval()
    torch.testing.assert_close(no_time(ids, times), no_time(ids, None))
    assert not any("time_bias" in name for name, _ in no_time.named_parameters())


def test_hstu_time_buckets_are_log_spaced() -> None:
    model = make_hstu(num_time_buckets=20)
    times = torch.tensor([[0, 1, 10, 10**9]])
    buckets = model.time_buckets(times)
    assert buckets.shape == (1, 4, 4)
    assert buckets[0, 0, 0] == 0  # no difference -> bucket 0
    assert buckets[0, 1, 0] == 2  # floor(ln 2 / 0.301)
    assert buckets[0, 2, 0] == 7  # floor(ln 11 / 0.301)
    assert buckets[0, 3, 0] == 20  # clamped to num_time_buckets
    torch.testing.assert_close(buckets[0], buckets[0].T)


def test_gradients_reach_every_parameter(make_model: MakeModel) -> None:
    model = make_model(dropout=0.1).train()
    ids, times = left_padded([10, 5, 1, 10], 10)
    hidden = model(ids, times)
    targets = torch.randint(1, NUM_ITEMS + 1, ids.shape)
    mask = ids > 0
    F.cross_entropy(model.score(hidden[mask]), targets[mask]).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    table_grad = model.item_embedding.weight.grad
    assert (table_grad[0] == 0).all()  # padding row is never trained


def toy_batch(gen: torch.Generator, batch: int = 64, length: int = 10, n: int = 20) -> Any:
    """Sequences i, i+1, ... (mod n) with random left padding; targets are the next items."""
    start = torch.randint(0, n, (batch, 1), generator=gen)
    seq = (start + torch.arange(length + 1)) % n + 1  # [B, L + 1]
    pad = torch.randint(0, length - 1, (batch,), generator=gen)
    seq = seq.masked_fill(torch.arange(length + 1) < pad[:, None], 0)
    inputs, targets = seq[:, :-1], seq[:, 1:]
    return inputs, targets.masked_fill(inputs == 0, 0)


@pytest.mark.parametrize("model_type", ["sasrec", "hstu", "bsarec"])
def test_tiny_model_learns_next_item(model_type: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    config = {"num_items": 20, "max_length": 10, "dim": 32, "dropout": 0.0}
    if model_type == "bsarec":
        config["attention_dropout"] = 0.0
    model = build_model(model_type, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        inputs, targets = toy_batch(gen)
        hidden = model(inputs)
        mask = targets > 0
        if not model.causal:  # a non-causal model learns the last position of each window
            mask[:, :-1] = False
        loss = F.cross_entropy(model.score(hidden[mask]), targets[mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    inputs, targets = toy_batch(gen, batch=256)
    mask = targets > 0
    if not model.causal:
        mask[:, :-1] = False
    with torch.no_grad():
        predicted = model.score(model(inputs)[mask]).argmax(-1)
    assert (predicted == targets[mask]).float().mean() > 0.9


@pytest.mark.parametrize(
    ("config_cls", "values", "field"),
    [
        (SASRecConfig, {"num_items": 0}, "num_items"),
        (SASRecConfig, {"num_items": 10, "dim": 10, "num_heads": 3}, "num_heads"),
        (SASRecConfig, {"num_items": 10, "dropout": 1.0}, "dropout"),
        (SASRecConfig, {"num_items": 10, "activation": "tanh"}, "activation"),
        (SASRecConfig, {"num_items": 10, "temperature": 0.0}, "temperature"),
        (SASRecConfig, {"num_items": 10, "max_length": 2.5}, "max_length"),
        (SASRecConfig, {"num_items": 10, "ffn_multiplier": 0}, "ffn_multiplier"),
        (HSTUConfig, {"num_items": -1}, "num_items"),
        (HSTUConfig, {"num_items": 10, "dim": 10, "num_heads": 3}, "num_heads"),
        (HSTUConfig, {"num_items": 10, "attention_dim": 0}, "attention_dim"),
        (HSTUConfig, {"num_items": 10, "attention_dropout": -0.1}, "attention_dropout"),
        (HSTUConfig, {"num_items": 10, "num_time_buckets": 0}, "num_time_buckets"),
        (HSTUConfig, {"num_items": 10, "time_bucket_width": 0}, "time_bucket_width"),
        (HSTUConfig, {"num_items": 10, "use_time_bias": 1}, "use_time_bias"),
        (BSARecConfig, {"num_items": 10, "alpha": 1.5}, "alpha"),
        (BSARecConfig, {"num_items": 10, "c": 0}, "c"),
        (BSARecConfig, {"num_items": 10, "attention_dropout": 1.0}, "attention_dropout"),
        (BSARecConfig, {"num_items": 10, "dim": 10, "num_heads": 4}, "num_heads"),
        (BSARecConfig, {"num_items": 10, "normalize_embeddings": "yes"}, "normalize_embeddings"),
    ],
)
def test_config_validation_names_the_field(
    config_cls: type[Any], values: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        config_cls(**values)


def test_hstu_head_dims_fit_a_dim_not_divisible_by_heads() -> None:
    model = make_hstu(dim=10, num_heads=3, attention_dim=4, linear_dim=5).eval()
    ids, times = left_padded([5], 6)
    assert model(ids, times).shape == (1, 6, 10)


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_factory_round_trip(model_type: str) -> None:
    torch.manual_seed(0)
    model = build_model(model_type, {"num_items": NUM_ITEMS, "dim": DIM, "num_blocks": 3}).eval()
    saved = json.loads(json.dumps(config_to_dict(model)))
    assert saved["type"] == model_type
    rebuilt = build_model(saved["type"], saved).eval()
    assert type(rebuilt) is type(model)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    ids, times = left_padded([10, 4], 10)
    torch.testing.assert_close(rebuilt(ids, times), model(ids, times))


def test_factory_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="bert4rec"):
        build_model("bert4rec", {"num_items": 5})
    with pytest.raises(ConfigError, match="hidden_size"):
        build_model("sasrec", {"num_items": 5, "hidden_size": 8})
    with pytest.raises(ConfigError, match="num_items"):
        build_model("hstu", {"dim": 8})
    with pytest.raises(ConfigError, match="hstu"):
        build_model("sasrec", {"type": "hstu", "num_items": 5})
