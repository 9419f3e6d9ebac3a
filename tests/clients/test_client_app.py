"""The deployed ClientApp: the identity handler (a stable name and the example count it trains
on), and the train handler held to the node's own privacy policy."""

import json

import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.clients.client_app import NodeFailed, app, identity, train
from fedpeft.clients.client_data import data_fingerprint
from fedpeft.clients.task_guard import TaskRefused
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError, DataError
from fedpeft.federation import build_task
from fedpeft.identity import member
from fedpeft.privacy import PRIVATE_REPLY_METRICS, LedgerFile, PolicyViolation
from tests.conftest import FAST_RUN

NODE_ID = 2**64 - 3  # Flower node ids use all 64 bits


@pytest.fixture(scope="module")
def task():
    return build_task(compose_config(FAST_RUN), 2, ["negative", "positive"])


def _ask(task, node_config: dict) -> dict:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    config = ConfigRecord({"task": json.dumps(task)})
    query = Message(
        RecordDict({"config": config}), dst_node_id=1, message_type=f"{MessageType.QUERY}.identity"
    )
    context = Context(
        run_id=1, node_id=NODE_ID, node_config=node_config, state=RecordDict(), run_config={}
    )
    return dict(identity(query, context).content.metric_records["metrics"])


def test_a_partition_node_is_named_by_its_partition_and_declares_its_size(task):
    # FAST_RUN: 400 training examples in 2 iid partitions
    assert _ask(task, {"partition-id": 1, "num-partitions": 2}) == {
        "client-id": 1,
        "num-examples": 200,
    }


def test_a_node_with_its_own_file_is_named_by_its_node_id_and_declares_the_file_size(
    task, tmp_path
):
    path = tmp_path / "mine.csv"
    pd.DataFrame({"text": ["good", "bad", "", "fine"], "label": [1, 0, 1, 1]}).to_csv(
        path, index=False
    )
    assert _ask(task, {"data-path": str(path)}) == {"client-id": NODE_ID, "num-examples": 3}


def test_a_node_without_data_answers_with_the_error_that_names_the_fix(task):
    with pytest.raises(ConfigError, match="this node has no data: set node config data-path"):
        _ask(task, {})


def test_member_is_the_partition_id_else_the_node_id():
    def context(node_config):
        return Context(
            run_id=1, node_id=NODE_ID, node_config=node_config, state=RecordDict(), run_config={}
        )

    assert member(context({"partition-id": 0, "num-partitions": 2})) == 0
    assert member(context({"data-path": "x.csv"})) == NODE_ID


def _train(task, node_config: dict, state_dir) -> Message:
    """One train message (round 1, the initial adapter) through the deployed train handler."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    config = ConfigRecord({"task": json.dumps(task), "server-round": 1})
    msg = Message(
        RecordDict({"arrays": ArrayRecord(), "config": config}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(state_dir), **node_config}
    context = Context(
        run_id=1, node_id=NODE_ID, node_config=node, state=RecordDict(), run_config={}
    )
    return train(msg, context)


@pytest.fixture(scope="module")
def private_task():
    cfg = compose_config([*FAST_RUN, "dp=eps3", "federation.local_steps=2"])
    return build_task(cfg, 2, ["negative", "positive"])


def test_a_private_reply_carries_only_data_independent_metrics(private_task, tmp_path):
    reply = _train(private_task, {}, tmp_path)
    metrics = dict(reply.content.metric_records["metrics"])
    assert "train-loss" not in metrics and set(metrics) <= PRIVATE_REPLY_METRICS
    assert metrics["dp-steps"] == 2 and 0 < metrics["epsilon"] <= 3
    fingerprint = data_fingerprint(private_task, {"partition-id": 0, "num-partitions": 2})
    assert LedgerFile(tmp_path, 1, fingerprint).exists()
    # Once the node has spent budget in the run, a task without DP is refused.
    with pytest.raises(PolicyViolation, match="already spent privacy budget in this run"):
        _train(build_task(compose_config(FAST_RUN), 2, ["negative", "positive"]), {}, tmp_path)


def test_the_deployed_handler_holds_the_task_to_the_node_config_policy(
    task, private_task, tmp_path
):
    with pytest.raises(PolicyViolation, match="node policy dp-epsilon=3 refuses"):
        _train(task, {"dp-required": True, "dp-epsilon": 3}, tmp_path)
    with pytest.raises(
        PolicyViolation, match="dp-epsilon=1 refuses the task's dp.target_epsilon=3"
    ):
        _train(private_task, {"dp-epsilon": 1}, tmp_path)
    seeded = {**private_task, "dp": {**private_task["dp"], "reproducible": True}}
    with pytest.raises(PolicyViolation, match="refuses dp.reproducible=true"):
        _train(seeded, {}, tmp_path)
    assert not any(tmp_path.iterdir())  # refused before a ledger was opened
    plain = dict(_train(task, {}, tmp_path).content.metric_records["metrics"])
    assert "train-loss" in plain and "epsilon" not in plain


SECRETS = ("hiv-clinic", "oncology", "diagnosis_note", "ward", "patient 4711", "3 row")


@pytest.mark.parametrize("handler", ["identity", "train"])
def test_a_deployed_nodes_errors_carry_no_label_column_or_text_of_its_data(task, tmp_path, handler):
    """Through the real ClientApp (its mods included), as Flower runs it on a SuperNode: the
    error a server would read names the message type and the exception's type only."""
    path = tmp_path / "mine.csv"
    pd.DataFrame(
        {"diagnosis_note": ["patient 4711 a", "b", "c"], "ward": ["hiv-clinic", "oncology", "x"]}
    ).to_csv(path, index=False)
    node = {"data-path": str(path), "text-column": "diagnosis_note", "label-column": "ward",
            "state-dir": str(tmp_path / "state")}  # fmt: skip
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    if handler == "identity":
        content = RecordDict({"config": ConfigRecord({"task": json.dumps(task)})})
        kind = f"{MessageType.QUERY}.identity"
    else:
        config = ConfigRecord({"task": json.dumps(task), "server-round": 1})
        content, kind = RecordDict({"arrays": ArrayRecord(), "config": config}), MessageType.TRAIN
    msg = Message(content, dst_node_id=1, message_type=kind)
    context = Context(run_id=1, node_id=NODE_ID, node_config=node, state=RecordDict(),
                      run_config={})  # fmt: skip
    with pytest.raises(NodeFailed) as raised:
        app(message=msg, context=context)
    text = str(raised.value)
    assert "(DataError)" in text and "stays in the node's log" in text
    assert not any(secret in text for secret in SECRETS), text
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    # The node's own call (no mods: its log and tests) still names the problem in full.
    with pytest.raises(DataError, match="hiv-clinic"):
        (identity if handler == "identity" else train)(msg, context)


def test_a_deployed_nodes_refusals_reach_the_server_whole(task, tmp_path):
    """Refusals depend on the task and the node's config only: the server may read them."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    config = ConfigRecord({"task": json.dumps(task).replace('"seed": 0', '"seed": NaN'),
                           "server-round": 1})  # fmt: skip
    msg = Message(RecordDict({"arrays": ArrayRecord(), "config": config}), dst_node_id=1,
                  message_type=MessageType.TRAIN)  # fmt: skip
    context = Context(run_id=1, node_id=NODE_ID, node_config={"partition-id": 0,
                      "num-partitions": 2}, state=RecordDict(), run_config={})  # fmt: skip
    with pytest.raises(TaskRefused, match="JSON constant NaN"):
        app(message=msg, context=context)
