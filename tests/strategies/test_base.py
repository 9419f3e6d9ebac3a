"""The shared strategy base: clients out of privacy budget leave the sampling pool for good."""

from flwr.app import Error, Message

from fedpeft.strategies import FedAvgLoRA
from tests.strategies.conftest import FakeGrid, client_updates, error_reply, global_adapter, reply

REFUSAL = (
    "ClientApp raised an exception. Message: BudgetExhausted: budget exhausted: ε would reach "
    "3.214 > target 3 (δ=1e-05) after 40 steps; this client stops training"
)


def test_a_client_out_of_budget_is_not_sampled_again_and_this_survives_a_checkpoint():
    strategy = FedAvgLoRA(global_adapter(), {"kind": "lora"}, max_num_examples=1000, seed=0)
    grid = FakeGrid([1, 2, 3, 4])
    sampled = [m.metadata.dst_node_id for m in strategy.configure_train(1, None, {}, grid)]
    assert sampled == [1, 2, 3, 4]
    updates = client_updates(strategy.up_keys(), 3)
    replies = [reply(n, u, 10) for n, u in zip([1, 2, 3], updates)]
    strategy.aggregate_train(1, [*replies, error_reply(4, REFUSAL)])
    assert "budget exhausted" in strategy.stats.failed[4] and strategy.stats.replied == 3
    for server_round in (2, 3):
        messages = strategy.configure_train(server_round, None, {}, grid)
        assert [m.metadata.dst_node_id for m in messages] == [1, 2, 3]
    _, meta = strategy.state_dict()
    resumed = FedAvgLoRA(global_adapter(), {"kind": "lora"}, max_num_examples=1000, seed=0)
    resumed.load_state_dict(*strategy.state_dict())
    assert meta["exhausted"] == [4] and resumed.roster.exhausted == {4}


def test_an_ordinary_failure_does_not_exclude_the_client():
    strategy = FedAvgLoRA(global_adapter(), {"kind": "lora"}, max_num_examples=1000, seed=0)
    grid = FakeGrid([1, 2])
    list(strategy.configure_train(1, None, {}, grid))
    strategy.aggregate_train(1, [error_reply(2, "ValueError: out of memory")])
    sampled = [m.metadata.dst_node_id for m in strategy.configure_train(2, None, {}, grid)]
    assert sampled == [1, 2]


def test_an_error_the_superlink_makes_counts_against_the_node_it_answers_for():
    strategy = FedAvgLoRA(global_adapter(), {"kind": "lora"}, max_num_examples=1000, seed=0)
    messages = list(strategy.configure_train(1, None, {}, FakeGrid([4, 5])))
    for msg in messages:  # as the grid does when it sends them
        msg.metadata.__dict__["_message_id"] = f"id-{msg.metadata.dst_node_id}"
    unreachable = Message(Error(code=1, reason="node unavailable"), reply_to=messages[0])
    unreachable.metadata.__dict__["_src_node_id"] = 0  # made by the SuperLink, not by node 4
    strategy.aggregate_train(
        1, [unreachable, reply(5, client_updates(strategy.up_keys(), 1)[0], 10)]
    )
    assert list(strategy.stats.failed) == [4] and "unavailable" in strategy.stats.failed[4]


def test_a_supernodes_error_reason_is_cut_to_the_clients_message():
    from fedpeft.records import short_reason

    reason = (
        "<class 'fedpeft.privacy.policy.PolicyViolation'>:<'node policy dp-required=true refuses "
        "a task with dp.enabled=false: start the run with dp=eps3'>"
    )
    assert short_reason(reason) == (
        "node policy dp-required=true refuses a task with dp.enabled=false: start the run with "
        "dp=eps3"
    )
