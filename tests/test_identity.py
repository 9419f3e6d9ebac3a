"""The identity answers the server reads and how it gives out names: unique claims only."""

import pytest
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.identity import Answer, read_answer, registration_names, resolve


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _answer(metrics: dict | None = None, error: str | None = None) -> Message:
    sent = Message(RecordDict(), dst_node_id=5, message_type=f"{MessageType.QUERY}.identity")
    if error is not None:
        return Message(Error(code=1, reason=error), reply_to=sent)
    return Message(RecordDict({"metrics": MetricRecord(metrics or {})}), reply_to=sent)


def test_an_answer_gives_the_name_and_count_and_anything_malformed_is_none():
    node_id = 2**64 - 1  # a Flower node id is an unsigned 64-bit integer
    assert read_answer(_answer({"client-id": node_id, "num-examples": 250})) == Answer(node_id, 250)
    assert read_answer(_answer({"client-id": 3})) == Answer(3, None)
    assert read_answer(_answer({"client-id": 1.5, "num-examples": 0})) == Answer(None, None)
    assert read_answer(_answer({"num-examples": -4})) == Answer(None, None)
    assert read_answer(_answer(error="DataError: no such file")) == Answer(None, None)


def test_a_name_goes_only_to_the_one_node_that_claims_it():
    claims = {101: 0, 102: 1, 103: 1, 104: 7}
    assert resolve(claims, {}) == {101: 0, 104: 7}
    # a connected node already holds 7: the newcomer keeps its node id
    assert resolve(claims, {99: 7}) == {101: 0}
    # a node asked again keeps its own name
    assert resolve({99: 7}, {99: 7}) == {99: 7}


def test_registration_order_gives_each_simulated_node_its_partition_id():
    """Flower's simulation registers node i with partition id i; the order says which is which."""
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    mapping = _register_nodes(300, factory)  # as run_simulation does: node id -> partition id
    assert registration_names(InMemoryGrid(state_factory=factory)) == mapping
    assert registration_names(object()) == {}  # a deployment's grid: no such order
