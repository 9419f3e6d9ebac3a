"""The roster's sampling of a pooled population: O(cohort), and the draws of one node per client."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fedpeft.strategies.roster import Eligible, Roster


class _Nodes:
    """A grid's node list (all the roster's sampling reads of it)."""

    def __init__(self, ids):  # noqa: ANN001
        self.ids = ids

    def get_node_ids(self):
        return self.ids


@pytest.mark.parametrize("seed", range(5))
def test_eligible_indexes_the_ids_not_excluded(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 300)
    excluded = set(rng.sample(range(n), rng.randint(0, n)))
    expected = [i for i in range(n) if i not in excluded]
    eligible = Eligible(n, excluded | {n + 5, -1})  # ids outside 0..n-1 are ignored
    assert len(eligible) == len(expected) and list(eligible) == expected
    with pytest.raises(IndexError):
        eligible[len(expected)]


def test_a_pooled_population_samples_the_clients_one_node_per_client_would():
    """Fixed-size sampling over client ids draws what the unpooled roster draws over N
    identified nodes, round after round, also once some clients have spent their budget."""
    n, fraction = 40, 0.2
    nodes = _Nodes([10_000 + 7 * i for i in range(n)])  # Flower's node ids, any order
    random.Random(1).shuffle(nodes.ids)
    unpooled, pooled = Roster(seed=3), Roster(seed=3)
    unpooled.identify({node: (node - 10_000) // 7 for node in nodes.ids})
    pooled.population, pooled.count = n, lambda client: 100 + client
    args = {"fraction": fraction, "min_clients": 1, "wait_timeout": 1.0}
    for server_round in range(1, 30):
        if server_round == 10:
            for roster in (unpooled, pooled):
                roster.exhausted |= {3, 17, 39}
        a = unpooled.sample(nodes, server_round=server_round, **args)
        b = pooled.sample(_Nodes(range(n)), server_round=server_round, **args)
        assert [unpooled.member(x) for x in a] == b and len(b) == 8
        assert server_round < 10 or not {3, 17, 39} & set(b)
    assert pooled.declared == {c: 100 + c for c in pooled.declared}  # the server's own counts
    assert len(pooled.declared) < n  # only clients sampled so far


def test_poisson_cohorts_follow_the_binomial_law_the_accountant_assumes():
    n, q, rounds = 1_000_000, 1e-4, 2000
    roster = Roster(seed=0)
    roster.population, roster.count = n, lambda client: 1
    roster.exhausted = {5, 6}
    sizes = []
    for server_round in range(rounds):
        sampled = roster.sample(
            _Nodes(range(n)),
            fraction=q,
            min_clients=50,  # Poisson ignores min_clients
            wait_timeout=1.0,
            server_round=server_round,
            poisson=True,
        )
        assert len(set(sampled)) == len(sampled) and not {5, 6} & set(sampled)
        sizes.append(len(sampled))
    mean, var = np.mean(sizes), np.var(sizes)
    expected = (n - 2) * q
    assert abs(mean - expected) < 4 * np.sqrt(expected * (1 - q) / rounds)
    assert 0.85 < var / (expected * (1 - q)) < 1.15
    assert len(roster.declared) < 0.3 * n  # only what was sampled


def test_sampling_costs_the_cohort_not_the_population():
    roster = Roster(seed=0)
    roster.population, roster.count = 10**15, lambda client: 20  # listing it would never end
    sampled = roster.sample(
        _Nodes(range(10**15)), fraction=1e-13, min_clients=1, wait_timeout=1.0, server_round=1
    )
    assert len(sampled) == 100 and all(0 <= c < 10**15 for c in sampled)


class _Answering(_Nodes):
    """A pooled grid whose clients answer the identity query with their id and a count."""

    def __init__(self, ids):  # noqa: ANN001
        super().__init__(ids)
        self.asked: list[int] = []

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001
        import uuid

        from flwr.app import Message, MetricRecord, RecordDict

        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            client = msg.metadata.dst_node_id
            self.asked.append(client)
            metrics = MetricRecord({"client-id": client, "num-examples": 1000 + client})
            reply = Message(RecordDict({"metrics": metrics}), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = client
            replies.append(reply)
        return replies


@pytest.mark.usefixtures("flower_task_identity")
def test_a_pooled_client_is_asked_its_count_when_the_server_cannot_know_it():
    """An audit's canaries change what clients hold: the pooled roster then asks the sampled
    clients (through the pool) instead of counting from its own partitioning."""
    roster = Roster(seed=0)
    roster.population = 10**6
    grid = _Answering(range(10**6))
    sampled = roster.sample(
        grid,
        fraction=5e-6,
        min_clients=1,
        wait_timeout=1.0,
        server_round=1,
        identify_timeout=5.0,
        task={"seed": 0},
    )
    assert sorted(grid.asked) == sampled and len(sampled) == 5
    assert roster.declared == {c: 1000 + c for c in sampled}
    roster.sample(grid, fraction=5e-6, min_clients=1, wait_timeout=1.0, server_round=2)
    assert len(grid.asked) <= 10  # each client asked once, when first sampled
