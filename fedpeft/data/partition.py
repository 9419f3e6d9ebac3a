"""Federated partitioning of a train split over clients with flwr-datasets partitioners."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping

import datasets
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from fedpeft.data.spec import plain_config
from fedpeft.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "pathological")
CLASS_ASSIGNMENT_MODES = ("first-deterministic", "deterministic", "random")
_CACHE_SIZE = 16  # partitioners kept per process

_PARTITIONERS: OrderedDict[tuple, Partitioner] = OrderedDict()


def partition_dataset(
    train: datasets.Dataset, num_partitions: int, partition_id: int, cfg: Mapping, seed: int
) -> datasets.Dataset:
    """Return the training examples of client `partition_id` out of `num_partitions`.

    Deterministic in (train, num_partitions, cfg, seed), so separate client processes agree.
    """
    partitioner = _partitioner(train, num_partitions, cfg, seed)
    if isinstance(partition_id, bool) or not isinstance(partition_id, int):
        raise ConfigError(f"partition-id must be an integer, got {partition_id!r}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"partition-id={partition_id} is outside [0, {num_partitions}): "
            f"set partition-id below num-partitions (federation.num_clients={num_partitions})"
        )
    return partitioner.load_partition(partition_id)


def partition_sizes(
    train: datasets.Dataset, num_partitions: int, cfg: Mapping, seed: int
) -> list[int]:
    """Count the training examples of every client, for summaries and tests."""
    partitioner = _partitioner(train, num_partitions, cfg, seed)
    return [len(partitioner.load_partition(i)) for i in range(num_partitions)]


def _partitioner(
    train: datasets.Dataset, num_partitions: int, cfg: Mapping, seed: int
) -> Partitioner:
    """Build (or reuse, per process) a flwr-datasets partitioner with its assignment computed."""
    params = _partition_params(cfg)
    if (
        isinstance(num_partitions, bool)
        or not isinstance(num_partitions, int)
        or num_partitions < 1
    ):
        raise ConfigError(
            f"federation.num_clients must be a positive integer, got {num_partitions!r}"
        )
    if num_partitions > len(train):
        raise ConfigError(
            f"federation.num_clients={num_partitions} exceeds the {len(train)} training examples "
            "of the dataset: lower federation.num_clients or raise dataset.max_train_examples"
        )
    key = (train._fingerprint, len(train), num_partitions, params, int(seed))
    if key in _PARTITIONERS:
        _PARTITIONERS.move_to_end(key)
        return _PARTITIONERS[key]
    partitioner = _build_partitioner(train, num_partitions, params, int(seed))
    _PARTITIONERS[key] = partitioner
    while len(_PARTITIONERS) > _CACHE_SIZE:
        _PARTITIONERS.popitem(last=False)
    return partitioner


def _partition_params(cfg: Mapping) -> tuple:
    c = plain_config(cfg)
    name = c.get("name")
    if name == "iid":
        return ("iid",)
    if name == "dirichlet":
        alpha = c.get("alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise ConfigError(
                f"partition.alpha must be a number > 0, got {alpha!r}: e.g. partition.alpha=0.5"
            )
        size = c.get("min_partition_size", 10)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigError(f"partition.min_partition_size must be an integer >= 0, got {size!r}")
        return ("dirichlet", float(alpha), size)
    if name == "pathological":
        k = c.get("num_classes_per_partition")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(
                f"partition.num_classes_per_partition must be an integer >= 1, got {k!r}"
            )
        mode = c.get("class_assignment_mode", "first-deterministic")
        if mode not in CLASS_ASSIGNMENT_MODES:
            raise ConfigError(
                f"partition.class_assignment_mode={mode!r} is not one of "
                f"{', '.join(CLASS_ASSIGNMENT_MODES)}"
            )
        return ("pathological", k, mode)
    raise ConfigError(
        f"partition.name={name!r} is not a known partitioning: use one of {', '.join(PARTITIONS)} "
        "(e.g. partition=dirichlet)"
    )


def _build_partitioner(
    train: datasets.Dataset, num_partitions: int, params: tuple, seed: int
) -> Partitioner:
    name = params[0]
    if name == "iid":
        partitioner: Partitioner = IidPartitioner(num_partitions)
        partitioner.dataset = train.shuffle(seed=seed)
        return partitioner
    if name == "dirichlet":
        _, alpha, min_size = params
        if min_size * num_partitions > len(train):
            raise ConfigError(
                f"partition.min_partition_size={min_size} x federation.num_clients="
                f"{num_partitions} exceeds the {len(train)} training examples: lower one of them"
            )
        partitioner = DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=True,
            seed=seed,
        )
        fix = (
            "raise partition.alpha or lower partition.min_partition_size or federation.num_clients"
        )
    else:
        _, k, mode = params
        present = len(train.unique("label"))
        if k > present:
            raise ConfigError(
                f"partition.num_classes_per_partition={k} exceeds the {present} labels present "
                "in the training set: lower it"
            )
        partitioner = PathologicalPartitioner(
            num_partitions,
            partition_by="label",
            num_classes_per_partition=k,
            class_assignment_mode=mode,
            seed=seed,
        )
        fix = "lower federation.num_clients or partition.num_classes_per_partition"
    partitioner.dataset = train
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            partitioner.load_partition(0)
    except ValueError as err:
        reason = " ".join(str(err).split())
        raise ConfigError(
            f"partition={name} cannot split {len(train)} examples over {num_partitions} clients "
            f"({reason}): {fix}"
        ) from err
    return partitioner
