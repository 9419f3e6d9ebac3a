"""A pool node answers as the client a message names, and refuses a record it cannot trust."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedpeft.clients.client_store import ClientStore
from fedpeft.clients.pool_client import client_mod, read_pool_record
from fedpeft.clients.task_guard import TaskRefused
from fedpeft.identity import member
from fedpeft.protocol import POOL_KEY

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _node() -> Context:
    config = {"partition-id": 1, "num-partitions": 4, "state-dir": "/x"}
    return Context(run_id=7, node_id=555, node_config=config, state=RecordDict(), run_config={})


def _message(pool: ConfigRecord | None) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    if pool is not None:
        content[POOL_KEY] = pool
    return Message(content, dst_node_id=555, message_type=MessageType.TRAIN)


def _counting(msg: Message, context: Context) -> Message:
    """A handler that counts its rounds in the context's state and reports what it saw."""
    seen = context.state["rounds"]["n"] if "rounds" in context.state else 0
    context.state["rounds"] = ConfigRecord({"n": seen + 1})
    metrics = {
        "member": member(context),
        "population": context.node_config["num-partitions"],
        "rounds": seen + 1,
        "records": len(msg.content),
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def test_a_pooled_message_runs_as_its_client_with_the_clients_own_state(tmp_path):
    mod, node = client_mod(ClientStore(tmp_path)), _node()
    for expected_rounds in (1, 2):
        for client in (3, 999_998):
            pool = ConfigRecord({"client": client, "population": 1_000_000})
            reply = mod(_message(pool), node, _counting)
            metrics = reply.content.metric_records["metrics"]
            assert metrics["member"] == client and metrics["population"] == 1_000_000
            assert metrics["rounds"] == expected_rounds  # the client's rounds, not the node's
            assert metrics["records"] == 1  # the pool record is not passed on
    assert len(node.state) == 0 and node.node_config["partition-id"] == 1  # node untouched


def test_a_message_without_a_pool_record_is_the_nodes_own(tmp_path):
    mod, node = client_mod(ClientStore(tmp_path)), _node()
    reply = mod(_message(None), node, _counting)
    assert reply.content.metric_records["metrics"]["member"] == 1
    assert node.state["rounds"]["n"] == 1 and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"client": 3}, "exactly"),
        ({"client": 3, "population": 10, "partition-id": 0}, "exactly"),
        ({"client": 10, "population": 10}, r"client=10 must be an int in \[0, 10\)"),
        ({"client": -1, "population": 10}, "client=-1"),
        ({"client": 2.0, "population": 10}, "client=2.0"),
        ({"client": True, "population": 10}, "client=True"),
        ({"client": "3", "population": 10}, "client='3'"),
        ({"client": 0, "population": 0}, "population=0"),
        ({"client": 0, "population": float("nan")}, "population=nan"),
        ({"client": 0, "population": 2**41}, "population="),
    ],
)
def test_a_hostile_pool_record_is_refused(tmp_path, record, problem):
    with pytest.raises(TaskRefused, match=problem):
        read_pool_record(ConfigRecord(record))
    with pytest.raises(TaskRefused):
        client_mod(ClientStore(tmp_path))(_message(ConfigRecord(record)), _node(), _counting)
    assert not list(tmp_path.iterdir())


def test_a_pool_record_of_the_wrong_kind_is_refused():
    with pytest.raises(TaskRefused, match="ConfigRecord"):
        read_pool_record(MetricRecord({"client": 1, "population": 2}))


def test_a_deployed_node_does_not_take_on_other_clients():
    """The deployed ClientApp has no pool mod: a pool record is not a way to pose as a client."""
    from fedpeft.clients import client_app

    assert "client_mod" not in vars(client_app)
    assert all("as_client" not in getattr(m, "__name__", "") for m in client_app.app._mods)
