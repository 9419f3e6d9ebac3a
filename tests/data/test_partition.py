"""fedpeft.data.partition: iid, dirichlet and pathological partitions over clients."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from flwr_datasets.partitioner import DirichletPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft import data
from fedpeft.data import partition
from fedpeft.errors import ConfigError
from tests.data.conftest import PARTITIONS, dataset_cfg, partition_cfg


@pytest.fixture(scope="module")
def sst2_train() -> datasets.Dataset:
    return data.load_text_dataset(dataset_cfg("sst2")).train


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
    partition._PARTITIONINGS.clear()
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
    with pytest.raises(ConfigError, match="iid, dirichlet, pathological, sampled"):
        data.partition_dataset(trec_train, 4, 0, {"name": "shards"}, seed=0)
    with pytest.raises(ConfigError, match="partition.alpha"):
        data.partition_dataset(trec_train, 4, 0, partition_cfg("dirichlet", alpha=0), seed=0)
    with pytest.raises(ConfigError, match="partition.min_partition_size=2000 x federation"):
        cfg = partition_cfg("dirichlet", min_partition_size=2000)
        data.partition_dataset(trec_train, 4, 0, cfg, seed=0)
    with pytest.raises(ConfigError, match="partition.min_partition_size must be an integer"):
        cfg = partition_cfg("dirichlet", min_partition_size="some")
        data.partition_dataset(trec_train, 4, 0, cfg, seed=0)
    with pytest.raises(ConfigError, match="partition.num_classes_per_partition=7 exceeds the 6"):
        cfg = partition_cfg("pathological", num_classes_per_partition=7)
        data.partition_dataset(trec_train, 4, 0, cfg, seed=0)
    with pytest.raises(ConfigError, match="partition-id=4 is outside"):
        data.partition_dataset(trec_train, 4, 4, PARTITIONS["iid"], seed=0)
    with pytest.raises(ConfigError, match="federation.num_clients must be a positive integer"):
        data.partition_sizes(trec_train, 0, PARTITIONS["iid"], seed=0)


@settings(max_examples=25, deadline=None)
@given(
    clients=st.integers(1, 60),
    alpha=st.sampled_from([0.05, 0.3, 1.0, 10.0]),
    labels=st.integers(1, 6),
    rows=st.integers(60, 400),
    seed=st.integers(0, 2**31 - 1),
)
def test_dirichlet_split_is_flwr_datasets_draw(
    clients: int, alpha: float, labels: int, rows: int, seed: int
) -> None:
    """The vectorised draw gives exactly DirichletPartitioner's partitions (same seed)."""
    y = np.random.default_rng(seed).integers(0, labels, rows)
    reference = DirichletPartitioner(
        clients, "label", alpha, min_partition_size=0, self_balancing=True, seed=seed
    )
    reference.dataset = datasets.Dataset.from_dict({"label": y.tolist()})
    reference.load_partition(0)
    drawn = partition.dirichlet_split(y, clients, alpha, seed)
    assert [d.tolist() for d in drawn] == [
        reference._partition_id_to_indices[i] for i in range(clients)
    ]


def test_dirichlet_floor_rule() -> None:
    assert partition.dirichlet_floor("auto", 67_349, 10) == 10
    assert partition.dirichlet_floor("auto", 67_349, 1_000) == 10
    assert partition.dirichlet_floor("auto", 67_349, 10_000) == 1
    assert partition.dirichlet_floor("auto", 67_349, 50_000) == 1
    assert partition.dirichlet_floor("auto", 5_452, 100) == 10
    assert partition.dirichlet_floor("auto", 5_452, 500) == 2
    assert partition.dirichlet_floor(3, 100, 50) == 3


@pytest.mark.parametrize(
    ("name", "clients"),
    [("dirichlet", 1_000), ("dirichlet", 10_000), ("dirichlet", 50_000), ("pathological", 50_000)],
)
def test_label_skew_works_at_cross_device_scale(
    sst2_train: datasets.Dataset, clients: int, name: str
) -> None:
    """At the defaults, every SST-2 client gets examples, disjointly, all examples used."""
    cfg = partition_cfg(name)
    sizes = data.partition_sizes(sst2_train, clients, cfg, seed=0)
    assert len(sizes) == clients and min(sizes) >= 1 and sum(sizes) == len(sst2_train)
    part = partition._PARTITIONINGS[next(reversed(partition._PARTITIONINGS))]
    if name == "dirichlet":
        everyone = np.concatenate(part.indices)
        assert len(np.unique(everyone)) == len(sst2_train)
        floor = partition.dirichlet_floor("auto", len(sst2_train), clients)
        assert min(sizes) >= floor
    for i in (0, clients // 2, clients - 1):
        assert len(data.partition_dataset(sst2_train, clients, i, cfg, seed=0)) == sizes[i]
    partition._PARTITIONINGS.clear()
    assert data.partition_sizes(sst2_train, clients, cfg, seed=0) == sizes


def test_dirichlet_keeps_label_skew_at_1000_clients(sst2_train: datasets.Dataset) -> None:
    """The even floor dilutes the skew only a little: far from IID at 1,000 clients."""
    labels = np.asarray(sst2_train["label"][:])
    overall = np.bincount(labels, minlength=2) / len(labels)

    def skew(cfg: dict) -> float:
        data.partition_sizes(sst2_train, 1_000, cfg, seed=0)
        parts = partition._PARTITIONINGS[next(reversed(partition._PARTITIONINGS))]
        mixes = [np.bincount(labels[ix], minlength=2) / len(ix) for ix in parts.indices]
        return float(np.mean([0.5 * np.abs(m - overall).sum() for m in mixes]))

    assert skew(partition_cfg("dirichlet", alpha=0.5)) > 0.25
    assert skew(partition_cfg("dirichlet", alpha=100.0)) < 0.1


def test_sampled_clients_outnumber_the_examples_and_draw_their_own(
    trec_train: datasets.Dataset,
) -> None:
    """partition=sampled: a million clients over 5,452 questions, each a seeded draw of
    distinct examples whose count follows the user-size distribution."""
    n, cfg = 1_000_000, partition_cfg("sampled", mean_examples=12, min_examples=3)
    sizes = np.asarray(data.partition_sizes(trec_train, n, cfg, seed=0))
    assert sizes.shape == (n,) and sizes.min() >= 3 and sizes.max() <= len(trec_train)
    assert abs(sizes.mean() - 12) < 0.05  # Poisson(12), floored at 3: mean ~12.0006
    assert 10 < sizes.var() < 13
    for client in (0, 17, n - 1):
        part = data.partition_dataset(trec_train, n, client, cfg, seed=0)
        ids = part["idx"]
        assert len(ids) == len(set(ids)) == sizes[client]
        partition._PARTITIONINGS.clear()  # another process draws the same examples
        assert data.partition_dataset(trec_train, n, client, cfg, seed=0)["idx"] == ids
        assert data.partition_dataset(trec_train, n, client, cfg, seed=1)["idx"] != ids
    constant = partition_cfg("sampled", mean_examples=7, size_distribution="constant")
    assert set(data.partition_sizes(trec_train, 1000, constant, seed=0)) == {7}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"mean_examples": 0}, "partition.mean_examples must be an integer in"),
        ({"mean_examples": 2.5}, "partition.mean_examples"),
        ({"min_examples": True}, "partition.min_examples"),
        ({"size_distribution": "zipf"}, "partition.size_distribution='zipf' is not one of"),
        ({"alpha": 0.5}, "partition=sampled has no key"),
    ],
)
def test_sampled_settings_are_checked(trec_train, change, problem) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=problem):
        data.partition_sizes(trec_train, 10, partition_cfg("sampled", **change), seed=0)
