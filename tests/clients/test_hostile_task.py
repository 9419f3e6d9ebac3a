"""A hostile server against the deployed train handler: tasks mutated from a genuine private one.

Every mutated task is either refused, or trains under the node's own policy: noise at least its
floor, clipping at most its bound, delta at most its cap, and the ledger's epsilon (this run's and
over all runs on the data) never above its epsilon. What DP-SGD was really given is recorded by
wrapping the function that runs Opacus (privacy.client_round.train_private).
"""

from __future__ import annotations

import copy
import json
import math
import tempfile

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedpeft.clients import client_app
from fedpeft.clients.client_data import data_fingerprint
from fedpeft.clients.task_guard import TaskRefused
from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.federation import build_task
from fedpeft.privacy import BudgetExhausted, LedgerFile, PolicyViolation, PrivacyLedger
from fedpeft.privacy import client_round as client_round_module
from tests.conftest import FAST_RUN

POLICY = {"dp-epsilon": 1.0, "dp-delta": 1e-5, "dp-max-grad-norm": 1.0, "dp-noise-multiplier": 0.3}
NODE = {"partition-id": 0, "num-partitions": 2}
REFUSED = (TaskRefused, PolicyViolation, BudgetExhausted, ConfigError)
NAN, INF = float("nan"), float("inf")

#: (section, key) -> hostile values
MUTATIONS: dict[tuple[str, str], list] = {
    ("dp", "enabled"): [False, "true", 1, None],
    ("dp", "target_epsilon"): [NAN, INF, -INF, -1.0, 0.0, 1e300, 5.0, "1", True, None, [1.0]],
    ("dp", "delta"): [NAN, INF, 0.0, 1.0, 2.0, -1e-5, 0.5, 1e-3, "x"],
    ("dp", "max_grad_norm"): [NAN, INF, 0.0, -1.0, 100.0, 1e300, None],
    ("dp", "noise_multiplier"): [NAN, INF, 0, 0.0, -1.0, 1e-9, 0.1, 5.0, "2"],
    ("dp", "accountant"): ["gdp", "rdp", "PRV", "", None, 3],
    ("dp", "reproducible"): [True, "false", 1],
    ("dp", "planned_rounds"): [0, -1, 2.5, True, 10**12],
    ("dp", "grad_sample_mode"): ["ew", "ghost", None],
    ("dp", "max_physical_batch_size"): [0, -1, 2.5, 10**12],
    ("train", "batch_size"): [0, -1, 10**9, 2.5, "16", NAN],
    ("train", "max_length"): [0, 10**9, -5],
    ("train", "local_steps"): [10**9, 0, -3, 1.5],
    ("train", "lr"): [NAN, INF, -1.0],
    ("adapter", "rank"): [0, 10**6, -1],
}
DELETABLE = [("dp", k) for k in ("target_epsilon", "delta", "max_grad_norm", "accountant")]
#: values at or inside the policy, which the node must accept (so that the property trains too)
BENIGN: dict[tuple[str, str], list] = {
    ("dp", "noise_multiplier"): [0.3, 0.5, 5.0, None],
    ("dp", "max_grad_norm"): [0.1, 1.0],
    ("dp", "target_epsilon"): [0.25, 1.0],
    ("dp", "grad_sample_mode"): ["ghost", "hooks"],
    ("dp", "planned_rounds"): [1, 10],
    ("dp", "max_physical_batch_size"): [4, None],
    ("dp", "delta"): [1e-6, None],
}


@pytest.fixture(scope="module")
def genuine():
    cfg = compose_config(
        [
            *FAST_RUN,
            "dp=eps3",
            "dp.target_epsilon=1",
            "federation.local_steps=2",
            "train.batch_size=16",
            "federation.rounds=3",
        ]  # fmt: skip
    )
    return build_task(cfg, 2, ["negative", "positive"])


def _send(task_text: str, state_dir: str, run_id: int = 1) -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0
    config = ConfigRecord({"task": task_text, "server-round": 1})
    msg = Message(
        RecordDict({"arrays": ArrayRecord(), "config": config}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    node = {**NODE, **POLICY, "state-dir": state_dir}
    context = Context(run_id=run_id, node_id=5, node_config=node, state=RecordDict(), run_config={})
    return client_app.train(msg, context)


@pytest.fixture
def opacus_calls(monkeypatch):
    """What the node really handed to DP-SGD, call by call."""
    calls = []
    real = client_round_module.train_private

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(client_round_module, "train_private", recording)
    return calls


def _check_what_ran(task: dict, state_dir: str, calls: list) -> None:
    """The round trained: it did so under the node's policy, whatever the task said."""
    assert calls, "an accepted private task must train under DP-SGD"
    for kwargs in calls:
        assert kwargs["noise_multiplier"] >= POLICY["dp-noise-multiplier"]
        assert math.isfinite(kwargs["noise_multiplier"])
        assert 0 < kwargs["max_grad_norm"] <= POLICY["dp-max-grad-norm"]
        assert 0 < kwargs["sample_rate"] <= 1
    store = LedgerFile(state_dir, 1, data_fingerprint(task, NODE))
    saved = store.load()
    assert saved is not None and saved["delta"] <= POLICY["dp-delta"]
    assert saved["noise_multiplier"] > 0 and saved["accountant"] == "prv"
    ledger = PrivacyLedger._load(saved)
    ledger.earlier = ()
    assert ledger.epsilon() <= POLICY["dp-epsilon"] * (1 + 1e-9)
    assert ledger.lifetime_epsilon() <= POLICY["dp-epsilon"] * (1 + 1e-9)


def _field_value(table: dict) -> st.SearchStrategy:
    return st.sampled_from(sorted(table)).flatmap(
        lambda field: st.tuples(st.just(field), st.sampled_from(table[field]))
    )


benign = _field_value(BENIGN)
hostile = st.one_of(
    _field_value(MUTATIONS),
    st.tuples(st.sampled_from(DELETABLE), st.just("<deleted>")),
    st.tuples(
        st.sampled_from([("dp", "secure_mode"), ("dp", "noise"), ("train", "zzz")]), st.just(0)
    ),  # fmt: skip
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutations=st.lists(st.one_of(benign, hostile), min_size=1, max_size=3))
def test_a_mutated_task_is_refused_or_trains_under_the_nodes_policy(
    genuine, opacus_calls, mutations
):
    task = copy.deepcopy(genuine)
    for (section, key), value in mutations:
        if value == "<deleted>":
            task[section].pop(key, None)
        else:
            task[section][key] = value
    state_dir = tempfile.mkdtemp(prefix="fedpeft-hostile-")
    opacus_calls.clear()
    try:
        _send(json.dumps(task), state_dir)  # NaN and inf are written as JSON's NaN, Infinity
    except REFUSED as exc:
        event(f"refused: {type(exc).__name__}")
        assert not opacus_calls, "a refused task must not have trained"
        return
    event("trained")
    _check_what_ran(task, state_dir, opacus_calls)


def test_the_genuine_task_and_stricter_ones_train(genuine, opacus_calls, tmp_path):
    for i, changes in enumerate(
        [{}, {"noise_multiplier": 5.0}, {"grad_sample_mode": "ghost"}, {"max_grad_norm": 0.5}]
    ):
        task = copy.deepcopy(genuine)
        task["dp"].update(changes)
        state_dir = str(tmp_path / str(i))
        opacus_calls.clear()
        reply = _send(json.dumps(task), state_dir)
        assert reply.content.metric_records["metrics"]["dp-steps"] == 2
        _check_what_ran(task, state_dir, opacus_calls)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"dp": {"target_epsilon": NaN}}', "JSON constant NaN"),
        ('{"dp": {"noise_multiplier": -Infinity}}', "JSON constant -Infinity"),
        ('{"seed": 1, "seed": 2}', r"repeats key\(s\) seed"),
        ("[1, 2]", "must be a JSON object, got list"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_task_json_is_refused_before_anything_reads_it(tmp_path, text, message):
    with pytest.raises(TaskRefused, match=message):
        _send(text, str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_the_nan_attack_of_issue_26_is_refused(genuine, opacus_calls, tmp_path):
    """Node policy dp-epsilon=1; task target_epsilon NaN, noise multiplier 0: before the fix this
    trained 2 x 200 steps without noise and wrote NaN into the ledger."""
    task = copy.deepcopy(genuine)
    task["dp"].update({"target_epsilon": NAN, "noise_multiplier": 0})
    with pytest.raises(TaskRefused, match="JSON constant NaN"):
        _send(json.dumps(task), str(tmp_path))
    task["dp"]["target_epsilon"] = 1.0  # the noise alone
    with pytest.raises(TaskRefused, match="0 would be no noise at all"):
        _send(json.dumps(task), str(tmp_path))
    assert not opacus_calls and not any(tmp_path.iterdir())


def test_a_gdp_accountant_is_refused_and_the_node_counts_with_its_own(genuine, tmp_path):
    """Opacus' gdp accountant underestimates epsilon: a task asking for it never runs."""
    task = copy.deepcopy(genuine)
    task["dp"]["accountant"] = "gdp"
    with pytest.raises(TaskRefused, match="dp.accountant=gdp must be one of prv, rdp"):
        _send(json.dumps(task), str(tmp_path))
    task["dp"]["accountant"] = "rdp"  # a real accountant, but not this node's (prv by default)
    with pytest.raises(PolicyViolation, match="dp-accountant=prv refuses"):
        _send(json.dumps(task), str(tmp_path))
