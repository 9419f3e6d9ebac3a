"""fedpeft.data.sources and .spec: the load cache, seeded subsets and config validation."""

from __future__ import annotations

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
