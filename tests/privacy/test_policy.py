"""A node's privacy policy against the task, field by field: stricter accepted, weaker refused."""

import pytest

from fedpeft.errors import ConfigError
from fedpeft.privacy import DPSettings, NodePolicy, PolicyViolation, default_state_dir

TASK = DPSettings(enabled=True, target_epsilon=3.0, delta=1e-6, max_grad_norm=1.0)
POLICY = NodePolicy.from_node_config(
    {"dp-epsilon": 3, "dp-delta": 1e-6, "dp-max-grad-norm": 1.0, "dp-noise-multiplier": 0.5}
)


def _with(**changes) -> DPSettings:
    return DPSettings(**{**TASK.__dict__, **changes})


def test_the_node_config_is_parsed_and_a_cap_on_epsilon_implies_dp():
    assert POLICY.required and POLICY.epsilon == 3.0 and POLICY.delta == 1e-6
    assert POLICY.max_grad_norm == 1.0 and POLICY.noise_multiplier == 0.5
    assert not POLICY.allow_reproducible  # never from a node config
    assert NodePolicy.from_node_config({"state-dir": "/var/x"}).state_dir.as_posix() == "/var/x"


def test_the_default_state_dir_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDPEFT_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == tmp_path / "fedpeft"
    monkeypatch.setenv("FEDPEFT_STATE_DIR", str(tmp_path / "mine"))
    assert NodePolicy.from_node_config({}).state_dir == tmp_path / "mine"


@pytest.mark.parametrize(
    "stricter",
    [
        {},
        {"target_epsilon": 1.0},
        {"delta": 1e-8},
        {"max_grad_norm": 0.5},
        {"noise_multiplier": 2.0},
    ],
)
def test_an_equal_or_stricter_task_is_accepted(stricter):
    POLICY.check(_with(**stricter), has_ledger=False)


@pytest.mark.parametrize(
    ("weaker", "message"),
    [
        ({"enabled": False}, "node policy dp-epsilon=3 refuses a task with dp.enabled=false"),
        ({"target_epsilon": 3.5}, "dp-epsilon=3 refuses the task's dp.target_epsilon=3.5"),
        ({"delta": 1e-5}, "dp-delta=1e-06 refuses the task's dp.delta=1e-05"),
        ({"max_grad_norm": 2.0}, "dp-max-grad-norm=1 refuses the task's dp.max_grad_norm=2"),
        ({"noise_multiplier": 0.3}, "dp-noise-multiplier=0.5 refuses dp.noise_multiplier=0.3"),
        ({"reproducible": True}, "this node refuses dp.reproducible=true"),
        ({"accountant": "rdp"}, "dp-accountant=prv refuses the task's dp.accountant=rdp"),
        ({"target_epsilon": float("nan")}, "dp.target_epsilon=nan: it must be a finite number"),
        ({"delta": float("nan")}, "dp.delta=nan: it must be a finite number"),
        ({"max_grad_norm": float("inf")}, "dp.max_grad_norm=inf: it must be a finite number"),
        ({"noise_multiplier": 0.0}, "dp.noise_multiplier=0.0: noise must be above 0"),
        ({"noise_multiplier": float("nan")}, "dp.noise_multiplier=nan: noise must be above 0"),
    ],
)
def test_a_weaker_task_is_refused_naming_the_field_and_its_value(weaker, message):
    with pytest.raises(PolicyViolation, match=message.replace(".", r"\.")):
        POLICY.check(_with(**weaker), has_ledger=False)


def test_without_a_policy_a_node_still_refuses_seeded_noise_and_dropping_dp_mid_run():
    open_policy = NodePolicy.from_node_config({})
    open_policy.check(DPSettings(enabled=False), has_ledger=False)
    open_policy.check(TASK, has_ledger=True)
    with pytest.raises(PolicyViolation, match="already spent privacy budget in this run"):
        open_policy.check(DPSettings(enabled=False), has_ledger=True)
    with pytest.raises(PolicyViolation, match="reproducible"):
        open_policy.check(_with(reproducible=True), has_ledger=False)
    required = NodePolicy(required=True)
    with pytest.raises(PolicyViolation, match="node policy dp-required=true refuses"):
        required.check(DPSettings(enabled=False), has_ledger=False)


def test_the_node_fixes_its_accountant_and_a_policy_without_epsilon_is_refused():
    rdp = NodePolicy.from_node_config({"dp-epsilon": 3, "dp-accountant": "rdp"})
    rdp.check(_with(accountant="rdp"), has_ledger=False)
    with pytest.raises(PolicyViolation, match="dp-accountant=rdp refuses the task's dp.accountant"):
        rdp.check(_with(accountant="prv"), has_ledger=False)
    with pytest.raises(ConfigError, match="dp-required=true without dp-epsilon sets no limit"):
        NodePolicy.from_node_config({"dp-required": True})
    assert POLICY.lifetime_epsilon == 3.0  # by default one run's cap is the lifetime cap
    both = NodePolicy.from_node_config({"dp-epsilon": 3, "dp-lifetime-epsilon": 9})
    assert both.epsilon == 3.0 and both.lifetime_epsilon == 9.0 and both.deployed


def test_a_simulated_node_holds_the_runs_own_dp_group(tmp_path):
    dp = {"enabled": True, "target_epsilon": 3.0, "delta": None, "max_grad_norm": 1.0,
          "noise_multiplier": None, "reproducible": True}  # fmt: skip
    policy = NodePolicy.for_simulation(dp, tmp_path)
    assert policy.required and policy.allow_reproducible and policy.state_dir == tmp_path
    policy.check(DPSettings(**dp), has_ledger=False)
    with pytest.raises(PolicyViolation):
        policy.check(DPSettings(enabled=False), has_ledger=False)
    assert not NodePolicy.for_simulation({"enabled": False}, tmp_path).required


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"dp-required": "yes"}, "dp-required='yes' must be true or false"),
        ({"dp-epsilon": -1}, "dp-epsilon=-1 must be a number above 0"),
        ({"dp-epsilon": True}, "dp-epsilon=True must be a number"),
        ({"dp-delta": 1.5}, r"dp-delta=1.5 must be a number above 0 and below 1"),
        ({"dp-max-grad-norm": "big"}, "dp-max-grad-norm='big'"),
        ({"state-dir": 3}, "state-dir=3 must be a directory path"),
        ({"dp-epsilon": float("nan")}, "dp-epsilon=nan must be a number above 0"),
        ({"dp-accountant": "gdp"}, "dp-accountant='gdp' is unknown: choose one of prv, rdp"),
        ({"dp-lifetime-epsilon": 9}, "dp-lifetime-epsilon needs dp-epsilon"),
        ({"dp-epsilon": 3, "dp-lifetime-epsilon": 1}, "dp-lifetime-epsilon=1 is below dp-epsilon"),
    ],
)
def test_a_bad_node_config_is_a_clear_error(config, message):
    with pytest.raises(ConfigError, match=message):
        NodePolicy.from_node_config(config)
