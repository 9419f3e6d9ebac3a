"""Federated partitioning of a train split over clients with flwr-datasets partitioners.

Label skew at any number of clients, from 10 to 50,000 on SST-2's 67,349 sentences:
- dirichlet: flwr-datasets' DirichletPartitioner alone leaves clients empty once they hold a few
  dozen examples on average (alpha 0.5 on SST-2: 10 of 1,000 clients and 15,254 of 50,000 get
  none, so its minimum-size retries give up). fedpeft gives every client a floor first: a seeded
  permutation deals `floor` examples to each client, and the remaining examples are split by the
  DirichletPartitioner's own draw (`dirichlet_split`). `partition.min_partition_size` is that floor;
  its default `auto` is min(10, max(1, examples // (4 x clients))): 10 while clients hold 40 or
  more on average (at most a quarter of the data dealt evenly), 1 once they hold fewer than 8. An
  explicit floor the data cannot give every client is an error.
- pathological: a client holds at most min(num_classes_per_partition, examples // clients)
  labels (at least 1), since flwr-datasets refuses a label wanted by more clients than it has
  examples; a split that still leaves a client empty is an error.

A population larger than the data set (a million simulated phones on 67,349 sentences):
- sampled: an artificial federated data set, as pfl-research builds one. Client i's size is
  drawn from a user-size distribution (`size_distribution`: poisson with mean `mean_examples`,
  at least `min_examples`; or constant), and its examples are that many distinct examples drawn
  uniformly from the whole train split, seeded by (seed, i). Clients' data is therefore IID and
  may overlap (two clients can hold the same sentence), unlike the splits above; each client's
  partition is drawn when it is loaded, so no per-client object exists until a client is
  sampled, and all N sizes are one vectorised draw.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from fedpeft.data.spec import plain_config
from fedpeft.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "pathological", "sampled")
SIZE_DISTRIBUTIONS = ("poisson", "constant")
CLASS_ASSIGNMENT_MODES = ("first-deterministic", "deterministic", "random")
#: Largest floor `min_partition_size=auto` gives each Dirichlet client.
AUTO_FLOOR = 10
_CACHE_SIZE = 16  # partitionings kept per process
_LOG = logging.getLogger(__name__)


class Partitioning:
    """Every client's partition of one train split, computed once: load one, or count all."""

    def __init__(self, train: datasets.Dataset, partitioner: Partitioner | None = None) -> None:
        self.train = train
        self.partitioner = partitioner
        self.indices: list[np.ndarray] = []

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """The examples of client `partition_id`."""
        if self.partitioner is not None:
            return self.partitioner.load_partition(partition_id)
        return self.train.select(self.indices[partition_id])

    def sizes(self) -> list[int]:
        """Every client's example count, without building its partition."""
        if isinstance(self.partitioner, IidPartitioner):
            n, k = len(self.partitioner.dataset), self.partitioner.num_partitions
            return [
                n // k + (1 if i < n % k else 0) for i in range(k)
            ]  # datasets' contiguous shard
        if self.partitioner is not None:  # PathologicalPartitioner: assignment already determined
            return [len(self.partitioner._partition_id_to_indices[i]) for i in range(self._count())]
        return [len(i) for i in self.indices]

    def _count(self) -> int:
        return (
            self.partitioner.num_partitions if self.partitioner is not None else len(self.indices)
        )


class SampledPartitioning(Partitioning):
    """An artificial federated data set: client i draws its size, then its examples, with (seed, i).

    Sizes: Poisson(mean) floored at `minimum` (or `mean` for all), capped at the split's length;
    examples: distinct, uniform over the split, drawn only when the client's partition is loaded.
    """

    def __init__(
        self,
        train: datasets.Dataset,
        num_partitions: int,
        mean: int,
        minimum: int,
        distribution: str,
        seed: int,
    ) -> None:
        super().__init__(train)
        self.seed = seed
        if distribution == "constant":
            sizes = np.full(num_partitions, mean, dtype=np.int64)
        else:
            sizes = np.random.default_rng([seed, 0x5A3D]).poisson(mean, num_partitions)
        self._sizes = np.clip(sizes, minimum, len(train)).astype(np.int64)

    def client_indices(self, partition_id: int) -> np.ndarray:
        """The positions in the train split of client `partition_id`'s examples, sorted."""
        size = int(self._sizes[partition_id])
        drawn = np.random.default_rng([self.seed, partition_id, 1]).choice(
            len(self.train), size, replace=False
        )
        return np.sort(drawn)

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """The examples of client `partition_id`, drawn now."""
        return self.train.select(self.client_indices(partition_id))

    def sizes(self) -> list[int]:
        """Every client's example count (one vectorised draw at construction)."""
        return self._sizes.tolist()


_PARTITIONINGS: OrderedDict[tuple, Partitioning] = OrderedDict()


def partition_dataset(
    train: datasets.Dataset, num_partitions: int, partition_id: int, cfg: Mapping, seed: int
) -> datasets.Dataset:
    """Return the training examples of client `partition_id` out of `num_partitions`.

    Deterministic in (train, num_partitions, cfg, seed), so separate client processes agree.
    """
    partitioning = _partitioning(train, num_partitions, cfg, seed)
    if isinstance(partition_id, bool) or not isinstance(partition_id, int):
        raise ConfigError(f"partition-id must be an integer, got {partition_id!r}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"partition-id={partition_id} is outside [0, {num_partitions}): "
            f"set partition-id below num-partitions (federation.num_clients={num_partitions})"
        )
    return partitioning.load_partition(partition_id)


def partition_sizes(
    train: datasets.Dataset, num_partitions: int, cfg: Mapping, seed: int
) -> list[int]:
    """Count the training examples of every client (without building the partitions)."""
    return _partitioning(train, num_partitions, cfg, seed).sizes()


def dirichlet_floor(setting: int | str, examples: int, num_partitions: int) -> int:
    """Examples dealt to every Dirichlet client before the draw (`partition.min_partition_size`).

    `auto`: min(10, max(1, examples // (4 x num_partitions))).
    """
    if setting == "auto":
        return min(AUTO_FLOOR, max(1, examples // (4 * num_partitions)))
    return int(setting)


def _partitioning(
    train: datasets.Dataset, num_partitions: int, cfg: Mapping, seed: int
) -> Partitioning:
    """Build (or reuse, per process) the partitioning with its assignment computed."""
    params = partition_params(cfg)
    if (
        isinstance(num_partitions, bool)
        or not isinstance(num_partitions, int)
        or num_partitions < 1
    ):
        raise ConfigError(
            f"federation.num_clients must be a positive integer, got {num_partitions!r}"
        )
    if num_partitions > len(train) and params[0] != "sampled":
        raise ConfigError(
            f"federation.num_clients={num_partitions} exceeds the {len(train)} training examples "
            "of the dataset: lower federation.num_clients, raise dataset.max_train_examples, or "
            "give clients sampled data sets (partition=sampled)"
        )
    key = (train._fingerprint, len(train), num_partitions, params, int(seed))
    if key in _PARTITIONINGS:
        _PARTITIONINGS.move_to_end(key)
        return _PARTITIONINGS[key]
    partitioning = _build(train, num_partitions, params, int(seed))
    _PARTITIONINGS[key] = partitioning
    while len(_PARTITIONINGS) > _CACHE_SIZE:
        _PARTITIONINGS.popitem(last=False)
    return partitioning


def partition_params(cfg: Mapping) -> tuple:
    """The `partition` group's settings, checked, as a hashable tuple (name first)."""
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
        size = c.get("min_partition_size", "auto")
        if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ConfigError(
                f"partition.min_partition_size must be an integer >= 0 or auto, got {size!r}"
            )
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
    if name == "sampled":
        return _sampled_params(c)
    raise ConfigError(
        f"partition.name={name!r} is not a known partitioning: use one of {', '.join(PARTITIONS)} "
        "(e.g. partition=dirichlet)"
    )


def _sampled_params(c: Mapping) -> tuple:
    """partition=sampled's settings, checked: ("sampled", mean, minimum, distribution)."""
    known = {"name", "mean_examples", "min_examples", "size_distribution"}
    unknown = sorted(set(c) - known)
    if unknown:
        raise ConfigError(
            f"partition=sampled has no key(s) {', '.join(unknown)}: it takes "
            f"{', '.join(sorted(known - {'name'}))}"
        )
    mean, minimum = c.get("mean_examples"), c.get("min_examples", 1)
    distribution = c.get("size_distribution", "poisson")
    for key, value in (("mean_examples", mean), ("min_examples", minimum)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10**7:
            raise ConfigError(f"partition.{key} must be an integer in [1, 1e7], got {value!r}")
    if distribution not in SIZE_DISTRIBUTIONS:
        raise ConfigError(
            f"partition.size_distribution={distribution!r} is not one of "
            f"{', '.join(SIZE_DISTRIBUTIONS)}"
        )
    return ("sampled", int(mean), int(minimum), str(distribution))


def _build(train: datasets.Dataset, num_partitions: int, params: tuple, seed: int) -> Partitioning:
    name = params[0]
    if name == "sampled":
        _, mean, minimum, distribution = params
        return SampledPartitioning(train, num_partitions, mean, minimum, distribution, seed)
    if name == "iid":
        partitioner = IidPartitioner(num_partitions)
        partitioner.dataset = train.shuffle(seed=seed)
        return Partitioning(train, partitioner)
    if name == "dirichlet":
        _, alpha, setting = params
        return _dirichlet(train, num_partitions, alpha, setting, seed)
    return _pathological(train, num_partitions, params[1], params[2], seed)


def _dirichlet(
    train: datasets.Dataset, num_partitions: int, alpha: float, setting: int | str, seed: int
) -> Partitioning:
    """A seeded floor for every client, then the Dirichlet draw over the remaining examples."""
    floor = dirichlet_floor(setting, len(train), num_partitions)
    if floor * num_partitions > len(train):
        raise ConfigError(
            f"partition.min_partition_size={setting} x federation.num_clients={num_partitions} "
            f"exceeds the {len(train)} training examples: lower one of them (or use "
            "partition.min_partition_size=auto)"
        )
    order = np.random.default_rng(seed).permutation(len(train))
    dealt = order[: floor * num_partitions].reshape(num_partitions, floor)
    rest = np.sort(order[floor * num_partitions :])
    labels = np.asarray(train["label"][:])[rest]
    drawn = dirichlet_split(labels, num_partitions, alpha, seed)
    partitioning = Partitioning(train)
    partitioning.indices = [
        np.concatenate([dealt[i], rest[drawn[i]]]) for i in range(num_partitions)
    ]
    return partitioning


def dirichlet_split(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Each client's positions in `labels` (shape (n,)), as DirichletPartitioner draws them.

    The draw of flwr-datasets' DirichletPartitioner (self-balancing, shuffled, no minimum),
    vectorised over clients, same seed same result.
    Per label in sorted order: proportions ~ Dirichlet(alpha, ..., alpha) over the clients, zero
    for clients already above the mean size, renormalised, and the label's examples cut at the
    cumulative proportions; then each client's positions are shuffled. Unlike the library it
    accepts more clients than examples (a floor leaves fewer, e.g. at 50,000 clients on SST-2).
    """
    rng = np.random.default_rng(seed)
    concentration = np.full(num_partitions, float(alpha))
    mean_size = len(labels) / num_partitions
    sizes = np.zeros(num_partitions, dtype=np.int64)
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for label in np.unique(labels):
        where = np.nonzero(labels == label)[0]
        share = rng.dirichlet(concentration)
        share = np.where(sizes > mean_size, 0.0, share)
        share = share / sum(share.tolist())  # the library's sequential sum, bit for bit
        cuts = (np.cumsum(share) * len(where)).astype(int)[:-1]
        for client, piece in enumerate(np.split(where, cuts)):
            if len(piece):
                pieces[client].append(piece)
        sizes += np.diff(np.concatenate([[0], cuts, [len(where)]]))
    drawn = []
    for client in range(num_partitions):
        positions = np.concatenate(pieces[client]) if pieces[client] else np.zeros(0, np.int64)
        as_list = positions.tolist()
        rng.shuffle(as_list)
        drawn.append(np.asarray(as_list, dtype=np.int64))
    return drawn


def _pathological(
    train: datasets.Dataset, num_partitions: int, k: int, mode: str, seed: int
) -> Partitioning:
    present = len(train.unique("label"))
    if k > present:
        raise ConfigError(
            f"partition.num_classes_per_partition={k} exceeds the {present} labels present "
            "in the training set: lower it"
        )
    per_client = min(k, max(1, len(train) // num_partitions))
    if per_client < k:
        _LOG.warning(
            "partition=pathological: %d clients hold %d examples on average, so each holds at "
            "most %d label(s) instead of partition.num_classes_per_partition=%d",
            num_partitions,
            len(train) // num_partitions,
            per_client,
            k,
        )
    partitioner = PathologicalPartitioner(
        num_partitions,
        partition_by="label",
        num_classes_per_partition=per_client,
        class_assignment_mode=mode,
        seed=seed,
    )
    partitioner.dataset = train
    try:
        partitioner.load_partition(0)
    except ValueError as err:
        reason = " ".join(str(err).split())
        raise ConfigError(
            f"partition=pathological cannot split {len(train)} examples over {num_partitions} "
            f"clients ({reason}): lower federation.num_clients or "
            "partition.num_classes_per_partition"
        ) from err
    partitioning = Partitioning(train, partitioner)
    empty = [i for i, size in enumerate(partitioning.sizes()) if size == 0]
    if empty:
        raise ConfigError(
            f"partition=pathological leaves {len(empty)} of {num_partitions} clients without "
            f"examples (client {empty[0]} first): lower federation.num_clients or raise "
            "partition.num_classes_per_partition"
        )
    return partitioning
