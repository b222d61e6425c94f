"""Item attributes: the JSON file, the dataset's attribute index, the attribute item table, and
training with it (the published version folds the attributes into a plain table)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recloop.config import ConfigError, config_from_dict
from recloop.data.attributes import attribute_index, read_item_attributes
from recloop.data.dataset import SequenceDataset
from recloop.data.prepare import FileSource, prepare, prepare_file, with_source_order
from recloop.data.synthetic import SyntheticConfig, generate_events
from recloop.errors import DatasetError
from recloop.evaluate import EvalConfig, evaluate
from recloop.models.embeddings import (
    AttributeItemEmbedding,
    ItemEmbedding,
    folded_state_dict,
    with_item_attributes,
)
from recloop.models.factory import build_model
from recloop.registry import Registry
from recloop.registry.loading import load_model
from recloop.train.trainer import train
from tests.test_train import checkpoint_weights, tiny_train

# user::item::rating::timestamp; items 3, 5, 7, 9 (dense ids 1..4 in that order).
RATINGS = "10::7::5::300\n20::5::4::100\n10::3::3::100\n20::9::2::100\n10::5::4::200\n"


def test_reading_the_file_names_what_is_wrong(write) -> None:  # type: ignore[no-untyped-def]
    good = write("a.json", json.dumps({"3": ["brand x", 12], "9": []}))
    assert read_item_attributes(good) == {"3": frozenset({"brand x", "12"}), "9": frozenset()}
    cases = {
        "list.json": ("[1, 2]", r"list\.json: item attributes must be a JSON object"),
        "bad.json": ("{not json", r"bad\.json: cannot read item attributes"),
        "value.json": ('{"3": "brand"}', r"attributes of item '3' must be a list"),
        "nested.json": ('{"3": [["a"]]}', r"attribute \['a'\] of item '3' is not a string"),
        "bool.json": ('{"3": [true]}', r"attribute True of item '3' is not a string"),
    }
    for name, (text, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            read_item_attributes(write(name, text))
    with pytest.raises(ConfigError, match=r"absent\.json: cannot read"):
        read_item_attributes(good.parent / "absent.json")


def test_attribute_index_rows_follow_dense_ids() -> None:
    attributes = {"5": frozenset({"b", "a"}), "9": frozenset({"c"}), "42": frozenset({"z"})}
    found = attribute_index(attributes, ["3", "5", "7", "9"])
    assert found.names == ["a", "b", "c"]  # "z" belongs to an item the log does not have
    assert found.index.tolist() == [[0, 0], [0, 0], [1, 2], [0, 0], [3, 0]]
    assert found.summary() == {
        "attributes": 3, "max_per_item": 2, "items_with_attributes": 2, "unknown_items": 1
    }  # fmt: skip


def test_prepare_writes_the_index_and_refuses_a_bad_file_before_writing(
    tmp_path: Path,
    write,  # type: ignore[no-untyped-def]
) -> None:
    log = write("ratings.dat", RATINGS)
    attributes = write("attrs.json", json.dumps({"5": ["b", "a"], "9": [3], "42": ["z"]}))
    manifest = prepare_file(
        FileSource(log, "movielens-dat"), tmp_path / "d", item_attributes=attributes
    )
    assert manifest["item_attributes"] == {
        "source": str(attributes), "attributes": 3, "max_per_item": 2,
        "items_with_attributes": 2, "unknown_items": 1,
    }  # fmt: skip
    data = SequenceDataset(tmp_path / "d", verify=True)  # the new files are checksummed too
    index = data.item_attributes
    assert index is not None and index.dtype == np.int32
    assert index.tolist() == [[0, 0], [0, 0], [2, 3], [0, 0], [1, 0]]  # names "3" < "a" < "b"
    assert {"item_attributes.npy", "attributes.parquet"} <= set(manifest["files"])  # type: ignore[operator]

    plain = prepare_file(FileSource(log, "movielens-dat"), tmp_path / "plain")
    assert (
        "item_attributes" not in plain
        and SequenceDataset(tmp_path / "plain").item_attributes is None
    )

    np.save(tmp_path / "plain" / "item_attributes.npy", np.zeros((3, 2), dtype=np.int32))
    with pytest.raises(DatasetError, match=r"item_attributes\.npy: shape \(3, 2\) does not match"):
        _ = SequenceDataset(tmp_path / "plain").item_attributes

    broken = write("broken.json", '{"5": "b"}')
    with pytest.raises(ConfigError, match=r"broken\.json: attributes of item '5'"):
        prepare_file(FileSource(log, "movielens-dat"), tmp_path / "never", item_attributes=broken)
    assert not (tmp_path / "never").exists()


def test_attribute_table_rows_share_attribute_vectors_and_fold_exactly() -> None:
    torch.manual_seed(0)
    base = ItemEmbedding(4, 8)
    ids = torch.tensor([[0, 0], [1, 2], [3, 0], [0, 0], [1, 0]])  # item 3 has none
    table = AttributeItemEmbedding(base, ids, init_std=0.5)
    assert table.weight is base.weight
    attribute = table.attribute_weight
    expected = base.weight.detach().clone()
    expected[1] += (attribute[1] + attribute[2]).detach() / 2
    expected[2] += attribute[3].detach()
    expected[4] += attribute[1].detach()
    torch.testing.assert_close(table.table().detach(), expected)
    queried = torch.tensor([[4, 0, 1], [2, 3, 3]])
    torch.testing.assert_close(table(queried), table.table()[queried])
    assert torch.equal(table(torch.tensor([0])), torch.zeros(1, 8))  # padding stays zero

    table.output_table().sum().backward()
    assert attribute.grad is not None and torch.equal(attribute.grad[0], torch.zeros(8))
    assert bool((attribute.grad[1:4] != 0).all())

    plain = table.fold()
    assert type(plain) is ItemEmbedding and set(plain.state_dict()) == {"weight"}
    torch.testing.assert_close(plain.output_table(), table.output_table().detach())

    with pytest.raises(ValueError, match=r"must be \[5, A\]"):
        AttributeItemEmbedding(base, ids[:3], init_std=0.02)
    with pytest.raises(ValueError, match="padding item"):
        AttributeItemEmbedding(base, ids.flip(0), init_std=0.02)


@pytest.mark.parametrize("model_type", ["sasrec", "hstu", "bsarec"])
def test_a_folded_model_scores_like_the_attribute_model(model_type: str) -> None:
    torch.manual_seed(1)
    config = {"num_items": 30, "dim": 16, "num_blocks": 1, "num_heads": 1, "max_length": 6}
    model = build_model(model_type, config).eval()
    attribute_ids = torch.randint(0, 5, (31, 3))
    attribute_ids[0] = 0
    with_item_attributes(model, attribute_ids, init_std=0.3)
    plain = build_model(model_type, config).eval()
    plain.load_state_dict(folded_state_dict(model))  # strict: same keys as a plain model
    seqs = torch.randint(1, 31, (4, 6))
    seqs[0, :3] = 0  # a left-padded history
    with torch.no_grad():
        torch.testing.assert_close(plain.score(plain.encode(seqs)), model.score(model.encode(seqs)))


@pytest.fixture(scope="module")
def data_with_attributes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic log whose items carry their topic as an attribute, plus one shared by all."""
    root = tmp_path_factory.mktemp("attrs")
    config = SyntheticConfig(
        num_users=400, num_items=120, num_topics=8, mean_length=12.0, max_length=40, seed=1
    )
    prepare(with_source_order(generate_events(config)), {"kind": "synthetic"}, root / "plain")
    events = SequenceDataset(root / "plain")
    items = events.items.to_raw(np.arange(1, events.num_items + 1)).tolist()
    attributes = {str(raw): [f"group {i % 8}", "catalogue"] for i, raw in enumerate(items)}
    path = root / "attributes.json"
    path.write_text(json.dumps(attributes))
    prepare(
        with_source_order(generate_events(config)), {"kind": "synthetic"}, root / "data",
        item_attributes=path,
    )  # fmt: skip
    return root


def test_training_with_attributes_publishes_a_plain_version(
    data_with_attributes: Path, tmp_path: Path
) -> None:
    data = data_with_attributes / "data"
    model = {"type": "sasrec", "dim": 16, "num_blocks": 1, "num_heads": 1, "dropout": 0.0}
    config = config_from_dict(
        {
            "model": model,
            "train": tiny_train(max_steps=40, eval_every_steps=20, item_attributes=True),
        }
    )
    result = train(
        config, data, tmp_path / "run", registry_dir=tmp_path / "reg", show_progress=False
    )
    assert result.best_metrics["HR@10"] > 0.2  # it learns (popularity alone gives ~0.1)
    assert "item_embedding.attribute_weight" in checkpoint_weights(tmp_path / "run")  # resumable

    registry = Registry(tmp_path / "reg")
    assert version_keys(registry, result.version) == set(build_model("sasrec", {
        "num_items": 120, "dim": 16, "num_blocks": 1, "num_heads": 1, "max_length": 20,
    }).state_dict())  # fmt: skip
    published, manifest = load_model(registry, str(result.version))
    assert manifest.training["config"]["train"]["item_attributes"] is True
    split = SequenceDataset(data).leave_one_out()
    again = evaluate(published, split.test, split.source, EvalConfig(max_length=20))
    assert again["NDCG@10"] == pytest.approx(result.test_metrics["NDCG@10"])


def version_keys(registry: Registry, version: str | None) -> set[str]:
    assert version is not None
    return set(registry.load_tensors(version))


def test_resume_with_attributes_reaches_the_same_parameters(
    data_with_attributes: Path, tmp_path: Path
) -> None:
    data = data_with_attributes / "data"
    model = {"type": "sasrec", "dim": 16, "num_blocks": 1, "num_heads": 1, "dropout": 0.3}
    config = config_from_dict({"model": model, "train": tiny_train(item_attributes=True)})
    train(config, data, tmp_path / "a", show_progress=False)
    train(config, data, tmp_path / "b", stop_at_step=7, show_progress=False)
    train(config, data, tmp_path / "b", resume=True, show_progress=False)
    a, b = checkpoint_weights(tmp_path / "a"), checkpoint_weights(tmp_path / "b")
    assert a.keys() == b.keys() and "item_embedding.attribute_weight" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_attributes_need_a_dataset_that_has_them(
    data_with_attributes: Path, tmp_path: Path
) -> None:
    model = {"type": "sasrec", "dim": 16, "num_blocks": 1, "num_heads": 1}
    config = config_from_dict({"model": model, "train": tiny_train(item_attributes=True)})
    with pytest.raises(
        ConfigError, match=r"needs a dataset prepared with --item-attributes; .*plain"
    ):
        train(config, data_with_attributes / "plain", tmp_path / "run", show_progress=False)
