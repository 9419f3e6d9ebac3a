"""fedpeft.data.sources and .spec: the load cache, seeded subsets and config validation."""

from __future__ import annotations

from collections import Counter

import pytest
from omegaconf import OmegaConf

from fedpeft import data
from fedpeft.errors import ConfigError
from tests.data.conftest import CONFIGS, dataset_cfg


def test_loads_are_cached_and_subsets_seeded() -> None:
    cfg = dataset_cfg("sst2", max_train_examples=200, max_test_examples=50)
    first = data.load_text_dataset(cfg, seed=1)
    assert data.load_text_dataset(OmegaConf.create(cfg), seed=1) is first
    assert (len(first.train), len(first.test)) == (200, 50)
    other = data.load_text_dataset(cfg, seed=2)
    assert first.train["text"] != other.train["text"]
    assert data.load_text_dataset(cfg, seed=1).train["text"] == first.train["text"]


def test_unknown_source_and_bad_fields() -> None:
    with pytest.raises(ConfigError, match="spamassassin, sst2, banking77, trec, files, hf"):
        data.load_text_dataset({"name": "imdb"})
    with pytest.raises(ConfigError, match="dataset.test_fraction"):
        data.load_text_dataset(dataset_cfg("trec", test_fraction=1.5))
    with pytest.raises(ConfigError, match="dataset.max_train_examples"):
        data.load_text_dataset(dataset_cfg("trec", max_train_examples=0))
    with pytest.raises(ConfigError, match="dataset.path is required"):
        data.load_text_dataset(OmegaConf.load(CONFIGS / "dataset" / "files.yaml"))


def test_a_validation_split_is_carved_from_train_and_the_test_split_never_read() -> None:
    full = data.load_text_dataset(dataset_cfg("trec"), seed=3)
    carved = data.load_text_dataset(dataset_cfg("trec", validation_fraction=0.2), seed=3)
    pairs = Counter(zip(full.train["text"], full.train["label"], strict=True))
    train = Counter(zip(carved.train["text"], carved.train["label"], strict=True))
    held = Counter(zip(carved.test["text"], carved.test["label"], strict=True))
    assert train + held == pairs  # a partition of the training split: the test split is unused
    assert len(carved.test) == pytest.approx(0.2 * len(full.train), abs=1)
    # stratified: every label keeps its share of the training split in the validation split
    for label in range(full.num_labels):
        share = full.train["label"].count(label) / len(full.train)
        carved_share = carved.test["label"].count(label) / len(carved.test)
        assert carved_share == pytest.approx(share, abs=0.01)
    same = data.load_text_dataset(dataset_cfg("trec", validation_fraction=0.2), seed=3)
    assert same.test["text"] == carved.test["text"]


def test_a_bad_validation_fraction_names_its_key() -> None:
    for bad in (0, 1, 1.5, float("nan"), True, "0.2"):
        with pytest.raises(ConfigError, match=r"dataset.validation_fraction must be a number"):
            data.load_text_dataset(dataset_cfg("sst2", validation_fraction=bad))
