"""The dp config group: defaults, validation errors that name the fix, refused adapters."""

import re

import pytest

from fedpeft.config import compose_config
from fedpeft.errors import ConfigError
from fedpeft.federation import prepare
from fedpeft.privacy import DPSettings, default_delta
from tests.conftest import FAST_RUN


@pytest.mark.parametrize(
    ("n", "delta"), [(3368, 1e-5), (100_000, 1e-5), (250_000, 1e-6), (2_000_000, 1e-7)]
)
def test_default_delta_is_below_one_over_n_and_at_most_1e_5(n, delta):
    assert default_delta(n) == pytest.approx(delta)
    assert default_delta(n) < 1 / n or n == 100_000


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dp=custom"], "dp.target_epsilon must be set"),
        (
            ["dp=eps3", "dp.target_epsilon=0"],
            "dp.target_epsilon=0 must be a finite number in (0, 100]",
        ),
        (["dp=eps3", "dp.target_epsilon=nan"], "dp.target_epsilon=nan must be a finite number"),
        (["dp=eps3", "dp.target_epsilon=inf"], "dp.target_epsilon=inf must be a finite number"),
        (["dp=eps3", "dp.target_epsilon=1e9"], "dp.target_epsilon=1000000000.0 must be a finite"),
        (["dp=eps3", "dp.delta=2"], "dp.delta=2 must be a finite number in (0, 1)"),
        (["dp=eps3", "dp.delta=nan"], "dp.delta=nan must be a finite number in (0, 1)"),
        (["dp=eps3", "dp.max_grad_norm=-1"], "dp.max_grad_norm=-1 must be a finite number in (0,"),
        (["dp=eps3", "dp.noise_multiplier=-0.5"], "dp.noise_multiplier=-0.5 must be a finite"),
        (["dp=eps3", "dp.noise_multiplier=0"], "0 would be no noise at all"),
        (["dp=eps3", "dp.accountant=gdp"], "dp.accountant=gdp must be one of prv, rdp"),
        (
            ["dp=eps3", "dp.grad_sample_mode=ew"],
            "dp.grad_sample_mode=ew must be one of hooks, ghost",
        ),
        (["dp=eps3", "dp.max_physical_batch_size=0"], "dp.max_physical_batch_size=0"),
        (["dp=eps3", "dp.planned_rounds=0"], "dp.planned_rounds=0 must be an integer"),
        (["dp=eps3", "+dp.secure=false"], "dp has unknown key(s) secure"),
        (["dp=eps9"], "dp=eps9 is unknown: choose one of custom, eps1, eps3, eps6, off"),
    ],
)
def test_bad_dp_values_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config(overrides)


def test_named_budgets_compose_to_their_epsilon():
    for name, eps in (("eps1", 1), ("eps3", 3), ("eps6", 6)):
        dp = compose_config([f"dp={name}"]).dp
        assert dp.enabled and dp.target_epsilon == eps and dp.accountant == "prv"
    assert compose_config([]).dp.enabled is False
    assert DPSettings.from_task({}).enabled is False


def test_task_carries_the_planned_rounds(data_dir):
    from fedpeft.federation import build_task

    cfg = compose_config(["dp=eps3", "federation.rounds=10", "federation.fraction=0.5",
                          "federation.num_clients=6"])  # fmt: skip
    settings = DPSettings.from_task(build_task(cfg, 2))
    assert settings.enabled and settings.planned_rounds == 5 and settings.target_epsilon == 3
    cfg = compose_config(["dp=eps3", "dp.planned_rounds=10"])
    assert DPSettings.from_task(build_task(cfg, 2)).planned_rounds == 10


def test_lora_on_embeddings_is_refused_under_dp(data_dir):
    cfg = compose_config([*FAST_RUN, "dp=eps3", "adapter.target_modules=[word_embeddings,query]"])
    with pytest.raises(ConfigError, match="Embedding module .*word_embeddings.* not supported"):
        prepare(cfg)


def test_a_private_run_cannot_be_resumed(tmp_path):
    with pytest.raises(ConfigError, match="cannot continue a DP run"):
        compose_config(["dp=eps3", f"resume={tmp_path}"])
