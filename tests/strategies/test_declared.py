"""Declared example counts bound later claims; the median rule bounds the declarations."""

from flwr.app import ArrayRecord, ConfigRecord

from fedpeft.strategies.declared import claim_refusal, median_limit
from fedpeft.strategies.fedavg import FedAvgLoRA
from tests.strategies.conftest import FakeGrid, client_updates, global_adapter, reply


def test_a_claim_above_the_own_declaration_is_refused_with_its_reason():
    assert claim_refusal(150, 150, [150, 200], None) is None
    reason = claim_refusal(151, 150, [150, 200], None)
    assert (
        reason
        == "num-examples=151 is more than the 150 this client declared when it joined the run"
    )
    assert claim_refusal(151, 150, [150, 200], 10.0) == reason


def test_the_median_rule_accepts_honest_large_nodes_and_bounds_a_hostile_one():
    assert median_limit([], 10) is None
    assert median_limit([200, 250], 10) == (2000, 200)  # the lower median: an honest count
    assert median_limit([200, 250, 10**9], 10) == (2500, 250)
    # an honest node larger than any server partition is accepted
    assert claim_refusal(250, 250, [200, 250], 10.0) is None
    # a hostile node declaring 10**9 cannot claim more than 10 x an honest node's count
    reason = claim_refusal(10**9, 10**9, [200, 250, 10**9], 10.0)
    assert reason is not None and "10 x 250, the median example count" in reason
    assert "set replies.max_num_examples" in reason
    assert claim_refusal(2500, 10**9, [200, 250, 10**9], 10.0) is None
    # a node that declared nothing is bounded by the others' median
    assert claim_refusal(2001, None, [200, 250], 10.0) is not None
    assert "no client declared" in claim_refusal(5, None, [], 10.0)


def _round(strategy, nodes, claims):
    list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(nodes)))
    updates = client_updates(strategy.up_keys(), len(nodes))
    return strategy.aggregate_train(1, [reply(n, u, c) for n, u, c in zip(nodes, updates, claims)])


def test_strategy_rejects_a_claim_above_the_declaration_and_aggregates_the_rest():
    strategy = FedAvgLoRA(global_adapter(), {}, max_num_examples=None, median_multiple=10.0)
    strategy.identify({11: 0, 12: 1}, {11: 200, 12: 250, 13: 300})
    arrays, _ = _round(strategy, [11, 12, 13], [200, 251, 300])
    assert arrays is not None and strategy.stats.replied == 2
    assert strategy.stats.rejected == {
        1: "num-examples=251 is more than the 250 this client declared when it joined the run"
    }


def test_a_node_that_takes_an_identity_over_replaces_its_declaration():
    strategy = FedAvgLoRA(global_adapter(), {}, max_num_examples=1000)
    strategy.identify({11: 0, 12: 1}, {11: 200, 12: 250})
    strategy.identify({21: 1}, {21: 260})  # node 12 restarted as node 21
    assert strategy.roster.identities == {11: 0, 21: 1}
    assert strategy.roster.declared == {11: 200, 21: 260}
    assert strategy.member(21) == 1 and strategy.member(12) == 12
