"""fedpeft.data.partition: iid, dirichlet and pathological partitions over clients."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from fedpeft import data
from fedpeft.data import partition
from fedpeft.errors import ConfigError
from tests.data.conftest import PARTITIONS, partition_cfg


@pytest.mark.parametrize("name", list(PARTITIONS))
def test_partitions_are_disjoint_and_cover(trec_train: datasets.Dataset, name: str) -> None:
    n = 8
    parts = [data.partition_dataset(trec_train, n, i, PARTITIONS[name], seed=0) for i in range(n)]
    ids = [i for part in parts for i in part["idx"]]
    assert len(ids) == len(set(ids)) == len(trec_train)
    assert data.partition_sizes(trec_train, n, PARTITIONS[name], seed=0) == [len(p) for p in parts]
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("name", list(PARTITIONS))
def test_partitions_are_deterministic(trec_train: datasets.Dataset, name: str) -> None:
    first = data.partition_dataset(trec_train, 6, 4, PARTITIONS[name], seed=5)["idx"]
    partition._PARTITIONERS.clear()
    assert data.partition_dataset(trec_train, 6, 4, PARTITIONS[name], seed=5)["idx"] == first
    other = data.partition_dataset(trec_train, 6, 4, PARTITIONS[name], seed=6)["idx"]
    assert other != first


def label_skew(train: datasets.Dataset, n: int, cfg: dict) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    k = len(train.features["label"].names)
    overall = np.bincount(train["label"][:], minlength=k) / len(train)
    distances = []
    for i in range(n):
        labels = data.partition_dataset(train, n, i, cfg, seed=0)["label"][:]
        mix = np.bincount(labels, minlength=k) / len(labels)
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def test_dirichlet_small_alpha_skews_labels(trec_train: datasets.Dataset) -> None:
    iid = label_skew(trec_train, 10, PARTITIONS["iid"])
    skewed = label_skew(trec_train, 10, partition_cfg("dirichlet", alpha=0.1))
    assert iid < 0.05
    assert skewed > 0.4


def test_pathological_limits_labels_per_client(trec_train: datasets.Dataset) -> None:
    for k in (1, 2, 3):
        cfg = partition_cfg("pathological", num_classes_per_partition=k)
        for i in range(10):
            labels = data.partition_dataset(trec_train, 10, i, cfg, seed=0)["label"]
            assert 1 <= len(set(labels)) <= k


def test_partition_errors(trec_train: datasets.Dataset) -> None:
    too_many = len(trec_train) + 1
    with pytest.raises(ConfigError, match=f"federation.num_clients={too_many} exceeds the 5452"):
        data.partition_dataset(trec_train, too_many, 0, PARTITIONS["iid"], seed=0)
    with pytest.raises(ConfigError, match="iid, dirichlet, pathological"):
        data.partition_dataset(trec_train, 4, 0, {"name": "shards"}, seed=0)
    with pytest.raises(ConfigError, match="partition.alpha"):
        data.partition_dataset(trec_train, 4, 0, partition_cfg("dirichlet", alpha=0), seed=0)
    with pytest.raises(ConfigError, match="partition.min_partition_size"):
        cfg = partition_cfg("dirichlet", min_partition_size=2000)
        data.partition_dataset(trec_train, 4, 0, cfg, seed=0)
    with pytest.raises(ConfigError, match="partition.num_classes_per_partition=7 exceeds the 6"):
        cfg = partition_cfg("pathological", num_classes_per_partition=7)
        data.partition_dataset(trec_train, 4, 0, cfg, seed=0)
    with pytest.raises(ConfigError, match="partition-id=4 is outside"):
        data.partition_dataset(trec_train, 4, 4, PARTITIONS["iid"], seed=0)
    with pytest.raises(ConfigError, match="federation.num_clients must be a positive integer"):
        data.partition_sizes(trec_train, 0, PARTITIONS["iid"], seed=0)
