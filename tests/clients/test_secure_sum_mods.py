"""The client side of secure aggregation (fedpeft/clients/secure_sum_mods.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.clients.secure_sum_mods import (
    BASE_PREFIX,
    SECAGG_CLIP_NORM,
    SECAGG_COUNT,
    SECAGG_NAMES,
    SECAGG_UPDATE_KEYS,
    clipped_update,
    fitins_adapter,
    secagg_instructions,
    secure_sum_mod,
)
from fedpeft.errors import ConfigError
from fedpeft.privacy.policy import NodePolicy, PolicyViolation


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def context() -> Context:
    return Context(1, 7, {}, RecordDict(), {})


def test_a_plain_train_message_skips_secure_aggregation():
    msg = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    seen = []
    out = secure_sum_mod(msg, context(), lambda m, c: seen.append(m) or m)
    assert seen == [msg] and out is msg


def test_a_node_that_requires_secure_aggregation_refuses_a_plain_round():
    """A hostile or misconfigured server cannot have a secagg-required node send its update in
    the clear: the plain train message is refused before the handler runs."""
    msg = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    seen = []
    node = Context(1, 7, {"secagg-required": True}, RecordDict(), {})
    with pytest.raises(PolicyViolation, match="secagg-required=true refuses a train message"):
        secure_sum_mod(msg, node, lambda m, c: seen.append(m) or m)
    assert seen == []
    for bad in ("true", 1, "yes"):
        with pytest.raises(ConfigError, match="secagg-required=.* must be true or false"):
            secure_sum_mod(msg, Context(1, 7, {"secagg-required": bad}, RecordDict(), {}), None)
    with pytest.raises(ConfigError, match="secagg-required"):  # refused when the node starts
        NodePolicy.from_node_config({"secagg-required": "no"})


def test_the_update_is_clipped_as_a_whole_and_its_count_entry_follows():
    base = {"a": np.zeros((2, 2)), "b": np.ones(3)}
    trained = {"a": np.full((2, 2), 3.0), "b": np.ones(3) + 4.0, "extra": np.zeros(1)}
    out = clipped_update(trained, base, ["b", "a"], clip_norm=2.0, count=True)
    assert [x.shape for x in out] == [(3,), (2, 2), (1,)]
    norm = np.sqrt(sum(float((x**2).sum()) for x in out[:2]))
    assert norm == pytest.approx(2.0) and out[2][0] == 0.0  # clipped: not counted
    small = clipped_update(trained, base, ["a"], clip_norm=10.0, count=True)
    np.testing.assert_allclose(small[0], trained["a"])
    assert small[1][0] == 10.0  # within the bound: C x 1
    with pytest.raises(ValueError, match="lacks c"):
        clipped_update(trained, base, ["a", "c"], clip_norm=1.0, count=False)


def test_the_adapter_hands_the_handler_fedpeft_records_and_returns_only_the_update():
    payload = {"a": np.ones((2, 2), np.float32), BASE_PREFIX + "b": np.full(3, 2.0, np.float32)}
    config = {
        "server-round": 3,
        "task": "{}",
        SECAGG_NAMES: json.dumps(list(payload)),
        SECAGG_UPDATE_KEYS: json.dumps(["a", "b"]),
        SECAGG_CLIP_NORM: 100.0,
        SECAGG_COUNT: False,
    }
    fitins = FitIns(ndarrays_to_parameters(list(payload.values())), config)
    msg = Message(
        compat.fitins_to_recorddict(fitins, keep_input=True),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    seen = {}

    def handler(inner: Message, ctx: Context) -> Message:
        seen["arrays"] = {k: v.numpy() for k, v in inner.content["arrays"].items()}
        seen["config"] = dict(inner.content["config"])
        trained = {"a": np.full((2, 2), 1.5, np.float32), "b": np.full(3, 2.5, np.float32)}
        arrays = ArrayRecord({k: Array(v) for k, v in trained.items()})
        metrics = MetricRecord({"train-loss": 0.5, "num-examples": 9})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=inner)

    out = fitins_adapter(msg, context(), handler)
    assert list(seen["arrays"]) == ["a"]  # the base is subtracted, never loaded
    assert seen["config"] == {"server-round": 3, "task": "{}"}
    fitres = compat.recorddict_to_fitres(out.content, keep_input=True)
    assert fitres.num_examples == 1 and fitres.metrics == {}
    assert "metrics" not in out.content
    update = parameters_to_ndarrays(fitres.parameters)
    np.testing.assert_allclose(update[0], np.full((2, 2), 0.5))
    np.testing.assert_allclose(update[1], np.full(3, 0.5))


GOOD = {
    "secagg-names": '["a", "secagg-base.b"]',
    "secagg-update-keys": '["a", "b"]',
    "secagg-clip-norm": 0.5,
    "secagg-count": True,
}


def test_well_formed_instructions_are_read():
    config = {**GOOD, "round": 3}
    assert secagg_instructions(config) == (["a", "secagg-base.b"], ["a", "b"], 0.5, True)
    assert config == {"round": 3}  # the rest goes on to the train handler


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("secagg-clip-norm", float("nan"), "finite and positive"),
        ("secagg-clip-norm", float("inf"), "finite and positive"),
        ("secagg-clip-norm", -1.0, "finite and positive"),
        ("secagg-clip-norm", "0.5", "finite and positive"),
        ("secagg-names", '{"a": 1}', "names must be a list"),
        ("secagg-names", '["a", "a"]', "names must be a list of distinct"),
        ("secagg-names", "not json", "malformed"),
        ("secagg-update-keys", '["c"]', "were not sent"),
        ("secagg-count", 1, "count flag"),
    ],
)
def test_hostile_instructions_are_refused(key, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        secagg_instructions({**GOOD, key: value})
    missing = dict(GOOD)
    del missing[key]
    with pytest.raises(ValueError, match="malformed"):
        secagg_instructions(missing)


def _stage(configs: dict, node_config: dict | None = None, dst: int = 7) -> Message:
    """A SecAgg+ train message for node `dst` carrying `configs`, through secure_sum_mod."""
    msg = Message(
        RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}),
        dst_node_id=dst,
        message_type=MessageType.TRAIN,
    )
    node = Context(1, dst, node_config or {}, RecordDict(), {})
    return secure_sum_mod(msg, node, lambda m, c: pytest.fail("trained"))


SETUP = {
    Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 5, Key.SHARE_NUMBER: 5, Key.THRESHOLD: 3,
    Key.CLIPPING_RANGE: 1.0, Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1.0,
}  # fmt: skip


@pytest.mark.parametrize(
    ("configs", "node_config", "error", "fragment"),
    [
        ({Key.THRESHOLD: 2}, {"secagg-min-threshold": 3}, PolicyViolation, "threshold is 2"),
        ({Key.THRESHOLD: 6}, {}, ValueError, "threshold 6 is more than the 5 shares"),
        ({Key.THRESHOLD: 3.0}, {}, ValueError, "must be integers"),
        ({Key.SHARE_NUMBER: True}, {}, ValueError, "must be integers"),
        ({}, {"secagg-min-threshold": 1}, ConfigError, "must be an integer >= 2"),
        ({}, {"secagg-min-threshold": "3"}, ConfigError, "must be an integer >= 2"),
        (
            {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [7, 8], Key.DEAD_NODE_ID_LIST: [8]},
            {},
            PolicyViolation,
            "node(s) [8] named both active and dropped",
        ),
        (
            {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [8, 9], Key.DEAD_NODE_ID_LIST: [7]},
            {},
            PolicyViolation,
            "this node (7) is named as dropped while it answers",
        ),
    ],
)
def test_a_secagg_stage_weaker_than_the_node_allows_is_refused(
    configs, node_config, error, fragment
):
    """The server's SecAgg+ parameters and its unmask request are held to the node's floor
    before Flower's mod sees them (the whole protocol runs in tests/test_secure_sum.py)."""
    stage = {**SETUP, **configs} if configs.get(Key.STAGE) != Stage.UNMASK else configs
    with pytest.raises(error) as raised:
        _stage(stage, node_config)
    assert fragment in str(raised.value)


def test_a_setup_at_the_nodes_floor_goes_to_flowers_mod():
    out = _stage(SETUP, {"secagg-min-threshold": 3})
    assert set(out.content.config_records[RECORD_KEY_CONFIGS]) == {
        Key.PUBLIC_KEY_1,
        Key.PUBLIC_KEY_2,
    }
    assert NodePolicy.from_node_config({"secagg-min-threshold": 3}) is not None
